"""The measurements behind the study's explanation (no training, no sampling loop of their own)."""
import numpy as np


# -- the information argument for blur_sigma_max -------------------------------------------------
def information(blur_values=(0, 5, 10, 15, 20, 30), times=(0.1, 0.3, 0.5, 0.7, 0.9), n=20000):
    """Remaining information ``sum_f 0.5 log(1 + alpha_t^2 P_f / sigma_t^2)`` (nats/image) along ``t``.

    ``P_f`` is the per-frequency variance of the training images in the DCT basis (B1); the sum is
    the capacity of the per-frequency Gaussian channels of B5 for Gaussian data with that spectrum.
    """
    import torch

    from bdm_train.diffusion import BlurringDiffusion

    from .. import fmnist

    x, _ = fmnist.load("train")
    x = torch.from_numpy(x[:n].astype(np.float64) / 127.5 - 1.0)
    u = BlurringDiffusion(32, 0.0).double().dct(x)[:, 0]
    power = u.var(0)
    t = torch.tensor(times, dtype=torch.float64)
    rows = {}
    for b in blur_values:
        alpha, sigma = BlurringDiffusion(32, float(b)).double().alpha_sigma(t)   # B3, B4
        snr = alpha[:, 0] ** 2 * power / sigma[:, 0] ** 2
        rows[b] = (0.5 * torch.log1p(snr).sum((1, 2))).tolist()
    return dict(times=list(times), nats=rows, dc_fraction=float(power[0, 0] / power.sum()))


# -- why few steps are hard with blur: the step's gain on the network's error -----------------------
def error_gain(blur_values=(0.0, 20.0), step_counts=(10, 20, 50, 100), eta=0.0, late=0.5):
    """Largest gain ``|d u_s / d u_eps|`` of one B10 step over frequencies and steps with ``t <= late``.

    B10 is ``u_s = alpha_s (u_t - sigma_t u_eps) / alpha_t + sqrt(sigma_s^2 - c^2) u_eps + c xi``, so an
    error in the network's ``u_eps`` reaches ``u_s`` times ``sqrt(sigma_s^2 - c^2) - alpha_s sigma_t / alpha_t``.
    Per frequency ``alpha_s / alpha_t`` is large exactly when that frequency is being un-blurred.
    """
    import torch

    from bdm_train.diffusion import BlurringDiffusion

    rows = {}
    for b in blur_values:
        process = BlurringDiffusion(32, float(b)).double()
        row = []
        for n in step_counts:
            grid = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
            t, s = grid[:-2], grid[1:-1]              # the last step returns x_hat: no u_s
            (alpha_t, sigma_t), (alpha_s, sigma_s) = process.alpha_sigma(t), process.alpha_sigma(s)
            a_ts = alpha_t / alpha_s                                                   # B6
            sigma_ts2 = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2                        # B6
            c = eta * torch.sqrt(1 / (1 / sigma_s ** 2 + a_ts ** 2 / sigma_ts2))       # B7, B10
            gain = (torch.sqrt(sigma_s ** 2 - c ** 2) - alpha_s * sigma_t / alpha_t).abs()
            row.append(float(gain[t <= late].max()))
        rows[b] = row
    return dict(step_counts=list(step_counts), eta=eta, late=late, gain=rows)


def denoising_error(ckpt, times=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), n=256, seed=0):
    """Mean squared error of the model's ``x_hat`` on test images along ``t``: ``{t: (raw, clipped)}``.

    ``x_hat`` is read through the model's parameterisation (B8 divides the eps error by ``alpha_t``;
    B14 does not). ``raw`` is measured on the 4x4 lowest DCT frequencies (what the image's layout
    is made of), ``clipped`` in pixels after clipping ``x_hat`` to ``[-1, 1]``, as B10's option does.
    """
    import torch

    from bdm_train import checkpoint
    from bdm_train.sampling import denoise

    from .. import fmnist

    model, process, _ = checkpoint.load(ckpt)
    x = torch.from_numpy(fmnist.load("test")[0][:n].astype(np.float32) / 127.5 - 1.0)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t0 in times:
        t = torch.full((n,), float(t0))
        z = process.q_sample(x, t, torch.randn(x.shape, generator=g))               # B5
        with torch.no_grad():
            _, u_x, _, _, _ = denoise(model, process, z, t)                          # B8 / B14
        low = float(((u_x - process.dct(x))[..., :4, :4] ** 2).mean())
        clipped = float(((process.idct(u_x).clamp(-1, 1) - x) ** 2).mean())
        out[t0] = (low, clipped)
    return out


# -- diverged samples ---------------------------------------------------------------------------
def roughness(images):
    """Mean |difference| of neighbouring pixels per grey image, in [0, 1] (uint8 NHWC or NCHW, one channel)."""
    x = np.asarray(images, np.float32) / 255.0
    x = x.reshape(len(x), *[d for d in x.shape[1:] if d != 1])   # [N, H, W]
    return (np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))) / 2


def noisy_fraction(images, reference, quantile=0.999):
    """Share of ``images`` rougher than ``quantile`` of the ``reference`` images: samples that ended as noise."""
    return float(np.mean(roughness(images) > np.quantile(roughness(reference), quantile)))
