"""Write scikit-learn's bundled 8x8 digits (1,797 images, no download) as a uint8 .npz for bdm-train."""
import sys

import numpy as np
from sklearn.datasets import load_digits

from bdm_runtime.images import save_npz


def main(path):
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # [N, 1, 8, 8], 0..16 -> 0..255
    save_npz(path, images=images, labels=digits.target.astype(np.int64))
    print(f"wrote {path}: {images.shape[0]} digits, 8x8")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "digits.npz")
