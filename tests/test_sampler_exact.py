"""The full sampler with the exact denoiser of a K-image mixture: samples must be those images.

With data uniform over K fixed images the optimal eps is known in closed form (``MixtureDenoiser``),
so the sampler (B9, B10), the noise protocol and the label / guidance paths (B12) are tested
without training. The final output is ``x_hat = sum_k w_k x_k``, a convex combination of the
images with softmax weights at the last noise level (sigma_t ~ 0.015 for 200 steps, ~0.08 for 20);
the images are ~0.7 apart (RMS per pixel, 64 pixels), so the off-target weights are
``exp(-O(100))`` and the output equals one image up to float32 rounding (measured ~4e-7).
TOL = 1e-3 is far above that rounding and ~700x below the distance between images.
"""
import numpy as np
import pytest
import torch
from torch import nn

from bdm_train.analytic import MixtureDenoiser
from bdm_train.diffusion import BlurringDiffusion
from bdm_train.sampling import ddim_step, guided, sample
from bdm_runtime.noise import NoiseStream, time_grid

TOL = 1e-3
BLURS = [20.0, 0.0]                       # BDM and the DDPM baseline
SCHEMES = [(1.0, 200), (0.0, 20)]         # ancestral with many steps, deterministic with few


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(k=4, shape=(1, 8, 8), seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(-0.9, 0.9, (k,) + shape)).float()


def _nearest(x, images):
    """Index of the nearest image and the largest absolute pixel error to it, per sample."""
    dist = ((x[:, None] - images[None]) ** 2).flatten(2).sum(-1)
    k = dist.argmin(1)
    return k, (x - images[k]).flatten(1).abs().max(1).values


def _binomial_ok(count, n, p, k_se=4.0):
    # Seeded, so deterministic; 4 standard errors would be a false alarm with probability 6e-5.
    return abs(count - n * p) <= k_se * np.sqrt(n * p * (1 - p))


class ClassMixture(nn.Module):
    """Exact conditional model: class ``c`` is the mixture of its own images; the null label all of them."""

    def __init__(self, images, classes, process):
        super().__init__()
        self.num_classes = int(classes.max()) + 1
        self.in_channels = images.shape[1]
        self.experts = nn.ModuleList([MixtureDenoiser(images[classes == c], process)
                                      for c in range(self.num_classes)] + [MixtureDenoiser(images, process)])

    def forward(self, z, t, labels=None):
        out = torch.stack([m(z, t) for m in self.experts])
        return out[labels, torch.arange(z.shape[0])]


@pytest.mark.parametrize("eta,steps", SCHEMES)
@pytest.mark.parametrize("blur", BLURS)
def test_samples_are_the_mixture_images_in_equal_proportions(blur, eta, steps):
    images = _images()
    process = BlurringDiffusion(8, blur_sigma_max=blur)
    n = 96
    x = sample(MixtureDenoiser(images, process), process, n, seed=1, steps=steps, eta=eta)
    assert x.shape == (n, 1, 8, 8) and x.dtype == torch.float32
    k, err = _nearest(x, images)
    assert err.max() < TOL
    counts = np.bincount(k.numpy(), minlength=4)
    assert all(_binomial_ok(c, n, 0.25) for c in counts), counts


@pytest.mark.parametrize("eta,steps", SCHEMES)
@pytest.mark.parametrize("blur", BLURS)
def test_sample_frequencies_follow_the_mixture_weights(blur, eta, steps):
    # Mixture [A, A, A, B]: A must come out 3/4 of the time. A sampler that only snapped to the
    # nearest mode (ignoring the posterior weights) would give ~1/2 and fail the bound.
    distinct = _images(2, seed=1)
    process = BlurringDiffusion(8, blur_sigma_max=blur)
    n = 128
    x = sample(MixtureDenoiser(distinct[[0, 0, 0, 1]], process), process, n, seed=2, steps=steps, eta=eta)
    k, err = _nearest(x, distinct)
    assert err.max() < TOL
    assert _binomial_ok(int((k == 0).sum()), n, 0.75), int((k == 0).sum())


def test_multichannel_non_square():
    images = _images(3, shape=(3, 6, 10), seed=2)
    process = BlurringDiffusion((6, 10))
    x = sample(MixtureDenoiser(images, process), process, 24, seed=0, steps=20, eta=0.0)
    assert x.shape == (24, 3, 6, 10)
    k, err = _nearest(x, images)
    assert err.max() < TOL and len(set(k.tolist())) == 3


def test_sample_follows_the_noise_protocol():
    # The loop written out from B9/B10 and bdm_runtime.noise: z_1 is the first draw of each image's
    # generator, then one xi per step (eta > 0); the last step returns the clipped x_hat.
    images = _images()
    process = BlurringDiffusion(8)
    model = MixtureDenoiser(images, process)
    n, steps, eta = 5, 6, 0.5
    noise = NoiseStream(7, 3, n, (1, 8, 8))
    z = torch.from_numpy(noise.draw())
    grid = time_grid(steps)
    for t, s in zip(grid[:-1], grid[1:]):
        xi = torch.from_numpy(noise.draw())
        z, x0 = ddim_step(model, process, z, torch.full((n,), float(t)), torch.full((n,), float(s)), eta, xi)
    got = sample(model, process, n, seed=7, steps=steps, eta=eta, first_index=3)
    torch.testing.assert_close(got, x0, rtol=0, atol=0)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_same_seed_same_images_and_chunking_and_first_index(eta):
    images = _images()
    process = BlurringDiffusion(8)
    model = MixtureDenoiser(images, process)
    kw = dict(steps=30, eta=eta)
    a = sample(model, process, 10, seed=3, **kw)
    torch.testing.assert_close(sample(model, process, 10, seed=3, **kw), a, rtol=0, atol=0)
    assert not torch.equal(sample(model, process, 10, seed=4, **kw), a)
    # Per-image generators: chunking and first_index reproduce the same images. Only the float32
    # rounding order of batched matmuls could depend on the batch size (~1e-7), hence atol 1e-6.
    torch.testing.assert_close(sample(model, process, 10, seed=3, batch_size=3, **kw), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(sample(model, process, 4, seed=3, first_index=6, **kw), a[6:], rtol=0, atol=1e-6)
    torch.testing.assert_close(sample(model, process, 3, seed=3, first_index=2, batch_size=2, **kw), a[2:5],
                               rtol=0, atol=1e-6)


def test_guided_eps_formula():
    # B12: (1 + w) eps(c) - w eps(null); w = 0 is the conditional model itself.
    images, classes = _images(), torch.tensor([0, 0, 1, 1])
    process = BlurringDiffusion(8)
    model = ClassMixture(images, classes, process)
    z, t, labels = torch.randn(6, 1, 8, 8), torch.rand(6), torch.tensor([0, 1, 0, 1, 1, 0])
    cond, null = model(z, t, labels), model(z, t, torch.full_like(labels, 2))
    assert (cond - null).abs().max() > 1e-3  # the two branches really differ
    torch.testing.assert_close(guided(model, labels, 0.0, 2)(z, t), cond, rtol=0, atol=0)
    # (1 + w) a - w b against the same expression: rounding only, ~1e-6 for |eps| ~ 10
    torch.testing.assert_close(guided(model, labels, 1.5, 2)(z, t), 2.5 * cond - 1.5 * null, rtol=0, atol=1e-5)


@pytest.mark.parametrize("blur", BLURS)
def test_labels_select_the_class(blur):
    images, classes = _images(), torch.tensor([0, 0, 1, 1])
    process = BlurringDiffusion(8, blur_sigma_max=blur)
    model = ClassMixture(images, classes, process)
    n = 24
    labels = torch.arange(n) % 2
    for guidance in [0.0, 2.0]:
        for eta, steps in [(1.0, 100), (0.0, 20)]:
            x = sample(model, process, n, seed=5, steps=steps, eta=eta, labels=labels, guidance=guidance)
            k, err = _nearest(x, images)
            assert err.max() < TOL
            assert torch.equal(classes[k], labels), (guidance, eta)
    # Conditional sampling (w = 0) of class 1 is unconditional sampling of class 1's own mixture,
    # with the same noise: equal up to float32 rounding.
    kw = dict(steps=50, eta=1.0, seed=6)
    cond = sample(model, process, 8, labels=1, **kw)
    torch.testing.assert_close(cond, sample(model.experts[1], process, 8, **kw), rtol=0, atol=1e-6)
    # No labels means the null label: the full mixture.
    null = sample(model, process, 8, **kw)
    torch.testing.assert_close(null, sample(model.experts[2], process, 8, **kw), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(n=0), dict(n=2.0), dict(eta=1.5), dict(eta=-0.1), dict(steps=0),
                                    dict(seed=-1), dict(labels=[0, 1])])
def test_invalid_arguments(kwargs):
    process = BlurringDiffusion(8)
    model = MixtureDenoiser(_images(), process)  # unconditional: labels are an error
    args = dict(n=2, seed=0, steps=2)
    args.update(kwargs)
    with pytest.raises(ValueError):
        sample(model, process, **args)


@pytest.mark.parametrize("labels", [3, [0, 5], [0, 1, 0], -1, 1.5, [0, 1.5]])
def test_invalid_labels(labels):
    process = BlurringDiffusion(8)
    model = ClassMixture(_images(), torch.tensor([0, 0, 1, 1]), process)  # labels 0, 1; null 2
    with pytest.raises(ValueError):
        sample(model, process, 2, seed=0, steps=2, labels=labels)
