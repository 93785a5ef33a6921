"""FD-FMNIST, KID and the committed feature network (``benchmarks.metrics``, ``benchmarks.feature_net``).

References are independent: closed forms for Gaussians with known parameters, ``scipy.linalg.sqrtm``,
and a double loop for the unbiased MMD^2.
"""
import os

import numpy as np
import pytest
import scipy.linalg
import torch

from benchmarks import feature_net, fmnist, metrics


def _random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# -- Fréchet distance ---------------------------------------------------------------------------
def test_fd_of_a_set_with_itself_is_zero():
    f = np.random.default_rng(0).standard_normal((500, 16)) @ np.random.default_rng(1).standard_normal((16, 16))
    mu, sigma = metrics.gaussian_stats(f)
    # The eigen-route computes tr S - 2 tr (S^1/2 S S^1/2)^1/2 + tr S; float64 rounding leaves ~1e-12 x tr S.
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_fd_matches_closed_form_for_known_gaussians():
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    # Diagonal covariances commute, so (S1 S2)^1/2 = diag(sqrt(v1 v2)) elementwise.
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    assert metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # A common rotation Q leaves the distance unchanged but makes both covariances full matrices.
    q = _random_orthogonal(d, rng)
    got = metrics.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


def test_fd_matches_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(3)
    d = 10
    a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real  # the textbook (pytorch-fid) route
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


# -- KID ----------------------------------------------------------------------------------------
def _mmd2_loops(x, y):
    """Unbiased MMD^2 with the cubic kernel, term by term (the U-statistic definition)."""
    d = x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_mmd2_matches_the_definition():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((30, 5)), rng.standard_normal((25, 5)) + 0.3
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(_mmd2_loops(x, y), rel=1e-10)


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(5)
    d = 16
    a, b = rng.standard_normal((1000, d)), rng.standard_normal((1000, d))
    mean, std = metrics.kid(a, b, subsets=20, subset_size=500)
    # Unbiased: the mean over subsets scatters around 0 by about one subset std (3x: a safe bound).
    assert abs(mean) < 3 * std
    shifted = rng.standard_normal((1000, d)) + 0.5
    mean_s, std_s = metrics.kid(a, shifted, subsets=20, subset_size=500)
    assert mean_s > 10 * std_s and mean_s > 10 * abs(mean)


# -- the committed feature network and statistics -----------------------------------------------
needs_data = pytest.mark.skipif(not fmnist.available("test"),
                                reason=f"Fashion-MNIST not in {fmnist.folder()} "
                                       "(apt-get install dataset-fashion-mnist)")


def test_feature_net_weights_load_with_weights_only_and_are_small():
    state = torch.load(feature_net.WEIGHTS, map_location="cpu", weights_only=True)
    net = feature_net.FeatureNet()
    net.load_state_dict(state)  # strict: every key present, every shape right
    assert os.path.getsize(feature_net.WEIGHTS) < 2 * 1024 * 1024


@needs_data
def test_feature_net_classifies_test_images_far_above_chance():
    x, y = fmnist.load("test")
    x, y = x[:300], y[:300]
    pred = feature_net.classify(x)
    # Chance is 10%; the committed net scores ~90% on the full test set, so 300 images are >= 80%
    # except with negligible probability (binomial sd ~1.7%).
    assert (pred == y).mean() > 0.8
    hist = metrics.class_histogram(x)
    assert hist.sum() == 300 and (hist == np.bincount(pred, minlength=10)).all()
    # uint8 [N,1,H,W], float [-1,1] [N,H,W,1] and unpadded 28x28 inputs give the same features.
    f = feature_net.features(x[:8])
    as_float = (x[:8].astype(np.float32) / 127.5 - 1.0).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(feature_net.features(as_float), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(feature_net.features(x[:8, :, 2:30, 2:30]), f, rtol=1e-5, atol=1e-5)


@needs_data
def test_reference_stats_match_the_committed_net():
    ref = metrics.reference_stats()  # raises if computed with other weights (sha256 check)
    x, _ = fmnist.load("test")
    f = feature_net.features(x[:200])
    # Stored features are float16: relative rounding 2^-11, so 1e-3 relative plus a small absolute slack.
    np.testing.assert_allclose(ref["features"][:200], f, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ref["mu"], ref["features"].astype(np.float64).mean(0), rtol=1e-3, atol=1e-3)
    assert ref["features"].shape == (10000, feature_net.FEATURES)
    # Real (training) images score close to the floor; the same images with shuffled pixels do not.
    xt, _ = fmnist.load("train")
    real = metrics.evaluate(xt[:500], ref, kid_subsets=10, kid_subset_size=500)
    noise = np.random.default_rng(0).permuted(xt[:500].reshape(500, -1), axis=1).reshape(xt[:500].shape)
    bad = metrics.evaluate(noise, ref, kid_subsets=10, kid_subset_size=500)
    assert bad["fd"] > 20 * real["fd"] and bad["kid"] > 20 * max(real["kid"], 1e-4)
