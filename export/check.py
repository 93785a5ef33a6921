"""Compare an exported step graph with the torch step it came from, through Polygraphy's Comparator.

Backends: torch (``TorchRunner``) vs ONNX Runtime on CPU (``OnnxrtRunner``), plus TensorRT
(``TrtRunner``) when an engine is given. Inputs are realistic: latents ``q_sample``d from random
images at grid times ``t = i/N`` with the adjacent ``s = t - 1/N``, ``N = max(default steps, 50)``
(far-apart ``t, s`` amplify any difference by ``alpha_s / alpha_t``, up to 3e4).

Two sets of inputs, because ``x0`` only matters where it is the output: "trajectory" inputs at
any grid time are compared on ``z_next``; "final" inputs at the last step (``t = 1/N, s = 0``)
on ``z_next`` and ``x0`` (and, in format 2, ``u_x``: it is ``x0``'s frequency-space twin). In
format 2 half of the images carry a history (``t_prev = t + 1/N``: B11's second-order step), the
others none (``t_prev = t``: first order). At earlier steps ``x0 = V (u_t - sigma_t u_eps) / alpha_t`` is a
preview whose float32 rounding is amplified by ``sigma_t / alpha_t`` (up to 1e5 at ``t = 1``);
torch in float32 is itself ~1e-2 away from float64 there, so no two backends agree on it.

ONNX Runtime's CPU provider has few float16 kernels on x86: it inserts casts and computes FP16
nodes in float32 (rounding to float16 between nodes), so an FP16 graph checked here is checked
for validity and against torch's own FP16 model, not for GPU FP16 arithmetic (TensorRT is).
"""
import time
from collections import OrderedDict

import numpy as np
import torch

from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError

from . import CHECK_TOLERANCES
from .fp16 import half_model
from .onnx_export import read_metadata
from .step import StepGraph

TOLERANCES = CHECK_TOLERANCES
CHECK_MIN_STEPS = 50


def preload():
    """Import everything the check uses, before any work (issue 22).

    Polygraphy imports its backends lazily, behind bare ``except:`` clauses: a SIGTERM that lands
    while such an import runs is swallowed and comes out later as "Module 'onnxruntime' is required
    but could not be imported" (with a hint to auto-install packages). Imported here, up front, an
    interrupt during the imports is an interrupt, and the check's lazy imports find the modules
    loaded (``run_cli``'s flag, ``check_terminated``, covers what is left).
    """
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx  # noqa: F401
    from polygraphy.comparator import Comparator, CompareFunc  # noqa: F401
    from polygraphy.common import TensorMetadata  # noqa: F401
    from polygraphy.logger import G_LOGGER  # noqa: F401


def _runner_base():
    from polygraphy.backend.pyt import PytRunner

    return PytRunner


class TorchRunner(_runner_base()):
    """Polygraphy's ``PytRunner`` on the model's own device (it assumes CUDA) returning a dict."""

    def infer_impl(self, feed_dict):
        device = next(iter(self.model.buffers()), torch.zeros(())).device
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feed_dict[n])).to(device) for n in self.input_metadata]
            start = time.time()
            outs = self.model(*args)
            self.inference_time = time.time() - start
        return OrderedDict((n, o.detach().cpu().numpy()) for n, o in zip(self.output_names, outs))


def make_inputs(meta, process, *, final, batch=3, seed=0, guidance=2.0):
    """One feed dict of realistic step inputs (``final``: the last step, ``t = 1/N, s = 0``)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = meta[fmt.K_IMAGE_SHAPE]
    # Differences between backends are amplified by alpha_s / alpha_t, which grows with the step
    # size (up to 3e4): on a grid of at least 50 steps the check measures the backends, not that.
    steps = max(int(meta[fmt.K_DEFAULT_STEPS]), CHECK_MIN_STEPS)
    i = torch.ones(batch) if final else torch.randint(1, steps + 1, (batch,), generator=g).float()
    t, s = i / steps, (i - 1) / steps
    x = torch.rand(batch, c, h, w, generator=g) * 2 - 1
    dev = process.c_h.device
    with torch.no_grad():
        z = process.q_sample(x.to(dev), t.to(dev), torch.randn(batch, c, h, w, generator=g).to(dev)).cpu()
        # B11's state: the previous step's u_x_hat, a slightly different guess of the same image
        u_prev = process.dct((x + 0.1 * torch.randn(batch, c, h, w, generator=g)).to(dev)).cpu()
    stateful = meta[fmt.K_FORMAT_VERSION] >= 2
    feed = OrderedDict()
    feed[fmt.Z] = z.numpy()
    feed[fmt.T] = t.numpy()
    feed[fmt.S] = s.numpy()
    # B11 steps are deterministic: eta 0 where there is history; DDIM-eta (random eta) elsewhere
    feed[fmt.ETA] = np.array([0.0 if stateful else float(torch.rand((), generator=g))], dtype=np.float32)
    feed[fmt.NOISE] = torch.randn(batch, c, h, w, generator=g).numpy()
    if stateful:
        history = (torch.arange(batch) % 2 == 0) & (i < steps)
        feed[fmt.T_PREV] = torch.where(history, (i + 1) / steps, t).numpy()
        feed[fmt.U_X_PREV] = u_prev.numpy()
    if meta[fmt.K_NUM_CLASSES] > 0:
        feed[fmt.LABEL] = torch.randint(0, meta[fmt.K_NUM_CLASSES] + 1, (batch,), generator=g).numpy()
    if meta[fmt.K_GUIDANCE]:
        feed[fmt.GUIDANCE] = np.array([guidance], dtype=np.float32)
    return feed


def _simple(**kwargs):
    """Polygraphy's simple (atol/rtol) comparison: ``SimpleCompareFunc`` (0.53+) or ``CompareFunc.simple``."""
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        from polygraphy.comparator import CompareFunc

        return CompareFunc.simple(**kwargs)
    return SimpleCompareFunc(**kwargs)


def _errors(results, outputs):
    """``{(reference, other): {output: (max abs error, max|a-b| / max|b|)}}`` against runner 0."""
    pairs = list(results.items())  # RunResults: [(runner name, [IterationResult, ...]), ...]
    (ref_name, ref_iters), others = pairs[0], pairs[1:]
    out = OrderedDict()
    for name, iters in others:
        errs = {}
        for ref_it, it in zip(ref_iters, iters):
            for o in outputs:
                a = np.asarray(it[o], np.float64)
                b = np.asarray(ref_it[o], np.float64)
                d = float(np.abs(a - b).max())
                r = d / max(float(np.abs(b).max()), 1e-30)
                old = errs.get(o, (0.0, 0.0))
                errs[o] = (max(old[0], d), max(old[1], r))
        out[(ref_name, name)] = errs
    return out


def check_onnx(onnx_path, model, process, *, plan_path=None, iterations=2, batch=3, seed=0, tolerances=None,
               log=print):
    """Compare torch, ONNX Runtime (and TensorRT if ``plan_path``) on one step graph; True if within tolerance.

    ``model`` is the FP32 model the graph was exported from (an FP16 graph is compared with its
    ``convert_to_fp16()`` copy). Prints max abs / rel error per output and comparison. ``batch``
    is clamped to the engine's profile. A Polygraphy failure (a runner that cannot load or run)
    is a ``BdmError`` with its first line.
    """
    from polygraphy.exception import PolygraphyException

    from bdm_runtime.errors import check_terminated

    try:
        return _check_onnx(onnx_path, model, process, plan_path, iterations, batch, seed, tolerances, log)
    except PolygraphyException as e:
        check_terminated()   # a SIGTERM swallowed by one of Polygraphy's bare excepts, not a failed check
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BdmError(f"cannot check {onnx_path}: {detail}")


def _profile_batch(plan_path, batch):
    """``batch`` clamped to the ``min..max`` of the engine's profile (from ``X.plan.json``)."""
    from bdm_runtime.step_info import read_side_file

    profile = read_side_file(str(plan_path)).get(fmt.K_PROFILE)
    if not isinstance(profile, dict):
        return batch
    return min(max(batch, int(profile["min"])), int(profile["max"]))


def _check_onnx(onnx_path, model, process, plan_path, iterations, batch, seed, tolerances, log):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.common import TensorMetadata
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    meta = read_metadata(onnx_path)
    if plan_path is not None:
        batch = _profile_batch(plan_path, batch)
    precision = meta[fmt.K_PRECISION]
    atol, rtol = (tolerances or TOLERANCES)[precision]
    net = half_model(model) if precision == "fp16" else model
    graph = StepGraph(net, process, num_classes=meta[fmt.K_NUM_CLASSES], guided=meta[fmt.K_GUIDANCE],
                      clip_denoised=meta[fmt.K_CLIP_DENOISED], format_version=meta[fmt.K_FORMAT_VERSION]).eval()
    c, h, w = meta[fmt.K_IMAGE_SHAPE]
    spec = TensorMetadata()
    for name in graph.input_names:
        per_image = name in fmt.IMAGE_TENSORS
        shape = (batch, c, h, w) if per_image else ((1,) if name in (fmt.ETA, fmt.GUIDANCE) else (batch,))
        spec.add(name, np.int64 if name == fmt.LABEL else np.float32, shape)
    # PytRunner takes "a torch.nn.Module or a callable that returns one", and calls any callable.
    runners = [TorchRunner(lambda: graph, spec, graph.output_names, name="torch"),
               OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name="onnxrt")]
    if plan_path is not None:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        runners.append(TrtRunner(EngineFromBytes(BytesFromPath(str(plan_path))), name="tensorrt"))

    ok = True
    for final in (False, True):
        outputs = graph.output_names if final else [fmt.Z_NEXT]
        feeds = [make_inputs(meta, process, final=final, batch=batch, seed=seed + 17 * k + int(final))
                 for k in range(iterations)]
        compare = _simple(atol=atol, rtol=rtol, check_error_stat="elemwise",
                                     find_output_func=lambda name, index, result, keep=outputs:
                                     [name] if name in keep else [])
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            results = Comparator.run(runners, data_loader=feeds)
            passed = bool(Comparator.compare_accuracy(results, compare_func=compare,
                                                      comparisons=[(0, k) for k in range(1, len(runners))]))
        ok = ok and passed
        where = "last step (t=1/N)" if final else "trajectory steps"
        for (ref, other), errs in _errors(results, outputs).items():
            for o, (d, r) in errs.items():
                log(f"  {other} vs {ref} [{precision}] {o:6s} @ {where}: max abs {d:.2e}, max rel {r:.2e}")
        if not passed:
            log(f"  FAILED at {where}: an element differs by > {atol:g} and > {rtol:g} x |reference|")
    return ok


def check_int8(onnx_path, model, process, *, batch=3, seed=0, log=print):
    """An INT8 graph on ONNX Runtime against the torch FP32 step: prints the error, fails only if not finite.

    INT8 differs from FP32 by its quantization error by design (measured by FD in docs/int8.md), so no
    element-wise tolerance applies; what must hold is that ONNX Runtime loads and runs it to finite outputs.
    """
    import onnxruntime as ort

    meta = read_metadata(onnx_path)
    graph = StepGraph(model, process, num_classes=meta[fmt.K_NUM_CLASSES], guided=meta[fmt.K_GUIDANCE],
                      clip_denoised=meta[fmt.K_CLIP_DENOISED], format_version=meta[fmt.K_FORMAT_VERSION]).eval()
    try:
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BdmError(f"cannot check {onnx_path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}")
    feed = make_inputs(meta, process, final=False, batch=batch, seed=seed)
    got = sess.run([fmt.Z_NEXT], feed)[0]
    with torch.no_grad():
        want = graph(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in graph.input_names))[0].numpy()
    d = np.abs(got.astype(np.float64) - want)
    log(f"  onnxrt [{meta[fmt.K_PRECISION]}] vs torch [fp32] z_next @ trajectory steps: max abs {d.max():.2e}, "
        f"rms {np.sqrt((d ** 2).mean()):.2e} (quantization error, not a tolerance)")
    ok = bool(np.isfinite(got).all())
    if not ok:
        log(f"  FAILED: the {meta[fmt.K_PRECISION]} graph's z_next is not finite")
    return ok
