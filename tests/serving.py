"""Helpers of tests/test_serve.py: free loopback ports, server processes that always stop, tritonclient calls.

Every wait is bounded (a deadline in seconds); every process started here is stopped by the
caller's ``finally`` (SIGTERM, then SIGKILL after a timeout).
"""
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"


def free_ports(n=3):
    """``n`` distinct ports free on the loopback interface now."""
    from bdm_runtime.serve.bundled import free_ports as free

    return free(n, HOST)


def http_status(url, timeout=2.0):
    """The HTTP status of GET ``url`` (``None`` when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_ready(http_port, proc, deadline_s=120.0, model="bdm"):
    """Wait until the model's ``/v2/models/MODEL/ready`` says 200, or fail (the process died, or the deadline
    passed). Not ``/v2/health/ready``: PyTriton loads its model after the server is up, and an empty
    server is ready."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before it was ready")
        if http_status(f"http://{HOST}:{http_port}/v2/models/{model}/ready") == 200:
            return
        time.sleep(0.25)
    raise AssertionError(f"server not ready after {deadline_s} s")


def stop(proc, timeout=60.0):
    """SIGTERM ``proc``, wait up to ``timeout`` s, then SIGKILL; returns its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


def descendant(pid, name):
    """The pid of a descendant process of ``pid`` whose command line contains ``name`` (``None`` if none)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    family, grew = {pid}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in family} - family
        family |= new
        grew = bool(new)
    for p in sorted(family - {pid}):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if name.encode() in f.read():
                    return p
        except OSError:
            pass
    return None


def start_bdm_serve(engine, ports, log, *extra):
    """``bdm-serve`` (as ``python -m bdm_runtime.serve.cli``) on ``ports``, its output to the file ``log``."""
    http, grpc, metrics = ports
    cmd = [sys.executable, "-m", "bdm_runtime.serve.cli", "--engine", str(engine), "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1"] + [str(a) for a in extra]
    out = open(log, "w")
    try:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    finally:
        out.close()


def start_tritonserver(repository, ports, work, log):
    """PyTriton's bundled ``tritonserver`` serving ``repository`` with no PyTriton, as an operator would run it
    (:func:`bdm_runtime.serve.bundled.start`: the stub, ``LD_LIBRARY_PATH`` and numpy it needs here)."""
    from bdm_runtime.serve import bundled

    return bundled.start(repository, ports, work, log, host=HOST)


def counts(metrics_port, model="bdm"):
    """``(inferences, executions)`` of ``model`` from Triton's Prometheus metrics: rows served and model calls."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = {}
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'^{name}{{model="{model}",version="1"}} (\d+)', text, re.M)
        found[name] = int(m.group(1)) if m else 0
    return found["nv_inference_count"], found["nv_inference_exec_count"]


def infer(http_port, rows, model="bdm", timeout=120.0, **extra):
    """One request of ``rows`` ``(seed, index)`` pairs (plus per-row inputs ``extra``): the result object."""
    import tritonclient.http as hc

    arrays = {"seed": np.array([[s] for s, _ in rows], np.int64), "index": np.array([[i] for _, i in rows], np.int64)}
    arrays.update(extra)
    inputs = []
    for name, a in arrays.items():
        a = np.asarray(a)
        kind = "BYTES" if a.dtype.kind in "OS" else hc.np_to_triton_dtype(a.dtype)
        i = hc.InferInput(name, list(a.shape), kind)
        i.set_data_from_numpy(a)
        inputs.append(i)
    client = hc.InferenceServerClient(f"{HOST}:{http_port}", connection_timeout=timeout, network_timeout=timeout)
    try:
        return client.infer(model, inputs)
    finally:
        client.close()
