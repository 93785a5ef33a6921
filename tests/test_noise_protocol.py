"""The noise protocol (bdm_runtime.noise): per-image generators and the time grid."""
import numpy as np
import pytest

from bdm_runtime.noise import NoiseStream, check_seed, time_grid


def test_numpy_stream_is_pinned():
    # Golden values, computed once with numpy 2.4.6. This is the one legitimate hard-coded value:
    # the protocol promises the same images for the same seed on every machine, so this test
    # catches a numpy release that changes the PCG64 / SeedSequence / ziggurat normal stream.
    got = np.random.default_rng([0, 0]).standard_normal((1, 2, 3), dtype=np.float32)
    want = np.array([[[1.117622, -1.3871249, -0.4265716],
                      [-0.80358726, 0.60142773, -0.074993245]]], dtype=np.float32)
    np.testing.assert_array_equal(got, want)


def test_noise_stream_equals_per_image_generators():
    seed, first, n, shape = 11, 5, 4, (2, 3, 4)
    stream = NoiseStream(seed, first, n, shape)
    draws = [stream.draw() for _ in range(3)]
    for i in range(n):
        g = np.random.default_rng([seed, first + i])
        for d in draws:
            assert d.dtype == np.float32 and d.shape == (n,) + shape
            np.testing.assert_array_equal(d[i], g.standard_normal(shape, dtype=np.float32))


def test_noise_stream_splits_and_out_buffer():
    # Images depend only on (seed, index): a split call reproduces a slice of a bigger one.
    whole = NoiseStream(3, 0, 6, (1, 2, 2))
    part = NoiseStream(3, 2, 3, (1, 2, 2))
    a, b = [whole.draw() for _ in range(2)], [part.draw() for _ in range(2)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x[2:5], y)
    out = np.empty((6, 1, 2, 2), dtype=np.float32)
    res = NoiseStream(3, 0, 6, (1, 2, 2)).draw(out)
    assert res is out
    np.testing.assert_array_equal(out, a[0])
    # different seeds and different images give different noise
    assert not np.array_equal(NoiseStream(4, 0, 6, (1, 2, 2)).draw(), a[0])
    assert not np.array_equal(a[0][0], a[0][1])


@pytest.mark.parametrize("seed,first", [(-1, 0), (0, -1), (1.0, 0), (True, 0), ("1", 0), (0, None)])
def test_invalid_seed(seed, first):
    with pytest.raises(ValueError):
        check_seed(seed, first)
    with pytest.raises(ValueError):
        NoiseStream(seed, first, 1, (1,))


def test_numpy_integer_seed_accepted():
    a = NoiseStream(np.int64(2), np.int32(1), 2, (3,)).draw()
    np.testing.assert_array_equal(a, NoiseStream(2, 1, 2, (3,)).draw())


def test_time_grid_values():
    g = time_grid(4)
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, np.array([1.0, 0.75, 0.5, 0.25, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(time_grid(1), np.array([1.0, 0.0], dtype=np.float32))
    g = time_grid(1000)
    assert len(g) == 1001 and g[0] == 1.0 and g[-1] == 0.0 and np.all(np.diff(g) < 0)
    # t_i = i / steps rounded once to float32 (not accumulated): exact float32 of each quotient
    np.testing.assert_array_equal(time_grid(7), np.float32(np.arange(7, -1, -1) / 7))
    assert time_grid(np.int64(3)).shape == (4,)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "10", None])
def test_time_grid_rejects_bad_steps(steps):
    with pytest.raises(ValueError):
        time_grid(steps)
