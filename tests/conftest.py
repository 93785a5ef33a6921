"""Shared fixtures: tiny generated data and tiny trained checkpoints (for export/runtime parity tests)."""
import os
import sys

import numpy as np
import pytest

# One intra-op thread for torch (read when torch is first imported, and inherited by subprocesses):
# on 2 shared cores, 2 OpenMP threads stall each other; measured: a tiny UNet's forward+backward
# took 6-7 s with 2 threads on a loaded machine against 0.03 s with 1. Tiny test models gain nothing
# from threads. Set here so that this conftest never imports torch itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The architecture of the tiny checkpoints: 16x16 -> 8x8 with attention at 8 (and in the middle).
TINY_MODEL = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn=(8,))
TINY_TRAIN = dict(steps=30, batch_size=16, lr=2e-3, warmup=5, blur_sigma_max=3.0, dropout=0.0, seed=0, param="eps",
                  log_every=10, ckpt_every=0)


def make_shapes(n, size=16, seed=0):
    """uint8 ``[n, 1, size, size]`` images of 3 classes (square, vertical bar, horizontal bar) and labels."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, 1, size, size), dtype=np.uint8)
    labels = np.arange(n) % 3
    for i, c in enumerate(labels):
        a, w = rng.integers(0, size // 2), rng.integers(size // 4, size // 2)
        if c == 0:
            b = rng.integers(0, size // 2)
            images[i, 0, a:a + w, b:b + w] = 255
        elif c == 1:
            images[i, 0, :, a:a + w // 2] = 255
        else:
            images[i, 0, a:a + w // 2, :] = 255
    return images, labels.astype(np.int64)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """An ``.npz`` of 96 generated 16x16 grayscale images with labels 0..2."""
    images, labels = make_shapes(96)
    path = tmp_path_factory.mktemp("tiny_data") / "shapes.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """An ``.npz`` of 24 generated 8x8 images (for training runs of a few steps)."""
    images, labels = make_shapes(24, size=8, seed=1)
    path = tmp_path_factory.mktemp("small_data") / "d.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


def _train_tiny(tmp_path_factory, data, name, **extra):
    from bdm_train.train import train

    return train(data, tmp_path_factory.mktemp(name), progress=False, **TINY_MODEL, **dict(TINY_TRAIN, **extra))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_data):
    """Path of an unconditional 16x16x1 checkpoint trained 30 steps (``OUT/model.pt``; log.jsonl and
    samples_000030.png beside it)."""
    return _train_tiny(tmp_path_factory, tiny_data, "tiny_ckpt", sample_every=30, sample_n=4)


@pytest.fixture(scope="session")
def tiny_spectral_checkpoint(tmp_path_factory, tiny_data):
    """Path of the same unconditional model with the spectral parameterisation (B14)."""
    return _train_tiny(tmp_path_factory, tiny_data, "tiny_spectral_ckpt", param="spectral")


@pytest.fixture(scope="session")
def tiny_cond_checkpoint(tmp_path_factory, tiny_data):
    """Path of the same, class-conditional with ``num_classes=3`` (null label 3)."""
    return _train_tiny(tmp_path_factory, tiny_data, "tiny_cond_ckpt", num_classes=3)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test (tiny tensors: threads only add overhead on shared cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
