"""The project's own feature network for Fashion-MNIST (the Inception network of FID cannot be downloaded here).

A small VGG-style CNN classifier on 32x32 padded images, trained with a fixed seed on the 60,000
training images. Its penultimate layer (128 ReLU units, the input of the last linear layer, like
Inception's pool3) gives the features of FD-FMNIST and KID (``benchmarks.metrics``).

    python -m benchmarks.feature_net train      # writes benchmarks/assets/fmnist_features.pt (+ .json)
"""
import hashlib
import json
import os
import time

import click
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from bdm_runtime.errors import BdmError

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "assets", "fmnist_features.pt")
FEATURES = 128
NUM_CLASSES = 10
SIZE = 32


def _conv(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _block(cin, cout, convs=2):
    """``convs`` 3x3 conv + BN + ReLU, then 2x2 max-pool (halves the resolution)."""
    layers = _conv(cin, cout)
    for _ in range(convs - 1):
        layers += _conv(cout, cout)
    return nn.Sequential(*layers, nn.MaxPool2d(2))


class FeatureNet(nn.Module):
    """32x32x1 -> 16 -> 8 -> 4 (channels 16, 32, 64) -> 128 features -> 10 logits.

    One convolution at full resolution (where a layer costs most), two at the lower ones.
    """

    def __init__(self, width=16, features=FEATURES, num_classes=NUM_CLASSES):
        super().__init__()
        self.body = nn.Sequential(_block(1, width, convs=1), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.fc = nn.Linear(4 * width * 4 * 4, features)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(features, num_classes)

    def features(self, x):
        """Penultimate activations ``[N, 128]`` (after ReLU) of float images ``[N, 1, 32, 32]`` in ``[-1, 1]``."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


# -- inputs -------------------------------------------------------------------------------------
def as_input(images):
    """uint8 (0..255) or float (-1..1) images, ``[N,H,W]``, ``[N,1,H,W]`` or ``[N,H,W,1]``, to float ``[N,1,32,32]``.

    28x28 images are centre-padded with the background (-1), as ``benchmarks.fmnist`` does.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] != 1 and x.shape[3] == 1:
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] != 1:
        raise BdmError(f"expected grayscale images [N,H,W], [N,1,H,W] or [N,H,W,1], got shape {x.shape}")
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
    h, w = x.shape[2:]
    if (h, w) != (SIZE, SIZE):
        if h > SIZE or w > SIZE:
            raise BdmError(f"the feature net takes images up to {SIZE}x{SIZE}, got {h}x{w}")
        top, left = (SIZE - h) // 2, (SIZE - w) // 2
        x = np.pad(x, ((0, 0), (0, 0), (top, SIZE - h - top), (left, SIZE - w - left)), constant_values=-1.0)
    return torch.from_numpy(np.ascontiguousarray(x))


# -- the committed network ----------------------------------------------------------------------
_CACHE = {}


def load(path=WEIGHTS):
    """The trained network in eval mode (cached per path); loads the state_dict with ``weights_only=True``."""
    path = os.path.abspath(os.fspath(path))
    if path not in _CACHE:
        if not os.path.isfile(path):
            raise BdmError(f"feature-net weights {path} not found: run python -m benchmarks.feature_net train")
        net = FeatureNet()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        _CACHE[path] = net.eval()
    return _CACHE[path]


def weights_digest(path=WEIGHTS):
    """sha256 of the weights file (stored with the reference statistics to catch a mismatch)."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@torch.no_grad()
def _run(fn, images, batch):
    x = as_input(images)
    return np.concatenate([fn(x[i:i + batch]).numpy() for i in range(0, max(len(x), 1), batch)])


def features(images, path=WEIGHTS, batch=500):
    """Penultimate features ``[N, 128]`` float32 of uint8 or float images (see :func:`as_input`)."""
    return _run(load(path).features, images, batch)


def logits(images, path=WEIGHTS, batch=500):
    """Class logits ``[N, 10]`` float32."""
    return _run(load(path), images, batch)


def classify(images, path=WEIGHTS, batch=500):
    """Predicted class ids ``[N]`` (argmax of the logits)."""
    return logits(images, path, batch).argmax(1)


@torch.no_grad()
def classify_features(feats, path=WEIGHTS):
    """Class ids ``[N]`` from penultimate features (the last linear layer's argmax; no second forward pass)."""
    return load(path).head(torch.as_tensor(np.asarray(feats, np.float32))).argmax(1).numpy()


# -- training -----------------------------------------------------------------------------------
def evaluate(net, images, labels, batch=1000):
    """Accuracy of ``net`` on uint8 ``images`` against ``labels``."""
    net.eval()
    with torch.no_grad():
        x = as_input(images)
        pred = torch.cat([net(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred.numpy() == np.asarray(labels)).mean())


def train(out=WEIGHTS, epochs=3, batch_size=128, lr=3e-3, seed=0, threads=1, progress=True):
    """Train the classifier on the training set; write its state_dict to ``out`` and a ``.json`` beside it.

    One-cycle learning rate (AdamW), light augmentation (random 1-pixel shifts and horizontal flips,
    both label-preserving for clothing). Returns the record written to the ``.json``.
    """
    from . import fmnist

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x_train, y_train = fmnist.load("train")
    x_test, y_test = fmnist.load("test")
    x = as_input(x_train)
    y = torch.from_numpy(y_train)
    net = FeatureNet()
    steps_per_epoch = len(x) // batch_size
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        total = 0.0
        for k in range(steps_per_epoch):
            idx = perm[k * batch_size:(k + 1) * batch_size]
            xb = _augment(x[idx], g)
            loss = F.cross_entropy(net(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        if progress:
            acc = evaluate(net, x_test, y_test)
            print(f"epoch {epoch + 1}/{epochs}: train loss {total / steps_per_epoch:.4f}, test accuracy {acc:.4f}, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    acc = evaluate(net, x_test, y_test)
    from bdm_runtime.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, tmp)
    _CACHE.pop(os.path.abspath(out), None)
    record = dict(test_accuracy=round(acc, 4), epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                  params=sum(p.numel() for p in net.parameters()), features=FEATURES,
                  train_seconds=round(time.perf_counter() - start, 1), torch=torch.__version__,
                  sha256=weights_digest(out))
    with atomic_path(os.path.splitext(out)[0] + ".json") as tmp, open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    return record


def _augment(x, g):
    """Random horizontal flip and a random shift by up to 1 pixel (in the padding), per batch."""
    flip = torch.rand(len(x), generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dy, dx = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    return torch.roll(x, (dy, dx), dims=(2, 3))


# -- CLI ----------------------------------------------------------------------------------------
@click.group()
def cli():
    """The Fashion-MNIST feature network of FD-FMNIST / KID."""


@cli.command("train")
@click.option("--out", default=WEIGHTS, show_default=True, type=click.Path(dir_okay=False))
@click.option("--epochs", default=3, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), help="torch CPU threads.")
def train_cmd(out, epochs, seed, threads):
    """Train on the Fashion-MNIST training set and write the weights (state_dict) to OUT."""
    record = train(out, epochs=epochs, seed=seed, threads=threads)
    click.echo(f"test accuracy {record['test_accuracy']:.4f}; wrote {out} ({os.path.getsize(out)} bytes)")


@cli.command("accuracy")
@click.option("--weights", default=WEIGHTS, show_default=True, type=click.Path(dir_okay=False))
def accuracy_cmd(weights):
    """Test accuracy of the committed network."""
    from . import fmnist

    x, y = fmnist.load("test")
    click.echo(f"test accuracy {float((classify(x, weights) == y).mean()):.4f}")


def main(args=None):
    from bdm_runtime.errors import run_cli

    run_cli(cli, args)


if __name__ == "__main__":
    main()
