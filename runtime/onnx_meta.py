"""Read an ONNX file's ``metadata_props`` and graph inputs/outputs (names, declared shapes) without ``onnx``.

A minimal protobuf walker over the top-level ``ModelProto`` (onnx.proto3): field 14 is
``metadata_props`` (``StringStringEntryProto``: key = 1, value = 2), field 7 the ``graph``
(``GraphProto``: input = 11, output = 12, ``ValueInfoProto.name`` = 1, ``.type`` = 2, whose tensor
shape lists ``dim_value``/``dim_param`` per dimension). Everything else is skipped by its
wire type, so the weights are never copied. A Jetson running TensorRT may have neither ``onnx``
nor ONNX Runtime, yet must read the metadata to build and label an engine.
"""
import mmap
import os
import stat

from .errors import BdmError

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# ModelProto, GraphProto, ValueInfoProto and StringStringEntryProto field numbers (onnx.proto3).
_MODEL_IR_VERSION, _MODEL_GRAPH, _MODEL_METADATA = 1, 7, 14
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 5, 11, 12, 13
_TENSOR_DIMS = 1  # TensorProto.dims (repeated int64: packed or not)
_VALUE_INFO_NAME, _VALUE_INFO_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_ELEM_TYPE, _TENSOR_SHAPE = 1, 1, 2  # TypeProto.tensor_type, Tensor.elem_type/.shape
_SHAPE_DIM, _DIM_VALUE = 1, 1  # TensorShapeProto.dim, Dimension.dim_value (dim_param = 2: symbolic)
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


class _Malformed(Exception):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf, pos, end):
    """Decode one base-128 varint at ``pos``; return ``(value, next_pos)``."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos, end):
    """Yield ``(field_number, wire_type, value)`` for each field of the message in ``buf[pos:end]``.

    ``value`` is an int for varints and fixed-width fields, a ``(start, stop)`` span for
    length-delimited ones (so nested messages and weights are not copied).
    """
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == _I64:
            if pos + 8 > end:
                raise _Malformed("truncated fixed64")
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == _I32:
            if pos + 4 > end:
                raise _Malformed("truncated fixed32")
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        elif wire == _LEN:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed("length past the end")
            value, pos = (pos, pos + n), pos + n
        else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
            raise _Malformed(f"wire type {wire}")
        yield number, wire, value


def _string(buf, span):
    return buf[span[0]:span[1]].decode("utf-8")


def _entry(buf, span):
    """``StringStringEntryProto`` -> ``(key, value)``."""
    key = value = ""
    for number, wire, v in _fields(buf, span[0], span[1]):
        if wire == _LEN and number == _ENTRY_KEY:
            key = _string(buf, v)
        elif wire == _LEN and number == _ENTRY_VALUE:
            value = _string(buf, v)
    return key, value


def _value_names(buf, span, field):
    """Names of the ``ValueInfoProto`` entries in field ``field`` of the ``GraphProto`` at ``span``."""
    names = []
    for number, wire, v in _fields(buf, span[0], span[1]):
        if wire == _LEN and number == field:
            for n2, w2, v2 in _fields(buf, v[0], v[1]):
                if w2 == _LEN and n2 == _VALUE_INFO_NAME:
                    names.append(_string(buf, v2))
    return names


def _sub(buf, span, field):
    """Spans of the length-delimited occurrences of ``field`` in the message at ``span``."""
    return [v for n, w, v in _fields(buf, span[0], span[1]) if n == field and w == _LEN]


def _elem_type(buf, value_info):
    """``TensorProto.DataType`` of a ``ValueInfoProto`` (``None`` when it is not a tensor)."""
    for tp in _sub(buf, value_info, _VALUE_INFO_TYPE):
        for tensor in _sub(buf, tp, _TYPE_TENSOR):
            for n, w, v in _fields(buf, tensor[0], tensor[1]):
                if n == _TENSOR_ELEM_TYPE and w == _VARINT:
                    return v
    return None


def _shape(buf, value_info):
    """Declared shape of a tensor ``ValueInfoProto``: a list with an int per fixed dimension and
    ``None`` per symbolic one (``dim_param``), or ``None`` when no shape is declared."""
    for tp in _sub(buf, value_info, _VALUE_INFO_TYPE):
        for tensor in _sub(buf, tp, _TYPE_TENSOR):
            for shape in _sub(buf, tensor, _TENSOR_SHAPE):
                dims = []
                for dim in _sub(buf, shape, _SHAPE_DIM):
                    values = [v for n, w, v in _fields(buf, dim[0], dim[1]) if n == _DIM_VALUE and w == _VARINT]
                    dims.append(values[0] if values else None)
                return dims
    return None


def _value_shapes(buf, span, field):
    """``{name: declared shape}`` of the ``ValueInfoProto`` entries in field ``field`` of a ``GraphProto``."""
    shapes = {}
    for vi in _sub(buf, span, field):
        names = [_string(buf, v) for v in _sub(buf, vi, _VALUE_INFO_NAME)]
        if names:
            shapes[names[0]] = _shape(buf, vi)
    return shapes


def _widest(buf, graph):
    """The most output channels of a convolution weight (a 4-D initializer ``[out, in, kh, kw]``), or 0: the
    network's widest feature map per pixel, which sets its activation memory (``bdm_runtime.limits``)."""
    widest = 0
    for init in _sub(buf, graph, _GRAPH_INITIALIZER):
        dims = []
        for n, w, v in _fields(buf, init[0], init[1]):
            if n != _TENSOR_DIMS:
                continue
            if w == _VARINT:
                dims.append(v)
            elif w == _LEN:  # packed
                pos = v[0]
                while pos < v[1]:
                    d, pos = _varint(buf, pos, v[1])
                    dims.append(d)
        if len(dims) == 4:
            widest = max(widest, dims[0])
    return widest


def value_types(path):
    """``{tensor name: ONNX elem type}`` of the graph's inputs, outputs and ``value_info``."""
    path = os.fspath(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        types = {}
        try:
            for graph in _sub(buf, (0, len(buf)), _MODEL_GRAPH):
                for field in (_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
                    for vi in _sub(buf, graph, field):
                        names = [_string(buf, v) for v in _sub(buf, vi, _VALUE_INFO_NAME)]
                        elem = _elem_type(buf, vi)
                        if names and elem is not None:
                            types[names[0]] = elem
        except (_Malformed, UnicodeDecodeError) as e:
            raise BdmError(f"{path}: not an ONNX model ({e})")
        return types


class OnnxInfo:
    """What the runtime needs from an ``.onnx``: ``metadata`` (raw strings), ``inputs``, ``outputs`` and
    ``shapes`` (``{input or output name: declared shape}``, see :func:`_shape`)."""

    def __init__(self, ir_version, metadata, inputs, outputs, shapes=None, widest=0):
        self.ir_version = ir_version
        self.widest = widest  # see _widest
        self.metadata = metadata
        self.inputs = inputs
        self.outputs = outputs
        self.shapes = shapes or {}


def parse(buf):
    """Parse the top level of a serialized ``ModelProto`` (``bytes`` or ``mmap``); raise ``ValueError`` if malformed."""
    ir_version, graph, metadata = None, None, {}
    try:
        for number, wire, v in _fields(buf, 0, len(buf)):
            if number == _MODEL_IR_VERSION and wire == _VARINT:
                ir_version = v
            elif number == _MODEL_GRAPH and wire == _LEN:
                graph = v
            elif number == _MODEL_METADATA and wire == _LEN:
                key, value = _entry(buf, v)
                metadata[key] = value
        if ir_version is None or graph is None:
            raise _Malformed("no ir_version or graph")
        inputs = _value_names(buf, graph, _GRAPH_INPUT)
        outputs = _value_names(buf, graph, _GRAPH_OUTPUT)
        shapes = _value_shapes(buf, graph, _GRAPH_INPUT)
        shapes.update(_value_shapes(buf, graph, _GRAPH_OUTPUT))
        widest = _widest(buf, graph)
    except (_Malformed, UnicodeDecodeError) as e:
        raise ValueError(f"not an ONNX model ({e})")
    return OnnxInfo(ir_version, metadata, inputs, outputs, shapes, widest)


def check_regular(path):
    """``BdmError`` unless ``path`` is a regular file (after symlinks): a FIFO would block ``open`` forever,
    a device or socket is no model."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BdmError(f"{path}: no such file")
    except PermissionError:
        raise BdmError(f"{path}: permission denied")
    if stat.S_ISDIR(mode):
        raise BdmError(f"{path}: is a directory, not a model file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise BdmError(f"{path}: {kind}, not a model file: give the .onnx or .plan file itself")


def read(path):
    """Read ``path``'s metadata and input/output names; ``BdmError`` naming the file if it is not ONNX."""
    path = os.fspath(path)
    try:
        check_regular(path)
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise BdmError(f"{path}: empty file, not an ONNX model")
            # mmap (indexed directly: no buffer exports to outlive it): the weights are never read.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                return parse(mm)
    except BdmError:  # already names the file
        raise
    except FileNotFoundError:
        raise BdmError(f"{path}: no such file")
    except IsADirectoryError:
        raise BdmError(f"{path}: is a directory, not a model file")
    except PermissionError:
        raise BdmError(f"{path}: permission denied")
    except ValueError as e:
        raise BdmError(f"{path}: {e}: give a step graph .onnx from bdm-export, or a TensorRT .plan")


def read_metadata(path):
    """``{key: value}`` of ``path``'s ``metadata_props`` (raw strings)."""
    return read(path).metadata
