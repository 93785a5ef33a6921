"""The forward marginal q(u_t | x) = N(alpha_t u_x, sigma_t^2 I) (B5) and the training loss (B8)."""
import numpy as np
import pytest
import torch

from bdm_train.analytic import MixtureDenoiser
from bdm_train.diffusion import BlurringDiffusion
from reference import dctn, ref_alpha_sigma


def _image(shape, seed=0):
    return np.random.default_rng(seed).uniform(-0.9, 0.9, shape)


N_MC = 20000
# Monte-Carlo bounds: the sample mean of N normals has standard error sigma/sqrt(N); the sample
# variance has standard error ~ sigma^2 sqrt(2/(N-1)). 5 standard errors over <= 2 x 60 x 4
# frequency checks has a false-alarm probability < 1e-4 (and the draw is seeded, so it is fixed).
K_SE = 5.0


@pytest.mark.parametrize("blur", [0.0, 20.0])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.6, 0.95])
def test_q_sample_moments_match_b5(blur, t):
    h, w = 6, 10
    process = BlurringDiffusion((h, w), blur_sigma_max=blur).double()
    x = _image((1, h, w))
    gen = torch.Generator().manual_seed(1234)
    eps = torch.randn((N_MC, 1, h, w), generator=gen, dtype=torch.float64)
    tt = torch.full((N_MC,), t, dtype=torch.float64)
    z = process.q_sample(torch.from_numpy(x).expand(N_MC, 1, h, w), tt, eps).numpy()
    u = dctn(z[:, 0])  # frequency space by scipy, not by the package
    alpha, sigma = ref_alpha_sigma(t, h, w, blur)
    mean_ref = alpha * dctn(x[0])
    mean_se = sigma / np.sqrt(N_MC)
    var_se = sigma ** 2 * np.sqrt(2 / (N_MC - 1))
    assert np.abs(u.mean(0) - mean_ref).max() < K_SE * mean_se
    assert np.abs(u.var(0, ddof=1) - sigma ** 2).max() < K_SE * var_se
    # white in frequency space: off-diagonal correlations of two frequencies ~ N(0, 1/N)
    c = np.corrcoef(u[:, 0, 1], u[:, 3, 7])[0, 1]
    assert abs(c) < K_SE / np.sqrt(N_MC)


def test_q_sample_is_b5_exactly_for_given_eps():
    # With eps fixed, u_t = alpha_t u_x + sigma_t V^T eps holds per sample (float64, rounding only).
    h, w = 5, 7
    process = BlurringDiffusion((h, w)).double()
    x = _image((3, 2, h, w), seed=1)
    eps = np.random.default_rng(2).standard_normal((3, 2, h, w))
    ts = np.array([0.0, 0.4, 1.0])
    z = process.q_sample(torch.from_numpy(x), torch.from_numpy(ts), torch.from_numpy(eps)).numpy()
    for i, t in enumerate(ts):
        alpha, sigma = ref_alpha_sigma(t, h, w)
        ref = alpha * dctn(x[i]) + sigma * dctn(eps[i])
        np.testing.assert_allclose(dctn(z[i]), ref, rtol=0, atol=1e-12)


class _Zero(torch.nn.Module):
    def forward(self, z, t, labels=None):
        return torch.zeros_like(z)


@pytest.mark.parametrize("blur", [0.0, 20.0])
def test_loss_of_exact_denoiser_is_zero_and_of_zero_model_is_one(blur):
    torch.manual_seed(0)
    process = BlurringDiffusion(8, blur_sigma_max=blur)
    image = torch.from_numpy(_image((1, 1, 8, 8), seed=3)).float()
    x = image.expand(512, 1, 8, 8)
    exact = process.loss(MixtureDenoiser(image, process), x)
    zero = process.loss(_Zero(), x)
    # Single-image data: the exact eps is eps itself; float32 rounding ~1e-7 amplified by
    # 1/sigma_t <= 150 leaves a squared error far below 1e-6.
    assert exact.item() < 1e-6
    # E eps^2 = 1 over 512*64 = 32768 normals: standard error sqrt(2/32768) = 0.008; 5 SE = 0.04.
    assert abs(zero.item() - 1.0) < 0.04
