"""FLOPs of one evaluation of an ONNX graph, counted from its (inferred) tensor shapes.

Counts the multiply-adds of Conv, MatMul and Gemm as 2 FLOPs each; elementwise and
normalisation ops are ignored (they are memory-bound and a few percent of the total here).
"""
import numpy as np
import onnx
from onnx import shape_inference


def _static_shapes(model, batch):
    """Shape inference with the dynamic batch dimension fixed to ``batch``."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for vi in list(model.graph.input) + list(model.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param:
                d.Clear()
                d.dim_value = batch
    model = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return model, shapes


def count_flops(path, batch=1):
    """``(total FLOPs, {op_type: FLOPs})`` of one run of the graph at ``path`` with batch ``batch``."""
    model, shapes = _static_shapes(onnx.load(path), batch)
    by_op = {}
    for node in model.graph.node:
        f = 0
        if node.op_type == "Conv":
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and y and None not in w + y:
                # every output element costs (Cin / groups) * kh * kw multiply-adds = prod(w[1:])
                f = 2 * int(np.prod(y)) * int(np.prod(w[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            y = shapes.get(node.output[0])
            if a and y and None not in a + y:
                k = a[-1] if not (node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute)) else a[-2]
                f = 2 * int(np.prod(y)) * int(k)
        if f:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + f
    return sum(by_op.values()), by_op
