"""ONNX Runtime settings as ONNX Runtime's own ``SessionOptions``, given to ``bdm_runtime.load``.

Step times come from the runtime's public hook (``Sampler.sample(..., timing=)``), the options the
session really runs with from ``Sampler.session_options``: nothing of ONNX Runtime is patched.
"""


def ort_session_options(settings):
    """``onnxruntime.SessionOptions`` as the runtime makes its own (all graph optimisations, errors-only
    logging) with ``settings`` applied; ``None`` without settings (the runtime's own, as shipped)."""
    import onnxruntime as ort

    if not settings:
        return None
    o = ort.SessionOptions()
    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                         settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    o.log_severity_level = 3
    if "intra_op_num_threads" in settings:
        o.intra_op_num_threads = int(settings["intra_op_num_threads"])
    if "inter_op_num_threads" in settings:
        o.inter_op_num_threads = int(settings["inter_op_num_threads"])
    if "execution_mode" in settings:
        o.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
    if "allow_spinning" in settings:
        flag = "1" if settings["allow_spinning"] else "0"
        o.add_session_config_entry("session.intra_op.allow_spinning", flag)
        o.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return o


def load_timed(path, settings):
    """``(sampler, step_times)``: ``bdm_runtime.load(path)`` on the CPU provider with ``settings``; the list
    receives the step times of the runtime's timing hook when passed as ``sample(..., timing=step_times.append)``."""
    import bdm_runtime

    sampler = bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"],
                               session_options=ort_session_options(settings))
    return sampler, []


def session_options(sampler):
    """The options the session actually runs with, read back from it (proof the settings arrived)."""
    o = sampler.session_options
    return {"intra_op_num_threads": o.intra_op_num_threads, "inter_op_num_threads": o.inter_op_num_threads,
            "graph_optimization_level": str(o.graph_optimization_level).split(".")[-1],
            "execution_mode": str(o.execution_mode).split(".")[-1],
            "allow_spinning": _config_entry(o, "session.intra_op.allow_spinning")}


def _config_entry(options, key):
    """A session config entry, or ``"default"`` when unset (ORT raises for unset keys)."""
    try:
        return options.get_session_config_entry(key)
    except Exception:
        return "default"
