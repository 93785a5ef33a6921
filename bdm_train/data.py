"""Training data: an image folder, an ``.npz`` of uint8 images, or MNIST-style IDX files.

Everything is decoded once into a uint8 array ``[N, C, H, W]`` (plus optional int64 labels); the
training loop indexes it directly. Images are scaled to ``[-1, 1]`` only when a batch is drawn.
"""
import gzip
import os

import numpy as np

from bdm_runtime.errors import BdmError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FITS = ("pad", "resize")


class Dataset:
    """uint8 ``images [N, C, H, W]``, int64 ``labels [N]`` or None, and where they came from."""

    def __init__(self, images, labels=None, source=""):
        self.images = images
        self.labels = labels
        self.source = source

    def __len__(self):
        return len(self.images)

    @property
    def channels(self):
        return self.images.shape[1]

    @property
    def size(self):
        return tuple(self.images.shape[2:])

    def info(self):
        """Plain-typed description (stored in the checkpoint config)."""
        return dict(path=self.source, n=len(self), channels=int(self.channels), size=list(self.size),
                    labels=self.labels is not None,
                    num_labels=int(self.labels.max()) + 1 if self.labels is not None and len(self.labels) else 0)


# -- scaling ------------------------------------------------------------------------------------
def to_float(images):
    """uint8 ``[0, 255]`` -> float ``[-1, 1]`` (numpy array or torch tensor)."""
    return images / 127.5 - 1.0


# -- IDX (MNIST / Fashion-MNIST) -------------------------------------------------------------------
def _open(path):
    with open(path, "rb") as f:
        head = f.read(2)
    return gzip.open(path, "rb") if head == b"\x1f\x8b" else open(path, "rb")


def read_idx(path):
    """Parse one IDX file (optionally gzipped): magic ``0 0 type ndim``, big-endian int32 dims, data."""
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise BdmError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise BdmError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise BdmError(f"{path} is truncated (IDX header)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(IDX_TYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) - 4 - 4 * ndim < count * dtype.itemsize:
        raise BdmError(f"{path} is truncated: header says {dims}, not enough data")
    return np.frombuffer(raw, dtype, count, 4 + 4 * ndim).reshape(dims)


def _find(folder, stem):
    for name in (stem, stem + ".gz"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    return None


def _labels_beside(images_path):
    """``train-images-idx3-ubyte[.gz]`` -> ``train-labels-idx1-ubyte[.gz]`` when it exists."""
    folder, name = os.path.split(images_path)
    if "images-idx3" not in name:
        return None
    stem = name.replace("images-idx3", "labels-idx1")
    stem = stem[:-3] if stem.endswith(".gz") else stem
    return _find(folder, stem)


def load_idx(images_path, labels_path=None):
    """Images from an IDX file (``[N, H, W]`` or ``[N, H, W, C]`` uint8), labels from its sibling."""
    images = read_idx(images_path)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise BdmError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
    images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
    labels = None
    labels_path = labels_path or _labels_beside(images_path)
    if labels_path:
        labels = read_idx(labels_path).astype(np.int64)
        if labels.shape != (len(images),):
            raise BdmError(f"{labels_path}: {labels.shape[0]} labels for {len(images)} images")
    return Dataset(np.ascontiguousarray(images), labels, images_path)


# -- npz ----------------------------------------------------------------------------------------
def _layout(a, path):
    """``[N,H,W]``, ``[N,H,W,C]`` or ``[N,C,H,W]`` -> ``[N,C,H,W]``."""
    if a.ndim == 3:
        return a[:, None]
    if a.ndim == 4:
        if a.shape[3] in (1, 2, 3, 4):
            return a.transpose(0, 3, 1, 2)
        if a.shape[1] in (1, 2, 3, 4):
            return a
    raise BdmError(f"{path}: images must be [N,H,W], [N,H,W,C] or [N,C,H,W] with C <= 4, got {a.shape}")


def load_npz(path):
    """uint8 images under key ``images`` (or the only array), optional ``labels``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile / numpy raise many types for a bad file
        raise BdmError(f"cannot read {path} as .npz: {e}") from None
    if "images" in arrays:
        images = arrays["images"]
    else:
        rest = [k for k in arrays if k != "labels"]
        if len(rest) != 1:
            raise BdmError(f"{path}: no 'images' array and not exactly one other array (keys: {sorted(arrays)})")
        images = arrays[rest[0]]
    if images.dtype != np.uint8:
        raise BdmError(f"{path}: images must be uint8 (0..255), got {images.dtype}")
    images = np.ascontiguousarray(_layout(images, path))
    labels = arrays.get("labels")
    if labels is not None:
        if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (len(images),):
            raise BdmError(f"{path}: labels must be integers of shape ({len(images)},), got "
                           f"{labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
    return Dataset(images, labels, path)


# -- image folder -------------------------------------------------------------------------------
def _image_files(folder):
    files = []
    for root, dirs, names in os.walk(folder):
        dirs.sort()
        files += [os.path.join(root, n) for n in sorted(names)
                  if n.lower().endswith(IMAGE_EXTS) and not n.startswith(".")]
    return files


def _read_image(path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "F") or (im.mode == "P" and _gray_palette(im))
            return np.asarray(im.convert("L" if gray else "RGB")), gray
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BdmError(f"cannot read image {path}: {e}") from None


def _gray_palette(im):
    pal = np.asarray(im.convert("RGB"))
    return bool((pal[..., 0] == pal[..., 1]).all() and (pal[..., 1] == pal[..., 2]).all())


def load_folder(folder, size=None, fit=None, workers=0):
    """Every image under ``folder``; labels from first-level subfolder names when all images have one.

    ``workers > 0`` decodes with that many threads (Pillow releases the GIL while decoding).
    """
    files = _image_files(folder)
    if not files:
        raise BdmError(f"no images ({', '.join(IMAGE_EXTS)}) found in folder {folder}")
    if workers and workers > 0:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            decoded = list(pool.map(_read_image, files))
    else:
        decoded = [_read_image(p) for p in files]
    gray = all(g for _, g in decoded)
    arrays = []
    for (a, g), p in zip(decoded, files):
        if not gray and g:
            a = np.repeat(a[..., None], 3, axis=2)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))  # [C, H, W]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        if size is None or fit is None:
            raise BdmError(f"images in {folder} have different sizes ({shapes[0][1:]}, {shapes[-1][1:]}, ...): "
                           f"pass --image-size and --fit pad|resize")
        _check_fit_memory(len(arrays), max(a.shape[0] for a in arrays), size, folder)
        arrays = [fit_images(a[None], size, fit)[0] for a in arrays]
    images = np.stack(arrays)
    rel = [os.path.relpath(p, folder).split(os.sep) for p in files]
    labels = None
    if all(len(r) == 2 for r in rel):
        classes = sorted({r[0] for r in rel})
        if len(classes) > 1:
            labels = np.array([classes.index(r[0]) for r in rel], dtype=np.int64)
    return Dataset(images, labels, folder)


# -- entry point --------------------------------------------------------------------------------
def load(path, size=None, fit=None, workers=0):
    """Load ``path`` (folder, ``.npz`` or IDX) and fit it to ``size`` x ``size``: a :class:`Dataset`."""
    if fit is not None and fit not in FITS:
        raise BdmError(f"--fit must be one of {', '.join(FITS)}, got {fit!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise BdmError(f"data path {path} does not exist")
    if os.path.isdir(path):
        idx = _find(path, "train-images-idx3-ubyte")
        if idx:
            lab = _find(path, "train-labels-idx1-ubyte")
            ds = load_idx(idx, lab)
        else:
            ds = load_folder(path, size, fit, workers)
    elif path.lower().endswith(".npz"):
        ds = load_npz(path)
    else:
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] == b"\x1f\x8b" or (len(head) == 4 and head[:2] == b"\0\0" and head[2] in IDX_TYPES):
            ds = load_idx(path)
        else:
            raise BdmError(f"cannot tell what {path} is: expected an image folder, an .npz or an IDX file")
    if len(ds) == 0:
        raise BdmError(f"{path} holds no images")
    if size is not None and ds.size != (size, size):
        if fit is None:
            raise BdmError(f"images in {path} are {ds.size[0]}x{ds.size[1]}, not {size}x{size}: "
                           f"pass --fit pad|resize (or --image-size {ds.size[0]})")
        _check_fit_memory(len(ds), ds.channels, size, path)
        ds.images = fit_images(ds.images, size, fit)
    elif size is None and ds.size[0] != ds.size[1]:
        raise BdmError(f"images in {path} are {ds.size[0]}x{ds.size[1]} (not square): "
                       f"pass --image-size and --fit pad|resize")
    return ds


def _check_fit_memory(n, channels, size, path):
    from .resources import check_image_memory

    check_image_memory(n, channels, size, path)


# -- fitting ------------------------------------------------------------------------------------
def background(images):
    """Per-channel background value: the most common value on the images' outer border."""
    border = np.concatenate([images[:, :, 0, :], images[:, :, -1, :],
                             images[:, :, :, 0], images[:, :, :, -1]], axis=2)  # [N, C, L]
    return [int(np.bincount(border[:, c].ravel(), minlength=256).argmax()) for c in range(images.shape[1])]


def fit_images(images, size, mode):
    """uint8 ``[N, C, H, W]`` -> ``[N, C, size, size]``: centre ``pad`` with the background, or bicubic ``resize``."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if mode == "pad":
        if h > size or w > size:
            raise BdmError(f"cannot pad {h}x{w} images to {size}x{size} (they are larger): use --fit resize")
        out = np.empty((n, c, size, size), dtype=np.uint8)
        for ch, v in enumerate(background(images)):
            out[:, ch] = v
        top, left = (size - h) // 2, (size - w) // 2
        out[:, :, top:top + h, left:left + w] = images
        return out
    if mode == "resize":
        from PIL import Image

        out = np.empty((n, c, size, size), dtype=np.uint8)
        for i in range(n):
            for ch in range(c):
                im = Image.fromarray(np.ascontiguousarray(images[i, ch]))  # 2-D uint8: mode L
                out[i, ch] = np.asarray(im.resize((size, size), Image.BICUBIC))
        return out
    raise BdmError(f"--fit must be one of {', '.join(FITS)}, got {mode!r}")
