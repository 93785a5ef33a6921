"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, centre-padded to 32x32.

The IDX files live under ``/usr/share/datasets/fashion-mnist`` (override with ``$BDM_FMNIST_DIR``).
Padding (not resizing) keeps every pixel of the 28x28 originals; the border is the background (0).
Decoding and fitting are ``bdm_train.data``'s, so the benchmark sees exactly what training sees.
"""
import os

from bdm_runtime.errors import BdmError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
SIZE = 32
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
INSTALL_HINT = "install it with: sudo apt-get install -y dataset-fashion-mnist (or set BDM_FMNIST_DIR)"


def folder(path=None):
    """The data folder: ``path``, else ``$BDM_FMNIST_DIR``, else the Debian location."""
    return os.fspath(path or os.environ.get("BDM_FMNIST_DIR") or DEFAULT_DIR)


def _paths(split, path=None):
    if split not in FILES:
        raise BdmError(f"split must be one of {', '.join(FILES)}, got {split!r}")
    return tuple(os.path.join(folder(path), name) for name in FILES[split])


def available(split="test", path=None):
    """True when the IDX files of ``split`` are present."""
    return all(os.path.isfile(p) for p in _paths(split, path))


def load(split="train", size=SIZE, path=None):
    """uint8 images ``[N, 1, size, size]`` (centre-padded) and int64 labels ``[N]``."""
    from bdm_train import data as datalib

    images_path, labels_path = _paths(split, path)
    if not available(split, path):
        raise BdmError(f"Fashion-MNIST {split} files not found in {folder(path)}: {INSTALL_HINT}")
    ds = datalib.load_idx(images_path, labels_path)
    return datalib.fit_images(ds.images, size, "pad"), ds.labels
