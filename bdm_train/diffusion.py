"""Blurring diffusion as a Gaussian diffusion that is diagonal in the DCT basis (B2-B8).

Every frequency has its own ``alpha_t`` (cosine noise schedule times heat dissipation); all share
one ``sigma_t``. With ``blur_sigma_max = 0`` the blur is the identity and this is the DDPM/VDM
baseline with the same cosine schedule, through the same code.
Equation labels refer to ``docs/maths.md``.
"""
import math

import torch
from torch import nn

from bdm_runtime.errors import BdmError

from .dct import dct2, dct_matrix, idct2


def _hw(image_size):
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def frequencies(h, w, dtype=torch.float32):
    """``lambda[k, l] = (pi k / H)^2 + (pi l / W)^2`` (B2), shape ``[H, W]``."""
    k = torch.arange(h, dtype=torch.float64)
    l = torch.arange(w, dtype=torch.float64)
    lam = (math.pi * k / h)[:, None] ** 2 + (math.pi * l / w)[None, :] ** 2
    return lam.to(dtype)


class BlurringDiffusion(nn.Module):
    """The forward process ``q(u_t | x) = N(alpha_t * u_x, sigma_t^2 I)`` in DCT space (B5).

    A module only so that its constant matrices follow ``.to(device)``; it has no parameters.
    """

    def __init__(self, image_size, blur_sigma_max=20.0, min_scale=0.001, logsnr_min=-10.0, logsnr_max=10.0):
        super().__init__()
        h, w = _hw(image_size)
        if h < 1 or w < 1:
            raise BdmError(f"image_size must be positive, got {image_size!r}")
        if blur_sigma_max < 0 or not 0 < min_scale <= 1 or not logsnr_min < logsnr_max:
            raise BdmError("need blur_sigma_max >= 0, 0 < min_scale <= 1 and logsnr_min < logsnr_max")
        self.image_size = (h, w)
        self.blur_sigma_max = float(blur_sigma_max)
        self.min_scale = float(min_scale)
        self.logsnr_min = float(logsnr_min)
        self.logsnr_max = float(logsnr_max)
        self.register_buffer("c_h", dct_matrix(h), persistent=False)
        self.register_buffer("c_w", dct_matrix(w), persistent=False)
        self.register_buffer("freqs", frequencies(h, w), persistent=False)

    def config(self):
        """All constructor arguments as plain types (travels in checkpoints and exported metadata)."""
        return dict(image_size=list(self.image_size), blur_sigma_max=self.blur_sigma_max,
                    min_scale=self.min_scale, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)

    def _apply(self, fn, *args, **kwargs):
        """Move/cast as usual; on a dtype change, rebuild the constants from float64 in the new dtype.

        Casting the float32 buffers would leave ``.double()`` only float32-accurate (~1e-7).
        """
        dtype = self.c_h.dtype
        super()._apply(fn, *args, **kwargs)
        if self.c_h.dtype == dtype:
            return self
        h, w = self.image_size
        self.c_h = dct_matrix(h, self.c_h.dtype, self.c_h.device)
        self.c_w = dct_matrix(w, self.c_w.dtype, self.c_w.device)
        self.freqs = frequencies(h, w, self.freqs.dtype).to(self.freqs.device)
        return self

    @classmethod
    def from_config(cls, cfg):
        cfg = dict(cfg)
        return cls(tuple(cfg.pop("image_size")), **cfg)

    # -- DCT (B1) -----------------------------------------------------------------------------
    def dct(self, x):
        """``u = V^T x`` over the last two dims (B1)."""
        return dct2(x, self.c_h, self.c_w)

    def idct(self, u):
        """``x = V u`` over the last two dims (B1)."""
        return idct2(u, self.c_h, self.c_w)

    # -- schedule (B3, B4) --------------------------------------------------------------------
    def logsnr(self, t):
        """Truncated cosine log-SNR (B3)."""
        c0 = math.atan(math.exp(-self.logsnr_max / 2))
        c1 = math.atan(math.exp(-self.logsnr_min / 2)) - c0
        return -2.0 * torch.log(torch.tan(c1 * t + c0))

    def blur_scale(self, t):
        """Per-frequency damping ``d_t = (1 - d_min) exp(-lambda tau_t) + d_min``, ``[B, 1, H, W]`` (B4)."""
        sigma_blur = self.blur_sigma_max * torch.sin(t * math.pi / 2) ** 2
        tau = (sigma_blur ** 2 / 2)[:, None, None, None]
        return (1 - self.min_scale) * torch.exp(-self.freqs * tau) + self.min_scale

    def alpha_sigma(self, t):
        """``(alpha_t [B,1,H,W], sigma_t [B,1,1,1])``: ``alpha_t = a_t d_t`` per frequency (B3, B4)."""
        t = t.to(self.freqs.dtype)
        logsnr = self.logsnr(t)[:, None, None, None]
        a = torch.sigmoid(logsnr).sqrt()
        sigma = torch.sigmoid(-logsnr).sqrt()
        return a * self.blur_scale(t), sigma

    # -- forward process and loss (B5, B8) ----------------------------------------------------
    def q_sample(self, x, t, eps):
        """``z_t = V (alpha_t * V^T x) + sigma_t * eps`` in pixel space (B5)."""
        alpha, sigma = self.alpha_sigma(t)
        return self.idct(alpha * self.dct(x)) + sigma * eps

    def loss(self, model, x, labels=None, t=None, eps=None):
        """Unweighted epsilon loss ``E || eps - f(z_t, t) ||^2`` with ``t ~ U(0, 1)`` (B8).

        ``t`` / ``eps`` are drawn from the global RNG when not given (training passes its own draws).
        The mean is over this batch: under DDP, the rank's slice.
        """
        if t is None:
            t = torch.rand(x.shape[0], device=x.device)
        if eps is None:
            eps = torch.randn_like(x)
        z = self.q_sample(x, t, eps)  # B5, in float32 (outside any autocast of the model)
        return torch.mean((eps - model(z, t, labels).float()) ** 2)
