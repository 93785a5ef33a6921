"""Export one whole sampler step (``bdm_export.step.StepGraph``) as an ONNX graph, format version 2 (or 1).

Exporter: the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) at opset 17. The
dynamo exporter (torch 2.13) emits opset 18 and converts down; on the FP16 UNet that conversion
left ``Split`` with the opset-18 ``num_outputs`` attribute, which ``onnx.checker`` rejects at
opset 17, and it took ~20 s against ~1 s. The TorchScript exporter writes opset 17 natively (GroupNorm
as ``InstanceNormalization`` + ``Reshape``, never opset-21 ``GroupNormalization``); onnxscript's
optimizer then folds its ``Constant`` nodes and no-op casts, so the graph is as clean as dynamo's.
"""
import io
import warnings

import torch

import bdm_train
from bdm_train.diffusion import param_of
from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from bdm_runtime.grids import GRIDS, solver_eta
from bdm_runtime.io import atomic_path
from bdm_runtime.noise import check_positive_int

from .fp16 import half_model
from .step import StepGraph

OPSET = 17
BATCH = "batch"


def metadata(process, *, channels, num_classes, guided, clip_denoised, default_steps, default_eta, precision,
             default_solver="ddim", default_grid="uniform", format_version=fmt.FORMAT_VERSION, param="eps"):
    """The ``bdm.*`` metadata of a step graph (``bdm_runtime.format``), as plain values."""
    h, w = process.image_size
    meta = {
        fmt.K_FORMAT_VERSION: int(format_version),
        fmt.K_IMAGE_SHAPE: [int(channels), int(h), int(w)],
        fmt.K_PROCESS: process.config(),
        fmt.K_NUM_CLASSES: int(num_classes),
        fmt.K_GUIDANCE: bool(guided),
        fmt.K_CLIP_DENOISED: bool(clip_denoised),
        fmt.K_DEFAULT_STEPS: int(default_steps),
        fmt.K_DEFAULT_ETA: float(default_eta),
        fmt.K_PRECISION: precision,
        fmt.K_VERSION: bdm_train.__version__,
        fmt.K_PARAM: param,
    }
    if format_version >= 2:
        meta[fmt.K_DEFAULT_SOLVER] = default_solver
        meta[fmt.K_DEFAULT_GRID] = default_grid
    return meta


def _check_args(model, channels, num_classes, guidance, default_steps, default_eta, default_solver, default_grid,
                format_version):
    check_positive_int(channels, "channels")
    if getattr(model, "in_channels", channels) != channels:
        raise BdmError(f"channels={channels} but the model has in_channels={model.in_channels}")
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise BdmError(f"num_classes={num_classes} but the model has num_classes={model.num_classes}")
    if guidance and num_classes <= 0:
        raise BdmError("guidance=True needs a conditional model (num_classes > 0)")
    check_positive_int(default_steps, "default_steps")
    if not 0.0 <= float(default_eta) <= 1.0:
        raise BdmError(f"default_eta must be in [0, 1], got {default_eta!r}")
    solver_eta(default_solver, default_eta, default_eta)  # a known solver
    if default_grid not in GRIDS:
        raise BdmError(f"default_grid must be one of {', '.join(GRIDS)}, got {default_grid!r}")
    if format_version not in fmt.SUPPORTED_VERSIONS:
        raise BdmError(f"format_version must be one of {fmt.SUPPORTED_VERSIONS}, got {format_version!r}")
    if format_version == 1 and (default_solver, default_grid) != ("ddim", "uniform"):
        raise BdmError("a format-1 graph runs only the ddim solver on the uniform grid by default")


def build_graph(model, process, *, channels, num_classes=0, fp16=False, guidance=None, clip_denoised=True,
                default_steps=50, default_eta=0.0, default_solver="ddim", default_grid="uniform", opset=OPSET,
                optimize=True, format_version=fmt.FORMAT_VERSION):
    """The step graph as an ``onnx.ModelProto`` (checked, with metadata), without writing it."""
    import onnx

    _check_args(model, channels, num_classes, guidance, default_steps, default_eta, default_solver, default_grid,
                format_version)
    guided = bool(num_classes > 0 if guidance is None else guidance)
    net = half_model(model) if fp16 else model
    was_training = net.training
    graph = StepGraph(net, process, num_classes=num_classes, guided=guided, clip_denoised=clip_denoised,
                      format_version=format_version).eval()
    device = process.c_h.device
    # Batch 2 for tracing, so that nothing specialises on a batch of 1; the axis is declared dynamic.
    args = tuple(a.to(device) for a in graph.example_inputs(channels, batch=2))
    batched = set(fmt.PER_IMAGE) | set(graph.output_names)
    dynamic = {n: {0: BATCH} for n in graph.input_names + graph.output_names if n in batched}
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(graph, args, buf, input_names=graph.input_names, output_names=graph.output_names,
                              dynamic_axes=dynamic, opset_version=int(opset), dynamo=False,
                              do_constant_folding=True)
    finally:
        net.train(was_training)
    proto = onnx.load_from_string(buf.getvalue())
    if optimize:
        proto = _optimize(proto)
    # Store every tensor's inferred type (value_info): TensorRT 8 builds pin FP16/FP32 layers by it.
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    meta = metadata(process, channels=channels, num_classes=num_classes, guided=guided,
                    clip_denoised=clip_denoised, default_steps=default_steps, default_eta=default_eta,
                    precision="fp16" if fp16 else "fp32", default_solver=default_solver, default_grid=default_grid,
                    format_version=format_version, param=param_of(model))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, fmt.encode(meta))
    proto.producer_name = "bdm"
    proto.producer_version = bdm_train.__version__
    proto.doc_string = ("bdm step graph: one sampler step of blurring diffusion (network + DCT update; DDIM-eta"
                        + (", DPM-Solver++(2M) state in/out)" if format_version >= 2 else ")"))
    onnx.checker.check_model(proto, full_check=True)  # full_check: strict shape inference too
    return proto


def _optimize(proto):
    """Fold constants and drop no-op casts with onnxscript's optimizer (part of ``[export]``)."""
    try:
        import onnxscript.optimizer
    except ImportError:  # the unoptimised graph is valid too, just has more Constant nodes
        return proto
    return onnxscript.optimizer.optimize(proto)


def export_onnx(model, process, path, *, channels, num_classes=0, fp16=False, guidance=None, clip_denoised=True,
                default_steps=50, default_eta=0.0, default_solver="ddim", default_grid="uniform", opset=OPSET,
                format_version=fmt.FORMAT_VERSION):
    """Write the step graph of ``model`` under ``process`` to ``path`` (atomically); returns its metadata.

    ``model`` is anything callable as ``model(z, t, labels=None)`` returning eps (a UNet or a
    closed-form denoiser). ``guidance=None`` includes the guided branch (B12) for conditional
    models; ``fp16=True`` runs the network in FP16 (``model.convert_to_fp16()`` on a deep copy)
    with the sampler update in FP32. ``default_solver``/``default_grid``/``default_steps``/``default_eta``
    are what the runtime uses when not told otherwise (format 2; any solver and grid run on it).
    ``format_version=1`` writes the DDIM-only graph older runtimes read.
    """
    import onnx

    proto = build_graph(model, process, channels=channels, num_classes=num_classes, fp16=fp16, guidance=guidance,
                        clip_denoised=clip_denoised, default_steps=default_steps, default_eta=default_eta,
                        default_solver=default_solver, default_grid=default_grid, opset=opset,
                        format_version=format_version)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return read_metadata(proto)


def read_metadata(model):
    """The decoded ``bdm.*`` metadata of an ONNX file path or ``ModelProto``."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(model, load_external_data=False)
    return fmt.decode({p.key: p.value for p in model.metadata_props})
