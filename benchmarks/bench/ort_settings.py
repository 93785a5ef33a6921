"""ONNX Runtime settings injected into the runtime's own session, and per-step timing of that session.

The runtime has no timing hook and builds its own ``SessionOptions``; both are reached from here.
"""
import contextlib
import time


def _options_class(ort, settings):
    """A ``SessionOptions`` subclass applying ``settings`` (a level given here wins over the runtime's)."""
    base = ort.SessionOptions
    level = settings.get("graph_optimization_level")

    def __init__(self):
        base.__init__(self)
        if "intra_op_num_threads" in settings:
            self.intra_op_num_threads = int(settings["intra_op_num_threads"])
        if "inter_op_num_threads" in settings:
            self.inter_op_num_threads = int(settings["inter_op_num_threads"])
        if "execution_mode" in settings:
            self.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
        if "allow_spinning" in settings:
            flag = "1" if settings["allow_spinning"] else "0"
            self.add_session_config_entry("session.intra_op.allow_spinning", flag)
            self.add_session_config_entry("session.inter_op.allow_spinning", flag)

    ns = {"__init__": __init__}
    if level is not None:
        prop = base.graph_optimization_level
        ns["graph_optimization_level"] = property(
            prop.__get__, lambda self, _v: prop.__set__(self, getattr(ort.GraphOptimizationLevel, level)))
    return type("BenchSessionOptions", (base,), ns)



@contextlib.contextmanager
def ort_options(settings):
    """While open, ``onnxruntime.SessionOptions()`` (as made by ``bdm_runtime.load``) carries ``settings``."""
    import onnxruntime as ort

    base = ort.SessionOptions
    if settings:
        ort.SessionOptions = _options_class(ort, settings)
    try:
        yield
    finally:
        ort.SessionOptions = base



class StepTimer:
    """Stands in for an ``InferenceSession``, timing each ``run_with_iobinding`` (one whole step)."""

    def __init__(self, session):
        self._session = session
        self.times = []

    def __getattr__(self, name):
        return getattr(self._session, name)

    def run_with_iobinding(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self._session.run_with_iobinding(*args, **kwargs)
        finally:
            self.times.append(time.perf_counter() - t)



def load_timed(path, settings):
    """``(sampler, StepTimer)``: ``bdm_runtime.load(path)`` on the CPU provider with ``settings``, step-timed."""
    import bdm_runtime

    with ort_options(settings):
        sampler = bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"])
    backend = sampler._backend  # the runtime offers no timing hook: wrap its session from here
    timer = StepTimer(backend.session)
    backend.session = timer
    return sampler, timer



def session_options(timer):
    """The options the session actually runs with, read back from it (proof the settings arrived)."""
    o = timer.get_session_options()
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
