"""The noise and blur schedule (B2-B4, B6) against an independent float64 numpy implementation."""
import math

import numpy as np
import pytest
import torch

from bdm_train.diffusion import BlurringDiffusion
from reference import ref_alpha_sigma

T_GRID = np.array([0.0, 1e-4, 0.01, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99, 1.0])


def _package(process, t, dtype):
    alpha, sigma = process.alpha_sigma(torch.as_tensor(t, dtype=dtype))
    return alpha.numpy(), sigma.numpy()


@pytest.mark.parametrize("blur", [0.0, 1.0, 20.0])
@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
def test_alpha_sigma_matches_reference_float64(blur, size):
    process = BlurringDiffusion(size, blur_sigma_max=blur).double()
    alpha, sigma = _package(process, T_GRID, torch.float64)
    ref_alpha, ref_sigma = ref_alpha_sigma(T_GRID, *size, blur_sigma_max=blur)
    # Same formulas in the same precision: only reordering differs, ~1e-15 relative.
    np.testing.assert_allclose(alpha[:, 0], ref_alpha, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sigma.reshape(-1), ref_sigma, rtol=1e-12, atol=0)


@pytest.mark.parametrize("blur", [0.0, 20.0])
def test_alpha_sigma_float32_close_to_reference(blur):
    t32 = T_GRID.astype(np.float32)
    process = BlurringDiffusion((6, 10), blur_sigma_max=blur)
    alpha, sigma = _package(process, t32, torch.float32)
    assert alpha.dtype == np.float32 and sigma.dtype == np.float32
    ref_alpha, ref_sigma = ref_alpha_sigma(t32.astype(np.float64), 6, 10, blur_sigma_max=blur)
    # float32 tan near its pole (t = 1, tan ~ 148) amplifies the 6e-8 argument rounding by ~150:
    # ~1e-5 relative in a_t; 1e-4 is a safe bound that still catches any formula error.
    np.testing.assert_allclose(alpha[:, 0], ref_alpha, rtol=1e-4, atol=0)
    np.testing.assert_allclose(sigma.reshape(-1), ref_sigma, rtol=1e-4, atol=0)


def test_a_squared_plus_sigma_squared_is_one():
    process = BlurringDiffusion(4, blur_sigma_max=0.0).double()
    t = np.linspace(0, 1, 101)
    alpha, sigma = _package(process, t, torch.float64)
    a = alpha[:, 0, 0, 0]  # lambda[0, 0] = 0 and no blur: alpha is a_t
    np.testing.assert_allclose(a ** 2 + sigma.reshape(-1) ** 2, 1.0, rtol=0, atol=1e-14)
    # a_t is close to cos(pi t / 2) (B3): the truncation at logsnr +-10 moves it by < 0.007.
    np.testing.assert_allclose(a, np.cos(np.pi * t / 2), rtol=0, atol=0.007)


@pytest.mark.parametrize("blur", [0.0, 1.0, 20.0])
def test_transition_variance_non_negative(blur):
    # B6: sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2 >= 0 for all s < t, all frequencies.
    process = BlurringDiffusion((8, 6), blur_sigma_max=blur).double()
    grid = np.linspace(0, 1, 201)
    alpha, sigma = _package(process, grid, torch.float64)
    sigma = sigma.reshape(-1)
    i, j = np.triu_indices(len(grid), k=1)  # s = grid[i] < t = grid[j]
    alpha_ts = alpha[j, 0] / alpha[i, 0]
    sigma2_ts = sigma[j, None, None] ** 2 - alpha_ts ** 2 * sigma[i, None, None] ** 2
    assert sigma2_ts.min() >= 0.0
    # and it is strictly positive, so the posterior of B7 is well defined
    assert (sigma2_ts > 0).all()


def test_no_blur_gives_a_t_at_every_frequency():
    process = BlurringDiffusion((5, 7), blur_sigma_max=0.0).double()
    alpha, sigma = _package(process, T_GRID, torch.float64)
    a = np.sqrt(1 - sigma.reshape(-1) ** 2)
    np.testing.assert_allclose(alpha[:, 0], np.broadcast_to(a[:, None, None], (len(T_GRID), 5, 7)),
                               rtol=1e-12, atol=1e-16)


def test_blur_damps_high_frequencies_monotonically():
    # B4: d_t decreases with lambda, so alpha is largest at (0, 0) and smallest at (H-1, W-1).
    # At t = 0.1, tau = 0.12 and exp(-lambda tau) >= exp(-1.8): no underflow, so strictly decreasing.
    process = BlurringDiffusion(8).double()
    alpha, _ = _package(process, np.array([0.1]), torch.float64)
    alpha = alpha[0, 0]
    assert np.all(np.diff(alpha, axis=0) < 0) and np.all(np.diff(alpha, axis=1) < 0)
    # At t = 0.5 most of the spectrum has reached the d_min floor: non-increasing.
    alpha, _ = _package(process, np.array([0.5]), torch.float64)
    assert np.all(np.diff(alpha[0, 0], axis=0) <= 0) and np.all(np.diff(alpha[0, 0], axis=1) <= 0)
    # at t = 1 the highest frequencies are damped to d_min = 1e-3 (exp(-lambda tau) underflows)
    alpha1, sigma1 = _package(process, np.array([1.0]), torch.float64)
    a1 = math.sqrt(1 - sigma1.item() ** 2)
    assert alpha1[0, 0, -1, -1] == pytest.approx(a1 * 1e-3, rel=1e-9)


@pytest.mark.parametrize("size", [6, (6, 10), (1, 3)])
def test_shapes(size):
    process = BlurringDiffusion(size)
    h, w = (size, size) if isinstance(size, int) else size
    assert process.image_size == (h, w)
    alpha, sigma = process.alpha_sigma(torch.rand(5))
    assert alpha.shape == (5, 1, h, w) and sigma.shape == (5, 1, 1, 1)
    assert process.freqs.shape == (h, w)


def test_logsnr_endpoints():
    for lo, hi in [(-10.0, 10.0), (-6.0, 8.0)]:
        process = BlurringDiffusion(4, logsnr_min=lo, logsnr_max=hi).double()
        ends = process.logsnr(torch.tensor([0.0, 1.0], dtype=torch.float64)).numpy()
        np.testing.assert_allclose(ends, [hi, lo], rtol=0, atol=1e-12)
        # and it decreases in between
        mid = process.logsnr(torch.linspace(0, 1, 50, dtype=torch.float64)).numpy()
        assert np.all(np.diff(mid) < 0)


def test_config_round_trip():
    process = BlurringDiffusion((6, 10), blur_sigma_max=3.0, min_scale=0.01, logsnr_min=-8, logsnr_max=9)
    clone = BlurringDiffusion.from_config(process.config())
    assert clone.config() == process.config()
    t = torch.linspace(0, 1, 7)
    for a, b in zip(process.alpha_sigma(t), clone.alpha_sigma(t)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs", [dict(image_size=0), dict(image_size=4, blur_sigma_max=-1.0),
                                    dict(image_size=4, min_scale=0.0), dict(image_size=4, logsnr_min=5.0,
                                                                            logsnr_max=5.0)])
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        BlurringDiffusion(**kwargs)


def test_double_rebuilds_constants_in_float64():
    # .double() must give float64-exact DCT matrices and frequencies, not widened float32 ones.
    process = BlurringDiffusion((6, 10)).double()
    assert process.c_h.dtype == process.freqs.dtype == torch.float64
    c = process.c_w.numpy()
    np.testing.assert_allclose(c @ c.T, np.eye(10), rtol=0, atol=1e-14)
    lam = (np.pi * np.arange(6) / 6)[:, None] ** 2 + (np.pi * np.arange(10) / 10)[None, :] ** 2
    np.testing.assert_allclose(process.freqs.numpy(), lam, rtol=1e-15, atol=0)
    # and back to float32 still works
    process.float()
    assert process.c_h.dtype == process.c_w.dtype == process.freqs.dtype == torch.float32
