"""The step-graph interface, format versions 1 and 2: one definition shared by exporter and runtime.

A bdm step graph computes one whole sampler step (network + DCT-domain update):

format 1 (DDIM-eta only, B10)
  inputs   z [B,C,H,W] f32, t [B] f32, s [B] f32, eta [1] f32, noise [B,C,H,W] f32,
           label [B] i64 (conditional models), guidance [1] f32 (graphs with the guided branch)
  outputs  z_next [B,C,H,W] f32, x0 [B,C,H,W] f32 (denoised estimate, clipped)

format 2 (every solver of ``bdm_runtime.grids.SOLVERS``: B10, and the multistep B11) adds the state
  inputs   t_prev [B] f32: the previous step's time; ``t_prev <= t`` (the runtime feeds ``t``)
           makes the step first order (B10), otherwise it is B11's second-order step;
           u_x_prev [B,C,H,W] f32: the previous step's ``u_x`` (read only when ``t_prev > t``)
  outputs  u_x [B,C,H,W] f32: this step's data prediction ``u_x_hat`` in frequency space (B8,
           after clipping when clip_denoised), the next step's ``u_x_prev``

Metadata lives in the ONNX file's ``metadata_props`` (JSON values), and for a TensorRT engine
``X.plan`` in ``X.plan.json`` beside it, under the keys below.
"""
import json
import math

from .errors import BdmError

FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)

# Graph inputs and outputs.
Z, T, S, ETA, NOISE, LABEL, GUIDANCE = "z", "t", "s", "eta", "noise", "label", "guidance"
T_PREV, U_X_PREV = "t_prev", "u_x_prev"
Z_NEXT, X0, U_X = "z_next", "x0", "u_x"
INPUTS_V1 = (Z, T, S, ETA, NOISE)   # always present
STATE_INPUTS = (T_PREV, U_X_PREV)   # format 2
OPTIONAL_INPUTS = (LABEL, GUIDANCE)
OUTPUTS_V1 = (Z_NEXT, X0)
STATE = {U_X_PREV: U_X}             # state input <- output of the previous step
IMAGE_TENSORS = (Z, NOISE, U_X_PREV, Z_NEXT, X0, U_X)   # [B, C, H, W]; the others [B] or [1]
PER_IMAGE = (Z, T, S, NOISE, T_PREV, U_X_PREV, LABEL)   # inputs whose first dimension is the batch

# Metadata keys.
PREFIX = "bdm."
K_FORMAT_VERSION = "bdm.format_version"
K_IMAGE_SHAPE = "bdm.image_shape"        # [C, H, W]
K_PROCESS = "bdm.process"                # BlurringDiffusion parameters
K_NUM_CLASSES = "bdm.num_classes"
K_GUIDANCE = "bdm.guidance"              # whether the graph contains the guided branch
K_CLIP_DENOISED = "bdm.clip_denoised"
K_DEFAULT_STEPS = "bdm.default_steps"
K_DEFAULT_ETA = "bdm.default_eta"
K_DEFAULT_SOLVER = "bdm.default_solver"  # format 2; format 1 is "ddim"
K_DEFAULT_GRID = "bdm.default_grid"      # format 2; format 1 is "uniform"
K_PRECISION = "bdm.precision"            # one of PRECISIONS
K_CALIBRATION = "bdm.int8_calibration"   # int8 graphs: how they were calibrated (CALIBRATION_FIELDS)
K_VERSION = "bdm.version"                # bdm package version that wrote it
K_PARAM = "bdm.param"                    # how the network output is read (PARAMS); optional, "eps" if absent

# Parameterisations of the network output: eps (B8) and spectral (B14). Graphs compute x_hat
# inside, so the runtime only reports this; training and export take the names from here.
PARAMS = ("eps", "spectral")
# Precisions: fp16 is the network in float16; int8 its convolutions in QDQ INT8 (bdm_export.int8);
# int8-fp16 the same INT8 convolutions in the fp16 graph (bdm_export.int8_fp16, opset 19: for TensorRT
# 10/11, whose strongly typed networks run the rest of the network FP16 only if the graph says so).
# Both INT8 precisions carry K_CALIBRATION: {"method": one of CALIBRATION_METHODS, "images", "steps", "seed":
# ints; "solver", "grid": the sampler whose trajectories it was calibrated on; "eta"; "float_layers":
# the network layers kept in float, "quantized": how many convolutions are INT8}.
INT8_FP16 = "int8-fp16"
INT8_PRECISIONS = ("int8", INT8_FP16)   # the Q/DQ graphs, with a calibration record
PRECISIONS = ("fp32", "fp16") + INT8_PRECISIONS
CALIBRATION_METHODS = ("max", "percentile", "entropy")
# The step graphs bdm-export writes, by precision: file name and the flags that ask for it (one definition
# for the exporter's names and stale-file refusal and for the runtime's hints).
EXPORT_FILES = {"fp32": ("bdm.onnx", ()), "fp16": ("bdm_fp16.onnx", ("--fp16",)),
                "int8": ("bdm_int8.onnx", ("--int8",)), INT8_FP16: ("bdm_int8_fp16.onnx", ("--int8", "--fp16"))}
CALIBRATION_FIELDS = ("method", "images", "steps", "seed", "solver", "grid", "eta", "float_layers", "quantized")
REQUIRED_KEYS_V1 = (K_FORMAT_VERSION, K_IMAGE_SHAPE, K_PROCESS, K_NUM_CLASSES, K_GUIDANCE,
                    K_CLIP_DENOISED, K_DEFAULT_STEPS, K_DEFAULT_ETA, K_PRECISION, K_VERSION)
REQUIRED_KEYS = REQUIRED_KEYS_V1 + (K_DEFAULT_SOLVER, K_DEFAULT_GRID)
# Engine side files only.
K_TRT_VERSION = "bdm.tensorrt_version"
K_PROFILE = "bdm.profile"                # {"min": b, "opt": b, "max": b}, in images
K_TRT_DEVICE = "bdm.tensorrt_device"     # {"name": "NVIDIA Orin", "compute_capability": [8, 7]}

# Format 1 names, as before format 2 (kept for code written against them).
INPUTS, OUTPUTS = INPUTS_V1, OUTPUTS_V1


def inputs(version, num_classes=0, guided=False):
    """The graph inputs of format ``version``, in the exporter's order."""
    out = list(INPUTS_V1) + (list(STATE_INPUTS) if version >= 2 else [])
    return out + ([LABEL] if num_classes > 0 else []) + ([GUIDANCE] if guided else [])


def outputs(version):
    """The graph outputs of format ``version``, in the exporter's order."""
    return list(OUTPUTS_V1) + ([U_X] if version >= 2 else [])


def encode(meta):
    """``{key: value}`` to ``{key: json string}``, as stored in ``metadata_props``."""
    return {k: json.dumps(v) for k, v in meta.items()}


def decode(props):
    """``{key: json string}`` to ``{key: value}`` for the ``bdm.`` keys; other keys are dropped."""
    out = {}
    for k, v in props.items():
        if k.startswith(PREFIX):
            out[k] = json.loads(v)
    return out


def missing_keys(meta):
    """The required keys absent from ``meta`` (those of its format version)."""
    keys = REQUIRED_KEYS if meta.get(K_FORMAT_VERSION, FORMAT_VERSION) != 1 else REQUIRED_KEYS_V1
    return [k for k in keys if k not in meta]


# bdm.process: BlurringDiffusion's constructor arguments, and the ranges a graph may claim (checked at
# load, so a crafted file is one line, not an overflow or a solver that never ends).
PROCESS_FLOATS = {  # name: (low, high, low inclusive)
    "blur_sigma_max": (0.0, 1e3, True),      # B4; the paper's is 20
    "min_scale": (0.0, 1.0, False),          # B4's d_min in (0, 1]
    "logsnr_min": (-100.0, 100.0, True),     # B3's truncation; the paper's is [-10, 10]
    "logsnr_max": (-100.0, 100.0, True),
}
MAX_IMAGE_SIDE = 4096   # pixels per side
MAX_CHANNELS = 64


def check_image_shape(shape, where):
    """``[C, H, W]`` as a tuple, if ``C`` in ``1..MAX_CHANNELS`` and ``H``, ``W`` in ``1..MAX_IMAGE_SIDE``."""
    ok = isinstance(shape, (list, tuple)) and len(shape) == 3 and all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape)
    if not ok or not (1 <= shape[0] <= MAX_CHANNELS and all(1 <= d <= MAX_IMAGE_SIDE for d in shape[1:])):
        raise BdmError(f"{where}: bad {K_IMAGE_SHAPE} {shape!r} (want [C, H, W] with C in 1..{MAX_CHANNELS} "
                       f"and H, W in 1..{MAX_IMAGE_SIDE}): the file was altered; export it again")
    return tuple(shape)


def check_process(process, where, image_shape=None, fix="the file was altered; export it again"):
    """Refuse a ``bdm.process`` config that is not BlurringDiffusion's: a missing or non-finite field, a value
    out of its range, ``logsnr_min >= logsnr_max``, or an ``image_size`` other than ``image_shape``'s H, W."""
    def bad(why):
        return BdmError(f"{where}: bad {K_PROCESS}: {why}: {fix}")

    if not isinstance(process, dict):
        raise bad(f"not an object ({type(process).__name__})")
    missing = [k for k in ("image_size",) + tuple(PROCESS_FLOATS) if k not in process]
    if missing:
        raise bad(f"{', '.join(missing)} missing")
    size = process["image_size"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_IMAGE_SIDE for d in size)):
        raise bad(f"image_size {size!r} (want [H, W] in 1..{MAX_IMAGE_SIDE})")
    if image_shape is not None and tuple(size) != tuple(image_shape[1:]):
        raise bad(f"image_size {list(size)} but images are {image_shape[1]}x{image_shape[2]}")
    for name, (low, high, closed) in PROCESS_FLOATS.items():
        v = process[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (
                (low <= v if closed else low < v) and v <= high):
            raise bad(f"{name} {v!r} (want a number in {'[' if closed else '('}{low:g}, {high:g}])")
    if not process["logsnr_min"] < process["logsnr_max"]:
        raise bad(f"logsnr_min {process['logsnr_min']!r} is not below logsnr_max {process['logsnr_max']!r}")
    return process
