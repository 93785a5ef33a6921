"""The DCT as two matrix multiplies (B1) against scipy's orthonormal DCT-II, in float64."""
import ast
import inspect

import numpy as np
import pytest
import scipy.fft
import torch

from bdm_train import dct as dct_module
from bdm_train.dct import dct2, dct_matrix, idct2

# float64 matmuls of size <= 16 accumulate ~n * 1e-16 rounding; 1e-12 leaves a wide margin while
# still failing on any wrong constant (c_0, the sqrt(2/N) scale or a transposed matrix give O(1) errors).
TOL = 1e-12

SHAPES = [(5, 7), (16, 12), (1, 4), (8, 8), (2, 3, 5, 7), (4, 1, 16, 12)]


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 16, 32])
def test_dct_matrix_is_orthonormal(n):
    c = dct_matrix(n, dtype=torch.float64).numpy()
    np.testing.assert_allclose(c @ c.T, np.eye(n), rtol=0, atol=TOL)
    np.testing.assert_allclose(c.T @ c, np.eye(n), rtol=0, atol=TOL)


@pytest.mark.parametrize("n", [1, 4, 7])
def test_dct_matrix_rows_are_scipy_dct_of_unit_vectors(n):
    # Column m of C is the orthonormal DCT-II of the unit vector e_m.
    ref = scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0)
    np.testing.assert_allclose(dct_matrix(n, dtype=torch.float64).numpy(), ref, rtol=0, atol=TOL)


def test_dct_matrix_default_dtype_is_float32():
    assert dct_matrix(6).dtype == torch.float32


@pytest.mark.parametrize("shape", SHAPES)
def test_dct2_matches_scipy_dctn(shape):
    x = _rand(shape)
    ref = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    out = dct2(torch.from_numpy(x)).numpy()
    assert out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_idct2_matches_scipy_idctn(shape):
    u = _rand(shape, seed=1)
    ref = scipy.fft.idctn(u, type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(idct2(torch.from_numpy(u)).numpy(), ref, rtol=0, atol=TOL)


@pytest.mark.parametrize("shape", SHAPES)
def test_idct2_inverts_dct2(shape):
    x = torch.from_numpy(_rand(shape, seed=2))
    torch.testing.assert_close(idct2(dct2(x)), x, rtol=0, atol=TOL)
    torch.testing.assert_close(dct2(idct2(x)), x, rtol=0, atol=TOL)


def test_explicit_matrices_equal_implicit_ones():
    x = torch.from_numpy(_rand((3, 2, 6, 9), seed=3))
    c_h, c_w = dct_matrix(6, torch.float64), dct_matrix(9, torch.float64)
    torch.testing.assert_close(dct2(x, c_h, c_w), dct2(x), rtol=0, atol=0)
    torch.testing.assert_close(idct2(x, c_h, c_w), idct2(x), rtol=0, atol=0)


def test_dct2_preserves_squared_norm():
    # Parseval (B1): orthonormality makes squared errors equal in pixel and frequency space.
    x = torch.from_numpy(_rand((4, 3, 5, 7), seed=4))
    np.testing.assert_allclose((dct2(x) ** 2).sum().item(), (x ** 2).sum().item(), rtol=1e-13)


def test_dct2_float32_close_to_float64():
    # float32 rounding ~6e-8 per op; 16-term sums of O(1) values stay below 1e-5.
    x = _rand((2, 1, 16, 12), seed=5)
    ref = scipy.fft.dctn(x, type=2, norm="ortho", axes=(-2, -1))
    out = dct2(torch.from_numpy(x).float())
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-5)


def test_dct_module_uses_no_fft():
    # The transform must export as plain MatMul: no torch.fft / numpy.fft / scipy in the code.
    tree = ast.parse(inspect.getsource(dct_module))
    attrs = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "fft" not in attrs and "fft" not in names
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported <= {"math", "torch"}, imported
