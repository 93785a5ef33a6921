"""INT8 with an FP16 network (``bdm_int8_fp16.onnx``): ``bdm_int8.onnx``'s quantization on the FP16 graph.

Why a second INT8 file: TensorRT 10 and 11 build strongly typed networks, which take every layer's
precision from the graph. ``bdm_int8.onnx`` types the network's unquantized layers (GroupNorm, SiLU,
attention, the float convolutions) FP32, so there they run FP32; TensorRT 8.x/9.x instead get the
FP16 builder flag and choose. This file is the FP16 step graph (``bdm_export.fp16``: the network in
float16 with its float32 islands, the sampler update in float32) with exactly ``bdm_int8.onnx``'s
Q/DQ convolutions: the same convolutions, the same INT8 weights (byte for byte), the same activation
and weight scales, rounded to float16 (relative change <= 2**-11; the scales are normal float16
numbers or the export fails, so none loses more).

Q/DQ whose float side is float16 need float16 scales, which ``QuantizeLinear``/``DequantizeLinear``
take from opset 19 (TensorRT 10.0's parser reads opsets 9-20): the FP16 graph is converted from
opset 17 to 19 first (``onnx.version_converter``). TensorRT 8.5 (JetPack 5) cannot parse opset 19,
so ``bdm_int8.onnx`` stays opset 17 and serves 8.x/9.x, ONNX Runtime and OpenVINO; the engine builder
refuses this file on 8.x/9.x (``bdm_runtime.trt_build``).

Convolutions are matched by ONNX node name: both graphs come from the same torch modules through the
same exporter, so ``/model/down.0/conv1/Conv`` names the same layer in both; a quantized convolution
of ``bdm_int8.onnx`` missing from the FP16 graph, or with another weight shape, fails the export.
"""
import numpy as np

from bdm_runtime import format as fmt
from bdm_runtime.errors import BdmError
from bdm_runtime.io import atomic_path

from .fp16 import F16
from .int8 import NETWORK, finish

OPSET = 19
IR_VERSION = 9      # the ONNX IR that opset 19 came with (onnx 1.14)
F16_TINY = float(np.finfo(np.float16).tiny)   # smallest normal float16; scales below it would lose bits
F16_MAX = float(np.finfo(np.float16).max)


def _arrays(proto):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _half_scale(scale, what, path):
    """``scale`` as float16; ``BdmError`` where float16 would not hold it to its own precision."""
    scale = np.asarray(scale, np.float32)
    if not np.all((scale >= F16_TINY) & (scale <= F16_MAX)):
        raise BdmError(f"{path}: {what} has a scale outside float16's normal range ({float(scale.min()):.3g}.."
                       f"{float(scale.max()):.3g}): keep that layer float, or use bdm_int8.onnx")
    return scale.astype(np.float16)


def quantized_convs(int8_proto, path):
    """``{conv name: (activation scale, INT8 weights, weight scales)}`` of an INT8 graph's Q/DQ convolutions.

    Checks the form ``bdm_export.int8`` writes: the convolution's input and weight each come through a
    ``DequantizeLinear`` with zero point 0, per tensor for the input and per output channel (axis 0)
    for the weights.
    """
    arrays = _arrays(int8_proto)
    producer = {o: n for n in int8_proto.graph.node for o in n.output}
    out = {}
    for node in int8_proto.graph.node:
        if node.op_type != "Conv" or not node.name.startswith(NETWORK):
            continue
        x_dq, w_dq = (producer.get(i) for i in node.input[:2])
        if w_dq is None or w_dq.op_type != "DequantizeLinear":
            continue                                  # a convolution kept in float
        if x_dq is None or x_dq.op_type != "DequantizeLinear":
            raise BdmError(f"{path}: {node.name} has INT8 weights but a float input: not a bdm INT8 graph")
        x_scale, x_zero = arrays[x_dq.input[1]], arrays[x_dq.input[2]]
        w, w_scale, w_zero = (arrays[i] for i in w_dq.input[:3])
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        if (x_scale.size != 1 or x_zero.any() or w.dtype != np.int8 or w_zero.any() or axis != 0
                or w_scale.shape != (w.shape[0],)):
            raise BdmError(f"{path}: {node.name} is not symmetric per-channel INT8 Q/DQ: not a bdm INT8 graph")
        out[node.name] = (x_scale.reshape(()), w, w_scale)
    if not out:
        raise BdmError(f"{path}: no INT8 convolution: not a bdm INT8 graph (bdm-export --int8 writes one)")
    return out


def _scope(conv):
    """``/model/down.0/conv1/`` of ``/model/down.0/conv1/Conv``: Q/DQ nodes stay in the network's ONNX scope."""
    return conv.name.rsplit("/", 1)[0] + "/"


def _qdq_input(conv, name, x_scale, state, path):
    """Nodes and initializers quantizing the float16 tensor ``name`` (once per tensor, as ONNX Runtime does)."""
    from onnx import helper, numpy_helper

    if name in state["done"]:
        if state["done"][name][1] != x_scale.tobytes():
            raise BdmError(f"{path}: {conv.name}'s input {name} has two INT8 scales: not a bdm INT8 graph; "
                           "export it again with bdm-export --int8 --fp16")
        return state["done"][name][0]
    stem = f"{name}_int8"
    state["inits"] += [numpy_helper.from_array(x_scale, stem + "_scale"),
                       numpy_helper.from_array(np.int8(0), stem + "_zero")]
    state["nodes"][name] = [
        helper.make_node("QuantizeLinear", [name, stem + "_scale", stem + "_zero"], [stem + "_q"],
                         name=_scope(conv) + "input_QuantizeLinear"),
        helper.make_node("DequantizeLinear", [stem + "_q", stem + "_scale", stem + "_zero"], [stem + "_dq"],
                         name=_scope(conv) + "input_DequantizeLinear")]
    state["done"][name] = (stem + "_dq", x_scale.tobytes())
    return stem + "_dq"


def _weight_dq(conv, w, w_scale, old_shape, path):
    """Initializers and the ``DequantizeLinear`` giving ``conv`` its INT8 weights as float16."""
    from onnx import helper, numpy_helper

    if tuple(old_shape) != w.shape:
        raise BdmError(f"{path}: {conv.name} has weights {list(old_shape)} in the FP16 graph but {list(w.shape)} "
                       "in the INT8 graph: they are not of one model; export both again")
    stem = conv.input[1]
    inits = [numpy_helper.from_array(w, stem + "_quantized"),
             numpy_helper.from_array(_half_scale(w_scale, conv.name + "'s weights", path), stem + "_scale"),
             numpy_helper.from_array(np.zeros(w.shape[0], np.int8), stem + "_zero")]
    node = helper.make_node("DequantizeLinear", [stem + "_quantized", stem + "_scale", stem + "_zero"],
                            [stem + "_dq"], name=_scope(conv) + "weight_DequantizeLinear", axis=0)
    return inits, node


def quantize_like(fp16_proto, convs, path):
    """``fp16_proto`` (converted to opset 19) with the convolutions ``convs`` (``quantized_convs``) in Q/DQ INT8.

    Each Q/DQ goes right before its convolution (its input exists there: the graph stays sorted);
    the FP16 weights it replaces are dropped. Every name of ``convs`` must be a float16 convolution
    of the graph with an initializer for weights, else ``BdmError`` naming the first that is not.
    """
    import onnx
    from onnx import version_converter

    from .fp16 import value_types

    types = value_types(fp16_proto)
    graph = version_converter.convert_version(fp16_proto, OPSET).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    state = {"done": {}, "nodes": {}, "inits": []}
    nodes, found, replaced = [], set(), set()
    for node in graph.node:
        if node.op_type == "Conv" and node.name in convs:
            x_scale, w, w_scale = convs[node.name]
            if node.input[1] not in shapes or types.get(node.input[0]) != F16:
                raise BdmError(f"{path}: {node.name} is not a float16 convolution with constant weights: "
                               "not a bdm FP16 graph (bdm-export --fp16 writes one)")
            x = _qdq_input(node, node.input[0], _half_scale(x_scale, node.name + "'s input", path), state,
                           path)
            inits, w_node = _weight_dq(node, w, w_scale, shapes[node.input[1]], path)
            state["inits"] += inits
            nodes += state["nodes"].pop(node.input[0], []) + [w_node]
            replaced.add(node.input[1])
            node.input[0], node.input[1] = x, w_node.output[0]
            found.add(node.name)
        nodes.append(node)
    missing = sorted(set(convs) - found)
    if missing:
        raise BdmError(f"{path}: the FP16 graph has no float16 convolution {missing[0]} (of {len(missing)} INT8 ones "
                       "missing): the graphs are not of one model; export both again with bdm-export --int8 --fp16")
    used = {i for n in nodes for i in n.input}
    keep = [i for i in graph.initializer if i.name not in replaced or i.name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(keep + state["inits"])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                  ir_version=max(fp16_proto.ir_version, IR_VERSION),
                                  producer_name=fp16_proto.producer_name, producer_version=fp16_proto.producer_version)


def _metadata(int8_meta, fp16_meta, int8_path, fp16_path):
    """The new graph's metadata: the INT8 graph's, ``precision int8-fp16``; both graphs must agree on the rest."""
    if int8_meta.get(fmt.K_PRECISION) != "int8" or fp16_meta.get(fmt.K_PRECISION) != "fp16":
        raise BdmError(f"want an int8 and an fp16 step graph, {int8_path} is {int8_meta.get(fmt.K_PRECISION)!r} "
                       f"and {fp16_path} {fp16_meta.get(fmt.K_PRECISION)!r}")
    drop = (fmt.K_PRECISION, fmt.K_CALIBRATION)
    if {k: v for k, v in int8_meta.items() if k not in drop} != {k: v for k, v in fp16_meta.items() if k not in drop}:
        raise BdmError(f"{int8_path} and {fp16_path} are not of one export (their metadata differ): "
                       "export both again with bdm-export --int8 --fp16")
    meta = dict(int8_meta)
    meta[fmt.K_PRECISION] = fmt.INT8_FP16
    return meta


def int8_fp16_graph(int8_path, fp16_path):
    """``(proto, meta)``: the FP16 step graph ``fp16_path`` with the Q/DQ convolutions of ``int8_path``."""
    import onnx

    from .onnx_export import read_metadata

    int8, fp16 = onnx.load(int8_path), onnx.load(fp16_path)
    meta = _metadata(read_metadata(int8), read_metadata(fp16), int8_path, fp16_path)
    proto = quantize_like(fp16, quantized_convs(int8, int8_path), fp16_path)
    doc = ("bdm step graph, INT8 network convolutions (QDQ, symmetric, per-channel weights, float16 scales), "
           "the rest of the network FP16, sampler update in FP32")
    return finish(proto, meta, doc), meta


def export_int8_fp16(int8_path, fp16_path, path):
    """Write ``int8_fp16_graph(int8_path, fp16_path)`` to ``path`` (atomically); returns its metadata."""
    import onnx

    proto, meta = int8_fp16_graph(int8_path, fp16_path)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return meta
