"""A closed-form denoiser: the exact eps prediction for data that is a uniform mixture of K images.

With ``x`` uniform over fixed images ``x_k``, ``q(k | u_t) ~ exp(-||u_t - alpha_t u_k||^2 / 2 sigma_t^2)``
(B5, frequency space, where the noise is white), ``E[u_x | u_t] = sum_k q(k | u_t) u_k`` and the
optimal eps is ``(u_t - alpha_t E[u_x | u_t]) / sigma_t`` (B8). It plugs in wherever a trained
network does (``sample``, the loss, the exporter), so the sampler maths is tested without training.
"""
import torch
from torch import nn


class MixtureDenoiser(nn.Module):
    """Exact ``eps(z_t, t)`` for the uniform mixture of ``images`` ``[K, C, H, W]`` under ``process``."""

    def __init__(self, images, process):
        super().__init__()
        self.process = process
        self.in_channels = images.shape[1]
        self.num_classes = 0
        self.register_buffer("u_k", process.dct(images.float()))

    def forward(self, z, t, labels=None):
        alpha, sigma = self.process.alpha_sigma(t)
        u_t = self.process.dct(z)
        diff = u_t[:, None] - alpha[:, None] * self.u_k[None]            # [B, K, C, H, W]
        logw = -(diff ** 2).sum(dim=(2, 3, 4)) / (2 * sigma.reshape(-1, 1) ** 2)
        w = torch.softmax(logw, dim=1)[:, :, None, None, None]
        u_x = (w * self.u_k[None]).sum(dim=1)                           # E[u_x | u_t]
        return self.process.idct((u_t - alpha * u_x) / sigma)           # B8
