"""Build a TensorRT engine ``X.plan`` (+ ``X.plan.json``) from a bdm step graph ``.onnx``.

Torch-free and Python 3.8 compatible: engines are specific to the GPU and the TensorRT version,
so they are built on the target (a Jetson has no torch). Needs ``tensorrt`` and Polygraphy (the
``[trt]`` extra); the ONNX metadata is read with ``runtime.onnx_meta`` (no ``onnx`` package).

Precision comes from the graph (``export.fp16``), by TensorRT major version, never by ``hasattr``
(a silently FP32 engine is the common failure in the field):

- 8.x/9.x (JetPack 5, 6.0): weakly typed networks. An FP16 graph gets ``BuilderFlag.FP16`` plus
  precision constraints ("obey"), each layer pinned to its ONNX tensors' type, so the FP32
  islands (update, DCTs, time embedding, GroupNorm) stay FP32. The types come from the graph's
  ``value_info`` (the exporter stores inferred types); TensorRT 8's own tensor dtypes are not the
  graph's (NVIDIA/TensorRT#1993: a constant of FP16 weights reports FLOAT).
- 10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: types are the graph's, no FP16 flag.
- 11.x: networks are always strongly typed; the FP16 flag no longer exists.
"""
import json
import os

from runtime import format as fmt
from runtime import onnx_meta
from runtime.backends.trt import probe_cuda, trt_version
from runtime.errors import BdmError
from runtime.io import atomic_path

DEFAULT_BATCH = (1, 16, 64)
BATCH_INPUTS = fmt.PER_IMAGE  # inputs whose first dim is the batch


def parse_batch(spec):
    """``"MIN:OPT:MAX"`` (images) -> ``(min, opt, max)`` with ``1 <= min <= opt <= max``."""
    shown = spec
    if isinstance(spec, str):
        parts = spec.split(":")
        try:
            spec = tuple(int(p) for p in parts)
        except ValueError:
            spec = ()
        if len(parts) != 3:
            spec = ()
    spec = tuple(spec)
    if len(spec) != 3 or not 1 <= spec[0] <= spec[1] <= spec[2]:
        raise BdmError(f"bad batch profile {shown!r}: want MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, e.g. 1:16:64")
    return spec


def unavailable_reason():
    """Why no engine can be built here (one line), or ``None`` when TensorRT >= 8.5 and a GPU are present."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (JetPack ships it; elsewhere pip install tensorrt)"
    try:
        trt_version(tensorrt)
    except BdmError as e:
        return str(e)
    try:
        from polygraphy.backend.trt import network_from_onnx_path  # noqa: F401
    except ImportError:
        return "Polygraphy is not installed (pip install polygraphy, or bdm[trt])"
    return probe_cuda()[1]


def read_step_metadata(onnx_path):
    """The validated ``bdm.*`` metadata of a step graph (``BdmError`` if it is not one this code reads)."""
    from runtime.sampler import onnx_info

    return onnx_info(os.fspath(onnx_path)).meta


def profile_shapes(meta, batch):
    """``{input: (min_shape, opt_shape, max_shape)}`` for the inputs with a batch dimension."""
    c, h, w = meta[fmt.K_IMAGE_SHAPE]
    inputs = [n for n in fmt.inputs(meta[fmt.K_FORMAT_VERSION], meta[fmt.K_NUM_CLASSES]) if n in BATCH_INPUTS]
    out = {}
    for name in inputs:
        tail = (c, h, w) if name in fmt.IMAGE_TENSORS else ()
        out[name] = tuple((b,) + tail for b in batch)
    return out


def build_engine(onnx_path, plan_path, batch=DEFAULT_BATCH, workspace_mib=None, timing_cache=None, verbose=False):
    """Build ``plan_path`` (and ``plan_path + ".json"``) from the step graph ``onnx_path``; returns the json dict.

    ``batch`` is ``(min, opt, max)`` or ``"MIN:OPT:MAX"`` in images (the guided branch doubles
    the batch inside the graph only). ``workspace_mib`` limits the builder's workspace pool;
    ``timing_cache`` is a file read (if present) and updated.
    """
    batch = parse_batch(batch)
    meta = read_step_metadata(onnx_path)
    reason = unavailable_reason()
    if reason:
        raise BdmError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    major, _ = trt_version(trt)  # >= 8.5, or BdmError
    fp16 = meta[fmt.K_PRECISION] == "fp16"
    weak_fp16 = fp16 and major < 10
    path = os.fspath(onnx_path)
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.WARNING):
        # Polygraphy backend/trt/loader.py NetworkFromOnnxPath: parse with trt.OnnxParser into an
        # explicit-batch network; strongly_typed sets NetworkDefinitionCreationFlag.STRONGLY_TYPED
        # (TensorRT 10 "Strongly Typed Networks"; the option came in Polygraphy 0.48.0, hence the
        # floor in setup.cfg). TensorRT 11 networks are strongly typed anyway.
        try:
            if major == 10:
                builder, network, parser = network_from_onnx_path(path, strongly_typed=True)
            else:
                builder, network, parser = network_from_onnx_path(path)
        except PolygraphyException as e:
            raise BdmError(f"TensorRT {trt.__version__} cannot parse {path}: {str(e).strip()[:300]}")
        if weak_fp16:
            _pin_precisions(trt, network, onnx_meta.value_types(path), path)
        profile = Profile()
        for name, (lo, opt, hi) in profile_shapes(meta, batch).items():
            profile.add(name, min=lo, opt=opt, max=hi)  # Polygraphy Profile.add(name, min, opt, max)
        limits = None
        if workspace_mib:
            # IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes) (TensorRT >= 8.4)
            limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20}
        # Polygraphy CreateConfig: tf32 defaults to False (it clears BuilderFlag.TF32: the DCTs and
        # the update stay true FP32); fp16=True sets BuilderFlag.FP16 (weak typing only), and
        # precision_constraints="obey" sets BuilderFlag.OBEY_PRECISION_CONSTRAINTS.
        config = CreateConfig(fp16=weak_fp16, precision_constraints="obey" if weak_fp16 else None,
                              profiles=[profile], memory_pool_limits=limits, load_timing_cache=timing_cache)
        # Polygraphy EngineFromNetwork: builder.build_serialized_network + deserialize; the timing
        # cache is appended to save_timing_cache.
        try:
            engine = engine_from_network((builder, network, parser), config=config, save_timing_cache=timing_cache)
        except PolygraphyException as e:  # raised after TensorRT's own errors are logged
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BdmError(f"TensorRT {trt.__version__} could not build an engine from {path}: {detail}")
    with atomic_path(plan_path) as tmp:
        save_engine(engine, tmp)  # Polygraphy SaveEngine: writes engine.serialize()
    side = dict(meta)
    side[fmt.K_TRT_VERSION] = trt.__version__
    side[fmt.K_PROFILE] = {"min": batch[0], "opt": batch[1], "max": batch[2]}
    with atomic_path(os.fspath(plan_path) + ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(side, f, indent=1, sort_keys=True)
    return side


def _pin_precisions(trt, network, onnx_types, path):
    """TensorRT 8/9 with an FP16 graph: pin each layer to the type its ONNX tensors have.

    ``ILayer.precision`` and ``ILayer.set_output_type`` (TensorRT developer guide, "Layer-Level
    Control of Precision"), enforced by ``OBEY_PRECISION_CONSTRAINTS``. Layers the parser adds
    with no ONNX name (helpers of one ONNX node) take the type of their first float input.
    """
    floats = {trt.float32, trt.float16}
    onnx_to_trt = {1: trt.float32, 10: trt.float16}
    known = {}
    for i in range(network.num_inputs):
        known[network.get_input(i).name] = network.get_input(i).dtype
    halves = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in (trt.LayerType.SHAPE, trt.LayerType.CONSTANT):
            continue
        inherited = None
        for j in range(layer.num_inputs):
            x = layer.get_input(j)
            if x is not None and known.get(x.name) in floats:
                inherited = known[x.name]
                break
        chosen = set()
        for k in range(layer.num_outputs):
            out = layer.get_output(k)
            if out.dtype not in floats:
                continue
            dtype = onnx_to_trt.get(onnx_types.get(out.name), inherited)
            if dtype is None:
                continue
            layer.set_output_type(k, dtype)
            known[out.name] = dtype
            chosen.add(dtype)
        if len(chosen) == 1:
            layer.precision = chosen.pop()
            halves += layer.precision == trt.float16
    if not halves:
        raise BdmError(f"{path}: no layer of this FP16 graph maps to FP16 in TensorRT {trt.__version__}; "
                       "refusing to build an FP32 engine labelled fp16 (re-export with bdm-export --fp16)")
