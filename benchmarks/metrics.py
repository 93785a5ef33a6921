"""Sample-quality metrics on the project's Fashion-MNIST feature network (``benchmarks.feature_net``).

- FD-FMNIST: the Fréchet distance between Gaussians fitted to the features (FID's formula, Heusel
  et al. 2017) ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.
- KID: the unbiased estimate of MMD^2 with the cubic polynomial kernel ``k(x, y) = (x.y / d + 1)^3``,
  averaged over random subsets (Binkowski et al. 2018); unbiased, so ~0 for equal distributions.
- The class histogram of generated images under the classifier's argmax (mode coverage).

Both distances are against the 10,000 test images, whose statistics are committed in
``benchmarks/assets/fmnist_test_stats.npz`` (regenerate: ``python -m benchmarks.metrics stats``).
The numbers are comparable with each other, not with published (Inception) FIDs.
"""
import json
import os

import click
import numpy as np

from bdm_runtime.errors import BdmError

HERE = os.path.dirname(os.path.abspath(__file__))
STATS = os.path.join(HERE, "assets", "fmnist_test_stats.npz")
REGENERATE = "python -m benchmarks.metrics stats"


# -- Fréchet distance ---------------------------------------------------------------------------
def gaussian_stats(features):
    """Mean ``[D]`` and covariance ``[D, D]`` (float64, unbiased) of features ``[N, D]``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise BdmError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _psd_sqrt(s):
    """Symmetric square root of a PSD matrix through its eigendecomposition (negatives from rounding -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2})``.

    ``tr (S1 S2)^{1/2}`` is the sum of the square roots of the eigenvalues of
    ``S1^{1/2} S2 S1^{1/2}`` (similar to ``S1 S2``, but symmetric PSD): no complex parts to discard,
    unlike ``scipy.linalg.sqrtm(S1 @ S2)``.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    root1 = _psd_sqrt(sigma1)
    m = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


# -- KID ----------------------------------------------------------------------------------------
def polynomial_kernel(a, b):
    """``(a b^T / d + 1)^3`` (the KID kernel)."""
    k = a @ b.T / a.shape[1] + 1.0
    return k * k * k  # not k ** 3: numpy's float power is ~25x slower


def mmd2_unbiased(f1, f2):
    """Unbiased MMD^2 of two feature sets under :func:`polynomial_kernel` (U-statistic: diagonals excluded)."""
    m, n = len(f1), len(f2)
    k11, k22, k12 = polynomial_kernel(f1, f1), polynomial_kernel(f2, f2), polynomial_kernel(f1, f2)
    return float((k11.sum() - np.trace(k11)) / (m * (m - 1)) + (k22.sum() - np.trace(k22)) / (n * (n - 1))
                 - 2 * k12.sum() / (m * n))


def kid(features1, features2, subsets=100, subset_size=1000, seed=0):
    """``(mean, std)`` of the unbiased MMD^2 over ``subsets`` random subsets of ``subset_size`` from each set."""
    f1 = np.asarray(features1, np.float64)
    f2 = np.asarray(features2, np.float64)
    size = min(subset_size, len(f1), len(f2))
    if size < 2:
        raise BdmError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    values = [mmd2_unbiased(f1[rng.choice(len(f1), size, replace=False)],
                            f2[rng.choice(len(f2), size, replace=False)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


# -- class histogram ----------------------------------------------------------------------------
def class_histogram(images, weights=None):
    """Counts ``[10]`` of the classifier's argmax over ``images`` (uint8 or float, see ``feature_net.as_input``)."""
    from . import feature_net

    pred = feature_net.classify(images, weights or feature_net.WEIGHTS)
    return np.bincount(pred, minlength=feature_net.NUM_CLASSES)


def total_variation(counts, reference=None):
    """Total variation distance of a histogram from ``reference`` (default uniform): 0 .. 1."""
    p = np.asarray(counts, np.float64) / max(np.sum(counts), 1)
    q = np.full_like(p, 1.0 / len(p)) if reference is None else np.asarray(reference, np.float64) / np.sum(reference)
    return float(0.5 * np.abs(p - q).sum())


# -- the committed test-set statistics ----------------------------------------------------------
def reference_stats(path=STATS, check_weights=True):
    """``dict(mu, sigma, features [10000, D] float32, hist, ...)`` of the test set, from the committed file."""
    from . import feature_net

    if not os.path.isfile(path):
        raise BdmError(f"reference statistics {path} not found: run {REGENERATE}")
    with np.load(path, allow_pickle=False) as z:
        ref = {k: z[k] for k in z.files}
    ref["features"] = ref["features"].astype(np.float32)
    if check_weights and os.path.isfile(feature_net.WEIGHTS):
        if str(ref["net_sha256"]) != feature_net.weights_digest():
            raise BdmError(f"{path} was computed with other feature-net weights than {feature_net.WEIGHTS}: "
                           f"run {REGENERATE}")
    return ref


def write_reference_stats(path=STATS, seed=0):
    """Features of the 10,000 test images -> ``path`` (mu, sigma float64; features float16 for KID).

    Also stores the metric's floor: FD and KID of real training images (1,000 and 10,000 drawn
    with ``seed``) against the test set, i.e. what a perfect generator would score at those counts.
    """
    from bdm_runtime.io import atomic_path

    from . import feature_net, fmnist

    x, y = fmnist.load("test")
    feats = feature_net.features(x)
    mu, sigma = gaussian_stats(feats)
    pred = feature_net.logits(x).argmax(1)
    out = dict(mu=mu, sigma=sigma, features=feats.astype(np.float16), labels=y.astype(np.uint8),
               hist=np.bincount(pred, minlength=feature_net.NUM_CLASSES),
               test_accuracy=np.float64((pred == y).mean()), net_sha256=np.array(feature_net.weights_digest()))
    xt, _ = fmnist.load("train")
    order = np.random.default_rng(seed).permutation(len(xt))
    for n in (1000, 10000):
        ft = feature_net.features(xt[order[:n]])
        out[f"fd_train_{n}"] = np.float64(frechet_distance(*gaussian_stats(ft), mu, sigma))
        out[f"kid_train_{n}"] = np.float64(kid(ft, feats)[0])
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **out)
    return {k: (v.item() if np.ndim(v) == 0 else None) for k, v in out.items() if np.ndim(v) == 0}


# -- everything for one set of samples ----------------------------------------------------------
def evaluate(images, ref=None, kid_subsets=100, kid_subset_size=1000, seed=0):
    """FD-FMNIST, KID (mean, std over subsets) and class histogram of generated ``images`` vs the test set."""
    from . import feature_net

    ref = ref if ref is not None else reference_stats()
    feats = feature_net.features(images)
    mu, sigma = gaussian_stats(feats)
    k, k_std = kid(feats, ref["features"], kid_subsets, kid_subset_size, seed)
    hist = np.bincount(feature_net.classify_features(feats), minlength=feature_net.NUM_CLASSES)
    return dict(n=int(len(feats)), fd=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]), kid=k, kid_std=k_std,
                hist=[int(c) for c in hist], hist_tv=total_variation(hist, ref["hist"]))


def load_images(path, key="images"):
    """uint8 images from an ``.npz`` written by ``bdm-run --npz`` / ``bdm-sample --npz``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise BdmError(f"{path} has no {key!r} array (keys: {', '.join(z.files)})")
            return z[key]
    except (OSError, ValueError) as e:
        raise BdmError(f"cannot read {path}: {e}") from None


# -- CLI ----------------------------------------------------------------------------------------
@click.group()
def cli():
    """FD-FMNIST / KID / class histogram against the Fashion-MNIST test set."""


@cli.command("stats")
@click.option("--out", default=STATS, show_default=True, type=click.Path(dir_okay=False))
def stats_cmd(out):
    """Recompute the test-set reference statistics (after retraining the feature net)."""
    info = write_reference_stats(out)
    click.echo(json.dumps(dict(info, path=out, bytes=os.path.getsize(out))))


@cli.command("eval")
@click.argument("npz", type=click.Path(exists=True, dir_okay=False))
@click.option("--key", default="images", show_default=True, help="Array of uint8 images in the .npz.")
def eval_cmd(npz, key):
    """FD-FMNIST, KID and class histogram of the images in NPZ (bdm-run/bdm-sample --npz output)."""
    click.echo(json.dumps(evaluate(load_images(npz, key))))


def main(args=None):
    from bdm_runtime.errors import run_cli

    run_cli(cli, args)


if __name__ == "__main__":
    main()
