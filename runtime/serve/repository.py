"""``bdm-serve --write-repository DIR``: a Triton model repository for a standalone ``tritonserver``.

    DIR/
      MODEL/config.pbtxt        inputs, outputs, max_batch_size, dynamic_batching, parameters
      MODEL/1/model.py          the Python-backend model (bdm_runtime/serve/triton_model.py)
      MODEL/1/bdm.onnx          the step graph (or X.plan with X.plan.json)

The whole tree is staged under a temporary name and appears in one rename, or not at all; an
existing ``DIR`` is refused, never replaced or merged into.
"""
import os
import shutil

from ..errors import BdmError
from ..io import Staging, check_writable_dir
from . import requests as rq

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


def model_info(engine):
    """The :class:`bdm_runtime.step_info.StepInfo` of an ``.onnx`` or engine, read without loading a backend."""
    from ..step_info import engine_info, onnx_info

    if not os.path.isfile(engine):
        raise BdmError(f"--engine {engine}: no such file")
    return engine_info(engine)[0] if engine.lower().endswith(ENGINE_SUFFIXES) else onnx_info(engine)


def _dims(shape):
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def config_text(name, image_shape, settings, params, gpu):
    """``config.pbtxt`` (protobuf text format of Triton's ``ModelConfig``)."""
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {settings.max_batch}", "dynamic_batching {",
             f"  max_queue_delay_microseconds: {settings.queue_delay_us}"]
    if settings.preferred:
        lines.append(f"  preferred_batch_size: {_dims(settings.preferred)}")
    lines.append("}")
    tensors = [("input", n, t, (1,), opt) for n, _, t, opt in rq.INPUTS]
    tensors += [("output", n, t, shape, False) for n, _, t, shape in rq.outputs(image_shape)]
    for kind in ("input", "output"):
        block = [f'  {{ name: "{n}" data_type: {t} dims: {_dims(s)}' + (" optional: true" if o else "") + " }"
                 for k, n, t, s, o in tensors if k == kind]
        lines += [f"{kind} ["] + [",\n".join(block)] + ["]"]
    # each instance is its own stub process with its own sampler (session): batches run side by side
    lines.append(f"instance_group [ {{ count: {settings.instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]")
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write(folder, engine, settings, backend="auto", threads=None, batch=None):
    """Write the repository into ``folder`` (refused if it exists); returns the model's folder."""
    folder = os.fspath(folder)
    if os.path.lexists(folder):
        raise BdmError(f"--write-repository {folder}: already exists; give a new folder (nothing is replaced)")
    check_writable_dir("--write-repository", folder)
    info = model_info(engine)
    name = os.path.basename(engine)
    files = [engine] + ([engine + ".json"] if name.lower().endswith(ENGINE_SUFFIXES) else [])
    gpu = backend == "trt" or name.lower().endswith(ENGINE_SUFFIXES)
    params = {"engine": name, "backend": backend, "threads": threads or "", "batch": batch or "",
              "max_steps": settings.max_steps}
    with Staging() as stage:
        root = stage.folder(folder)
        version = os.path.join(root, settings.model_name, "1")
        os.makedirs(version)
        for f in files:
            shutil.copyfile(f, os.path.join(version, os.path.basename(f)))
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_model.py"),
                        os.path.join(version, "model.py"))
        with open(os.path.join(root, settings.model_name, "config.pbtxt"), "w", encoding="utf-8") as f:
            f.write(config_text(settings.model_name, info.image_shape, settings, params, gpu))
    return os.path.join(folder, settings.model_name)
