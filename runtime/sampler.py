"""The reverse sampling loop around a bdm step graph: numpy and one backend, no torch.

``load(path)`` reads the model's own metadata (``bdm_runtime.format``), refuses what it cannot run
(with a message naming the file) and returns a :class:`Sampler`. The sampler follows the noise
protocol of ``bdm_runtime.noise`` exactly, so a seed gives the same images as
``bdm_train.sampling.sample`` and as every other backend, at any chunking.
"""
import math
import os
import threading

import numpy as np

from .errors import BdmError
from .grids import SOLVERS, previous_times, resolve, solver_eta
from .step_info import StepInfo, engine_info, onnx_info, read_side_file, side_file  # noqa: F401 (public here too)
from .labels import normalize_labels
from .limits import DEFAULT_BATCH, activation_bytes, check_sample_memory, check_steps, check_threads
from .loop import Plan, run_chunk
from .noise import NoiseStream, check_positive_int, check_seed
from .onnx_meta import check_regular

BACKENDS = ("auto", "ort", "trt", "openvino")
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
ORT_DEFAULT_BATCH = DEFAULT_BATCH  # chunk size when the backend has no profile maximum (bounds host memory)


# -- loading --------------------------------------------------------------------------------------
def _stream_handle(stream):
    """A CUDA stream handle (int) from an int, or an object with ``.ptr``/``.cuda_stream``/``.handle``."""
    if stream is None:
        return None
    for attr in ("ptr", "cuda_stream", "handle"):
        if hasattr(stream, attr):
            stream = getattr(stream, attr)
            break
    try:
        return int(stream)
    except (TypeError, ValueError):
        raise BdmError(f"cuda_stream must be a stream handle (int) or a stream object, got {stream!r}")


def load(path, backend="auto", providers=None, batch=None, cuda_stream=None, cuda_graph=False,
         engine_cache=None, threads=None, session_options=None, device=None, precision=None, config=None,
         core=None, cache_dir=None):
    """Open a bdm step graph (``.onnx``) or TensorRT engine (``.plan``) as a :class:`Sampler`.

    ``backend``: ``"auto"`` (ONNX Runtime for ``.onnx``, TensorRT for ``.plan``), ``"ort"``,
    ``"trt"`` (an ``.onnx`` is then built into an engine once and cached beside it, or in
    ``engine_cache``) or ``"openvino"``. ``providers``: ONNX Runtime providers as ONNX Runtime takes them (names or
    ``(name, options)``; default CUDA when available, else CPU); ``session_options``: an
    ``onnxruntime.SessionOptions``, used as given. ``batch``: the largest chunk run at once (capped by an engine's profile maximum).
    ``cuda_stream``: the caller's CUDA stream (handle or stream object). ``cuda_graph``: replay
    the TensorRT step as a CUDA graph once shapes are fixed. ``threads``: ONNX Runtime's (or
    OpenVINO's) intra-op CPU threads (default: the library's choice, one per core); 1 suits a busy or shared machine.
    OpenVINO only (``bdm_runtime.backends.openvino``): ``device`` (``"CPU"`` default, ``"GPU"``,
    ``"NPU"``, ``"AUTO"``), ``precision`` of the network (``"auto"`` default, ``"fp32"``, ``"bf16"``,
    ``"fp16"``; the update stays FP32), ``config`` (``compile_model`` properties), ``core`` (an
    ``openvino.Core``), ``cache_dir`` (compiled-model cache; ``False`` disables it).
    """
    path = os.fspath(path)
    if backend not in BACKENDS:
        raise BdmError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    check_regular(path)  # a FIFO would block the first read forever
    if threads is not None:
        threads = check_threads(threads)
    if batch is not None:
        batch = check_positive_int(batch, "batch", BdmError)
    openvino = dict(device=device, precision=precision, config=config, core=core, cache_dir=cache_dir)
    given = [k for k, v in openvino.items() if v is not None]
    if given and backend != "openvino":
        raise BdmError(f"{', '.join(given)}: OpenVINO options; give backend='openvino' (--backend openvino)")
    stream = _stream_handle(cuda_stream)
    if path.lower().endswith(ENGINE_SUFFIXES):
        if backend in ("ort", "openvino"):
            raise BdmError(f"{path}: a TensorRT engine runs only with --backend trt; "
                           f"give {'ONNX Runtime' if backend == 'ort' else 'OpenVINO'} the .onnx instead")
        info, raw = engine_info(path)
        from .backends.trt import TrtBackend

        be = TrtBackend(path, info, raw, batch=batch, cuda_stream=stream, cuda_graph=cuda_graph)
    else:
        be, info = _onnx_backend(path, backend, providers, batch, stream, cuda_graph, engine_cache, threads,
                                 session_options, openvino)
    return Sampler(be, info, batch=batch)


def _onnx_backend(path, backend, providers, batch, stream, cuda_graph, engine_cache, threads, session_options,
                  openvino):
    """``(backend, info)`` for an ``.onnx``: ONNX Runtime, OpenVINO, or a TensorRT engine built from it."""
    info = onnx_info(path)
    if backend == "trt":
        from .backends.trt import TrtBackend
        from .trt_build import cached_engine

        plan = cached_engine(path, info, engine_cache=engine_cache, batch=batch)
        plan_info, raw = engine_info(plan)
        return TrtBackend(plan, plan_info, raw, batch=batch, cuda_stream=stream, cuda_graph=cuda_graph), info
    if cuda_graph:
        raise BdmError("--cuda-graph needs the TensorRT backend")
    if backend == "openvino":
        if providers is not None or session_options is not None or stream is not None:
            raise BdmError("providers, session_options and cuda_stream are ONNX Runtime options; "
                           "OpenVINO takes device, precision and config")
        from .backends.openvino import OpenVinoBackend

        return OpenVinoBackend(path, info, threads=threads, batch=batch, **openvino), info
    from .backends.ort import OrtBackend

    return OrtBackend(path, info, providers=providers, batch=batch, cuda_stream=stream, threads=threads,
                      session_options=session_options), info


# -- the sampler ----------------------------------------------------------------------------------
def _finite(v, name):
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise BdmError(f"{name} must be a number, got {v!r}")
    if not math.isfinite(f):
        raise BdmError(f"{name} must be finite, got {v!r}")
    return f


class Sampler:
    """Draws images from a bdm step graph with one backend; the latent stays on its device.

    Use it as a context manager, or call :meth:`close` to release the session or engine and all
    device memory. Thread safety: calls on one sampler are serialized by an internal lock (it
    reuses its device buffers), so for parallel sampling use one sampler per thread (each with
    its own CUDA stream); never call it from two processes after a fork.
    """

    def __init__(self, backend, info, batch=None):
        self._backend = backend
        self.info = info
        self._lock = threading.Lock()
        limit = backend.max_batch
        self.batch = batch if batch is not None else (limit or ORT_DEFAULT_BATCH)
        if limit is not None:
            self.batch = min(self.batch, limit)  # chunks above the profile maximum: split

    # -- description --------------------------------------------------------------------------
    @property
    def image_shape(self):
        """``(C, H, W)``."""
        return self.info.image_shape

    @property
    def num_classes(self):
        return self.info.num_classes

    @property
    def backend(self):
        """``"ort"``, ``"trt"`` or ``"openvino"``."""
        return self._require().name

    @property
    def provider(self):
        """What actually runs the graph (an ONNX Runtime provider, or ``TensorRT x.y``)."""
        return self._require().provider

    @property
    def device(self):
        return self._require().device

    @property
    def precision(self):
        """The type the network runs in: OpenVINO's as its runtime model reports it, else the graph's own."""
        return getattr(self._require(), "network_precision", None) or self.info.precision

    @property
    def activation_bytes(self):
        """Host memory of the network's activations per image (``bdm_runtime.limits``): 0 where the
        network runs on a GPU or the graph's layers are unknown (a TensorRT engine)."""
        if self._require().device != "cpu":
            return 0
        return activation_bytes(self.info.widest, self.image_shape, self.info.guided)

    @property
    def session_options(self):
        """The ``onnxruntime.SessionOptions`` the session runs with (ONNX Runtime only; ``None`` for TensorRT)."""
        return getattr(self._require(), "session_options", None)

    def __repr__(self):
        state = "closed" if self._backend is None else f"{self._backend.name}/{self._backend.provider}"
        return f"Sampler({self.info.path!r}, {state}, image_shape={self.image_shape})"

    # -- life cycle ---------------------------------------------------------------------------
    def _require(self):
        if self._backend is None:
            raise BdmError("this sampler is closed")
        return self._backend

    def close(self):
        """Release the session or engine and all device memory (idempotent)."""
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- arguments ----------------------------------------------------------------------------
    def _guidance(self, guidance, labels):
        if guidance is None:
            return 0.0 if self.info.guided else None
        w = _finite(guidance, "guidance")
        if w != 0.0 and labels is None and self.info.num_classes > 0:
            raise BdmError("guidance needs labels (--label): without them every image gets the null label, "
                           "where guidance has no effect (B12)")
        if self.info.num_classes == 0:
            if w != 0.0:
                raise BdmError("guidance needs a conditional model; this one is unconditional")
            return None
        if not self.info.guided:
            if w != 0.0:
                raise BdmError(f"{self.info.path}: exported without the guided branch; "
                               "re-export with guidance to use --guidance")
            return None
        return w

    def _destination(self, out, n):
        """``(host array or None, DeviceOut or None)`` for ``out`` of shape ``[n, C, H, W]``."""
        from .backends import cuda_array

        shape = (n,) + self.image_shape
        if out is None:
            return np.empty(shape, dtype=np.float32), None
        if isinstance(out, np.ndarray):
            if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
                raise BdmError(f"out must be a writable C-contiguous float32 array of shape {shape}, "
                               f"got {out.dtype} {out.shape}")
            return out, None
        if hasattr(out, "__cuda_array_interface__"):
            if self._require().device != "cuda":
                raise BdmError(f"out is device memory, but {self.provider} runs on the CPU: pass a numpy array")
            return None, cuda_array(out, shape)
        raise BdmError(f"out must be a numpy array or device memory (__cuda_array_interface__), got {type(out).__name__}")

    # -- sampling -----------------------------------------------------------------------------
    def plan(self, steps=None, eta=None, solver=None, grid=None):
        """The :class:`bdm_runtime.loop.Plan` of a call (times, history, eta), every argument checked.

        ``None`` takes the graph's default; ``grid`` is a name of ``bdm_runtime.grids.GRIDS`` or an
        explicit sequence of times from 1 down to 0 (``steps`` then follows from it).
        """
        solver = self.info.default_solver if solver is None else solver
        if solver not in SOLVERS:
            raise BdmError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if solver != "ddim" and self.info.format_version < 2:
            raise BdmError(f"{self.info.path}: a format-{self.info.format_version} step graph runs only the ddim "
                           f"solver; re-export it with this bdm (bdm-export) to sample with {solver}")
        if steps is not None:
            steps = check_steps(steps)
        try:
            eta = solver_eta(solver, None if eta is None else _finite(eta, "eta"), self.info.default_eta,
                             self.info.default_solver)
            times = resolve(steps, self.info.default_grid if grid is None else grid, self.info.process,
                            self.info.default_steps)
        except ValueError as e:
            raise BdmError(str(e))
        return Plan(times, previous_times(times, solver), eta, self.info.format_version >= 2)

    def sample(self, n, seed=0, steps=None, eta=None, labels=None, guidance=None, first_index=0,
               out=None, progress=False, solver=None, grid=None, timing=None):
        """Draw images ``first_index .. first_index + n - 1`` of ``seed``: float32 ``[n, C, H, W]`` in ``[-1, 1]``.

        ``solver``: ``"ddim"`` (B10; ``eta = 0`` deterministic .. ``eta = 1`` ancestral, B9) or
        ``"dpmpp2m"`` (format-2 graphs; B11 at ``eta = 0``, SDE-DPM-Solver++(2M) at ``eta = 1``, B16;
        without ``eta`` it is deterministic unless it is the graph's default solver); ``grid``: a time grid of
        ``bdm_runtime.grids`` (B15) or explicit times. ``steps``, ``eta``, ``solver``, ``grid`` default
        to the graph's own defaults. ``labels``: one or ``n`` class ids (``None`` on a conditional
        model: the null label); ``guidance``: ``w`` of B12 (needs a guided graph). ``out``: a
        float32 array or device memory (``__cuda_array_interface__``) to write into; it is
        returned. ``progress``: ``True`` for a tqdm bar on stderr, or a callable
        ``progress(done, total)`` called after every step. ``timing``: a callable
        ``timing(seconds)`` given every step's own time (network + update, without the loop's
        uploads and noise draws; asynchronous backends are synchronised around each timed step).
        """
        n = check_positive_int(n, "n", BdmError)
        check_sample_memory(n, self.image_shape, min(n, self.batch), out is None, self.activation_bytes)
        plan = self.plan(steps, eta, solver, grid)
        try:
            check_seed(seed, first_index)
        except ValueError as e:
            raise BdmError(str(e))
        all_labels = normalize_labels(labels, n, self.info.num_classes, BdmError)
        w = self._guidance(guidance, labels)
        host, device = self._destination(out, n)
        streams = lambda start, b: NoiseStream(seed, first_index + start, b, self.image_shape)  # noqa: E731
        self._run(n, streams, plan, all_labels, w, host, device, progress, timing)
        return host if device is None else out

    def sample_images(self, seeds, indices, steps=None, eta=None, labels=None, guidance=None, solver=None,
                      grid=None, out=None):
        """Draw image ``indices[k]`` of seed ``seeds[k]`` for every ``k``, in chunks: float32 ``[n, C, H, W]``.

        Image ``k`` equals image ``indices[k]`` of :meth:`sample` with seed ``seeds[k]`` (the noise
        protocol draws every image from its own ``(seed, index)``), so images of different requests
        run as one chunk through the step graph: what ``bdm-serve`` does with a batch Triton merged.
        The other arguments are those of :meth:`sample`, shared by all images (labels: one per image).
        """
        seeds, indices = np.asarray(seeds).reshape(-1), np.asarray(indices).reshape(-1)
        n = check_positive_int(len(seeds), "number of images", BdmError)
        check_sample_memory(n, self.image_shape, min(n, self.batch), out is None)
        plan = self.plan(steps, eta, solver, grid)
        all_labels = normalize_labels(labels, n, self.info.num_classes, BdmError)
        w = self._guidance(guidance, labels)
        host, device = self._destination(out, n)
        streams = lambda start, b: NoiseStream.of_images(  # noqa: E731
            seeds[start:start + b].tolist(), indices[start:start + b].tolist(), self.image_shape)
        streams(0, n)  # checks every seed and index before any step runs
        self._run(n, streams, plan, all_labels, w, host, device, False, None)
        return host if device is None else out

    def _run(self, n, streams, plan, all_labels, w, host, device, progress, timing):
        """The chunks of a call: ``streams(start, b)`` gives the noise of images ``start .. start + b - 1``."""
        with self._lock:
            backend = self._require()
            chunk = self.batch
            chunks = (n + chunk - 1) // chunk
            tick, finish = _progress(progress, plan.steps * chunks)
            try:
                for start in range(0, n, chunk):
                    b = min(chunk, n - start)
                    stream = streams(start, b)
                    z = stream.draw()                                 # the initial latent z_1
                    noise = _drawer(stream) if plan.eta > 0 else None  # then one draw per step (xi)
                    lab = None if all_labels is None else all_labels[start:start + b]
                    dest = host[start:start + b] if device is None else device.rows(start, b)
                    run_chunk(backend, z, plan, noise, lab, w, dest, tick, timing)
            except MemoryError:  # a buffer the up-front estimate allowed, refused by the machine now
                raise BdmError(f"{self.info.path}: out of memory in a chunk of {chunk} images: "
                               "lower the batch (--batch, or batch= of load)") from None
            finally:
                finish()

    def generate(self, n, seed=0, steps=None, eta=None, labels=None, guidance=None, first_index=0,
                 out=None, progress=False, solver=None, grid=None, timing=None):
        """Like :meth:`sample`, as uint8 images ``[n, H, W, C]`` (written into ``out`` if given)."""
        from .images import to_uint8

        if out is not None:
            c, h, w = self.image_shape
            shape = (check_positive_int(n, "n", BdmError), h, w, c)
            if not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != np.uint8 or not out.flags.writeable:
                raise BdmError(f"out must be a writable uint8 array of shape {shape}")
        x = self.sample(n, seed=seed, steps=steps, eta=eta, labels=labels, guidance=guidance,
                        first_index=first_index, progress=progress, solver=solver, grid=grid, timing=timing)
        images = to_uint8(x)
        if out is None:
            return images
        out[...] = images
        return out


def _drawer(stream):
    """``draw()`` of ``stream`` into one reused host buffer."""
    buf = np.empty((len(stream.generators),) + stream.shape, dtype=np.float32)
    return lambda: stream.draw(buf)


def _progress(progress, total):
    """``(tick, finish)`` for ``progress``: ``False``, ``True`` (tqdm on stderr) or ``f(done, total)``."""
    if not progress:
        return None, lambda: None
    if callable(progress):
        done = [0]

        def tick():
            done[0] += 1
            progress(done[0], total)

        return tick, lambda: None
    import sys

    from tqdm import tqdm

    bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, leave=False)
    return (lambda: bar.update(1)), bar.close
