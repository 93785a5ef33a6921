"""The orthonormal 2-D DCT as two matrix multiplies with constant matrices (B1).

No FFT and no library DCT: written as ``C_H @ x @ C_W.T`` the transform exports to ONNX as
plain MatMul with constant initializers, which every TensorRT version parses.
"""
import math

import torch


def dct_matrix(n, dtype=torch.float32, device=None):
    """Orthonormal DCT-II matrix ``C[k, m] = sqrt(2/n) c_k cos(pi (2m + 1) k / (2n))`` (B1)."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    m = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    c = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)  # c_0 = 1/sqrt(2)
    return c.to(dtype=dtype, device=device)


def _matrices(x, c_h=None, c_w=None):
    h, w = x.shape[-2:]
    if c_h is None:
        c_h = dct_matrix(h, x.dtype, x.device)
    if c_w is None:
        c_w = dct_matrix(w, x.dtype, x.device)
    return c_h, c_w


def dct2(x, c_h=None, c_w=None):
    """Forward 2-D DCT over the last two dims: ``u = V^T x = C_H @ x @ C_W^T`` (B1)."""
    c_h, c_w = _matrices(x, c_h, c_w)
    return c_h @ x @ c_w.transpose(0, 1)


def idct2(u, c_h=None, c_w=None):
    """Inverse 2-D DCT over the last two dims: ``x = V u = C_H^T @ u @ C_W`` (B1)."""
    c_h, c_w = _matrices(u, c_h, c_w)
    return c_h.transpose(0, 1) @ u @ c_w
