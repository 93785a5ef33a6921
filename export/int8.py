"""INT8 step graphs: the network's convolutions in QDQ INT8, calibrated on the model's own trajectories.

Why this way (docs/int8.md has the measurements):

- **QDQ, symmetric, per-channel.** ``QuantizeLinear``/``DequantizeLinear`` pairs with INT8 zero
  points 0, weights per output channel, activations per tensor: the one form that ONNX Runtime,
  OpenVINO and TensorRT's ONNX parser (explicit quantization) all take, so one file serves all three.
- **Only the network, and not all of it.** The sampler update (DCTs B1, the update B10/B11) divides
  by ``alpha_t`` down to ~1e-5 and never is quantized: only ``Conv`` nodes under ``/model/`` are
  candidates. Of those, NVIDIA Model Optimizer's diffusion recipe keeps the first and last
  convolutions and the shortcut (``skip``) convolutions in float (they carry the image itself and
  the concatenated skip activations, whose two halves have different ranges: Q-Diffusion); the time
  embedding is ``Gemm`` and GroupNorm, SiLU and softmax are not ``Conv``: all stay float.
- **Timestep-aware calibration** (Q-Diffusion): the activation ranges come from the step graph's
  inputs at every step of the model's own default sampler (solver, grid, steps, eta from its
  metadata) over a fixed, seeded set of images, recorded by running the FP32 graph through the
  runtime itself (ONNX Runtime), so calibration sees exactly the latents sampling will produce.
- **The method chosen per model** (``--calib-method auto``, the default): max and percentile each won
  FD on one of the two FMNIST DDPMs; the final-image error against FP32 on held-out seeds ranks them
  as FD did on both, so ``bdm_export.int8_auto`` keeps the candidate with the smaller one.
- **Reproducible.** Seeded noise (``bdm_runtime.noise``), one ONNX Runtime thread while recording
  and ONNX Runtime's own deterministic calibrators: the same graph and options give the same bytes.

ONNX Runtime's ``quantize_static`` does the work (calibration, scales, QDQ insertion); this module
chooses what it is given and records how in the graph's metadata (``format.K_CALIBRATION``).
"""
import contextlib
import io
import logging
import os
import tempfile

import numpy as np

from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from bdm_runtime.io import atomic_path

from .int8_auto import AUTO, HELD_OUT_SEED_OFFSET, choose

# CLI names -> onnxruntime.quantization.CalibrationMethod members
METHODS = {"max": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# The best method depends on the model (FD-FMNIST: percentile on the 6,000-step DDPM, max on the 12,000-step one);
# auto picks it by a proxy that ranked both as FD did, at ~2x percentile's INT8 export time: docs/int8.md
DEFAULT_METHOD = AUTO
CHOICES = tuple(METHODS) + (AUTO,)  # --calib-method: a method, or the one closest to FP32 (int8_auto)
DOC = "bdm step graph, INT8 network convolutions (QDQ, symmetric, per-channel weights), sampler update in FP32"
DEFAULT_IMAGES = 32         # trajectories; x the default steps = calibration batches' images
DEFAULT_SEED = 0
PERCENTILE = 99.999         # of |activation|, for "percentile" (ONNX Runtime's default)
RECORD_BATCH = 16           # images per recorded step (one calibration batch)
NETWORK = "/model/"         # the torch exporter's scope of the network inside the step graph
# Network layers that can be kept in float, by the exporter's node-name scopes (bdm_train.unet)
LAYERS = {"first": ("/model/conv_in/",), "last": ("/model/conv_out/",), "skip": ("/skip/",),
          "attention": ("/qkv/", "/proj/")}
DEFAULT_FLOAT = ("first", "last", "skip")   # Model Optimizer's diffusion recipe; measured in docs/int8.md


MIN_ORT = (1, 16)           # quantize_static with QuantizeBias, symmetric calibration, iterable readers


def require_quantizer():
    """``BdmError`` (one line, with the fix) unless ONNX Runtime's quantization tools are here."""
    try:
        import onnxruntime
        from onnxruntime import quantization  # noqa: F401
    except ImportError:
        raise BdmError("--int8 needs ONNX Runtime's quantization tools: pip install 'bdm[ort]' (or onnxruntime-gpu)")
    version = tuple(int(p) for p in onnxruntime.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_ORT:
        raise BdmError(f"--int8 needs ONNX Runtime >= {MIN_ORT[0]}.{MIN_ORT[1]}, this is {onnxruntime.__version__}: "
                       f"pip install -U onnxruntime")


def network_convs(proto, float_layers=DEFAULT_FLOAT):
    """``(quantized, kept)``: names of the network's ``Conv`` nodes to quantize and of those kept in float."""
    unknown = sorted(set(float_layers) - set(LAYERS))
    if unknown:
        raise BdmError(f"unknown layer group(s) {unknown}: choose from {', '.join(LAYERS)}")
    patterns = [p for k in float_layers for p in LAYERS[k]]
    quantized, kept = [], []
    for node in proto.graph.node:
        if node.op_type == "Conv" and node.name.startswith(NETWORK):
            (kept if any(p in node.name for p in patterns) else quantized).append(node.name)
    return quantized, kept


def _recorder_class():
    from bdm_runtime.backends.ort import OrtBackend

    class Recorder(OrtBackend):
        """ONNX Runtime backend that keeps a host copy of every step's inputs (calibration batches)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.feeds = []

        def step(self, parity, out=None):
            self.feeds.append(self.step_inputs(parity))
            super().step(parity, out)

    return Recorder


def record_inputs(fp32_path, images=DEFAULT_IMAGES, seed=DEFAULT_SEED, progress=False):
    """The step graph's inputs at every step of its default sampler for ``images`` seeded trajectories.

    Runs ``fp32_path`` through the runtime (``bdm_runtime.Sampler``, ONNX Runtime CPU, one thread:
    reproducible) in chunks of ``RECORD_BATCH``; conditional models get the labels ``0, 1, ...``
    in turn. Returns ``(feeds, plan)``: one ``{input name: array}`` per step and chunk, and the plan.
    """
    from bdm_runtime.sampler import Sampler
    from bdm_runtime.step_info import onnx_info

    info = onnx_info(fp32_path)
    backend = _recorder_class()(fp32_path, info, providers=["CPUExecutionProvider"], threads=1)
    labels = None if info.num_classes == 0 else np.arange(images) % info.num_classes
    with Sampler(backend, info, batch=min(RECORD_BATCH, images)) as sampler:
        plan = sampler.plan()
        sampler.sample(images, seed=seed, labels=labels, progress=progress)
    return backend.feeds, plan


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded feeds (with a progress bar)."""

    def __init__(self, feeds, progress):
        self._feeds = iter(feeds)
        self._bar = None
        if progress:
            import sys

            from tqdm import tqdm

            self._bar = tqdm(total=len(feeds), desc="calibrating", unit="batch", file=sys.stderr, leave=False)

    def get_next(self):
        feed = next(self._feeds, None)
        if self._bar is not None:
            if feed is None:
                self._bar.close()
            else:
                self._bar.update(1)
        return feed

    def __iter__(self):  # CalibrationDataReader's protocol (ONNX Runtime >= 1.16)
        return self

    def __next__(self):
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


@contextlib.contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer warns through the root logger to pre-process the model (ours is: export) and
    its histogram calibrators print to stdout, which is the CLI's report: both are silenced."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize(fp32_path, feeds, method="percentile", float_layers=DEFAULT_FLOAT, progress=False, nodes=None):
    """``(proto, n)``: the QDQ INT8 ``onnx.ModelProto`` of ``fp32_path`` calibrated on ``feeds`` (metadata not yet
    changed) and how many convs it quantized: the network's but ``float_layers``, or exactly ``nodes``."""
    import onnx

    require_quantizer()
    from onnxruntime import quantization as q

    if method not in METHODS:
        raise BdmError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if nodes is None:
        nodes, _ = network_convs(onnx.load(fp32_path), float_layers)
    if not nodes:
        raise BdmError(f"{fp32_path}: no convolution of the network is left to quantize")
    reader = _Reader(feeds, progress)
    with tempfile.TemporaryDirectory(prefix="bdm-int8-") as tmp, _quiet_quantizer():
        out = os.path.join(tmp, "int8.onnx")
        q.quantize_static(fp32_path, out, reader, quant_format=q.QuantFormat.QDQ, op_types_to_quantize=["Conv"],
                          nodes_to_quantize=nodes, per_channel=True, activation_type=q.QuantType.QInt8,
                          weight_type=q.QuantType.QInt8, calibrate_method=getattr(q.CalibrationMethod,
                                                                                   METHODS[method]),
                          extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                         "CalibPercentile": PERCENTILE, "CalibMovingAverage": False,
                                         # float biases: TensorRT's parser takes no INT32 DequantizeLinear,
                                         # and ONNX Runtime still fuses QDQ Conv into QLinearConv
                                         "QuantizeBias": False})
        return onnx.load(out), len(nodes)


def int8_graph(fp32_path, images=DEFAULT_IMAGES, method=DEFAULT_METHOD, seed=DEFAULT_SEED,
               float_layers=DEFAULT_FLOAT, progress=False):
    """The INT8 step graph of the FP32 step graph ``fp32_path``, with its metadata (``precision int8``);
    ``method`` ``"auto"``: the candidate closest to FP32 on held-out seeds (``bdm_export.int8_auto``)."""

    from .onnx_export import read_metadata

    meta = read_metadata(fp32_path)
    if method not in CHOICES:
        raise BdmError(f"calibration method must be one of {', '.join(CHOICES)}, got {method!r}")
    if meta[fmt.K_PRECISION] != "fp32":
        raise BdmError(f"{fp32_path}: INT8 is calibrated from the FP32 step graph, this one is "
                       f"{meta[fmt.K_PRECISION]}")
    feeds, plan = record_inputs(fp32_path, images, seed, progress)

    def build(m):
        proto, quantized = quantize(fp32_path, feeds, m, float_layers, progress)
        out = dict(meta)
        out[fmt.K_PRECISION] = "int8"
        out[fmt.K_CALIBRATION] = {
            "method": m, "images": int(images), "steps": int(plan.steps), "seed": int(seed),
            "solver": meta.get(fmt.K_DEFAULT_SOLVER, "ddim"), "grid": meta.get(fmt.K_DEFAULT_GRID, "uniform"),
            "eta": float(plan.eta), "float_layers": list(float_layers), "quantized": int(quantized)}
        del proto.metadata_props[:]
        return finish(proto, out, DOC), out

    if method == AUTO:  # every candidate on held-out seeds: bdm_export.int8_auto
        return choose(fp32_path, build, seed + HELD_OUT_SEED_OFFSET)
    return build(method)


def finish(proto, meta, doc):
    """``proto`` with ``meta`` and ``doc`` stored, its shapes inferred (value_info, as export stores it), checked."""
    import onnx

    onnx.helper.set_model_props(proto, fmt.encode(meta))
    proto.doc_string = doc
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_int8(fp32_path, path, images=DEFAULT_IMAGES, method=DEFAULT_METHOD, seed=DEFAULT_SEED,
                float_layers=DEFAULT_FLOAT, progress=False):
    """Write the INT8 step graph of ``fp32_path`` to ``path`` (atomically); returns its metadata."""
    import onnx

    proto, meta = int8_graph(fp32_path, images, method, seed, float_layers, progress)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return meta
