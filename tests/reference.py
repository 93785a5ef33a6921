"""Independent float64 numpy references for the maths tests (written from docs/maths.md, not from the package)."""
import numpy as np
import scipy.fft


def ref_alpha_sigma(t, h, w, blur_sigma_max=20.0, d_min=1e-3, logsnr_min=-10.0, logsnr_max=10.0):
    """B2-B4 in float64: alpha ``[*t.shape, H, W]`` per frequency, sigma ``[*t.shape]``."""
    t = np.asarray(t, dtype=np.float64)
    lam = (np.pi * np.arange(h) / h)[:, None] ** 2 + (np.pi * np.arange(w) / w)[None, :] ** 2  # B2
    c0 = np.arctan(np.exp(-logsnr_max / 2))                                                   # B3
    c1 = np.arctan(np.exp(-logsnr_min / 2)) - c0
    logsnr = -2 * np.log(np.tan(c1 * t + c0))
    a = np.sqrt(1 / (1 + np.exp(-logsnr)))
    sigma = np.sqrt(1 / (1 + np.exp(logsnr)))
    tau = (blur_sigma_max * np.sin(np.pi * t / 2) ** 2) ** 2 / 2                             # B4
    d = (1 - d_min) * np.exp(-lam * tau[..., None, None]) + d_min
    return a[..., None, None] * d, sigma


def dctn(x):
    """Orthonormal 2-D DCT-II over the last two axes (scipy), the reference for B1."""
    return scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))


def idctn(u):
    """Its inverse (scipy)."""
    return scipy.fft.idctn(u, type=2, norm="ortho", axes=(-2, -1))
