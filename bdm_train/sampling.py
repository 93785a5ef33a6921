"""Samplers for blurring diffusion: one step function (B10) and the full reverse loop.

``ddim_step`` is the unit that is also exported as the ONNX step graph (``export``): the runtime
loop only feeds it tensors. A model is anything callable as ``model(z, t, labels=None)`` returning
its output in pixel space; how that output is read is its parameterisation (``param``: eps, B8, by
default; ``spectral``, B14, with ``data_mean``/``data_std``), applied by ``denoise`` alone.
"""
import torch

from bdm_runtime.errors import BdmError
from bdm_runtime.labels import normalize_labels
from bdm_runtime.noise import NoiseStream, check_positive_int, time_grid


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


def posterior_variance(alpha_t, sigma_t, alpha_s, sigma_s):
    """``sigma_{t->s}^2`` of the denoising posterior, per frequency (B6, B7)."""
    alpha_ts = alpha_t / alpha_s                                        # B6
    sigma2_ts = (sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2).clamp(min=0)  # B6
    # B7: 1 / (1/sigma_s^2 + alpha_ts^2/sigma2_ts) = sigma_s^2 sigma2_ts / sigma_t^2, since
    # sigma2_ts + alpha_ts^2 sigma_s^2 = sigma_t^2; this form has no 0/0 when sigma2_ts = 0.
    return sigma_s ** 2 * sigma2_ts / sigma_t ** 2


def ddim_step(model_fn, process, z, t, s, eta, noise, clip_denoised=True, spec=None):
    """One step ``z_t -> z_s`` of DDIM-eta per frequency (B10); returns ``(z_s, x0)``.

    ``eta = 1`` is the paper's ancestral sampler (B9), ``eta = 0`` the deterministic one.
    ``noise`` is ``xi`` in frequency space. ``x0`` is the denoised estimate clipped to ``[-1, 1]``.
    ``spec`` declares the parameterisation (see ``denoise``).
    """
    u_t, u_x, u_eps, alpha_t, sigma_t = denoise(model_fn, process, z, t, spec)   # B8 / B14
    alpha_s, sigma_s = process.alpha_sigma(s)
    x0 = process.idct(u_x).clamp(-1.0, 1.0)
    if clip_denoised:
        u_x = process.dct(x0)
        u_eps = (u_t - alpha_t * u_x) / sigma_t                        # B10, eps from clipped x
    c = eta * posterior_variance(alpha_t, sigma_t, alpha_s, sigma_s).sqrt()  # B10
    u_s = alpha_s * u_x + (sigma_s ** 2 - c ** 2).clamp(min=0).sqrt() * u_eps + c * noise  # B10
    return process.idct(u_s), x0


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
def sample(model, process, n, seed, steps, eta=1.0, labels=None, guidance=0.0, first_index=0,
           clip_denoised=True, batch_size=None, channels=None, num_classes=None, device=None,
           progress=False):
    """Draw ``n`` images with the noise protocol of ``bdm_runtime.noise``: float ``[n, C, H, W]`` in ``[-1, 1]``.

    Time grid ``t_i = i / steps``, ``i = steps .. 0``: one network evaluation per step; the last
    step (to ``s = 0``) returns the clipped denoised estimate.
    """
    n = check_positive_int(n, "n")
    if not 0.0 <= float(eta) <= 1.0:
        raise BdmError(f"eta must be in [0, 1], got {eta!r}")
    grid = time_grid(steps)
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

        bar = tqdm(total=steps * ((n + batch_size - 1) // batch_size), desc="sampling", unit="step")
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        noise = NoiseStream(seed, first_index + start, b, shape)
        z = torch.from_numpy(noise.draw()).to(device)
        lab = None if all_labels is None else all_labels[start:start + b]
        if lab is not None and guidance:
            eps_model = guided(model, lab, float(guidance), num_classes)
        else:
            eps_model = conditioned(model, lab)
        xi = torch.zeros_like(z)
        for t_i, s_i in zip(grid[:-1], grid[1:]):
            if eta > 0:
                xi = torch.from_numpy(noise.draw()).to(device)
            t = torch.full((b,), float(t_i), device=device)
            s = torch.full((b,), float(s_i), device=device)
            z, x0 = ddim_step(eps_model, process, z, t, s, float(eta), xi, clip_denoised, spec=model)
            if bar is not None:
                bar.update(1)
        out.append(x0.float())
    if bar is not None:
        bar.close()
    return torch.cat(out)
