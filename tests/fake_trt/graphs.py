"""Small hand-made bdm step graphs (format 1, or 2 with B11's state) for the fake-TensorRT tests.

Not a diffusion step: a cheap function of every input, so that a misbound address, a stale time
row, a wrong batch or a dropped label shows in the output. It contains what matters to TensorRT:
``InstanceNormalization`` (GroupNorm's ONNX form), constants, a shape-dependent reshape and, for
``fp16=True``, a float16 island (``Cast`` to FLOAT16 and back), with inferred ``value_info`` as the
exporter stores it.
"""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bdm_runtime import format as fmt


def _const(name, value):
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(np.asarray(value), name))


def _PROCESS(image_shape):  # a valid bdm.process (the runtime checks it since audit-rt); the graph ignores it
    return {"image_size": list(image_shape[1:]), "blur_sigma_max": 0.0, "min_scale": 0.001, "logsnr_min": -10.0,
            "logsnr_max": 10.0}


def _int8_conv(c, src, dst, half=False):
    """What ``bdm_export.int8`` makes of a network conv: Q/DQ of the input (scale 1/32) and of INT8
    per-channel weights (zero points 0), under the network's ONNX scope ``/model/``. ``half``: what
    ``bdm_export.int8_fp16`` makes of it, in a float16 network (casts in and out, float16 scales)."""
    w = np.zeros((c, c, 1, 1), np.int8)
    w[np.arange(c), np.arange(c)] = 32   # 32 x scale 1/64 = 0.5: the conv halves its input
    kind = np.float16 if half else np.float32
    inits = [numpy_helper.from_array(kind(1 / 32), "x_scale"), numpy_helper.from_array(np.int8(0), "x_zero"),
             numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(np.full(c, 1 / 64, kind), "w_scale"),
             numpy_helper.from_array(np.zeros(c, np.int8), "w_zero")]
    x, y = (src + "_h", dst + "_h") if half else (src, dst)
    nodes = [helper.make_node("QuantizeLinear", [x, "x_scale", "x_zero"], ["xq"], name="/model/conv/q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xdq"], name="/model/conv/dq"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="/model/conv/dq_w",
                              axis=0),
             helper.make_node("Conv", ["xdq", "w"], [y], name="/model/conv/Conv")]
    if half:
        nodes = ([helper.make_node("Cast", [src], [x], name="/model/to_half", to=TensorProto.FLOAT16)] + nodes
                 + [helper.make_node("Cast", [y], [dst], name="/model/to_float", to=TensorProto.FLOAT)])
    return nodes, inits


def _precision(fp16, int8):
    return fmt.INT8_FP16 if int8 == "fp16" else "int8" if int8 else "fp16" if fp16 else "fp32"


def write_step_graph(path, image_shape=(1, 4, 4), num_classes=0, fp16=False, default_steps=6, format_version=1,
                     int8=False):
    """Write the graph to ``path`` and return it.

    ``int8=True``: the normalised latent goes through a Q/DQ-quantized 1x1 conv (``_int8_conv``);
    ``int8="fp16"``: that conv in float16, Q/DQ with float16 scales, opset 19 (precision ``int8-fp16``).

    ``format_version=2`` adds the state: ``z_next`` gains ``0.1 (t_prev - t) u_x_prev`` (so a stale
    state buffer or time row shows), and ``u_x = z + t`` is the state passed on.
    """
    c, h, w = image_shape
    guided = num_classes > 0
    img = ["B", c, h, w]
    inputs = [helper.make_tensor_value_info(fmt.Z, TensorProto.FLOAT, img),
              helper.make_tensor_value_info(fmt.T, TensorProto.FLOAT, ["B"]),
              helper.make_tensor_value_info(fmt.S, TensorProto.FLOAT, ["B"]),
              helper.make_tensor_value_info(fmt.ETA, TensorProto.FLOAT, [1]),
              helper.make_tensor_value_info(fmt.NOISE, TensorProto.FLOAT, img)]
    nodes = [_const("shape4", np.array([-1, 1, 1, 1], np.int64)), _const("scale", np.ones(c, np.float32)),
             _const("bias", np.zeros(c, np.float32)), _const("c001", np.float32(0.01)),
             _const("c05", np.float32(0.5)),
             helper.make_node("Div", [fmt.S, fmt.T], ["r"], name="ratio"),
             helper.make_node("Reshape", ["r", "shape4"], ["r4"], name="r4"),
             helper.make_node("Reshape", [fmt.T, "shape4"], ["t4"], name="t4"),
             helper.make_node("Mul", [fmt.Z, "r4"], ["zr"], name="scale_z"),
             helper.make_node("InstanceNormalization", [fmt.Z, "scale", "bias"], ["norm"], name="norm", epsilon=1e-5),
             helper.make_node("Mul", ["norm_c" if int8 else "norm", "c001"], ["norm_s"], name="norm_s"),
             helper.make_node("Add", ["zr", "norm_s"], ["zn"], name="add_norm"),
             helper.make_node("Mul", [fmt.NOISE, fmt.ETA], ["en"], name="noise_eta"),
             helper.make_node("Mul", ["en", "c05"], ["en_s"], name="noise_s"),
             helper.make_node("Add", ["zn", "en_s"], ["zn2"], name="add_noise"),
             helper.make_node("Mul", [fmt.Z, "t4"], [fmt.X0], name="x0")]
    last, inits = "zn2", []
    if int8:
        conv, inits = _int8_conv(c, "norm", "norm_c", half=int8 == "fp16")
        at = [n.name for n in nodes].index("norm_s")
        nodes[at:at] = conv
    if fp16:
        nodes += [helper.make_node("Cast", [last], ["half"], name="to_half", to=TensorProto.FLOAT16),
                  helper.make_node("Cast", ["half"], ["back"], name="to_float", to=TensorProto.FLOAT)]
        last = "back"
    if guided:
        inputs += [helper.make_tensor_value_info(fmt.LABEL, TensorProto.INT64, ["B"]),
                   helper.make_tensor_value_info(fmt.GUIDANCE, TensorProto.FLOAT, [1])]
        nodes += [_const("c01", np.float32(0.1)),
                  helper.make_node("Cast", [fmt.LABEL], ["labf"], name="label_f", to=TensorProto.FLOAT),
                  helper.make_node("Reshape", ["labf", "shape4"], ["lab4"], name="lab4"),
                  helper.make_node("Mul", ["lab4", fmt.GUIDANCE], ["lg"], name="label_w"),
                  helper.make_node("Mul", ["lg", "c01"], ["lg_s"], name="label_s"),
                  helper.make_node("Add", [last, "lg_s"], ["zg"], name="add_label")]
        last = "zg"
    if format_version >= 2:
        inputs += [helper.make_tensor_value_info(fmt.T_PREV, TensorProto.FLOAT, ["B"]),
                   helper.make_tensor_value_info(fmt.U_X_PREV, TensorProto.FLOAT, img)]
        nodes += [_const("c01s", np.float32(0.1)), _const("cm1", np.float32(-1.0)),
                  helper.make_node("Mul", [fmt.T, "cm1"], ["neg_t"], name="neg_t"),
                  helper.make_node("Add", [fmt.T_PREV, "neg_t"], ["dt"], name="dt"),
                  helper.make_node("Reshape", ["dt", "shape4"], ["dt4"], name="dt4"),
                  helper.make_node("Mul", [fmt.U_X_PREV, "dt4"], ["hist"], name="hist"),
                  helper.make_node("Mul", ["hist", "c01s"], ["hist_s"], name="hist_s"),
                  helper.make_node("Add", [last, "hist_s"], ["zh"], name="add_hist"),
                  helper.make_node("Add", [fmt.Z, "t4"], [fmt.U_X], name="u_x")]
        last = "zh"
    nodes.append(helper.make_node("Mul", [last, "c05"], [fmt.Z_NEXT], name="z_next"))  # keeps |z| bounded
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, img) for n in fmt.outputs(format_version)]
    graph = helper.make_graph(nodes, "fake_step", inputs, outputs, initializer=inits)
    opset = 19 if int8 == "fp16" else 17
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9 if opset > 17 else 8)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    meta = {fmt.K_FORMAT_VERSION: format_version, fmt.K_IMAGE_SHAPE: list(image_shape), fmt.K_PROCESS: _PROCESS(image_shape),
            fmt.K_NUM_CLASSES: num_classes, fmt.K_GUIDANCE: guided, fmt.K_CLIP_DENOISED: True,
            fmt.K_DEFAULT_STEPS: default_steps, fmt.K_DEFAULT_ETA: 1.0, fmt.K_PRECISION: _precision(fp16, int8),
            fmt.K_VERSION: "0.1.0"}
    if int8:
        meta[fmt.K_CALIBRATION] = {"method": "max", "images": 2, "steps": default_steps, "seed": 0, "solver": "ddim",
                                   "grid": "uniform", "eta": 1.0, "float_layers": [], "quantized": 1}
    if format_version >= 2:
        meta.update({fmt.K_DEFAULT_SOLVER: "ddim", fmt.K_DEFAULT_GRID: "uniform"})
    helper.set_model_props(model, fmt.encode(meta))
    onnx.save(model, str(path))
    return str(path)
