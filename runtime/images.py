"""Images out of the sampler: uint8 conversion, sample grids and files (numpy + Pillow only)."""
import contextlib
import math
import os
import zipfile

import numpy as np

from .errors import BdmError
from .io import atomic_path, image_name


def to_uint8(x):
    """Float ``[n, C, H, W]`` in ``[-1, 1]`` to uint8 ``[n, H, W, C]``."""
    x = np.asarray(x, dtype=np.float32)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def check_finite(x, source, first_index=0):
    """Refuse float images holding NaN or inf (a broken model or graph), naming the first such image.

    ``to_uint8`` would turn them into black pixels and the run would look fine.
    """
    x = np.asarray(x)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise BdmError(f"{source} produced non-finite values (NaN or inf) for image {first_index + int(np.argmax(bad))}"
                       f": the model or its export is broken (bdm-export --check compares a graph with PyTorch)")


def grid_shape(n, h, w, c, ncols=None, pad=2):
    """The shape :func:`make_grid` gives ``n`` images of ``h x w x c``."""
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    return nrows * (h + pad) + pad, ncols * (w + pad) + pad, c


def grid_memory(n, h, w, c, scale=1):
    """Bytes that writing a grid of ``n`` uint8 images needs at once: the images, the grid, its upscaled copy
    and Pillow's copy of that."""
    gh, gw, _ = grid_shape(n, h, w, c)
    return n * h * w * c + gh * gw * c * (1 + 2 * scale * scale)


def make_grid(images, ncols=None, pad=2):
    """uint8 ``[n, H, W, C]`` to one uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` grid."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    grid = np.zeros(grid_shape(n, h, w, c, ncols, pad), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def _pil(img):
    from PIL import Image

    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def save_png(img, path):
    """Write one uint8 ``[H, W, C]`` image (C = 1 or 3) as PNG, atomically."""
    with atomic_path(path) as tmp:
        _pil(img).save(tmp, format="PNG")


def save_grid(images, path, ncols=None, scale=1):
    """Write uint8 ``[n, H, W, C]`` images as one PNG grid, optionally upscaled (nearest)."""
    grid = make_grid(images, ncols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    save_png(grid, path)


def save_dir(images, folder, first_index=0):
    """Write each image as ``folder/NNNNNN.png`` (named by its index in the seed protocol)."""
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, os.path.join(folder, image_name(first_index + i)))


def save_npz(path, **arrays):
    """Write arrays to an ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


class NpzWriter:
    """An uncompressed ``.npz`` written array by array, each chunk by chunk: no array is ever whole in memory.

    ``np.load`` reads it like ``np.savez``'s output (a zip of ``NAME.npy`` members; ZIP64, so
    members may pass 4 GiB). Use as a context manager; ``array(name, shape, dtype)`` is a context
    giving ``write(chunk)``, to be called with consecutive rows until ``shape[0]`` rows are written.
    """

    def __init__(self, path):
        self._zip = zipfile.ZipFile(os.fspath(path), "w", zipfile.ZIP_STORED, allowZip64=True)

    @contextlib.contextmanager
    def array(self, name, shape, dtype):
        dtype = np.dtype(dtype)
        shape = tuple(int(d) for d in shape)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        row = dtype.itemsize * math.prod(shape[1:])
        written = [0]
        with self._zip.open(name + ".npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, header)

            def write(chunk):
                chunk = np.ascontiguousarray(chunk, dtype=dtype)
                if chunk.shape[1:] != shape[1:]:
                    raise ValueError(f"{name}: chunk of shape {chunk.shape}, want rows of {shape[1:]}")
                f.write(chunk.data.cast("B") if chunk.size else b"")
                written[0] += chunk.nbytes

            yield write
            if written[0] != row * shape[0]:
                raise ValueError(f"{name}: {written[0]} bytes written, its shape {shape} needs {row * shape[0]}")

    def close(self):
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def npz_bytes(*arrays):
    """The size of an uncompressed ``.npz`` of arrays given as ``(shape, dtype)`` (headers generously counted)."""
    total = 0
    for shape, dtype in arrays:
        total += math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize + 1024
    return total + 1024
