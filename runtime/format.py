"""The step-graph interface, format version 1: one definition shared by exporter and runtime.

A bdm step graph computes one whole sampler step (network + DCT-domain update of B10):

  inputs   z [B,C,H,W] f32, t [B] f32, s [B] f32, eta [1] f32, noise [B,C,H,W] f32,
           label [B] i64 (conditional models), guidance [1] f32 (graphs with the guided branch)
  outputs  z_next [B,C,H,W] f32, x0 [B,C,H,W] f32 (denoised estimate, clipped)

Metadata lives in the ONNX file's ``metadata_props`` (JSON values), and for a TensorRT engine
``X.plan`` in ``X.plan.json`` beside it, under the keys below.
"""
import json

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)

# Graph inputs and outputs.
Z, T, S, ETA, NOISE, LABEL, GUIDANCE = "z", "t", "s", "eta", "noise", "label", "guidance"
Z_NEXT, X0 = "z_next", "x0"
INPUTS = (Z, T, S, ETA, NOISE)  # always present
OPTIONAL_INPUTS = (LABEL, GUIDANCE)
OUTPUTS = (Z_NEXT, X0)

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
K_PRECISION = "bdm.precision"            # "fp32" or "fp16"
K_VERSION = "bdm.version"                # bdm package version that wrote it
K_PARAM = "bdm.param"                    # how the network output is read (PARAMS); optional, "eps" if absent

# Parameterisations of the network output: eps (B8) and spectral (B14). Graphs compute x_hat
# inside, so the runtime only reports this; training and export take the names from here.
PARAMS = ("eps", "spectral")
REQUIRED_KEYS = (K_FORMAT_VERSION, K_IMAGE_SHAPE, K_PROCESS, K_NUM_CLASSES, K_GUIDANCE,
                 K_CLIP_DENOISED, K_DEFAULT_STEPS, K_DEFAULT_ETA, K_PRECISION, K_VERSION)
# Engine side files only.
K_TRT_VERSION = "bdm.tensorrt_version"
K_PROFILE = "bdm.profile"                # {"min": b, "opt": b, "max": b}, in images
K_TRT_DEVICE = "bdm.tensorrt_device"     # {"name": "NVIDIA Orin", "compute_capability": [8, 7]}


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
    """The required keys absent from ``meta``."""
    return [k for k in REQUIRED_KEYS if k not in meta]
