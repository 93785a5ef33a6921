"""Every solver and grid through the deployment path: torch, ONNX Runtime (the loop written out) and the runtime.

Also: format-1 graphs still load and sample as before and refuse dpmpp2m in one line; the runtime's
step-timing hook and ONNX Runtime's own ``SessionOptions``; the flags of ``bdm-run``.
"""
import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import export_mixture, ort_sample

import bdm_runtime
from bdm_train.sampling import sample
from bdm_runtime import format as fmt
from bdm_runtime.cli import main as run_main
from bdm_runtime.errors import BdmError
from bdm_runtime.grids import GRIDS, SOLVERS, time_grid

# Parity tolerance (as in test_runtime): the paths differ only by kernel rounding (ORT vs torch,
# ~1e-7 relative per op) amplified by at most alpha_s / alpha_t per step; measured below 1e-5.
PARITY_TOL = 1e-3
STEPS = 8


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def mix2(tmp_path_factory):
    """The exact mixture denoiser (8x8, blur 20) as a format-2 graph; default dpmpp2m on the power grid."""
    return export_mixture(tmp_path_factory.mktemp("mix2"), default_steps=STEPS, default_eta=0.0,
                          default_solver="dpmpp2m", default_grid="power")


@pytest.fixture(scope="module")
def mix1(tmp_path_factory):
    """The same as a format-1 graph (what earlier releases wrote)."""
    return export_mixture(tmp_path_factory.mktemp("mix1"), default_steps=STEPS, format_version=1, name="old.onnx")


def _session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("solver,eta", [("ddim", 1.0), ("dpmpp2m", 0.0), ("dpmpp2m", 1.0)])
def test_every_solver_and_grid_agrees_across_torch_onnxruntime_and_the_runtime(mix2, solver, eta):
    """Whole runs, 8 steps: torch ``sample``, the graph stepped by hand with ONNX Runtime, ``Sampler.sample``.

    ddim ancestral (B9), dpmpp2m deterministic (B11) and stochastic (B16): the noise path and the history."""
    path, model, process = mix2
    sess = _session(path)
    errs = {}
    with bdm_runtime.load(path, threads=1) as sampler:
        for grid in GRIDS:
            kw = dict(n=4, seed=3, steps=STEPS, eta=eta)
            want = sample(model, process, solver=solver, grid=grid, **kw).numpy()
            times = time_grid(STEPS, grid, process.config())
            by_hand = ort_sample(sess, (1, 8, 8), solver=solver, times=times, **kw)
            got = sampler.sample(4, seed=3, steps=STEPS, eta=eta, solver=solver, grid=grid)
            errs[grid] = (float(np.abs(by_hand - want).max()), float(np.abs(got - want).max()))
            assert errs[grid][0] < PARITY_TOL and errs[grid][1] < PARITY_TOL, (grid, errs[grid])
            assert np.abs(want).max() > 0.5   # images, not a collapsed zero
    print(f"\n{solver} eta {eta:g}: max abs (ONNX Runtime by hand, runtime) vs torch per grid: {errs}")


def test_solvers_differ_and_defaults_come_from_the_graph(mix2):
    path, model, process = mix2
    with bdm_runtime.load(path) as s:
        assert (s.info.default_solver, s.info.default_grid, s.info.default_steps) == ("dpmpp2m", "power", STEPS)
        default = s.sample(3, seed=1, steps=3)
        np.testing.assert_array_equal(default, s.sample(3, seed=1, steps=3, solver="dpmpp2m", grid="power"))
        ddim = s.sample(3, seed=1, steps=3, solver="ddim", grid="power", eta=0.0)
        assert np.abs(default - ddim).max() > 1e-3   # the history really reaches the graph
        explicit = s.sample(3, seed=1, grid=time_grid(3, "power"))
        np.testing.assert_array_equal(default, explicit)
        # deterministic: only the initial latent is drawn, so chunks and first_index reproduce images
        a = s.sample(5, seed=2, steps=4)
        s.batch = 2
        np.testing.assert_allclose(s.sample(5, seed=2, steps=4), a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(s.sample(2, seed=2, steps=4, first_index=3), a[3:], rtol=0, atol=1e-6)
        # eta > 0 (B16): one draw per step, so it differs, and still reproduces per image
        b = s.sample(5, seed=2, steps=4, eta=1.0)
        assert np.abs(a - b).max() > 1e-3
        np.testing.assert_allclose(s.sample(2, seed=2, steps=4, eta=1.0, first_index=3), b[3:], rtol=0, atol=1e-6)
        for bad, what in ((dict(solver="dpmpp2m", eta=1.5), "eta"), (dict(solver="heun"), "solver"),
                          (dict(grid="cosine"), "grid"), (dict(grid=[1.0, 0.5]), "t = 0"),
                          (dict(grid=[1.0, 0.5, 0.0], steps=3), "steps")):
            with pytest.raises(BdmError, match=what):
                s.sample(2, **bad)


def test_format_1_graphs_sample_as_before_and_refuse_dpmpp2m(mix1, mix2, tmp_path, capsys):
    path, model, process = mix1
    with bdm_runtime.load(path) as s:
        assert s.info.format_version == 1 and (s.info.default_solver, s.info.default_grid) == ("ddim", "uniform")
        for grid in ("uniform", "spectral"):   # any grid: a format-1 step takes any (t, s)
            got = s.sample(4, seed=5, steps=6, eta=1.0, grid=grid)
            want = sample(model, process, 4, seed=5, steps=6, eta=1.0, grid=grid).numpy()
            assert np.abs(got - want).max() < PARITY_TOL
        with bdm_runtime.load(mix2[0]) as s2:   # the same DDIM run on a format-2 graph
            assert np.abs(s2.sample(4, seed=5, steps=6, eta=1.0, solver="ddim", grid="spectral") - got).max() < 1e-5
        with pytest.raises(BdmError) as e:
            s.sample(2, solver="dpmpp2m")
    msg = str(e.value)
    assert "old.onnx" in msg and "re-export" in msg and "\n" not in msg
    code = 0
    try:
        run_main(["--engine", path, "--n", "2", "--solver", "dpmpp2m", "--out", str(tmp_path / "g.png"), "--quiet"])
    except SystemExit as ex:
        code = ex.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "re-export" in err[0] and "Traceback" not in err[0]
    assert not os.path.exists(tmp_path / "g.png")


def test_bdm_run_takes_solver_grid_steps(mix2, tmp_path, capsys):
    npz = tmp_path / "s.npz"
    run_main(["--engine", mix2[0], "--n", "3", "--seed", "4", "--solver", "ddim", "--grid", "logsnr", "--steps",
              "5", "--eta", "0", "--npz", str(npz), "--quiet"])
    with bdm_runtime.load(mix2[0]) as s:
        from bdm_runtime.images import to_uint8

        want = to_uint8(s.sample(3, seed=4, solver="ddim", grid="logsnr", steps=5, eta=0.0))
    np.testing.assert_array_equal(np.load(npz)["images"], want)
    assert "3 images" in capsys.readouterr().out


def test_step_timing_hook(mix2):
    """``timing`` gets one positive time per step and chunk; they add up to less than the call."""
    import time

    times = []
    with bdm_runtime.load(mix2[0], batch=3) as s:
        start = time.perf_counter()
        s.sample(5, seed=0, steps=4, timing=times.append)
        wall = time.perf_counter() - start
        assert len(times) == 4 * 2 and all(t > 0 for t in times) and sum(times) < wall
        times.clear()
        s.generate(2, steps=3, timing=times.append)
        assert len(times) == 3


def test_session_options_and_providers_as_onnxruntime_takes_them(mix2):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with bdm_runtime.load(mix2[0], session_options=so, providers=[("CPUExecutionProvider", {})]) as s:
        got = s.session_options   # read back from the session: what it really runs with
        assert got.intra_op_num_threads == 1
        assert got.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        assert s.provider == "CPUExecutionProvider"
        s.sample(1, steps=2)
    with pytest.raises(BdmError, match="session_options"):
        bdm_runtime.load(mix2[0], session_options=so, threads=2)
    assert fmt.FORMAT_VERSION == 2
