"""The spectral parameterisation (B14): closed forms, the Wiener oracle through the real sampler,
training with data statistics, and old eps checkpoints unchanged.

The oracle: data that are Gaussian per frequency with known mean ``m`` and std ``s`` (DCT space).
For such data the exact posterior mean is linear in ``u_t``, and B14 with a network that outputs 0
*is* that posterior mean (the Wiener filter). So the real sampler, driven by an object that only
declares ``param``, ``data_mean`` and ``data_std``, must reproduce the data's statistics.
"""
import numpy as np
import pytest
import torch

from bdm_train import checkpoint
from bdm_train.dct import dct_matrix, idct2
from bdm_train.diffusion import BlurringDiffusion, data_statistics, param_of
from bdm_train.sampling import denoise, sample
from bdm_train.prepare import spectral_statistics
from bdm_train.train import train
from conftest import TINY_MODEL, TINY_TRAIN, make_shapes

SIZE = 8


def gaussian_stats(size=SIZE):
    """A per-frequency mean and std decaying with frequency like natural images', ``[1, H, W]``.

    Small enough (pixel std ~0.15) that the sampler's final clip to [-1, 1] never binds (> 6 sigma).
    No std is below 0.1: a frequency whose variance is far below sigma_t^2 at the last steps of the
    uniform grid (logsnr 7.6 -> 10 in the last of 100 steps) tests the time grid's discretisation
    (B15), not the parameterisation; 0.1^2 crosses sigma_t^2 near t = 0.06, where steps are fine.
    """
    k = np.arange(size)
    r = k[:, None] + k[None, :]
    std = 0.1 + 0.3 / (1.0 + r) ** 2
    mean = np.zeros((size, size))
    mean[0, 0], mean[0, 1], mean[1, 0] = 0.4, -0.2, 0.1
    return torch.tensor(mean[None], dtype=torch.float32), torch.tensor(std[None], dtype=torch.float32)


class WienerOracle:
    """Not an nn.Module, not a UNet: any object with these attributes must sample (issue 12)."""

    in_channels = 1
    num_classes = 0
    param = "spectral"

    def __init__(self, mean, std):
        self.data_mean, self.data_std = mean, std

    def __call__(self, z, t, labels=None):
        return torch.zeros_like(z)


def test_param_of_defaults_to_eps():
    assert param_of(object()) == "eps"
    assert param_of(WienerOracle(*gaussian_stats())) == "spectral"

    class Bad:
        param = "v"

    with pytest.raises(ValueError, match="unknown parameterisation"):
        param_of(Bad())


@pytest.mark.parametrize("blur", [0.0, 2.0])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.95])
def test_spectral_target_has_unit_variance(blur, t):
    """B14's training target is N(0, 1) per frequency at every t (Monte Carlo, 20,000 draws).

    Standard error of a variance estimate from n = 20,000 Gaussian draws: sqrt(2/n) = 1%; 64
    frequencies at 5 standard errors: 5%. The mean's standard error is 0.7%; 5 of them: 0.035.
    """
    process = BlurringDiffusion(SIZE, blur_sigma_max=blur).double()
    mean, std = gaussian_stats()
    oracle = WienerOracle(mean.double(), std.double())
    g = torch.Generator().manual_seed(0)
    n = 20000
    u_x = mean.double() + std.double() * torch.randn((n, 1, SIZE, SIZE), generator=g, dtype=torch.float64)
    x = process.idct(u_x)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    tt = torch.full((n,), t, dtype=torch.float64)
    z = process.q_sample(x, tt, eps)
    alpha, sigma = process.alpha_sigma(tt)
    target = process.dct(process.target(oracle, x, z, eps, alpha, sigma))
    var = target.var(dim=0)
    assert (var - 1).abs().max() < 0.05, float((var - 1).abs().max())
    assert target.mean(dim=0).abs().max() < 0.035


@pytest.mark.parametrize("blur", [0.0, 2.0])
def test_read_output_inverts_target(blur):
    """The exact target, read back through B14, is the data itself: u_x_hat = u_x and u_eps = V^T eps."""
    process = BlurringDiffusion(SIZE, blur_sigma_max=blur).double()
    mean, std = gaussian_stats()
    oracle = WienerOracle(mean.double(), std.double())
    g = torch.Generator().manual_seed(1)
    x = torch.randn((6, 1, SIZE, SIZE), generator=g, dtype=torch.float64) * 0.3
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    t = torch.linspace(0.02, 0.98, 6, dtype=torch.float64)
    z = process.q_sample(x, t, eps)
    alpha, sigma = process.alpha_sigma(t)
    out = process.target(oracle, x, z, eps, alpha, sigma)
    u_x, u_eps = process.read_output(oracle, out, process.dct(z), alpha, sigma)
    torch.testing.assert_close(u_x, process.dct(x), rtol=0, atol=1e-9)
    torch.testing.assert_close(u_eps, process.dct(eps), rtol=0, atol=1e-7)   # divides by sigma >= 6.7e-3


def test_wiener_filter_is_the_gaussian_posterior_mean():
    """With f = 0, u_x_hat equals the closed-form E[u_x | u_t] of a Gaussian prior (B5, B7 in VE form)."""
    process = BlurringDiffusion(SIZE, blur_sigma_max=2.0).double()
    mean, std = (v.double() for v in gaussian_stats())
    oracle = WienerOracle(mean, std)
    g = torch.Generator().manual_seed(2)
    z = torch.randn((4, 1, SIZE, SIZE), generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.7, 0.99], dtype=torch.float64)
    _, u_x, _, alpha, sigma = denoise(oracle, process, z, t)
    # Prior N(m, s^2), observation u_t = alpha u_x + sigma n: posterior mean by precision weighting.
    u_t = process.dct(z)
    post = (mean / std ** 2 + alpha * u_t / sigma ** 2) / (1 / std ** 2 + alpha ** 2 / sigma ** 2)
    torch.testing.assert_close(u_x, post, rtol=1e-10, atol=1e-12)


def propagate(process, mean, std, steps, eta):
    """Mean and variance per frequency of the image the B10 sampler returns, in closed form (float64).

    With Gaussian data and the Wiener denoiser every step is affine in ``u_t`` plus independent
    noise: ``x_hat = m + c_skip (u_t - alpha_t m)`` (B14 at f = 0),
    ``u_eps = (u_t - alpha_t x_hat) / sigma_t``, ``u_s = alpha_s x_hat + k u_eps + c xi`` with
    ``c = eta sigma_{t->s}`` (B6, B7) and ``k = sqrt(sigma_s^2 - c^2)`` (B10). So mean and variance
    follow exactly from ``u_1 ~ N(0, 1)``; the last step returns ``x_hat``. Written out here with
    scalars per frequency, independently of ``bdm_train.sampling``.
    """
    m, s2 = mean.double()[0], std.double()[0] ** 2
    mu, var = torch.zeros_like(m), torch.ones_like(m)
    grid = [i / steps for i in range(steps, -1, -1)]
    for t, s in zip(grid[:-1], grid[1:]):
        a_t, sg_t = (v[0, 0] for v in process.alpha_sigma(torch.tensor([t], dtype=torch.float64)))
        gain = a_t * s2 / (a_t ** 2 * s2 + sg_t ** 2)                     # c_skip, B14
        if s == 0:
            return m + gain * (mu - a_t * m), gain ** 2 * var
        a_s, sg_s = (v[0, 0] for v in process.alpha_sigma(torch.tensor([s], dtype=torch.float64)))
        a_ts = a_t / a_s
        c2 = eta ** 2 * sg_s ** 2 * (sg_t ** 2 - a_ts ** 2 * sg_s ** 2) / sg_t ** 2   # B6, B7
        k = (sg_s ** 2 - c2).sqrt()
        # x_hat = gain u + (1 - gain a_t) m;  u_eps = ((1 - a_t gain) u - a_t (1 - gain a_t) m) / sg_t
        slope = a_s * gain + k * (1 - a_t * gain) / sg_t
        offset = a_s * (1 - gain * a_t) * m - k * a_t * (1 - gain * a_t) * m / sg_t
        mu, var = slope * mu + offset, slope ** 2 * var + c2


@pytest.mark.parametrize("blur", [0.0, 2.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_wiener_oracle_sampling_matches_closed_form(blur, eta):
    """Spectral sampling with a zero network, through the real ``sample``, has exactly the per-frequency
    mean and variance that propagating Gaussian data through B10 + B14 predicts (blurred and not;
    deterministic and ancestral); with enough steps that is the data's own variance.

    4,000 samples: a variance estimate's relative standard error is sqrt(2/4000) = 2.2%. Allowed:
    12% for the worst of 64 frequencies (5.4 standard errors) and 1.5% for their average (SE 0.3%,
    the frequencies are independent). The mean's standard error is at most 0.4 / sqrt(4000) = 0.006;
    allowed 0.03.
    """
    process = BlurringDiffusion(SIZE, blur_sigma_max=blur)
    process64 = BlurringDiffusion(SIZE, blur_sigma_max=blur).double()
    mean, std = gaussian_stats()
    steps = 50
    x = sample(WienerOracle(mean, std), process, n=4000, seed=0, steps=steps, eta=eta, clip_denoised=False,
               batch_size=4000)
    assert float(x.abs().max()) < 1.0                      # the final clip did not bind
    u = process64.dct(x.double())
    want_mean, want_var = propagate(process64, mean, std, steps, eta)
    ratio = u.var(dim=0)[0] / want_var
    assert (ratio - 1).abs().max() < 0.12, ratio
    assert abs(float(ratio.mean()) - 1) < 0.015, float(ratio.mean())
    assert (u.mean(dim=0)[0] - want_mean).abs().max() < 0.03
    # Many steps: the sampler's output variance tends to the data's, s^2 alpha^2 s^2 / (alpha^2 s^2
    # + sigma^2) at the last time (the returned image is a posterior mean, B9): within 2% at 2,000.
    _, var_many = propagate(process64, mean, std, 2000, eta)
    a, sg = process64.alpha_sigma(torch.tensor([1 / 2000], dtype=torch.float64))
    s2 = std.double()[0] ** 2
    limit = s2 * a[0, 0] ** 2 * s2 / (a[0, 0] ** 2 * s2 + sg[0, 0] ** 2)
    assert ((var_many / limit) - 1).abs().max() < 0.02, float(((var_many / limit) - 1).abs().max())
    # The eps parameterisation with the exact Gaussian eps is the same denoiser (B14 at f = 0 and B8
    # with the exact eps): the same seeds give the same images up to float32 rounding.
    y = sample(_ExactGaussianEps(process, mean, std), process, n=64, seed=0, steps=steps, eta=eta,
               clip_denoised=False)
    assert float((y - x[:64]).abs().max()) < 1e-3
    print(f"\nWiener oracle, blur {blur}, eta {eta}: variance ratio to closed form, worst "
          f"{float((ratio - 1).abs().max()):.3f}, mean {float(ratio.mean()):.4f}")


class _ExactGaussianEps:
    """The exact eps of the same Gaussian data (B8 form): (u_t - alpha E[u_x | u_t]) / sigma."""

    in_channels = 1
    num_classes = 0

    def __init__(self, process, mean, std):
        self.process, self.mean, self.std = process, mean, std

    def __call__(self, z, t, labels=None):
        alpha, sigma = self.process.alpha_sigma(t)
        u_t = self.process.dct(z)
        post = (self.mean / self.std ** 2 + alpha * u_t / sigma ** 2) / (1 / self.std ** 2 + alpha ** 2 / sigma ** 2)
        return self.process.idct((u_t - alpha * post) / sigma)


def test_data_statistics_against_numpy():
    """Per-frequency mean/std of the DCT (B1, via scipy's orthonormal DCT-II) with B14's floor."""
    import scipy.fft

    g = np.random.default_rng(0)
    x = g.uniform(-1, 1, (50, 2, SIZE, SIZE))
    x[:, 1] = 0.25                                       # a constant channel: no variance but at (0, 0)
    mean, std = data_statistics(torch.from_numpy(x), BlurringDiffusion(SIZE))
    u = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    want_std = np.maximum(u.std(axis=0), 1e-3 * u.std(axis=0).max())
    np.testing.assert_allclose(mean.numpy(), u.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), want_std, rtol=1e-5, atol=1e-9)
    assert float(std[1].min()) == pytest.approx(1e-3 * u.std(axis=0).max(), rel=1e-5)


# -- training ----------------------------------------------------------------------------------------
def test_spectral_checkpoint_stores_its_statistics(tiny_spectral_checkpoint, tiny_data):
    """Measured on the data before step 1 (a seeded subset), stored in weights and config, used by the model."""
    model, process, config = checkpoint.load(tiny_spectral_checkpoint)
    assert model.param == "spectral" and config["model"]["param"] == "spectral"
    assert config["train"]["param"] == "spectral"
    images = np.load(tiny_data)["images"]
    mean, std = spectral_statistics(images, 16, seed=TINY_TRAIN["seed"])
    torch.testing.assert_close(model.data_mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(model.data_std, std, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor(config["model"]["data_mean"]), mean, rtol=0, atol=0)
    # 96 images < the 10,000 limit: the subset is all of them, so these are the data's own statistics.
    full_mean, full_std = data_statistics(torch.from_numpy(images) / 127.5 - 1, process)
    torch.testing.assert_close(mean, full_mean, rtol=1e-6, atol=1e-6)


def test_spectral_training_beats_the_wiener_filter(tmp_path):
    """A fresh spectral UNet outputs 0, i.e. the Wiener filter: its loss is E||F_target||^2 = 1 per
    element (unit variance, tested above). Training must learn what the linear filter cannot: on
    fresh (t, eps) draws the trained EMA model's loss is clearly below the zero network's
    (measured 0.88 of it after 120 steps on these 8x8 shapes; asserted below 0.93)."""
    images, labels = make_shapes(96, size=8, seed=1)
    np.savez(tmp_path / "d.npz", images=images, labels=labels)
    path = train(str(tmp_path / "d.npz"), tmp_path / "run", progress=False, ch=8, ch_mult=(1, 2),
                 num_res_blocks=1, attn=(), dropout=0.0, blur_sigma_max=2.0, batch_size=16, lr=3e-3, warmup=5,
                 ema_decay=0.9, log_every=10, ckpt_every=0, steps=120, seed=0, param="spectral")
    model, process, _ = checkpoint.load(path)
    x = torch.from_numpy(images).float() / 127.5 - 1
    g = torch.Generator().manual_seed(123)
    t, eps = torch.rand(96, generator=g), torch.randn(x.shape, generator=g)
    with torch.no_grad():
        z = process.q_sample(x, t, eps)
        alpha, sigma = process.alpha_sigma(t)
        target = process.target(model, x, z, eps, alpha, sigma)
        trained = torch.mean((target - model(z, t)) ** 2).item()
        wiener = torch.mean(target ** 2).item()
    assert trained < 0.93 * wiener, (trained, wiener)


def test_resume_keeps_the_statistics(tiny_data, tmp_path):
    """A resumed spectral run reuses the stored statistics, and equals an uninterrupted run."""
    opts = dict(TINY_MODEL, **dict(TINY_TRAIN, steps=4, log_every=2, param="spectral"))
    whole = train(tiny_data, tmp_path / "whole", progress=False, **opts)
    train(tiny_data, tmp_path / "part", progress=False, **dict(opts, steps=2))
    part = train(tiny_data, tmp_path / "part", resume=True, progress=False, **dict(opts, steps=4))
    a, b = checkpoint.load_state(whole), checkpoint.load_state(part)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0)
    assert a["config"]["model"]["data_std"] == b["config"]["model"]["data_std"]


def test_resume_cannot_change_the_parameterisation(tiny_data, tmp_path):
    from bdm_runtime.errors import BdmError

    opts = dict(TINY_MODEL, **dict(TINY_TRAIN, steps=1, param="spectral"))
    train(tiny_data, tmp_path, progress=False, **opts)
    with pytest.raises(BdmError, match="--param eps differs"):
        train(tiny_data, tmp_path, resume=True, progress=False, **dict(opts, steps=2, param="eps"))


def test_old_eps_checkpoint_loads_as_eps():
    """A checkpoint from before B14 loads and reads as eps: the first study's DDPM (``runs/study/ddpm/model.pt``,
    shipped as ``models/fmnist32`` until the third study replaced it), with no ``param`` in its config."""
    from conftest import ROOT
    import os

    path = os.path.join(ROOT, "runs", "study", "ddpm", "model.pt")
    if not os.path.isfile(path):
        pytest.skip(f"{path} is not in this checkout")
    state = checkpoint.load_state(path)
    assert "param" not in state["config"]["model"]
    model, process, config = checkpoint.load(path)
    assert model.param == "eps" and param_of(model) == "eps"
    assert not hasattr(model, "data_mean")
    x = sample(model, process, n=2, seed=0, steps=2, eta=1.0)
    assert x.shape == (2, 1, 32, 32) and bool(torch.isfinite(x).all())
