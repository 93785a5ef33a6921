"""The Python-backend model of a repository written by ``bdm-serve --write-repository`` (copied as ``1/model.py``).

A standalone ``tritonserver`` (container, Kubernetes, Jetson) runs it with no PyTriton; its Python
needs ``bdm`` installed (``pip install bdm[ort]``, or the runtime with TensorRT on a Jetson), or the
folders of ``BDM_SITE_PACKAGES`` (``os.pathsep``-separated site-packages, e.g. a virtual environment's:
the backend's stub runs Python isolated, so it ignores ``PYTHONPATH``). It loads
the step graph or engine beside it with the settings of ``config.pbtxt``'s ``parameters``, and runs
each batch the dynamic batcher formed through :func:`bdm_runtime.serve.requests.run`: rows that share
sampler settings go through the step graph as one chunk; a request refused on its values gets its
own error response, and the others in the batch are answered.
"""
import json
import os
import site


def _parameters(config):
    """``config.pbtxt``'s ``parameters`` as a plain ``{key: string}``."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


class TritonPythonModel:
    """Triton's Python-backend interface: ``initialize``, ``execute`` (one merged batch), ``finalize``."""

    def initialize(self, args):
        for folder in os.environ.get("BDM_SITE_PACKAGES", "").split(os.pathsep):
            if folder:
                site.addsitedir(folder)  # .pth files too: an editable install's finder
        import bdm_runtime

        config = json.loads(args["model_config"])
        params = _parameters(config)
        folder = os.path.dirname(os.path.abspath(__file__))
        threads = int(params.get("threads") or 0) or None
        batch = int(params.get("batch") or 0) or None
        self.sampler = bdm_runtime.load(os.path.join(folder, params["engine"]), backend=params.get("backend", "auto"),
                                        threads=threads, batch=batch)
        self.max_rows = int(config["max_batch_size"])
        self.max_steps = int(params.get("max_steps") or 1000)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils

        from bdm_runtime.serve import requests as rq

        batch = []
        for request in requests:
            inputs = {}
            for name, _, _, _ in rq.INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    inputs[name] = tensor.as_numpy()
            batch.append(inputs)
        responses = []
        for result in rq.run(self.sampler, batch, self.max_rows, self.max_steps):
            if isinstance(result, Exception):
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)  # HTTP 400 (Triton >= 23.06), else 500
                error = pb_utils.TritonError(str(result)) if code is None else pb_utils.TritonError(str(result), code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in result.items()]))
        return responses

    def finalize(self):
        self.sampler.close()
