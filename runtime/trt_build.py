"""Build a TensorRT engine ``X.plan`` (+ ``X.plan.json``) from a bdm step graph ``.onnx``.

Part of the runtime, torch-free and Python 3.8 compatible: engines are specific to the GPU and the
TensorRT version, so they are built on the target (a Jetson has no torch), by ``bdm-export --onnx``
or on first use by ``bdm_runtime.load(onnx, backend="trt")`` (:func:`cached_engine`). Needs
``tensorrt`` and Polygraphy >= 0.50 (the ``[trt]`` extra: older Polygraphy sets TensorRT 11's removed
``EXPLICIT_BATCH`` flag and reads the removed ``ILayer.precision_is_set``); the ONNX metadata is read
with ``bdm_runtime.onnx_meta`` (no ``onnx`` package).

Precision comes from the graph (``bdm_export.fp16``), by TensorRT major version, never by ``hasattr``
(a silently FP32 engine is the common failure in the field):

- 8.x/9.x (JetPack 5, 6.0): weakly typed networks. An FP16 graph gets ``BuilderFlag.FP16`` plus
  precision constraints ("prefer": "obey" aborts the build where a layer has no FP16 kernel),
  each layer pinned to its ONNX tensors' type, so the FP32 islands (update, DCTs, time
  embedding, GroupNorm statistics) stay FP32. The types come from the graph's ``value_info``
  (the exporter stores inferred types); TensorRT 8's own tensor dtypes are not the graph's
  (NVIDIA/TensorRT#1993: a constant of FP16 weights reports FLOAT).
- 10.x: ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: types are the graph's, no FP16 flag.
- 11.x: networks are always strongly typed; the FP16 flag no longer exists.

INT8 graphs (Q/DQ around the network's convolutions, explicit quantization), two files (docs/int8.md):

- ``bdm_int8.onnx`` (precision ``int8``, opset 17, ``bdm_export.int8``): 8.x/9.x set
  ``BuilderFlag.INT8`` and ``FP16`` with the sampler update pinned to FP32, so the network's float
  layers may run FP16. 10.x/11.x build it strongly typed: its unquantized layers run in the graph's
  FP32, and the build prints one note saying so and naming the file below.
- ``bdm_int8_fp16.onnx`` (precision ``int8-fp16``, opset 19, ``bdm_export.int8_fp16``; written by
  ``bdm-export --int8 --fp16``): the same Q/DQ convolutions in the FP16 graph, with float16 scales.
  10.x/11.x build it strongly typed: INT8 convolutions, FP16 elsewhere in the network, FP32 update,
  all as the graph types them. 8.x/9.x are refused (one line): TensorRT 8.5's parser reads opsets
  up to 17, and their INT8 + FP16 flags give ``bdm_int8.onnx`` the same mix there.

GroupNorm reaches TensorRT as ONNX ``InstanceNormalization``. TensorRT 8.5's parser always makes it
the ``InstanceNormalization_TRT`` plugin (the runtime registers plugins before loading); 8.6 does
too unless ``OnnxParserFlag.NATIVE_INSTANCENORM`` is set, which is done here (on from 10.0).
"""
import json
import os

from . import format as fmt
from . import onnx_meta
from .backends.trt import device_tag, import_cuda, import_tensorrt, probe_cuda, trt_version
from .errors import BdmError
from .io import atomic_path, writable_folder
from .step_info import onnx_info, read_side_file

DEFAULT_BATCH = (1, 16, 64)
BATCH_INPUTS = fmt.PER_IMAGE  # inputs whose first dim is the batch
MIN_POLYGRAPHY = (0, 50)
NETWORK_SCOPE = "/model/"  # the exporter's ONNX node names of the network (bdm_export.int8.NETWORK)


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


def _polygraphy_reason():
    """Why the installed Polygraphy cannot build engines (one line), or ``None``."""
    try:
        import polygraphy
        from polygraphy.backend.trt import network_from_onnx_path  # noqa: F401
    except ImportError:
        return "Polygraphy is not installed (pip install polygraphy, or bdm[trt])"
    version = tuple(int(p) for p in polygraphy.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_POLYGRAPHY:
        return (f"Polygraphy {polygraphy.__version__} is too old for this TensorRT: "
                f"pip install 'polygraphy>={MIN_POLYGRAPHY[0]}.{MIN_POLYGRAPHY[1]}'")
    return None


def unavailable_reason():
    """Why no engine can be built here (one line); ``None`` with TensorRT >= 8.5, Polygraphy >= 0.50 and a GPU."""
    try:
        import tensorrt
    except ImportError:
        return "TensorRT is not installed (JetPack ships it; elsewhere pip install tensorrt)"
    try:
        trt_version(tensorrt)
    except BdmError as e:
        return str(e)
    return _polygraphy_reason() or probe_cuda()[1]


def read_step_metadata(onnx_path):
    """The validated ``bdm.*`` metadata of a step graph (``BdmError`` if it is not one this code reads)."""
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


def network_options(trt, version):
    """Polygraphy ``network_from_onnx_path`` options for TensorRT ``version`` (see the module docstring)."""
    if version[0] >= 11:
        return {}                                            # always strongly typed
    if version[0] == 10:
        return {"strongly_typed": True}                      # NATIVE_INSTANCENORM is on by default
    if version >= (8, 6):
        # Polygraphy sets the parser's flags to exactly this list (8.6's default is none).
        return {"flags": [trt.OnnxParserFlag.NATIVE_INSTANCENORM]}
    return {}                                                # 8.5: no parser flags at all


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def route_refusal(precision, version=None):
    """Why TensorRT ``version`` (default: the installed one) builds no engine from a graph of ``precision``
    (one line naming the file to use instead), or ``None``."""
    if precision != fmt.INT8_FP16:
        return None
    if version is None:
        import tensorrt

        version = trt_version(tensorrt)
    if version[0] >= 10:
        return None
    return (f"TensorRT {version[0]}.{version[1]} builds no {precision} graph (it is opset 19, for float16 Q/DQ "
            f"scales; TensorRT 8.5/8.6 parse opsets up to 17): build {fmt.EXPORT_FILES['int8'][0]} here, whose "
            "INT8 + FP16 builder flags run its float layers FP16")


def _note_fp32_layers(trt, version, precision, path):
    """One line on stderr when a strongly typed build gives an INT8 graph's unquantized layers FP32."""
    if precision != "int8" or version[0] < 10:
        return
    import sys

    name, flags = fmt.EXPORT_FILES[fmt.INT8_FP16]
    print(f"note: TensorRT {trt.__version__} builds {os.path.basename(path)} strongly typed, so its unquantized "
          f"layers run FP32; bdm-export {' '.join(flags)} also writes {name}, which runs them FP16",
          file=sys.stderr)


def build_engine(onnx_path, plan_path, batch=DEFAULT_BATCH, workspace_mib=None, timing_cache=None, verbose=False,
                 note=True):
    """Build ``plan_path`` (and ``plan_path + ".json"``) from the step graph ``onnx_path``; returns the json dict.

    ``batch`` is ``(min, opt, max)`` or ``"MIN:OPT:MAX"`` in images (the guided branch doubles
    the batch inside the graph only). ``workspace_mib`` limits the builder's workspace pool;
    ``timing_cache`` is a file read (if present) and updated. Any failure of Polygraphy or
    TensorRT is one ``BdmError`` line (TensorRT's own log says more above it), as is a graph this
    TensorRT builds no engine from (``route_refusal``). ``note``: say on stderr when an ``int8``
    graph's float layers will run FP32 (TensorRT 10/11).
    """
    batch = parse_batch(batch)
    meta = read_step_metadata(onnx_path)
    reason = unavailable_reason()
    if reason:
        raise BdmError(f"cannot build a TensorRT engine: {reason}")
    import tensorrt as trt
    from polygraphy.logger import G_LOGGER

    version = trt_version(trt)  # >= 8.5, or BdmError
    path = os.fspath(onnx_path)
    refused = route_refusal(meta[fmt.K_PRECISION], version)
    if refused:
        raise BdmError(f"{path}: {refused}")
    device = probe_cuda()[0].device()
    if note:
        _note_fp32_layers(trt, version, meta[fmt.K_PRECISION], path)
    with G_LOGGER.verbosity(G_LOGGER.INFO if verbose else G_LOGGER.WARNING):
        try:
            engine = _build(trt, version, meta, path, batch, workspace_mib, timing_cache)
        except BdmError:
            raise
        except Exception as e:  # Polygraphy's exceptions and TensorRT's (RuntimeError, TypeError, ...)
            raise BdmError(f"TensorRT {trt.__version__} could not build an engine from {path}: {_first_line(e)}")
    from polygraphy.backend.common import save_bytes

    with atomic_path(plan_path) as tmp:
        save_bytes(engine, tmp)
    del engine
    side = dict(meta)
    side[fmt.K_TRT_VERSION] = trt.__version__
    side[fmt.K_TRT_DEVICE] = device
    side[fmt.K_PROFILE] = {"min": batch[0], "opt": batch[1], "max": batch[2]}
    with atomic_path(os.fspath(plan_path) + ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(side, f, indent=1, sort_keys=True)
    return side


def _build(trt, version, meta, path, batch, workspace_mib, timing_cache):
    """The serialized engine (Polygraphy's loaders: parse, configure, build; never deserialized here)."""
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path
    from polygraphy.exception import PolygraphyException

    fp16, int8, pin = precision_route(meta[fmt.K_PRECISION], version)
    try:
        # Polygraphy NetworkFromOnnxPath: registers TensorRT's plugins, parses with trt.OnnxParser
        # (parse_from_file) into an explicit-batch network (a default from TensorRT 10 on).
        builder, network, parser = network_from_onnx_path(path, **network_options(trt, version))
    except PolygraphyException as e:
        raise BdmError(f"TensorRT {trt.__version__} cannot parse {path}: {str(e).strip()[:300]}")
    if pin:
        _pin_precisions(trt, network, onnx_meta.value_types(path), path, pin)
    profile = Profile()
    for name, (lo, opt, hi) in profile_shapes(meta, batch).items():
        profile.add(name, min=lo, opt=opt, max=hi)  # Polygraphy Profile.add(name, min, opt, max)
    limits = None
    if workspace_mib:
        # IBuilderConfig.set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes) (TensorRT >= 8.4)
        limits = {trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20}
    # Polygraphy CreateConfig: tf32 defaults to False (it clears BuilderFlag.TF32: the DCTs and the
    # update stay true FP32); fp16=True sets BuilderFlag.FP16 (weak typing only), and
    # precision_constraints="prefer" sets BuilderFlag.PREFER_PRECISION_CONSTRAINTS.
    # int8=True sets BuilderFlag.INT8: with Q/DQ in the graph (explicit quantization) no calibrator is used.
    config = CreateConfig(fp16=fp16, int8=int8, precision_constraints="prefer" if pin else None,
                          profiles=[profile], memory_pool_limits=limits, load_timing_cache=timing_cache)
    # Polygraphy EngineBytesFromNetwork: builder.build_serialized_network; the timing cache is
    # appended to save_timing_cache. Bytes only: deserializing to serialize again would double the
    # peak memory (an 8 GB Jetson shares it with the GPU).
    return engine_bytes_from_network((builder, network, parser), config=config, save_timing_cache=timing_cache)


def precision_route(precision, version):
    """``(fp16 flag, int8 flag, pin)`` for a graph of ``precision`` on TensorRT ``version``.

    Strongly typed networks (10, 11) take everything from the graph: Q/DQ make INT8 layers, the rest
    runs in the graph's own float types (``int8``: FP32; ``int8-fp16``: FP16 in the network, which
    8.x/9.x never get: ``route_refusal``). Weakly typed ones (8.x, 9.x): an FP16 graph gets the FP16
    flag with every layer pinned to its ONNX type (``pin="graph"``); an INT8 graph the INT8 and FP16
    flags with the layers outside the network (sampler update, DCTs) pinned to FP32 (``pin="update"``),
    so TensorRT picks INT8 where the graph has Q/DQ and FP16 or FP32 elsewhere in the network.
    """
    if version[0] >= 10 or precision == "fp32":
        return False, False, None
    if precision == fmt.INT8_FP16:
        raise BdmError(route_refusal(precision, version))
    if precision == "int8":
        return True, True, "update"
    return True, False, "graph"


def _pin_precisions(trt, network, onnx_types, path, pin="graph"):
    """TensorRT 8/9: pin layers to the type their ONNX tensors have (all, or the update's: ``pin``).

    ``ILayer.precision`` and ``ILayer.set_output_type`` (TensorRT developer guide, "Layer-Level
    Control of Precision"), honoured by ``PREFER_PRECISION_CONSTRAINTS``. Layers the parser adds
    with no ONNX name (helpers of one ONNX node) take the type of their first float input. With
    ``pin="update"`` (an INT8 graph) the network's layers (ONNX scope ``/model/``) are left to the
    builder: pinning its Q/DQ or convolutions would keep them out of INT8.
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
        if pin == "update" and layer.name.startswith(NETWORK_SCOPE):
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
    if not halves and pin == "graph":
        raise BdmError(f"{path}: no layer of this FP16 graph maps to FP16 in TensorRT {trt.__version__}; "
                       "refusing to build an FP32 engine labelled fp16 (re-export with bdm-export --fp16)")


def cached_engine(onnx_path, info, engine_cache=None, batch=None):
    """Path of a TensorRT engine for ``onnx_path``, built once per TensorRT version, GPU and batch profile.

    The engine ``<stem>.trt<version>.<gpu>-sm<cc>[.b<batch>].plan`` lives beside the ``.onnx`` (or
    in ``engine_cache``), with profile ``1:batch:batch`` (export's default without ``batch``). It
    is rebuilt when missing, older than the ``.onnx``, or when its side file names another
    TensorRT, another GPU (name or compute capability) or another profile.
    """
    trt = import_tensorrt()
    refused = route_refusal(info.precision, trt_version(trt))
    if refused:   # before any folder or engine is made
        raise BdmError(f"{os.fspath(onnx_path)}: {refused}")
    device = import_cuda().device()
    profile = tuple(DEFAULT_BATCH) if batch is None else (1, batch, batch)
    stem = os.path.splitext(os.path.basename(onnx_path))[0]
    folder = engine_cache or os.path.dirname(os.path.abspath(onnx_path))
    tag = "" if batch is None else f".b{batch}"
    plan = os.path.join(folder, f"{stem}.trt{trt.__version__}.{device_tag(device)}{tag}.plan")
    if _is_current(plan, onnx_path, trt.__version__, profile, device):
        return plan
    writable_folder(folder, "the TensorRT engine cache (pass engine_cache to choose another)")
    build_engine(onnx_path, plan, batch=profile)
    return plan


def _is_current(plan, onnx_path, version, profile, device):
    """Whether ``plan`` is newer than ``onnx_path`` and its side file names ``version``, ``device`` and ``profile``."""
    if not os.path.exists(plan) or os.path.getmtime(plan) < os.path.getmtime(onnx_path):
        return False
    try:
        raw = read_side_file(plan)
    except (BdmError, OSError):
        return False
    want = {"min": profile[0], "opt": profile[1], "max": profile[2]}
    return (raw.get(fmt.K_TRT_VERSION) == version and raw.get(fmt.K_PROFILE) == want
            and raw.get(fmt.K_TRT_DEVICE) == device)
