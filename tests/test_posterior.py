"""One sampler step (B10) against the denoising posterior (B6-B8), all in float64.

The reference is written from the formulas in numpy with scipy's DCT; the package step runs on a
``.double()`` process with a fixed eps "model", so the comparison is at float64 precision.
"""
import numpy as np
import pytest
import torch

from bdm_train.diffusion import BlurringDiffusion
from bdm_train.sampling import ddim_step
from reference import dctn, idctn
from reference import ref_alpha_sigma as _ref_alpha_sigma

H, W = 6, 10
# (t, s) pairs: ordinary, tiny step, the noisy end (alpha_t ~ 7e-6 at high frequencies) and the last step.
PAIRS = [(0.6, 0.5), (0.31, 0.3), (1.0, 0.95), (0.05, 0.0)]


def ref_alpha_sigma(t, blur_sigma_max=20.0):
    """B2-B4 (``tests/reference.py``) at this file's image size."""
    return _ref_alpha_sigma(t, H, W, blur_sigma_max)


def reference(z, eps, t, s, blur):
    """Posterior quantities from B6-B8 and the DDIM-eta=0 update, per frequency."""
    alpha_t, sigma_t = ref_alpha_sigma(t, blur_sigma_max=blur)
    alpha_s, sigma_s = ref_alpha_sigma(s, blur_sigma_max=blur)
    u_t, u_eps = dctn(z), dctn(eps)
    u_x = (u_t - sigma_t * u_eps) / alpha_t                                          # B8
    alpha_ts = alpha_t / alpha_s                                                     # B6
    sigma2_ts = sigma_t ** 2 - alpha_ts ** 2 * sigma_s ** 2
    var = 1 / (1 / sigma_s ** 2 + alpha_ts ** 2 / sigma2_ts)                         # B7
    mean = var * (alpha_ts / sigma2_ts * u_t + alpha_s / sigma_s ** 2 * u_x)         # B7
    mean_stable = u_t / alpha_ts - sigma2_ts / (alpha_ts * sigma_t) * u_eps          # B8
    ddim = alpha_s * u_x + sigma_s * u_eps                                           # B10, eta = 0
    return dict(u_t=u_t, u_eps=u_eps, u_x=u_x, mean=mean, mean_stable=mean_stable, var=var, ddim=ddim,
                alpha_t=alpha_t, sigma_t=sigma_t, alpha_s=alpha_s, sigma_s=sigma_s)


def _inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 1, H, W)), rng.standard_normal((batch, 1, H, W))


def _step(process, z, eps, t, s, eta, noise, clip=False):
    """Run ``ddim_step`` in float64 with the fixed eps model; returns ``(u_s, x0)`` as numpy."""
    b = z.shape[0]
    e = torch.from_numpy(eps)
    z_s, x0 = ddim_step(lambda zz, tt: e, process, torch.from_numpy(z),
                        torch.full((b,), t, dtype=torch.float64), torch.full((b,), s, dtype=torch.float64),
                        eta, torch.from_numpy(noise), clip_denoised=clip)
    assert z_s.dtype == torch.float64
    return dctn(z_s.numpy()), x0.numpy()


def _assert_close(actual, desired, rel=1e-11):
    # Measured: ~3e-15 of the largest entry (float64 rounding through a few 10-term DCT sums). 1e-11
    # leaves room for other BLAS orderings; a float32 constant anywhere (~1e-7) fails it.
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rel * np.abs(desired).max())


@pytest.mark.parametrize("blur", [0.0, 20.0])
@pytest.mark.parametrize("t,s", PAIRS)
def test_b7_mean_equals_stable_b8_mean(t, s, blur):
    # The reference is self-consistent: B7 with u_x_hat substituted is the stable form of B8.
    z, eps = _inputs()
    ref = reference(z, eps, t, s, blur)
    _assert_close(ref["mean"], ref["mean_stable"])


@pytest.mark.parametrize("blur", [0.0, 20.0])
@pytest.mark.parametrize("t,s", PAIRS)
def test_eta1_step_is_the_posterior(t, s, blur):
    process = BlurringDiffusion((H, W), blur_sigma_max=blur).double()
    z, eps = _inputs(seed=1)
    ref = reference(z, eps, t, s, blur)
    zero = np.zeros_like(z)
    mean, _ = _step(process, z, eps, t, s, 1.0, zero)
    _assert_close(mean, ref["mean_stable"])                                        # B8 stable form
    _assert_close(mean, ref["mean"])                                    # B7 form
    # the coefficient of the (frequency-space) noise xi is the posterior standard deviation
    noise = np.random.default_rng(7).standard_normal(z.shape)
    noisy, _ = _step(process, z, eps, t, s, 1.0, noise)
    c = (noisy - mean) / noise
    np.testing.assert_allclose(c, np.broadcast_to(np.sqrt(ref["var"]), c.shape), rtol=1e-10, atol=0)


@pytest.mark.parametrize("eta", [0.0, 0.3])
@pytest.mark.parametrize("blur", [0.0, 20.0])
@pytest.mark.parametrize("t,s", PAIRS)
def test_eta_step_matches_ddim(t, s, blur, eta):
    # B10 written out: u_s = alpha_s u_x + sqrt(sigma_s^2 - c^2) u_eps + c xi, c = eta sigma_{t->s}.
    process = BlurringDiffusion((H, W), blur_sigma_max=blur).double()
    z, eps = _inputs(seed=2)
    ref = reference(z, eps, t, s, blur)
    noise = np.random.default_rng(8).standard_normal(z.shape)
    c = eta * np.sqrt(ref["var"])
    want = ref["alpha_s"] * ref["u_x"] + np.sqrt(ref["sigma_s"] ** 2 - c ** 2) * ref["u_eps"] + c * noise
    if eta == 0:
        np.testing.assert_array_equal(want, ref["ddim"])
    got, _ = _step(process, z, eps, t, s, eta, noise)
    _assert_close(got, want)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("blur", [0.0, 20.0])
def test_clipping_is_a_no_op_inside_the_box(blur, eta):
    # Build z_t from a known x in [-0.8, 0.8]: the denoised estimate is x itself, so clipping changes
    # nothing but the recomputation of u_eps (B10), which divides by sigma_t >= 0.0067: ~1e-13.
    process = BlurringDiffusion((H, W), blur_sigma_max=blur).double()
    rng = np.random.default_rng(3)
    x = rng.uniform(-0.8, 0.8, (2, 1, H, W))
    eps = rng.standard_normal(x.shape)
    noise = rng.standard_normal(x.shape)
    for t, s in [(0.5, 0.4), (0.05, 0.0), (0.9, 0.8)]:
        alpha_t, sigma_t = ref_alpha_sigma(t, blur_sigma_max=blur)
        z = idctn(alpha_t * dctn(x) + sigma_t * dctn(eps))
        clipped, x0_c = _step(process, z, eps, t, s, eta, noise, clip=True)
        plain, x0_p = _step(process, z, eps, t, s, eta, noise, clip=False)
        np.testing.assert_allclose(x0_c, x, rtol=0, atol=1e-9)   # 1/alpha_t <= 1e3 here at t = 0.9
        np.testing.assert_allclose(x0_p, x0_c, rtol=0, atol=0)
        _assert_close(clipped, plain)


@pytest.mark.parametrize("blur", [0.0, 20.0])
def test_clipping_outside_the_box_uses_clipped_x(blur):
    # x_hat outside [-1, 1]: the step uses x_c = clip(x_hat) and eps recomputed from it (B10).
    process = BlurringDiffusion((H, W), blur_sigma_max=blur).double()
    t, s, eta = 0.4, 0.3, 0.5
    rng = np.random.default_rng(4)
    z, eps = 2 * rng.standard_normal((2, 1, H, W)), rng.standard_normal((2, 1, H, W))
    noise = rng.standard_normal(z.shape)
    ref = reference(z, eps, t, s, blur)
    x_hat = idctn(ref["u_x"])
    assert np.abs(x_hat).max() > 1.5  # the case is really outside the box
    u_xc = dctn(np.clip(x_hat, -1, 1))
    u_epsc = (ref["u_t"] - ref["alpha_t"] * u_xc) / ref["sigma_t"]
    c = eta * np.sqrt(ref["var"])
    want = ref["alpha_s"] * u_xc + np.sqrt(ref["sigma_s"] ** 2 - c ** 2) * u_epsc + c * noise
    got, x0 = _step(process, z, eps, t, s, eta, noise, clip=True)
    _assert_close(got, want)
    np.testing.assert_allclose(x0, np.clip(x_hat, -1, 1), rtol=0, atol=1e-12)
    plain, _ = _step(process, z, eps, t, s, eta, noise, clip=False)
    assert np.abs(plain - got).max() > 1e-3


def test_float32_step_close_to_float64():
    # The float32 step (as used in sampling) agrees with the float64 reference to float32 accuracy,
    # away from the ill-conditioned t = 1 end: 1/alpha_t <= ~10 at t = 0.5 here, so ~1e-5 relative.
    process = BlurringDiffusion((H, W))
    z, eps = _inputs(seed=5)
    t, s = 0.5, 0.45
    ref = reference(z.astype(np.float32).astype(np.float64), eps.astype(np.float32).astype(np.float64),
                    np.float64(np.float32(t)), np.float64(np.float32(s)), 20.0)
    e = torch.from_numpy(eps).float()
    z_s, _ = ddim_step(lambda zz, tt: e, process, torch.from_numpy(z).float(), torch.full((2,), t),
                       torch.full((2,), s), 1.0, torch.zeros(2, 1, H, W), clip_denoised=False)
    assert z_s.dtype == torch.float32
    _assert_close(dctn(z_s.double().numpy()), ref["mean_stable"], rel=1e-4)
