"""PyTriton's bundled ``tritonserver`` started by hand on a written repository, with no PyTriton in between.

What an operator's container gives for free has to be arranged here: the Python backend's stub
for this Python (PyTriton ships one per Python version) copied into the backends folder, and the
loader path for this interpreter's ``libpython``. Shared by tests/test_serve.py (the repository
loads and answers) and ``benchmarks.serve_bench --standalone`` (the same measurements as through
PyTriton), so both run the server the same way.
"""
import os
import shutil
import socket
import subprocess
import sys

from ..errors import BdmError


def free_ports(n=3, host="127.0.0.1"):
    """``n`` distinct TCP ports free on ``host`` now (HTTP, gRPC, metrics of a server about to start)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def bundled_tritonserver():
    """``(tritonserver binary, backends folder, Python stub)`` shipped inside the pytriton package."""
    try:
        import pytriton
    except ImportError:
        raise BdmError("the bundled tritonserver comes with PyTriton: pip install 'bdm[serve]' (nvidia-pytriton)")
    root = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    stub = os.path.join(root, "python_backend_stubs", "{}.{}".format(*sys.version_info[:2]),
                        "triton_python_backend_stub")
    binary = os.path.join(root, "bin", "tritonserver")
    for path in (binary, stub):
        if not os.path.isfile(path):
            raise BdmError(f"{path}: missing from this PyTriton; reinstall nvidia-pytriton for this Python")
    return binary, os.path.join(root, "backends"), stub


def prepare(work):
    """``(backends folder, working directory, environment)`` for the bundled server, made under ``work``.

    The stub runs Python isolated (no ``PYTHONPATH``), so the model finds bdm through
    ``BDM_SITE_PACKAGES``. It imports numpy first from its own search path, whose first entry is
    the working directory: a ``numpy`` link there to the numpy this interpreter runs keeps the stub
    off a numpy 2 of the base interpreter, which its pybind11 build cannot read (outputs came back
    empty).
    """
    import numpy

    from .server import library_path

    _, backends, stub = bundled_tritonserver()
    mine = os.path.join(work, "backends")
    shutil.copytree(backends, mine)
    shutil.copy(stub, os.path.join(mine, "python", "triton_python_backend_stub"))
    cwd = os.path.join(work, "cwd")
    os.makedirs(cwd)
    os.symlink(os.path.dirname(numpy.__file__), os.path.join(cwd, "numpy"))
    sites = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    env = dict(os.environ, LD_LIBRARY_PATH=library_path(), BDM_SITE_PACKAGES=os.pathsep.join(sites))
    return mine, cwd, env


def start(repository, ports, work, log, host="127.0.0.1", exit_timeout=10):
    """The bundled ``tritonserver`` serving ``repository`` on ``host`` and ``ports`` ``(http, grpc, metrics)``,
    its output to the file ``log``; a ``subprocess.Popen`` the caller must stop (SIGTERM drains)."""
    binary = bundled_tritonserver()[0]
    backends, cwd, env = prepare(os.fspath(work))
    http, grpc, metrics = ports
    cmd = [binary, "--model-repository", os.fspath(repository), "--backend-directory", backends,
           "--http-address", host, "--http-port", str(http), "--grpc-address", host, "--grpc-port", str(grpc),
           "--metrics-address", host, "--metrics-port", str(metrics), "--allow-gpu-metrics", "false",
           "--exit-timeout-secs", str(exit_timeout)]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
