"""Few-step sampling: DPM-Solver++(2M) (B11) beside DDIM (B10), the time grids (B15), in torch.

References: B11 written out in float64 numpy from docs/maths.md (scipy's DCT, ``tests/reference.py``);
the exact denoiser of an image mixture (``MixtureDenoiser``); a 1,000-step solution of the same
ODE for the order of convergence; B3/B15 re-derived here for the grids.
"""
import itertools
import math

import numpy as np
import pytest
import torch

from bdm_train.analytic import MixtureDenoiser
from bdm_train.diffusion import BlurringDiffusion
from bdm_train.sampling import ddim_step, dpmpp2m_step, sample, solve, step
from reference import dctn, idctn, ref_alpha_sigma
from bdm_runtime.grids import GRIDS, SOLVERS, previous_times, resolve, settings, solver_eta, time_grid
from bdm_runtime.noise import NoiseStream

BLURS = [20.0, 0.0]  # BDM and the DDPM baseline


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(size=8, blur=20.0):
    return BlurringDiffusion(size, blur_sigma_max=blur).config()


def _logsnr(t, lo=-10.0, hi=10.0):
    """B3, written out."""
    c0 = math.atan(math.exp(-hi / 2))
    c1 = math.atan(math.exp(-lo / 2)) - c0
    return -2 * np.log(np.tan(c1 * np.asarray(t, np.float64) + c0))


def _ell(t, size, blur):
    """``ell_k = log(alpha_k / sigma)`` (B11) from the independent float64 reference of B2-B4: ``[len(t), H, W]``."""
    alpha, sigma = ref_alpha_sigma(np.asarray(t, np.float64), size, size, blur)
    return np.log(alpha) - np.log(sigma)[:, None, None]


# -- grids (B15) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("grid", GRIDS)
def test_grids_fall_from_one_to_zero(grid):
    for blur in BLURS:
        for steps in (1, 2, 5, 10, 50):
            g = time_grid(steps, grid, _config(8, blur))
            assert g.dtype == np.float32 and g.shape == (steps + 1,)
            assert g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0), (grid, blur, steps, g)


def test_grid_formulas():
    cfg = _config(8, 20.0)
    n = 10
    i = np.arange(n, -1, -1)
    np.testing.assert_allclose(time_grid(n, "uniform"), i / n, rtol=0, atol=1e-7)
    np.testing.assert_allclose(time_grid(n, "power", cfg), (i / n) ** 2, rtol=0, atol=1e-7)
    np.testing.assert_allclose(time_grid(n, "power", cfg, rho=3), (i / n) ** 3, rtol=0, atol=1e-7)
    # logsnr: equal steps in B3's log-SNR, from logsnr(1) = -10 to logsnr(0) = 10 (float32 times:
    # d logsnr / dt <= 460 at t = 1, so 6e-8 rounding of t is 3e-5 of logsnr)
    steps_l = np.diff(_logsnr(time_grid(n, "logsnr", cfg)))
    np.testing.assert_allclose(steps_l, 2.0, rtol=0, atol=1e-4)
    # edm: B13's sigma_i with sigma_min = 0.002 -> exp(-5) (the trained minimum, t = 0) and
    # sigma_max = 80 (inside the range); the first point is t = 1, where the latent is drawn
    sigma = np.exp(-_logsnr(time_grid(n, "edm", cfg)[1:]) / 2)
    lo, hi = math.exp(-5), 80.0
    want = (hi ** (1 / 7) + np.arange(1, n + 1) / n * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    np.testing.assert_allclose(sigma, want, rtol=1e-4)


@pytest.mark.parametrize("size", [8, 32])
def test_spectral_grid_has_equal_largest_per_frequency_step(size):
    """Every step's ``max_k |ell_k(s) - ell_k(t)|`` is the same, to within 1% (measured: 1e-4 at 50 steps)."""
    for steps in (5, 10, 20, 50):
        g = time_grid(steps, "spectral", _config(size, 20.0))
        inc = np.abs(np.diff(_ell(g, size, 20.0), axis=0)).max(axis=(1, 2))
        assert inc.max() / inc.min() < 1.01, (size, steps, inc)
        # and no other grid does that: the test can fail
        other = np.abs(np.diff(_ell(time_grid(steps, "logsnr", _config(size, 20.0)), size, 20.0), axis=0))
        assert other.max(axis=(1, 2)).max() / other.max(axis=(1, 2)).min() > 1.5
    # Without blur every frequency has ell = logsnr / 2: the spectral grid is the logsnr grid.
    np.testing.assert_allclose(time_grid(20, "spectral", _config(size, 0.0)),
                               time_grid(20, "logsnr", _config(size, 0.0)), rtol=0, atol=2e-6)


def test_grid_and_solver_arguments():
    cfg = _config()
    for bad in (dict(grid="cosine"), dict(grid="uniform", rho=2.0), dict(grid="power", rho=0.0),
                dict(grid="logsnr", process=None), dict(steps=0)):
        kw = dict(steps=4, grid="power", process=cfg)
        kw.update(bad)
        with pytest.raises(ValueError):
            time_grid(kw.pop("steps"), **kw)
    explicit = [1.0, 0.7, 0.2, 0.0]
    np.testing.assert_array_equal(resolve(None, explicit), np.float32(explicit))
    for bad in ([1.0, 0.5], [0.9, 0.5, 0.0], [1.0, 0.5, 0.6, 0.0], [[1.0, 0.0]], [1.0, np.nan, 0.0]):
        with pytest.raises(ValueError):
            resolve(None, bad)
    with pytest.raises(ValueError, match="steps"):
        resolve(5, explicit)
    t = time_grid(4)
    np.testing.assert_array_equal(previous_times(t, "ddim"), t[:-1])        # never any history
    np.testing.assert_array_equal(previous_times(t, "dpmpp2m"), np.r_[t[0], t[:-2]])  # first step: none
    # eta not given: the model's for ddim and for the model's own solver; dpmpp2m otherwise deterministic
    assert solver_eta("dpmpp2m", None, 1.0) == 0.0 and solver_eta("ddim", None, 0.3) == 0.3
    assert solver_eta("dpmpp2m", None, 1.0, "dpmpp2m") == 1.0 and solver_eta("dpmpp2m", 0.5, 0.0) == 0.5
    assert solver_eta("ddim", None, 0.7, "dpmpp2m") == 0.7
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            solver_eta("dpmpp2m", bad, 0.0)
    assert settings({"steps": 7, "eta": 1.0}) == ("ddim", "uniform", 7, 1.0)
    assert settings({"steps": 7, "eta": 1.0}, solver="dpmpp2m", grid="edm") == ("dpmpp2m", "edm", 7, 0.0)
    assert settings({"steps": 7, "eta": 1.0, "solver": "dpmpp2m"}) == ("dpmpp2m", "uniform", 7, 1.0)
    assert settings({"steps": 7, "eta": 1.0, "solver": "dpmpp2m"}, eta=0) == ("dpmpp2m", "uniform", 7, 0.0)


# -- B11 against its formula, float64 ---------------------------------------------------------------
H = W = 6


def _b11(z, eps, t, s, t_prev, u_prev, blur, clip, xi=None):
    """DPM-Solver++(2M) as docs/maths.md B11 writes it, per frequency, in numpy (clipping as in B10);
    with ``xi`` (frequency space) its SDE form at eta 1 as B16 writes it."""
    a_t, s_t = ref_alpha_sigma(t, H, W, blur)
    a_s, s_s = ref_alpha_sigma(s, H, W, blur)
    u_t = dctn(z)
    u_x = (u_t - s_t * dctn(eps)) / a_t                                              # B8
    if clip:
        u_x = dctn(np.clip(idctn(u_x), -1, 1))
    ell = lambda a, sg: np.log(a / sg)                                               # noqa: E731
    h = ell(a_s, s_s) - ell(a_t, s_t)
    d = u_x
    if t_prev is not None:
        a_p, s_p = ref_alpha_sigma(t_prev, H, W, blur)
        r = (ell(a_t, s_t) - ell(a_p, s_p)) / h
        d = (1 + 1 / (2 * r)) * u_x - 1 / (2 * r) * u_prev
    if xi is not None:   # B16, eta = 1
        return ((s_s / s_t) * np.exp(-h) * u_t + a_s * (1 - np.exp(-2 * h)) * d
                + s_s * np.sqrt(1 - np.exp(-2 * h)) * xi), u_x
    return (s_s / s_t) * u_t - a_s * (np.exp(-h) - 1) * d, u_x


@pytest.mark.parametrize("blur", BLURS)
@pytest.mark.parametrize("clip", [False, True])
def test_dpmpp2m_step_is_b11(blur, clip):
    process = BlurringDiffusion((H, W), blur_sigma_max=blur).double()
    rng = np.random.default_rng(3)
    z, eps, u_prev = (rng.standard_normal((2, 1, H, W)) for _ in range(3))
    f64 = lambda v: torch.full((2,), v, dtype=torch.float64)   # noqa: E731
    for t, s, t_prev in ((0.6, 0.5, 0.7), (1.0, 0.9, None), (0.1, 0.0, 0.25), (0.52, 0.5, 0.53)):
        z_s, x0, u_x = dpmpp2m_step(lambda zz, tt: torch.from_numpy(eps), process, torch.from_numpy(z), f64(t),
                                    f64(s), None if t_prev is None else f64(t_prev), torch.from_numpy(u_prev),
                                    clip_denoised=clip)
        want, want_ux = _b11(z, eps, t, s, t_prev, u_prev, blur, clip)
        # float64 rounding through a few 6-term DCT sums, amplified by alpha_s/alpha_t and 1/(2r): measured
        # ~1e-13 of the largest entry; 1e-10 leaves room for other orderings, and a float32 constant fails it.
        np.testing.assert_allclose(dctn(z_s.numpy()), want, rtol=0, atol=1e-10 * np.abs(want).max())
        np.testing.assert_allclose(u_x.numpy(), want_ux, rtol=0, atol=1e-10 * np.abs(want_ux).max())
        if t_prev is None:  # the first step is B10 with eta = 0
            z_ddim, x0_ddim = ddim_step(lambda zz, tt: torch.from_numpy(eps), process, torch.from_numpy(z), f64(t),
                                        f64(s), 0.0, torch.zeros(2, 1, H, W, dtype=torch.float64), clip)
            np.testing.assert_allclose(z_s.numpy(), z_ddim.numpy(), rtol=0, atol=1e-12)
            np.testing.assert_array_equal(x0.numpy(), x0_ddim.numpy())


@pytest.mark.parametrize("blur", BLURS)
@pytest.mark.parametrize("clip", [False, True])
def test_dpmpp2m_at_eta_1_is_b16(blur, clip):
    """``step`` with B11's history and eta 1 is SDE-DPM-Solver++(2M) in B16's closed form; its first step is
    B10's ancestral step (B9) with the same noise."""
    process = BlurringDiffusion((H, W), blur_sigma_max=blur).double()
    rng = np.random.default_rng(4)
    z, eps, u_prev, xi = (rng.standard_normal((2, 1, H, W)) for _ in range(4))
    f64 = lambda v: torch.full((2,), v, dtype=torch.float64)   # noqa: E731
    net = lambda zz, tt: torch.from_numpy(eps)                 # noqa: E731
    for t, s, t_prev in ((0.6, 0.5, 0.7), (1.0, 0.9, None), (0.1, 0.02, 0.25), (0.52, 0.5, 0.53)):
        z_s, _, u_x = step(net, process, torch.from_numpy(z), f64(t), f64(s), 1.0, torch.from_numpy(xi),
                           None if t_prev is None else f64(t_prev), torch.from_numpy(u_prev), clip)
        want, want_ux = _b11(z, eps, t, s, t_prev, u_prev, blur, clip, xi)
        # as in test_dpmpp2m_step_is_b11; the square roots add a few ulps
        np.testing.assert_allclose(dctn(z_s.numpy()), want, rtol=0, atol=1e-10 * np.abs(want).max())
        np.testing.assert_allclose(u_x.numpy(), want_ux, rtol=0, atol=1e-10 * np.abs(want_ux).max())
        if t_prev is None:
            z_anc, _ = ddim_step(net, process, torch.from_numpy(z), f64(t), f64(s), 1.0, torch.from_numpy(xi), clip)
            np.testing.assert_allclose(z_s.numpy(), z_anc.numpy(), rtol=0, atol=1e-12)


def test_sample_follows_the_noise_protocol_with_dpmpp2m():
    """dpmpp2m draws only the initial latent; the loop written out with dpmpp2m_step equals sample()."""
    images = torch.from_numpy(np.random.default_rng(0).uniform(-0.9, 0.9, (4, 1, 8, 8))).float()
    process = BlurringDiffusion(8)
    model = MixtureDenoiser(images, process)
    n, times = 5, time_grid(6, "spectral", process.config())
    z = torch.from_numpy(NoiseStream(7, 3, n, (1, 8, 8)).draw())
    t_prev = u_x = None
    for t, s in zip(times[:-1], times[1:]):
        full = lambda v: torch.full((n,), float(v))   # noqa: E731
        z, x0, u = dpmpp2m_step(model, process, z, full(t), full(s), None if t_prev is None else full(t_prev), u_x)
        t_prev, u_x = t, u
    got = sample(model, process, n, seed=7, steps=6, solver="dpmpp2m", grid="spectral", first_index=3)
    torch.testing.assert_close(got, x0, rtol=0, atol=0)
    # with eta (B16) one further draw per step, as for ddim
    stream = NoiseStream(7, 3, n, (1, 8, 8))
    z, t_prev, u_x = torch.from_numpy(stream.draw()), None, None
    for t, s in zip(times[:-1], times[1:]):
        full = lambda v: torch.full((n,), float(v))   # noqa: E731
        z, x0, u = step(model, process, z, full(t), full(s), 0.6, torch.from_numpy(stream.draw()),
                        None if t_prev is None else full(t_prev), u_x)
        t_prev, u_x = t, u
    got = sample(model, process, n, seed=7, steps=6, solver="dpmpp2m", grid="spectral", first_index=3, eta=0.6)
    torch.testing.assert_close(got, x0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eta"):
        sample(model, process, n, seed=7, steps=6, solver="dpmpp2m", eta=1.5)


# -- the exact mixture denoiser: few evaluations land on the images ----------------------------------
def _images(k=4, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-0.9, 0.9, (k, 1, 8, 8))).float()


def _rms_to_nearest(x, images):
    rms = ((x[:, None] - images[None]) ** 2).flatten(2).mean(-1).sqrt()
    return rms.min(1).values, rms.argmin(1)


@pytest.mark.parametrize("blur", BLURS)
def test_dpmpp2m_lands_on_the_mixture_images_in_10_and_20_evaluations(blur):
    """Every grid, 10 and 20 network evaluations, deterministic (B11) and stochastic (B16): RMS to the
    nearest image < 0.05, in equal shares.

    The images are ~0.7 apart (RMS per pixel), so 0.05 means "on an image", not between two; a
    seeded count within 4 standard errors of n/4 per image (false alarm 6e-5) rules out collapse.
    """
    images = _images()
    process = BlurringDiffusion(8, blur_sigma_max=blur)
    model = MixtureDenoiser(images, process)
    n = 48
    for grid, steps, eta in itertools.product(GRIDS, (10, 20), (0.0, 1.0)):   # B11, and B16 at eta 1
        x = sample(model, process, n, seed=1, steps=steps, solver="dpmpp2m", grid=grid, clip_denoised=False, eta=eta)
        rms, k = _rms_to_nearest(x, images)
        assert rms.max() < 0.05, (grid, steps, eta, float(rms.max()))
        counts = np.bincount(k.numpy(), minlength=4)
        assert np.all(np.abs(counts - n / 4) <= 4 * math.sqrt(n * 0.25 * 0.75)), (grid, steps, eta, counts)
    if blur:  # the measure can fail: 5 evaluations on the uniform grid leave samples between images
        x = sample(model, process, n, seed=1, steps=5, solver="dpmpp2m", grid="uniform", clip_denoised=False)
        assert _rms_to_nearest(x, images)[0].max() > 0.05


# -- order of convergence -----------------------------------------------------------------------------
ORDER_STEPS = (20, 40, 80, 160)


@pytest.fixture(scope="module")
def order_errors():
    """RMS error of each solver's ODE state at ``t = 0.5`` against dpmpp2m with 1,000 steps, float64.

    Measured at ``t = 0.5`` because the sample itself carries no discretisation error to measure:
    the mixture posterior collapses near ``t = 0`` and every run lands on an image to 1e-16. The
    grid is uniform in ``t`` on ``[0.5, 1]``. The reference's own error is ~(80/1000)^2 = 0.6% of
    the 80-step error at second order, below what the slope fit resolves.
    """
    images = _images().double()
    z0 = torch.from_numpy(np.random.default_rng(5).standard_normal((4, 1, 8, 8)))
    out = {}
    for blur in BLURS:
        process = BlurringDiffusion(8, blur_sigma_max=blur)
        model = MixtureDenoiser(images.float(), process).double()
        process.double()
        grid = lambda n: np.linspace(1.0, 0.5, n + 1)   # noqa: E731
        ref = solve(model, process, z0.clone(), grid(1000), "dpmpp2m", clip_denoised=False)[0]
        for solver in SOLVERS:
            out[blur, solver] = [float((solve(model, process, z0.clone(), grid(n), solver, clip_denoised=False)[0]
                                        - ref).pow(2).mean().sqrt()) for n in ORDER_STEPS]
    return out


@pytest.mark.parametrize("blur", BLURS)
def test_dpmpp2m_is_second_order_and_ddim_first(order_errors, blur):
    """Fitted slope of log error against log steps: -2 for dpmpp2m, -1 for ddim.

    Measured: dpmpp2m -1.90 (blur) / -1.83 (DDPM), its error ratios per doubling rising 3.4 -> 3.9
    towards 4 (higher-order terms still present at 20 steps); ddim -1.00 / -1.01. The bounds
    [-2.3, -1.7] and [-1.15, -0.85] separate the two orders with room on both sides.
    """
    slope = {s: np.polyfit(np.log(ORDER_STEPS), np.log(order_errors[blur, s]), 1)[0] for s in SOLVERS}
    print(f"\nblur {blur}: slopes {slope}; errors {dict((s, order_errors[blur, s]) for s in SOLVERS)}")
    assert -2.3 < slope["dpmpp2m"] < -1.7, slope
    assert -1.15 < slope["ddim"] < -0.85, slope
    assert all(a < b for a, b in zip(order_errors[blur, "dpmpp2m"], order_errors[blur, "ddim"]))
