"""Data loading: folders, .npz, IDX (plain and gzipped), fitting, and clear errors."""
import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from bdm_train import data
from bdm_runtime.errors import BdmError


def rand_images(n=5, c=1, h=6, w=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def write_idx(path, array, gz=False):
    """Write an IDX file by hand (the MNIST format: 0 0 type ndim, big-endian dims, data)."""
    head = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = head + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


# -- npz ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW"])
def test_npz_layouts(tmp_path, layout):
    x = rand_images(4, c=1 if layout == "NHW" else 3, h=5, w=5)
    arr = {"NHW": x[:, 0], "NHWC": x.transpose(0, 2, 3, 1), "NCHW": x}[layout]
    np.savez(tmp_path / "d.npz", images=arr, labels=np.array([0, 1, 2, 1]))
    ds = data.load(tmp_path / "d.npz")
    assert ds.images.dtype == np.uint8 and np.array_equal(ds.images, x)
    assert ds.labels.tolist() == [0, 1, 2, 1] and ds.labels.dtype == np.int64


def test_npz_only_array_without_labels(tmp_path):
    x = rand_images(3)
    np.savez(tmp_path / "d.npz", whatever=x[:, 0])
    ds = data.load(tmp_path / "d.npz")
    assert np.array_equal(ds.images, x) and ds.labels is None


@pytest.mark.parametrize("arrays,match", [
    (dict(images=np.zeros((2, 4, 4), np.float32)), "uint8"),
    (dict(a=np.zeros((2, 4, 4), np.uint8), b=np.zeros((2, 4, 4), np.uint8)), "keys"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, np.int64)), "labels"),
])
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(BdmError, match=match) as e:
        data.load(tmp_path / "d.npz")
    assert "d.npz" in str(e.value)


# -- IDX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_and_file(tmp_path, gz):
    x = rand_images(7, h=28, w=28)[:, 0]
    y = np.arange(7, dtype=np.uint8) % 10
    sfx = ".gz" if gz else ""
    write_idx(tmp_path / ("train-images-idx3-ubyte" + sfx), x, gz)
    write_idx(tmp_path / ("train-labels-idx1-ubyte" + sfx), y, gz)
    for path in (tmp_path, tmp_path / ("train-images-idx3-ubyte" + sfx)):
        ds = data.load(path)
        assert np.array_equal(ds.images[:, 0], x) and ds.labels.tolist() == y.tolist()


def test_idx_truncated_and_bad_magic(tmp_path):
    x = rand_images(3, h=8, w=8)[:, 0]
    write_idx(tmp_path / "t-images-idx3-ubyte", x)
    raw = (tmp_path / "t-images-idx3-ubyte").read_bytes()
    (tmp_path / "t-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(BdmError, match="truncated") as e:
        data.read_idx(str(tmp_path / "t-images-idx3-ubyte"))
    assert "t-images-idx3-ubyte" in str(e.value)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04rest"))
    with pytest.raises(BdmError, match="magic"):
        data.load(tmp_path / "bad.gz")


# -- image folders --------------------------------------------------------------------------------
def test_folder_gray_and_class_subfolders(tmp_path):
    x = rand_images(4, h=8, w=8)
    for i, img in enumerate(x):
        d = tmp_path / ("cat" if i % 2 else "dog")
        d.mkdir(exist_ok=True)
        Image.fromarray(img[0]).save(d / f"{i}.png")
    ds = data.load(tmp_path)
    # sorted walk: cat/1, cat/3, dog/0, dog/2; classes sorted by name: cat=0, dog=1
    assert np.array_equal(ds.images, x[[1, 3, 0, 2]])
    assert ds.labels.tolist() == [0, 0, 1, 1]


def test_folder_mixed_gray_rgb_becomes_rgb(tmp_path):
    gray = rand_images(1, h=8, w=8)[0, 0]
    rgb = rand_images(1, c=3, h=8, w=8, seed=1)[0].transpose(1, 2, 0)
    Image.fromarray(gray).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "b.png")
    ds = data.load(tmp_path)
    assert ds.images.shape == (2, 3, 8, 8) and ds.labels is None
    assert all(np.array_equal(ds.images[0, c], gray) for c in range(3))
    assert np.array_equal(ds.images[1], rgb.transpose(2, 0, 1))


def test_folder_errors(tmp_path):
    with pytest.raises(BdmError, match="does not exist") as e:
        data.load(tmp_path / "nope")
    assert "nope" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BdmError, match="no images") as e:
        data.load(tmp_path / "empty")
    assert "empty" in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(BdmError, match="broken.png"):
        data.load(tmp_path / "bad")


# -- fitting and scaling --------------------------------------------------------------------------
@pytest.mark.parametrize("bg", [0, 255])
def test_fit_pad_centres_with_background(tmp_path, bg):
    x = np.full((3, 1, 28, 28), bg, np.uint8)
    x[:, :, 10:18, 10:18] = 128
    np.savez(tmp_path / "d.npz", images=x)
    ds = data.load(tmp_path / "d.npz", size=32, fit="pad")
    assert ds.images.shape == (3, 1, 32, 32)
    assert np.array_equal(ds.images[:, :, 2:30, 2:30], x)       # 28 -> 32: 2 on each side
    border = np.concatenate([ds.images[:, :, :2].ravel(), ds.images[:, :, :, :2].ravel()])
    assert (border == bg).all()


def test_fit_resize_bicubic():
    # A constant image stays constant and a horizontal ramp stays monotone under bicubic resizing.
    const = np.full((1, 1, 16, 16), 77, np.uint8)
    assert (data.fit_images(const, 32, "resize") == 77).all()
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (1, 1, 16, 1))
    up = data.fit_images(ramp, 32, "resize")[0, 0]
    assert up.shape == (32, 32) and (np.diff(up[16].astype(int)) >= 0).all()
    down = data.fit_images(ramp, 8, "resize")[0, 0]
    assert abs(int(down[0, 4]) - int(ramp[0, 0, 0, 8])) <= 12  # middle column ~ middle value


def test_size_mismatch_needs_fit(tmp_path):
    np.savez(tmp_path / "d.npz", images=rand_images(2, h=28, w=28))
    with pytest.raises(BdmError, match="--fit pad\\|resize") as e:
        data.load(tmp_path / "d.npz", size=32)
    assert "28x28" in str(e.value)
    with pytest.raises(BdmError, match="--fit resize"):
        data.load(tmp_path / "d.npz", size=16, fit="pad")  # cannot pad to something smaller


def test_to_float_range():
    x = np.array([0, 255, 128], np.uint8)
    np.testing.assert_allclose(data.to_float(x), [-1.0, 1.0, 128 / 127.5 - 1], rtol=0, atol=1e-12)
