"""Samplers for blurring diffusion: the step (DDIM-eta B10, DPM-Solver++(2M) B11, its SDE form B16) and the loop.

``step`` is the unit that is also exported as the ONNX step graph (``export``): the runtime loop
only feeds it tensors. A model is anything callable as ``model(z, t, labels=None)`` returning its
output in pixel space; how that output is read is its parameterisation (``param``: eps, B8, by
default; ``spectral``, B14, with ``data_mean``/``data_std``), applied by ``denoise`` alone: the
solvers take ``u_x_hat`` and ``u_eps`` from it only. Time grids and the solvers' history rule
come from ``bdm_runtime.grids`` (numpy, shared with the runtime), so both step through the same times.
"""
from collections import namedtuple

import torch

from bdm_runtime.grids import previous_times, resolve, solver_eta
from bdm_runtime.labels import normalize_labels
from bdm_runtime.noise import NoiseStream, check_positive_int

Denoised = namedtuple("Denoised", "u_t u_x_hat u_eps alpha sigma x0")
Denoised.__doc__ = """What every solver needs at ``(z_t, t)``, in frequency space (B1).

``u_t = V^T z_t``; ``u_x_hat``, ``u_eps`` the data and noise predictions (consistent:
``u_t = alpha u_x_hat + sigma u_eps``); ``alpha`` ``[B,1,H,W]`` and ``sigma`` ``[B,1,1,1]`` of
``t`` (B3, B4); ``x0`` the denoised estimate in pixels, clipped to ``[-1, 1]`` (the image at the
last step)."""


def denoise(model_fn, process, z, t, spec=None):
    """The network at ``z_t`` read through its parameterisation (B8 or B14):
    ``(u_t, u_x_hat, u_eps, alpha_t, sigma_t)``, all in frequency space.

    ``model_fn(z, t)`` gives the raw output (labels and guidance already bound); ``spec`` is the
    object that declares the parameterisation (``param``, ``data_mean``, ``data_std``): the model
    itself, which is also the default.
    """
    alpha_t, sigma_t = process.alpha_sigma(t)
    u_t = process.dct(z)
    u_x, u_eps = process.read_output(model_fn if spec is None else spec, model_fn(z, t), u_t, alpha_t, sigma_t)
    return u_t, u_x, u_eps, alpha_t, sigma_t


def prediction(model_fn, process, z, t, clip_denoised=False, spec=None):
    """:class:`Denoised` at ``(z, t)`` from ``denoise``; with ``clip_denoised`` ``x_hat`` is clipped.

    Clipping ``x_hat`` to ``[-1, 1]`` recomputes ``u_eps`` from it (B10), so the pair stays
    consistent (``u_t = alpha u_x_hat + sigma u_eps``) for every solver.
    """
    u_t, u_x, u_eps, alpha_t, sigma_t = denoise(model_fn, process, z, t, spec)   # B8 / B14
    x0 = process.idct(u_x).clamp(-1.0, 1.0)
    if clip_denoised:
        u_x = process.dct(x0)
        u_eps = (u_t - alpha_t * u_x) / sigma_t                         # B10, eps from clipped x
    return Denoised(u_t, u_x, u_eps, alpha_t, sigma_t, x0)


def posterior_variance(alpha_t, sigma_t, alpha_s, sigma_s):
    """``sigma_{t->s}^2`` of the denoising posterior, per frequency (B6, B7)."""
    alpha_ts = alpha_t / alpha_s                                        # B6
    sigma2_ts = (sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2).clamp(min=0)  # B6
    # B7: 1 / (1/sigma_s^2 + alpha_ts^2/sigma2_ts) = sigma_s^2 sigma2_ts / sigma_t^2, since
    # sigma2_ts + alpha_ts^2 sigma_s^2 = sigma_t^2; this form has no 0/0 when sigma2_ts = 0.
    return sigma_s ** 2 * sigma2_ts / sigma_t ** 2


def half_logsnr(alpha, sigma):
    """``ell = log(alpha / sigma)`` per frequency (B11; half that frequency's log-SNR)."""
    return torch.log(alpha) - torch.log(sigma)


def extrapolation(process, d, t, t_prev, alpha_s, sigma_s, u_x_prev):
    """``D - u_x_hat`` of DPM-Solver++(2M) (B11), per frequency; exactly 0 where ``t_prev <= t``.

    ``h = ell_s - ell_t``, ``h_prev = ell_t - ell_prev``, ``r = h_prev / h`` and
    ``D = (1 + 1/(2r)) u_x_hat - 1/(2r) u_x_prev``, i.e. ``D - u_x_hat = (h / (2 h_prev)) (u_x_hat - u_x_prev)``.
    ``t_prev <= t`` (no previous step) selects the first-order step; ``u_x_prev`` is then never read.
    """
    alpha_p, sigma_p = process.alpha_sigma(t_prev)
    ell_t = half_logsnr(d.alpha, d.sigma)
    h = half_logsnr(alpha_s, sigma_s) - ell_t
    second = (t_prev > t)[:, None, None, None]
    # Scalar fallbacks (not ones_like/zeros_like): the exported graph keeps its static shapes.
    h_prev = torch.where(second, ell_t - half_logsnr(alpha_p, sigma_p), 1.0)    # no 0/0 without history
    return torch.where(second, h / (2 * h_prev) * (d.u_x_hat - u_x_prev), 0.0)


def update(d, alpha_s, sigma_s, eta, noise=None, delta=None):
    """``u_s`` from :class:`Denoised` ``d``: DDIM-eta (B10) on the data prediction ``D = u_x_hat + delta``.

    ``delta = None`` (or 0): B10, ``u_s = alpha_s u_x_hat + sqrt(sigma_s^2 - c^2) u_eps + c xi``.
    With B11's ``delta`` and ``eta = 0`` it is DPM-Solver++(2M), ``u_s = (sigma_s/sigma_t) u_t -
    alpha_s (exp(-h) - 1) D``, since ``alpha_s exp(-h) = alpha_t sigma_s / sigma_t`` and the eps
    that goes with ``D`` is ``(u_t - alpha_t D) / sigma_t = u_eps - (alpha_t / sigma_t) delta``.
    With ``delta`` and ``eta = 1`` it is SDE-DPM-Solver++(2M) (B16): ``c = sigma_s sqrt(1 - exp(-2h))``
    and ``u_s = (sigma_s/sigma_t) exp(-h) u_t + alpha_s (1 - exp(-2h)) D + c xi``.
    """
    u_x, u_eps = d.u_x_hat, d.u_eps
    if delta is not None:
        u_x = u_x + delta
        u_eps = u_eps - (d.alpha / d.sigma) * delta
    c = eta * posterior_variance(d.alpha, d.sigma, alpha_s, sigma_s).sqrt()   # B10
    u_s = alpha_s * u_x + (sigma_s ** 2 - c ** 2).clamp(min=0).sqrt() * u_eps
    return u_s if noise is None else u_s + c * noise


def step(model, process, z, t, s, eta, noise, t_prev=None, u_x_prev=None, clip_denoised=True, spec=None):
    """One step ``z_t -> z_s`` of every solver; returns ``(z_s, x0, u_x_hat)``.

    First order (DDIM-eta, B10) where ``t_prev`` is ``None`` or ``<= t``; else the second-order
    multistep update of B11 from the previous step's ``t_prev`` and ``u_x_hat`` (``u_x_prev``,
    frequency space): deterministic at ``eta = 0``, SDE-DPM-Solver++(2M) at ``eta = 1`` (B16).
    ``noise`` is ``xi`` in frequency space (``None``: eta = 0).
    The returned ``u_x_hat`` is the next step's ``u_x_prev``; ``x0`` the clipped denoised estimate.
    ``spec`` declares the parameterisation (see ``denoise``).
    """
    d = prediction(model, process, z, t, clip_denoised, spec)
    alpha_s, sigma_s = process.alpha_sigma(s)
    delta = None
    if t_prev is not None:
        delta = extrapolation(process, d, t, t_prev, alpha_s, sigma_s, u_x_prev)   # B11
    u_s = update(d, alpha_s, sigma_s, eta, noise, delta)
    return process.idct(u_s), d.x0, d.u_x_hat


def ddim_step(model_fn, process, z, t, s, eta, noise, clip_denoised=True, spec=None):
    """One step ``z_t -> z_s`` of DDIM-eta per frequency (B10); returns ``(z_s, x0)``.

    ``eta = 1`` is the paper's ancestral sampler (B9), ``eta = 0`` the deterministic one.
    ``noise`` is ``xi`` in frequency space. ``x0`` is the denoised estimate clipped to ``[-1, 1]``.
    ``spec`` declares the parameterisation (see ``denoise``).
    """
    z_s, x0, _ = step(model_fn, process, z, t, s, eta, noise, clip_denoised=clip_denoised, spec=spec)
    return z_s, x0


def dpmpp2m_step(model_fn, process, z, t, s, t_prev, u_x_prev, clip_denoised=True, spec=None):
    """One DPM-Solver++(2M) step (B11, deterministic); returns ``(z_s, x0, u_x_hat)``.

    ``t_prev = None`` (the first step) is the first-order step, equal to B10 with ``eta = 0``.
    """
    return step(model_fn, process, z, t, s, 0.0, None, t_prev, u_x_prev, clip_denoised, spec)


def solve(model, process, z, times, solver="ddim", eta=0.0, draw=None, clip_denoised=True, on_step=None,
          spec=None):
    """Step the latents ``z`` through ``times`` (1 .. 0) with ``solver``; returns ``(z, x0)`` of the last step.

    ``draw()`` gives the next ``xi`` (frequency space) when ``eta > 0``. ``x0`` of the last step
    is the sample (B9); ``z`` is the solver's state at ``times[-1]``. ``spec`` declares the
    parameterisation (default: ``model``).
    """
    t_prev = previous_times(times, solver)
    b = z.shape[0]
    u_x = x0 = None
    for i in range(len(times) - 1):
        xi = draw() if eta > 0 else torch.zeros_like(z)
        t = torch.full((b,), float(times[i]), device=z.device)
        s = torch.full((b,), float(times[i + 1]), device=z.device)
        tp = torch.full((b,), float(t_prev[i]), device=z.device) if t_prev[i] > times[i] else None
        z, x0, u_x = step(model, process, z, t, s, eta, xi, tp, u_x if tp is not None else None, clip_denoised, spec)
        if on_step is not None:
            on_step()
    return z, x0


def guided(model, labels, guidance, null_label):
    """Classifier-free guidance: ``eps = (1 + w) eps(z, t, c) - w eps(z, t, null)`` (B12).

    The conditional and null branch run as one doubled batch (as in the exported graph).
    """

    def eps_model(z, t):
        null = torch.full_like(labels, null_label)
        eps = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([labels, null]))
        eps_c, eps_u = eps.chunk(2)
        return (1 + guidance) * eps_c - guidance * eps_u

    return eps_model


def conditioned(model, labels):
    """The model with its labels bound: ``eps_model(z, t)``."""
    return lambda z, t: model(z, t, labels)


def _labels(labels, n, num_classes, device):
    """``bdm_runtime.labels.normalize_labels`` as a long tensor on ``device`` (``None`` if unconditional)."""
    if torch.is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    labels = normalize_labels(labels, n, num_classes)
    return None if labels is None else torch.from_numpy(labels).to(device)


@torch.no_grad()
def sample(model, process, n, seed, steps=None, eta=None, labels=None, guidance=0.0, first_index=0,
           clip_denoised=True, batch_size=None, channels=None, num_classes=None, device=None,
           progress=False, solver="ddim", grid="uniform"):
    """Draw ``n`` images with the noise protocol of ``bdm_runtime.noise``: float ``[n, C, H, W]`` in ``[-1, 1]``.

    ``solver``: ``"ddim"`` (B10; ``eta`` default 1, the paper's ancestral sampler) or
    ``"dpmpp2m"`` (``eta`` default 0: B11, deterministic; ``eta = 1``: SDE-DPM-Solver++(2M), B16).
    ``grid``: a name of ``bdm_runtime.grids.GRIDS`` with ``steps`` steps, or an explicit sequence of
    times from 1 to 0. One network evaluation per step; the last step returns the clipped denoised estimate.
    """
    n = check_positive_int(n, "n")
    eta = solver_eta(solver, eta, 1.0)
    times = resolve(steps, grid, process.config())
    channels = channels if channels is not None else getattr(model, "in_channels", None)
    if channels is None:
        raise ValueError("channels not given and the model has no in_channels attribute")
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", 0)
    device = torch.device(device) if device is not None else process.c_h.device
    shape = (channels,) + tuple(process.image_size)
    all_labels = _labels(labels, n, num_classes, device)
    batch_size = batch_size or n
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(len(times) - 1) * ((n + batch_size - 1) // batch_size), desc="sampling", unit="step")
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = NoiseStream(seed, first_index + start, b, shape)
        z = torch.from_numpy(noise.draw()).to(device)
        lab = None if all_labels is None else all_labels[start:start + b]
        if lab is not None and guidance:
            eps_model = guided(model, lab, float(guidance), num_classes)
        else:
            eps_model = conditioned(model, lab)
        _, x0 = solve(eps_model, process, z, times, solver, eta, lambda: torch.from_numpy(noise.draw()).to(device),
                      clip_denoised, bar.update if bar is not None else None, spec=model)
        out.append(x0.float())
    if bar is not None:
        bar.close()
    return torch.cat(out)
