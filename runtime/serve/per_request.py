"""Per-request errors under PyTriton: a request refused on its values fails alone, not its batch-mates.

PyTriton (0.7) answers a batch as a whole: its infer callable returns one dict of outputs per
request, and an exception it raises becomes the error of every request in the batch (the proxy
model that PyTriton loads into ``tritonserver``'s Python backend builds each
``InferenceResponse`` from outputs only, in ``_wrap_response``). Triton's Python backend itself
does answer each request of a batch on its own (``InferenceResponse(error=TritonError(...))``),
as the standalone repository's model does. So :func:`install` extends the proxy model's source,
as PyTriton hands it to ``tritonserver``, by one branch: a response dict that holds only
:data:`ERROR_OUTPUT` (the refusal's message, bytes) becomes that request's error response
(``INVALID_ARG``: HTTP 400). Where PyTriton's source differs from the version this was written
for, nothing is changed and :func:`install` says so: the server then falls back to failing the
whole batch with a message naming the refused request (the behaviour without this module).
"""
import numpy as np

ERROR_OUTPUT = "bdm_error"  # not an output of the model: only ever the whole of a refused request's response

# the first lines of PyTriton 0.7's proxy/model.py ``_wrap_response``; the branch goes before its body
_ANCHOR = ("def _wrap_response(response: Response, requested_outputs_names, model_outputs_dict):\n"
           "    if response.data is not None:\n")
_BRANCH = f'''    if response.data is not None and list(response.data) == ["{ERROR_OUTPUT}"]:  # bdm-serve: refused alone
        _text = response.data["{ERROR_OUTPUT}"].reshape(-1)[0]
        _text = _text.decode("utf-8", "replace") if isinstance(_text, bytes) else str(_text)
        _code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
        _error = pb_utils.TritonError(_text) if _code is None else pb_utils.TritonError(_text, _code)
        return pb_utils.InferenceResponse(output_tensors=[], error=_error)
'''


def patch_source(text):
    """The proxy model's source with the per-request error branch, or ``None`` if its anchor is missing."""
    if _ANCHOR not in text or ERROR_OUTPUT in text:
        return None
    head, tail = text.split(_ANCHOR, 1)
    signature, body = _ANCHOR.split("\n", 1)
    return head + signature + "\n" + _BRANCH + body + tail


def install(model_name):
    """Patch the proxy model files PyTriton sends to ``tritonserver`` for ``model_name``.

    Returns ``(state, uninstall)``: ``state["per_request"]`` turns true once the patched model
    has been handed over (PyTriton loads the model when the server starts, before any request);
    ``uninstall()`` restores PyTriton. Only the default lifecycle (files sent with the load
    request, ``Model.get_proxy_model_files``) is patched.
    """
    from pytriton.models.model import Model

    state = {"per_request": False}
    original = Model.get_proxy_model_files

    def get_proxy_model_files(self):
        files = original(self)
        key = f"file:{self.model_version}/model.py"
        if self.model_name == model_name and key in files:
            text = patch_source(files[key].decode("utf-8"))
            if text is not None:
                files[key] = text.encode("utf-8")
                state["per_request"] = True
        return files

    Model.get_proxy_model_files = get_proxy_model_files

    def uninstall():
        Model.get_proxy_model_files = original

    return state, uninstall


def refusal(error):
    """The response dict of a request refused with ``error`` (see :data:`ERROR_OUTPUT`)."""
    return {ERROR_OUTPUT: np.array([str(error).encode("utf-8")], dtype=np.bytes_)}
