"""Write scikit-learn's bundled 8x8 digits (1,797 images, no download) as a uint8 .npz for bdm-train."""
import os

import click
import numpy as np

from bdm_runtime.errors import BdmError, run_cli
from bdm_runtime.images import save_npz


@click.command()
@click.argument("path", default="digits.npz", type=click.Path(dir_okay=False))
def main(path):
    """Write the digits to PATH (*.npz)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):   # one line before any work (save_npz names other write failures)
        raise BdmError(f"{path}: folder {folder} does not exist")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8], 0..16 -> 0..255
    save_npz(path, images=images, labels=digits.target.astype(np.int64))
    print(f"wrote {path}: {images.shape[0]} digits, 8x8")


if __name__ == "__main__":
    run_cli(main, prog_name="digits_npz.py")   # a mistake is one "Error: ..." line, not a traceback
