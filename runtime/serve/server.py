"""The PyTriton binding of ``bdm-serve``: one Triton model whose Python callable samples merged batches.

PyTriton starts the ``tritonserver`` it bundles (it runs on a CPU-only machine too) and hands
each batch the dynamic batcher formed to :func:`infer` in this process. Triton itself refuses a
request whose inputs have the wrong data type or shape, or more rows than ``max_batch``, before
it is batched; :mod:`bdm_runtime.serve.requests` refuses bad values, each request on its own
(:mod:`bdm_runtime.serve.per_request`: PyTriton by itself can only fail a whole batch).
"""
import logging
import os
import signal
import sys
import sysconfig
import threading


from ..errors import BdmError
from . import per_request
from . import requests as rq

LOG = logging.getLogger("bdm_runtime.serve")


class Settings:
    """What the server binds: model name, the batcher's bounds, the largest ``steps`` a request may ask."""

    def __init__(self, model_name="bdm", max_batch=64, queue_delay_us=2000, preferred=None, max_steps=1000,
                 exit_timeout=30, instances=1):
        self.model_name = model_name
        self.instances = int(instances)
        self.max_batch = int(max_batch)
        self.queue_delay_us = int(queue_delay_us)
        self.preferred = list(preferred or [])
        self.max_steps = int(max_steps)
        self.exit_timeout = int(exit_timeout)


def library_path():
    """``LD_LIBRARY_PATH`` that ``tritonserver`` and PyTriton's Python stub need, beside what is set.

    The stub links this interpreter's ``libpython`` (in ``LIBDIR``, not on the loader's path for a
    pyenv or venv Python); the server links the libraries of the ``nvidia_pytriton.libs`` folder,
    which PyTriton misses when it is imported from outside ``site.getsitepackages()``.
    """
    import pytriton

    extra = [sysconfig.get_config_var("LIBDIR") or "",
             os.path.join(os.path.dirname(os.path.dirname(pytriton.__file__)), "nvidia_pytriton.libs")]
    have = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if p]
    return ":".join(have + [p for p in extra if p and os.path.isdir(p) and p not in have])


def make_infer(sampler, settings, stats, lock, refusals):
    """The callable PyTriton runs: a list of requests (one merged batch) in, a list of output dicts out.

    ``lock`` guards ``stats`` (one callable per model instance, each on its own PyTriton thread);
    the sampler's own lock lets one batch at a time through the step graph. ``refusals["per_request"]``:
    the proxy model answers a refused request alone (:mod:`.per_request`); else the batch fails.
    """

    def infer(requests):
        batch = [{name: request[name] for name in request} for request in requests]
        parsed, errors = rq.check(sampler, batch, settings.max_batch, settings.max_steps)
        if errors and not refusals["per_request"]:  # the whole batch fails: name every refused request in it
            raise BdmError("; ".join(f"request {i + 1} of {len(batch)} in this batch: {e}" for i, e in errors.items()))
        results = rq.respond(sampler, parsed, len(batch))
        for i, e in errors.items():
            results[i] = per_request.refusal(e)
        with lock:
            stats["executions"] += 1
            stats["requests"] += len(batch)
            stats["images"] += sum(len(rs) for _, rs, _ in parsed)
        return results

    return infer


def bind(triton, sampler, settings, stats, refusals):
    """Bind the sampler as model ``settings.model_name`` with dynamic batching.

    ``settings.instances`` > 1 binds that many callables over the one sampler (Triton model
    instances): while one batch samples, Triton hands the next to another instance, whose transfer
    and parsing overlap the sampling instead of leaving the step graph idle between batches.
    """
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

    inputs = [Tensor(name=name, dtype=dtype, shape=(1,), optional=optional) for name, dtype, _, optional in rq.INPUTS]
    outputs = [Tensor(name=name, dtype=dtype, shape=shape)
               for name, dtype, _, shape in rq.outputs(sampler.image_shape)]
    batcher = DynamicBatcher(max_queue_delay_microseconds=settings.queue_delay_us,
                             preferred_batch_size=settings.preferred or None)
    config = ModelConfig(batching=True, max_batch_size=settings.max_batch, batcher=batcher)
    lock = threading.Lock()
    infer = [make_infer(sampler, settings, stats, lock, refusals) for _ in range(settings.instances)]
    triton.bind(model_name=settings.model_name, infer_func=infer if len(infer) > 1 else infer[0], inputs=inputs,
                outputs=outputs, config=config, strict=False)


def triton_config(host, http_port, grpc_port, metrics_port, exit_timeout):
    from pytriton.triton import TritonConfig

    return TritonConfig(http_address=host, http_port=http_port, grpc_address=host, grpc_port=grpc_port,
                        metrics_address=host, metrics_port=metrics_port, exit_timeout_secs=exit_timeout,
                        allow_gpu_metrics=False)


def serve(sampler, settings, host, ports, on_ready=None, log=print):
    """Serve until SIGTERM or SIGINT, then drain: in-flight requests finish (up to ``exit_timeout`` s).

    ``ports``: ``(http, grpc, metrics)``. Returns the reason it stopped (``"SIGTERM"``, ``"SIGINT"``,
    or ``"server exited"`` when tritonserver died).
    """
    from pytriton.triton import Triton

    os.environ["LD_LIBRARY_PATH"] = library_path()
    # multiprocessing's resource tracker (a child process, started by PyTriton) warns at exit about the
    # shared memory PyTriton hands over to tritonserver; it reads its warning filters from here
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"),
                                                          "ignore:resource_tracker:UserWarning"]))
    stats = {"executions": 0, "requests": 0, "images": 0}
    stop, reason = threading.Event(), []

    def on_signal(signum, frame):
        reason.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    triton = Triton(config=triton_config(host, *ports, settings.exit_timeout))
    refusals, uninstall = per_request.install(settings.model_name)
    try:
        bind(triton, sampler, settings, stats, refusals)
        triton.run()
        if not refusals["per_request"]:
            LOG.warning("this PyTriton's proxy model could not be taught per-request errors: a request refused "
                        "on its values fails the requests batched with it")
        log(f"bdm-serve: model '{settings.model_name}' ready on http://{host}:{ports[0]} (gRPC {host}:{ports[1]}, "
            f"metrics http://{host}:{ports[2]}/metrics), backend {sampler.backend} ({sampler.provider}), "
            f"max batch {settings.max_batch}, queue delay {settings.queue_delay_us} us, {settings.instances} instance(s)")
        if on_ready is not None:
            on_ready()
        while not stop.is_set() and triton.is_alive():
            stop.wait(0.5)
    finally:
        triton.stop()  # SIGINT to tritonserver: it finishes in-flight requests, then exits
        uninstall()
        for s, h in previous.items():
            signal.signal(s, h)
    why = reason[0] if reason else "server exited"
    log(f"bdm-serve: stopped ({why}) after {stats['requests']} requests, {stats['images']} images "
        f"in {stats['executions']} batches")
    return why


def quiet_pytriton():
    """PyTriton logs every start-up step at INFO; keep warnings and errors (and tritonserver's own on stderr)."""
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
