"""TensorRT and CUDA paths of the runtime: run where TensorRT (or CUDA ONNX Runtime) and a GPU exist.

Skipped here with the reason (``pytest -rs`` shows it); ``test_trt_fake.py`` runs the same
backend on the CPU against each TensorRT version's API. What they check where they run: TensorRT
engine parity with ONNX Runtime on the CPU, chunking above the profile maximum and padding below
its minimum, CUDA-graph replay equal to plain execution (with chunk sizes alternating), a caller's
CUDA stream and device memory (``__cuda_array_interface__``) as output, an engine loading in a
fresh process (where nothing parsed an ONNX file, so nothing else registered TensorRT's plugins),
the TensorRT-version refusal, building and caching an engine from an ``.onnx``, and the ONNX
Runtime CUDA provider with I/O binding.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bdm_runtime
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# TensorRT vs ONNX Runtime on the CPU: different kernels, TF32 off (bdm_runtime.trt_build); same budget as the
# ORT-vs-torch parity of test_runtime (errors there measure ~1e-4 after the final-step amplification).
TOL = 1e-3
PROFILE = (2, 4, 8)  # min 2 exercises padding, max 8 exercises chunking


def _trt_reason():
    try:
        from bdm_runtime.trt_build import unavailable_reason
    except ImportError as e:
        return f"bdm_runtime.trt_build not importable ({e})"
    return unavailable_reason()


TRT_REASON = _trt_reason()
needs_trt = pytest.mark.skipif(TRT_REASON is not None, reason=f"TensorRT path: {TRT_REASON}")


def _ort_cuda_reason():
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (CPU wheel)"
    try:
        from polygraphy import cuda  # device buffers for the __cuda_array_interface__ test

        cuda.wrapper()
    except Exception as e:
        return f"no CUDA runtime through polygraphy ({e})"
    return None


ORT_CUDA_REASON = _ort_cuda_reason()
needs_ort_cuda = pytest.mark.skipif(ORT_CUDA_REASON is not None, reason=f"ONNX Runtime CUDA: {ORT_CUDA_REASON}")


class CudaBuffer:
    """Minimal device array with ``__cuda_array_interface__`` (what CuPy/PyTorch/Numba expose)."""

    def __init__(self, shape):
        from polygraphy import cuda

        self._cuda = cuda
        self.shape = tuple(shape)
        self.nbytes = 4 * int(np.prod(shape))
        self.ptr = cuda.wrapper().malloc(self.nbytes)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": "<f4", "data": (self.ptr, False), "strides": None, "version": 2}

    def numpy(self):
        host = np.empty(self.shape, dtype=np.float32)
        self._cuda.wrapper().memcpy(host.ctypes.data, self.ptr, self.nbytes, self._cuda.MemcpyKind.DeviceToHost)
        return host

    def free(self):
        self._cuda.wrapper().free(self.ptr)


@pytest.fixture(scope="module")
def step_onnx(tiny_checkpoint, tmp_path_factory):
    from bdm_train.checkpoint import load
    from bdm_export import export_onnx

    model, process, config = load(tiny_checkpoint)
    path = str(tmp_path_factory.mktemp("gpu") / "bdm.onnx")
    export_onnx(model, process, path, channels=model.in_channels, default_steps=8, default_eta=1.0)
    return path


@pytest.fixture(scope="module")
def engine(step_onnx):
    from bdm_runtime.trt_build import build_engine

    plan = step_onnx[:-len(".onnx")] + ".plan"
    build_engine(step_onnx, plan, batch=PROFILE)
    return plan


def _cpu(path, n, **kw):
    with bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"]) as s:
        return s.sample(n, **kw)


SOLVER_RUNS = [dict(eta=0.0), dict(eta=1.0), dict(solver="dpmpp2m", grid="spectral"),
               dict(solver="dpmpp2m", grid="power"), dict(solver="dpmpp2m", grid="edm", eta=1.0)]   # B16 last


@needs_trt
@pytest.mark.parametrize("kw", SOLVER_RUNS)
def test_trt_matches_onnx_runtime(engine, step_onnx, kw):
    """Every solver: dpmpp2m carries B11's state (u_x) from step to step in the engine's own buffers (and at
    eta 1, B16, uploads a noise draw per step beside it)."""
    with bdm_runtime.load(engine) as s:
        assert s.backend == "trt" and s.provider.startswith("TensorRT") and s.batch == PROFILE[2]
        got = s.sample(5, seed=3, steps=8, **kw)
    err = float(np.abs(got - _cpu(step_onnx, 5, seed=3, steps=8, **kw)).max())
    print(f"TensorRT vs ORT-CPU, {kw}: max abs err {err:.3g}")
    assert err < TOL


@needs_trt
def test_trt_chunks_and_pads(engine):
    with bdm_runtime.load(engine) as s:
        big = s.sample(11, seed=1, steps=4, eta=1.0)                 # chunks of 8 + 3 (profile max 8)
        one = s.sample(1, seed=1, steps=4, eta=1.0, first_index=10)  # padded to the profile min 2
    with bdm_runtime.load(engine, batch=4) as s4:
        assert s4.batch == 4
        small = s4.sample(11, seed=1, steps=4, eta=1.0)              # chunks of 4, 4, 3
    # Same noise per image at every chunking; kernels may differ per batch size (tactics), hence 1e-4.
    np.testing.assert_allclose(small, big, rtol=0, atol=1e-4)
    np.testing.assert_allclose(one[0], big[10], rtol=0, atol=1e-4)


@needs_trt
def test_cuda_graph_replay_equals_plain_execution(engine):
    with bdm_runtime.load(engine) as s:
        plain = s.sample(6, seed=2, steps=5, eta=1.0)
        plain2 = s.sample(6, seed=2, steps=5, solver="dpmpp2m")
        mixed = s.sample(11, seed=2, steps=5, eta=1.0)               # chunks 8 and 3
    with bdm_runtime.load(engine, cuda_graph=True) as g:
        graphed = g.sample(6, seed=2, steps=5, eta=1.0)
        again = g.sample(6, seed=2, steps=5, eta=1.0)                # replays the captured graphs
        graphed2 = g.sample(6, seed=2, steps=5, solver="dpmpp2m")    # the state buffers swap in the graphs too
        alternating = [g.sample(11, seed=2, steps=5, eta=1.0) for _ in range(2)]  # 8, 3, 8, 3
    np.testing.assert_allclose(graphed, plain, rtol=0, atol=1e-6)
    np.testing.assert_allclose(graphed2, plain2, rtol=0, atol=1e-6)
    assert np.array_equal(graphed, again)
    for x in alternating:
        np.testing.assert_allclose(x, mixed, rtol=0, atol=1e-6)


@needs_trt
def test_engine_loads_in_a_fresh_process(engine, tmp_path):
    """A new process that only loads the engine (TensorRT 8.5/8.6: the GroupNorm plugin must be registered)."""
    with bdm_runtime.load(engine) as s:
        want = s.sample(3, seed=6, steps=4)
    out = str(tmp_path / "x.npy")
    code = (f"import sys, numpy as np, bdm_runtime\nwith bdm_runtime.load({engine!r}) as s:\n"
            f"    np.save({out!r}, s.sample(3, seed=6, steps=4))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('bdm_export', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"   # nothing parsed or built there
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-6)  # same engine and inputs


@needs_trt
def test_caller_stream_and_device_output(engine):
    from polygraphy import cuda

    with bdm_runtime.load(engine) as s:
        host = s.sample(3, seed=4, steps=4)
    stream = cuda.Stream()
    dev = CudaBuffer((3, 1, 16, 16))
    try:
        with bdm_runtime.load(engine, cuda_stream=stream) as s:
            assert s.sample(3, seed=4, steps=4, out=dev) is dev
        np.testing.assert_allclose(dev.numpy(), host, rtol=0, atol=1e-6)
        with bdm_runtime.load(engine) as s, pytest.raises(BdmError, match="shape"):
            s.sample(2, seed=4, steps=4, out=dev)
    finally:
        dev.free()
        stream.free()


@needs_trt
def test_engine_of_another_tensorrt_version_is_refused(engine, tmp_path):
    plan = str(tmp_path / "old.plan")
    shutil.copy(engine, plan)
    with open(engine + ".json") as f:
        side = json.load(f)
    side[fmt.K_TRT_VERSION] = "7.0.0.11"
    with open(plan + ".json", "w") as f:
        json.dump(side, f)
    with pytest.raises(BdmError, match="built by TensorRT 7.0.0.11") as e:
        bdm_runtime.load(plan)
    assert "old.plan" in str(e.value)


@needs_trt
def test_onnx_with_trt_backend_builds_once_and_caches(step_onnx, tmp_path):
    cache = str(tmp_path / "engines")
    with bdm_runtime.load(step_onnx, backend="trt", engine_cache=cache, batch=4) as s:
        assert s.backend == "trt"
        a = s.sample(2, seed=0, steps=3)
    plans = [f for f in os.listdir(cache) if f.endswith(".plan")]
    assert len(plans) == 1
    stamp = os.path.getmtime(os.path.join(cache, plans[0]))
    with bdm_runtime.load(step_onnx, backend="trt", engine_cache=cache, batch=4) as s:
        assert np.array_equal(s.sample(2, seed=0, steps=3), a)
    assert os.path.getmtime(os.path.join(cache, plans[0])) == stamp  # reused, not rebuilt


@needs_trt
def test_bdm_run_with_tensorrt_and_cuda_graph(engine, tmp_path):
    args = ["--engine", engine, "--n", "10", "--steps", "4", "--cuda-graph", "--quiet", "--npz", str(tmp_path / "s.npz")]
    proc = subprocess.run([sys.executable, "-m", "bdm_runtime.cli"] + args, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "backend trt (TensorRT" in proc.stdout
    print(proc.stdout.strip())


@needs_ort_cuda
@pytest.mark.parametrize("kw", SOLVER_RUNS)
def test_onnx_runtime_cuda_matches_cpu(step_onnx, kw):
    with bdm_runtime.load(step_onnx) as s:
        assert s.provider == "CUDAExecutionProvider" and s.device == "cuda"
        got = s.sample(5, seed=3, steps=8, **kw)
        dev = CudaBuffer((5, 1, 16, 16))
        try:
            s.sample(5, seed=3, steps=8, out=dev, **kw)  # x0 of the last step bound to the caller's memory
            np.testing.assert_allclose(dev.numpy(), got, rtol=0, atol=1e-6)
        finally:
            dev.free()
    err = float(np.abs(got - _cpu(step_onnx, 5, seed=3, steps=8, **kw)).max())
    print(f"ORT CUDA vs CPU, {kw}: max abs err {err:.3g}")
    assert err < TOL
