"""Images out of the sampler: uint8 conversion, sample grids and files (numpy + Pillow only)."""
import math
import os

import numpy as np

from .io import atomic_path


def to_uint8(x):
    """Float ``[n, C, H, W]`` in ``[-1, 1]`` to uint8 ``[n, H, W, C]``."""
    x = np.asarray(x, dtype=np.float32)
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def make_grid(images, ncols=None, pad=2):
    """uint8 ``[n, H, W, C]`` to one uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` grid."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), dtype=np.uint8)
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
        save_png(img, os.path.join(folder, f"{first_index + i:06d}.png"))


def save_npz(path, **arrays):
    """Write arrays to an ``.npz``, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
