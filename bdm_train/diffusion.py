"""Blurring diffusion as a Gaussian diffusion that is diagonal in the DCT basis (B2-B8, B14).

Every frequency has its own ``alpha_t`` (cosine noise schedule times heat dissipation); all share
one ``sigma_t``. With ``blur_sigma_max = 0`` the blur is the identity and this is the DDPM/VDM
baseline with the same cosine schedule, through the same code.

How a network's output is read is the model's *parameterisation* (``PARAMS``), declared by the
model's attribute ``param``: ``"eps"`` (B8; the default when absent, i.e. every model before B14)
or ``"spectral"`` (B14: EDM's preconditioning per frequency, with the model's buffers
``data_mean`` and ``data_std``, ``[C, H, W]`` in DCT space). ``read_output`` is the one place that
turns an output into ``(u_x_hat, u_eps)`` and ``target`` the one place that says what it is
trained to be; the loss, the torch samplers and the exported step graph all go through them.
Equation labels refer to ``docs/maths.md``.
"""
import math

import torch
from torch import nn

from bdm_runtime.errors import BdmError
from bdm_runtime.format import PARAMS

from .dct import dct2, dct_matrix, idct2


def param_of(model):
    """The parameterisation ``model`` declares (``model.param``; ``"eps"`` when absent)."""
    param = getattr(model, "param", "eps")
    if param not in PARAMS:
        raise ValueError(f"unknown parameterisation {param!r}; known: {', '.join(PARAMS)}")
    return param


def data_statistics(images, process, std_floor=1e-3):
    """Per-channel, per-frequency mean and std of ``images`` ``[N, C, H, W]`` in DCT space (B14).

    Computed in float64 and returned float32 ``[C, H, W]``. The std is floored at ``std_floor``
    times its maximum: a frequency with (nearly) no variance in the data would otherwise make
    ``c_out`` vanish, and the training target divides by it.
    """
    h, w = process.image_size
    x = torch.as_tensor(images, dtype=torch.float64)
    u = dct2(x, dct_matrix(h, torch.float64), dct_matrix(w, torch.float64))
    mean = u.mean(dim=0)
    std = u.std(dim=0, unbiased=False)
    std = std.clamp(min=std_floor * float(std.max()))
    return mean.float(), std.float()


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

    # -- forward process (B5) -----------------------------------------------------------------
    def q_sample(self, x, t, eps):
        """``z_t = V (alpha_t * V^T x) + sigma_t * eps`` in pixel space (B5)."""
        alpha, sigma = self.alpha_sigma(t)
        return self.idct(alpha * self.dct(x)) + sigma * eps

    # -- parameterisations (B8, B14) -----------------------------------------------------------
    @staticmethod
    def preconditioning(alpha, sigma, data_std):
        """``(c_skip, c_out)`` per frequency (B14): with ``v = alpha^2 s^2 + sigma^2``,
        ``c_skip = alpha s^2 / v`` (the Wiener filter's gain) and ``c_out = sigma s / sqrt(v)``."""
        v = alpha ** 2 * data_std ** 2 + sigma ** 2
        return alpha * data_std ** 2 / v, sigma * data_std / v.sqrt()

    def read_output(self, model, out, u_t, alpha, sigma):
        """``(u_x_hat, u_eps)`` from the network output ``out`` (pixel space) at ``u_t = V^T z_t``.

        ``model`` declares the parameterisation (``param_of``). eps (B8): ``u_eps = V^T out`` and
        ``u_x_hat = (u_t - sigma u_eps) / alpha``, which divides the network's error by ``alpha``.
        spectral (B14): ``u_x_hat = m + c_skip (u_t - alpha m) + c_out V^T out`` and
        ``u_eps = (u_t - alpha u_x_hat) / sigma``; nothing divides by ``alpha``.
        """
        f = self.dct(out)
        if param_of(model) == "eps":
            return (u_t - sigma * f) / alpha, f                              # B8
        m, s = model.data_mean, model.data_std
        c_skip, c_out = self.preconditioning(alpha, sigma, s)
        u_x = m + c_skip * (u_t - alpha * m) + c_out * f                     # B14
        return u_x, (u_t - alpha * u_x) / sigma                              # B14

    def target(self, model, x, z, eps, alpha, sigma):
        """What the network is trained to output at ``z_t`` (pixel space): ``eps`` (B8), or B14's
        unit-variance ``V F_target`` with ``F_target = (u_x - m - c_skip (u_t - alpha m)) / c_out``."""
        if param_of(model) == "eps":
            return eps                                                       # B8
        m, s = model.data_mean, model.data_std
        c_skip, c_out = self.preconditioning(alpha, sigma, s)
        return self.idct((self.dct(x) - m - c_skip * (self.dct(z) - alpha * m)) / c_out)  # B14

    def loss(self, model, x, labels=None, t=None, eps=None, spec=None):
        """``E || target - f(z_t, t) ||^2`` with ``t ~ U(0, 1)``, unweighted in the network's own
        units: eps (B8) or B14's spectral target (EDM's weight ``1 / c_out^2``, per frequency).

        ``spec`` declares the parameterisation (default: ``model``; training passes the bare
        network when ``model`` is a wrapper such as DDP or an autocast closure). ``t`` / ``eps``
        are drawn from the global RNG when not given (training passes its own draws). The mean is
        over this batch: under DDP, the rank's slice.
        """
        spec = model if spec is None else spec
        if t is None:
            t = torch.rand(x.shape[0], device=x.device)
        if eps is None:
            eps = torch.randn_like(x)
        z = self.q_sample(x, t, eps)  # B5, in float32 (outside any autocast of the model)
        alpha, sigma = self.alpha_sigma(t)
        return torch.mean((self.target(spec, x, z, eps, alpha, sigma) - model(z, t, labels).float()) ** 2)
