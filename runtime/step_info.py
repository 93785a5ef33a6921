"""What a bdm model file says about itself: the validated ``bdm.*`` metadata of a step graph
(``.onnx``) or of a TensorRT engine (``X.plan`` with its side file ``X.plan.json``).

Below the sampler and the backends (both read it), so that neither has to import the other.
"""
import json
import os

from . import format as fmt
from .errors import BdmError
from .grids import GRIDS, SOLVERS, solver_eta
from .limits import MAX_STEPS


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class StepInfo:
    """What a step graph declares about itself (validated): shape, classes, defaults, interface."""

    def __init__(self, path, meta, inputs=None):
        self.path = path
        self.meta = meta
        self.format_version = meta[fmt.K_FORMAT_VERSION]
        self.image_shape = tuple(meta[fmt.K_IMAGE_SHAPE])
        self.process = meta[fmt.K_PROCESS]
        self.num_classes = meta[fmt.K_NUM_CLASSES]
        self.guided = bool(meta[fmt.K_GUIDANCE])
        self.clip_denoised = bool(meta[fmt.K_CLIP_DENOISED])
        self.default_steps = meta[fmt.K_DEFAULT_STEPS]
        self.default_eta = float(meta[fmt.K_DEFAULT_ETA])
        self.default_solver = meta.get(fmt.K_DEFAULT_SOLVER, "ddim")      # format 1: DDIM only
        self.default_grid = meta.get(fmt.K_DEFAULT_GRID, "uniform")
        self.precision = meta[fmt.K_PRECISION]
        self.version = meta[fmt.K_VERSION]
        self.inputs = inputs
        self.widest = 0  # the widest convolution's channels where the graph is at hand (onnx_info), else 0
        self.symbolic = False  # whether the graph leaves its image dimensions symbolic (onnx_info)

    @classmethod
    def from_meta(cls, path, meta, inputs=None, outputs=None, shapes=None):
        """Validate decoded ``bdm.*`` metadata (and graph input/output names and declared shapes when known)."""
        if not meta:
            raise BdmError(f"{path}: not a bdm step graph (no bdm.* metadata)")
        missing = fmt.missing_keys(meta)
        if missing:
            raise BdmError(f"{path}: not a bdm step graph (metadata {', '.join(missing)} missing)")
        version = meta[fmt.K_FORMAT_VERSION]
        if not _is_int(version):  # 1.0 and true equal 1 in Python: still not a format version
            raise BdmError(f"{path}: bad {fmt.K_FORMAT_VERSION} {version!r}: not an integer")
        if version not in fmt.SUPPORTED_VERSIONS:
            raise BdmError(f"{path}: step-graph format version {version!r}, this runtime reads "
                           f"{', '.join(str(v) for v in fmt.SUPPORTED_VERSIONS)}: upgrade bdm")
        shape = meta[fmt.K_IMAGE_SHAPE]
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape)):
            raise BdmError(f"{path}: bad {fmt.K_IMAGE_SHAPE} {shape!r} (want [C, H, W])")
        k = meta[fmt.K_NUM_CLASSES]
        if not (_is_int(k) and k >= 0):
            raise BdmError(f"{path}: bad {fmt.K_NUM_CLASSES} {k!r}")
        steps = meta[fmt.K_DEFAULT_STEPS]
        if not (_is_int(steps) and 0 < steps <= MAX_STEPS):
            raise BdmError(f"{path}: bad {fmt.K_DEFAULT_STEPS} {steps!r} (want 1..{MAX_STEPS})")
        eta = meta[fmt.K_DEFAULT_ETA]
        if not (isinstance(eta, (int, float)) and not isinstance(eta, bool) and 0.0 <= eta <= 1.0):
            raise BdmError(f"{path}: bad {fmt.K_DEFAULT_ETA} {eta!r}")
        if meta[fmt.K_GUIDANCE] and k == 0:
            raise BdmError(f"{path}: a guided graph of an unconditional model")
        _check_defaults(path, meta)
        _check_precision(path, meta)
        if inputs is not None:
            want = fmt.inputs(version, k, meta[fmt.K_GUIDANCE])
            if sorted(inputs) != sorted(want):
                raise BdmError(f"{path}: graph inputs {sorted(inputs)} do not match its metadata "
                               f"(format {version} wants {sorted(want)})")
        if outputs is not None and sorted(outputs) != sorted(fmt.outputs(version)):
            raise BdmError(f"{path}: graph outputs {sorted(outputs)}, format {version} has "
                           f"{sorted(fmt.outputs(version))}")
        _check_image_shapes(path, shape, shapes or {})
        fmt.check_image_shape(shape, path)  # after the graph's own shapes: those say more
        fmt.check_process(meta[fmt.K_PROCESS], path, shape)
        return cls(path, meta, inputs)


def _check_defaults(path, meta):
    """The format-2 defaults: a known solver and grid, and an eta that solver takes."""
    if meta[fmt.K_FORMAT_VERSION] < 2:
        return
    solver, grid = meta[fmt.K_DEFAULT_SOLVER], meta[fmt.K_DEFAULT_GRID]
    if solver not in SOLVERS:
        raise BdmError(f"{path}: bad {fmt.K_DEFAULT_SOLVER} {solver!r} (this runtime knows {', '.join(SOLVERS)}): "
                       "upgrade bdm")
    if grid not in GRIDS:
        raise BdmError(f"{path}: bad {fmt.K_DEFAULT_GRID} {grid!r} (this runtime knows {', '.join(GRIDS)}): upgrade bdm")
    try:
        solver_eta(solver, meta[fmt.K_DEFAULT_ETA], 0.0)
    except ValueError as e:
        raise BdmError(f"{path}: bad {fmt.K_DEFAULT_ETA}: {e}")


def _check_precision(path, meta):
    """A known precision; an int8 graph's calibration record complete and sane (``format.K_CALIBRATION``)."""
    precision = meta[fmt.K_PRECISION]
    if precision not in fmt.PRECISIONS:
        raise BdmError(f"{path}: bad {fmt.K_PRECISION} {precision!r} (this runtime knows "
                       f"{', '.join(fmt.PRECISIONS)}): upgrade bdm")
    if precision not in fmt.INT8_PRECISIONS:
        return
    calib = meta.get(fmt.K_CALIBRATION)
    missing = [k for k in fmt.CALIBRATION_FIELDS if k not in calib] if isinstance(calib, dict) else ["all"]
    if missing:
        raise BdmError(f"{path}: an int8 graph without its calibration record ({fmt.K_CALIBRATION}: "
                       f"{', '.join(missing)} missing): export it again with bdm-export --int8")
    bad = [k for k in ("images", "steps", "quantized") if not (_is_int(calib[k]) and calib[k] > 0)]
    if calib["method"] not in fmt.CALIBRATION_METHODS:
        bad.append("method")
    if bad:
        raise BdmError(f"{path}: bad {fmt.K_CALIBRATION} ({', '.join(bad)}: {[calib[k] for k in bad]!r}): "
                       "the file was altered; export it again with bdm-export --int8")


def _check_image_shapes(path, image_shape, shapes):
    """Refuse metadata whose ``[C, H, W]`` disagrees with the image tensors the graph declares ``[B, C, H, W]``."""
    for name in (fmt.Z, fmt.NOISE, fmt.Z_NEXT, fmt.X0):
        declared = shapes.get(name)
        if declared is None:
            continue
        shown = "x".join("?" if d is None else str(d) for d in declared)
        if len(declared) != 4 or any(d is not None and d != m for d, m in zip(declared[1:], image_shape)):
            raise BdmError(f"{path}: its metadata says images are {'x'.join(map(str, image_shape))} (C x H x W), "
                           f"but the graph's {name} is {shown}: the file was altered; export it again")


def _decode(path, props):
    try:
        return fmt.decode(props)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise BdmError(f"{path}: unreadable bdm metadata ({e})")


def onnx_info(path):
    """Validated :class:`StepInfo` of an ``.onnx`` step graph (read without the onnx package)."""
    from . import onnx_meta

    info = onnx_meta.read(path)
    step = StepInfo.from_meta(path, _decode(path, info.metadata), info.inputs, info.outputs, info.shapes)
    step.widest = info.widest
    z = info.shapes.get(fmt.Z)
    step.symbolic = z is None or any(d is None for d in z[1:])  # then only a step can tell a wrong shape
    return step


def side_file(plan_path):
    """``X.plan.json``: the metadata of engine ``X.plan``."""
    return plan_path + ".json"


def read_side_file(plan_path):
    """Decoded ``bdm.*`` metadata of a TensorRT engine, from ``X.plan.json`` beside it."""
    from .onnx_meta import check_regular

    path = side_file(plan_path)
    if os.path.lexists(path):
        check_regular(path)  # a FIFO would block the read forever
    try:
        with open(path, "r", encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise BdmError(f"{plan_path}: its metadata {os.path.basename(path)} is missing beside it "
                       "(not a bdm engine, or copied without it)")
    except (ValueError, UnicodeDecodeError) as e:
        raise BdmError(f"{path}: not JSON ({e})")
    if not isinstance(raw, dict):
        raise BdmError(f"{path}: not a bdm engine side file (want a JSON object)")
    return raw


def engine_info(plan_path):
    """Validated :class:`StepInfo` of a TensorRT engine plus its side file's raw dict."""
    raw = read_side_file(plan_path)
    meta = {k: v for k, v in raw.items() if k.startswith(fmt.PREFIX)}
    return StepInfo.from_meta(plan_path, meta), raw


