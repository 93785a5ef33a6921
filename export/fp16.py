"""FP16 as part of the graph: the network in float16, the sampler update (B8, B10) in float32.

TensorRT 11 has no FP16 builder flag (strongly typed networks take precision from the graph), so
precision is decided here, at export: the network is converted with ``convert_to_fp16()`` (float16
weights, explicit casts around what float16 cannot hold: the time embedding's input, GroupNorm
statistics, attention softmax) and returns float32 eps; the DCTs and the update divide by
``alpha_t`` (down to ~1e-5 at high frequencies) and stay float32.
"""
import copy

import numpy as np

F32, F16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16


def half_model(model):
    """A deep copy of ``model`` with its network converted to FP16 (``model.convert_to_fp16()``)."""
    if not callable(getattr(model, "convert_to_fp16", None)):
        raise TypeError(f"{type(model).__name__} has no convert_to_fp16(): an FP16 graph needs a model that "
                        "knows which parts must stay float32 (e.g. bdm_train.unet.UNet)")
    half = copy.deepcopy(model)
    half.convert_to_fp16()
    return half.eval()


def value_types(model_proto):
    """``{value name: onnx elem type}`` for every tensor of the graph (after ONNX shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model_proto, strict_mode=True)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({i.name: i.data_type for i in g.initializer})
    return types


def node_input_types(model_proto, op_type):
    """For every node of ``op_type``: the elem types of its inputs, ``[[type, ...], ...]``."""
    types = value_types(model_proto)
    return [[types.get(i) for i in n.input if i] for n in model_proto.graph.node if n.op_type == op_type]


def relative_error(a, b):
    """``max|a - b| / max|b|``: error relative to the output's scale, not per element (see tests)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
