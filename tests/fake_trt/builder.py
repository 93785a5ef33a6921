"""The fake TensorRT network side: builder, network, layers, tensors and the ONNX parser."""
import os

from .core import ONNX_TYPES, Bound, _new


# The other ONNX ops of an exported bdm step graph (bdm_export), as TensorRT's parser makes them (by kind only)
UNET_KINDS = dict({op: "UNARY" for op in ("Sin", "Cos", "Tan", "Exp", "Log", "Sqrt", "Neg")},
                  **{op: "ELEMENTWISE" for op in ("Sub", "Pow", "Greater")},
                  **{op: "SHUFFLE" for op in ("Unsqueeze", "Squeeze", "Transpose")},
                  Gemm="MATRIX_MULTIPLY", MatMul="MATRIX_MULTIPLY", Sigmoid="ACTIVATION", Clip="ACTIVATION",
                  Softmax="SOFTMAX", Concat="CONCATENATION", Resize="RESIZE", Gather="GATHER", Where="SELECT",
                  Split="SLICE")


class ITensor(Bound):
    def __init__(self, name, dtype):
        self._name, self._dtype = name, dtype

    @property
    def name(self):
        return self._name

    @property
    def dtype(self):
        return self._dtype


class ILayer(Bound):
    def __init__(self, name, kind, inputs, outputs):
        self._name, self._kind, self._inputs, self._outputs = name, kind, inputs, outputs
        self._precision, self._output_types = None, {}

    name = property(lambda self: self._name)
    type = property(lambda self: self._kind)
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_output(self, index):
        return self._outputs[index]

    @property
    def precision(self):
        return self._precision if self._precision is not None else self._trt.float32

    @precision.setter
    def precision(self, value):
        self._precision = value

    def set_output_type(self, index, dtype):
        self._output_types[index] = dtype


class INetworkDefinition(Bound):
    def __init__(self, flags):
        self._flags, self._inputs, self._layers, self._outputs = flags, [], [], []

    num_inputs = property(lambda self: len(self._inputs))
    num_layers = property(lambda self: len(self._layers))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, index):
        return self._inputs[index]

    def get_layer(self, index):
        return self._layers[index]

    def get_output(self, index):
        return self._outputs[index]

    def _has(self, flag):
        enum = self._trt.NetworkDefinitionCreationFlag
        if flag not in self._fake.enums["NetworkDefinitionCreationFlag"]:
            return False
        return bool(self._flags & (1 << int(getattr(enum, flag))))


class Builder(Bound):
    def __init__(self, logger):
        self._logger = logger

    def create_network(self, flags=0):
        return _new(self._trt.INetworkDefinition, flags)


class OnnxParser(Bound):
    """Parses a step graph into layers: one per ONNX node, typed as the TensorRT version would."""

    def __init__(self, network, logger):
        self._network, self._logger, self._errors, self._path = network, logger, [], None
        native = self._fake.major >= 10  # NATIVE_INSTANCENORM: off by default on 8.6, on from 10.0
        self._flags = (1 << int(self._trt.OnnxParserFlag.NATIVE_INSTANCENORM)) if native else 0

    @property
    def flags(self):
        return self._flags

    @flags.setter
    def flags(self, value):
        self._flags = int(value)

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, index):
        return self._errors[index]

    def parse_from_file(self, path):
        import onnx

        trt, fake, net = self._trt, self._fake, self._network
        if fake.major < 10 and not net._has("EXPLICIT_BATCH"):
            self._errors.append("the ONNX parser needs an explicit-batch network")
            return False
        typed = fake.major >= 11 or net._has("STRONGLY_TYPED")
        model = onnx.shape_inference.infer_shapes(onnx.load(path))
        onnx_types = {v.name: v.type.tensor_type.elem_type
                      for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output)}

        def dtype(name):
            kind = ONNX_TYPES.get(onnx_types.get(name), "FLOAT")
            if kind == "INT64" and fake.major < 10:
                kind = "INT32"  # TensorRT 8 casts int64 inputs to int32
            elif kind == "HALF" and not typed:
                kind = "FLOAT"  # weakly typed: the builder decides (NVIDIA/TensorRT#1993)
            return getattr(trt.DataType, kind)

        tensors = {v.name: _new(trt.ITensor, v.name, dtype(v.name)) for v in model.graph.input}
        net._inputs = list(tensors.values())
        native = "OnnxParserFlag" in fake.enums and bool(
            self._flags & (1 << int(trt.OnnxParserFlag.NATIVE_INSTANCENORM)))
        kinds = {"Cast": "CAST" if "CAST" in fake.enums["LayerType"] else "IDENTITY", "Shape": "SHAPE",
                 "Constant": "CONSTANT", "Reshape": "SHUFFLE", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE",
                 "Div": "ELEMENTWISE", "InstanceNormalization": "NORMALIZATION" if native else "PLUGIN_V2",
                 "QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE", "Conv": "CONVOLUTION"}
        kinds.update(UNET_KINDS)
        for node in model.graph.node:
            outs = [_new(trt.ITensor, o, dtype(o)) for o in node.output]
            tensors.update({t.name: t for t in outs})
            layer = _new(trt.ILayer, node.name, getattr(trt.LayerType, kinds[node.op_type]),
                               [tensors.get(i) for i in node.input], outs)
            net._layers.append(layer)
        net._outputs = [tensors[o.name] for o in model.graph.output]
        self._path = os.path.abspath(path)
        return True
