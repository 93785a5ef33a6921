"""``bdm-serve``: serve a bdm step graph on Triton Inference Server (PyTriton), or write a model repository.

    bdm-serve --engine bdm.onnx                              # http://127.0.0.1:8000, gRPC 8001, metrics 8002
    bdm-serve --engine bdm.plan --host 0.0.0.0 --max-batch 32 --queue-delay-us 5000
    bdm-serve --engine bdm.onnx --write-repository models/   # for a standalone tritonserver

One request row is one image (inputs ``seed``, ``index``; optional ``steps``, ``solver``, ``grid``,
``eta``, ``label``, ``guidance``, ``float_output``); the response holds uint8 ``image`` rows (and
float32 ``sample`` rows on request). See docs/serving.md. SIGTERM or Ctrl-C drains: requests in
flight are answered, then the server exits 0 with one line. Mistakes print one ``Error:`` line.
"""
import click

from ..cli import BACKEND_OPTION, BATCH_OPTION, CUDA_GRAPH_OPTION, ENGINE_OPTION, THREADS_OPTION
from ..errors import BdmError, run_cli
from ..limits import MAX_STEPS

PORT = click.IntRange(1, 65535)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@ENGINE_OPTION
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP, gRPC and metrics endpoints listen on (0.0.0.0: every interface).")
@click.option("--http-port", type=PORT, default=8000, show_default=True, help="HTTP/REST port (KServe v2 protocol).")
@click.option("--grpc-port", type=PORT, default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=PORT, default=8002, show_default=True, help="Prometheus metrics port.")
@BACKEND_OPTION
@THREADS_OPTION
@BATCH_OPTION
@CUDA_GRAPH_OPTION
@click.option("--max-batch", type=click.IntRange(1, 4096), default=None,
              help="Most images (rows) in one request and in one batch Triton forms (default: the sampler's chunk: "
                   "--batch, else the engine's profile maximum, else 64).")
@click.option("--queue-delay-us", type=click.IntRange(0, 10000000), default=2000, show_default=True,
              help="Longest time (microseconds) a request waits in Triton's queue for others to batch with.")
@click.option("--preferred-batch", type=click.IntRange(min=1), multiple=True,
              help="A batch size the batcher forms as soon as it can (repeatable; default: as large as it can).")
@click.option("--instances", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Triton model instances over the one sampler: with 2, the next batch is received while one "
                   "samples (the step graph still runs one batch at a time; see docs/serving.md). With "
                   "--write-repository: instance_group's count, each instance a process with its own sampler.")
@click.option("--max-steps", type=click.IntRange(1, MAX_STEPS), default=1000, show_default=True,
              help="Most sampler steps a request may ask for (a request's time on the model grows with it).")
@click.option("--model-name", default="bdm", show_default=True, help="Triton model name (URL /v2/models/NAME).")
@click.option("--exit-timeout", type=click.IntRange(0, 3600), default=30, show_default=True,
              help="On SIGTERM/Ctrl-C: seconds requests in flight get to finish before the server exits.")
@click.option("--write-repository", type=click.Path(file_okay=False), default=None,
              help="Write a Triton model repository (Python backend + this step graph) to this new folder and "
                   "exit, instead of serving.")
def cli(engine, host, http_port, grpc_port, metrics_port, backend, threads, batch, cuda_graph, max_batch,
        queue_delay_us, preferred_batch, instances, max_steps, model_name, exit_timeout, write_repository):
    """Serve a bdm step graph on Triton Inference Server, with dynamic batching."""
    import re

    from .server import Settings

    if not re.match(r"^[A-Za-z0-9._-]+$", model_name):
        raise BdmError(f"--model-name {model_name!r}: use letters, digits, '.', '_' and '-' only")
    if len(set((http_port, grpc_port, metrics_port))) < 3:
        raise BdmError(f"--http-port, --grpc-port and --metrics-port must differ, got {http_port}, {grpc_port}, "
                       f"{metrics_port}")
    settings = Settings(model_name, max_batch or batch or 64, queue_delay_us, preferred_batch, max_steps, exit_timeout,
                        instances)
    _check_preferred(settings)
    if write_repository:
        from .repository import write

        path = write(write_repository, engine, settings, backend=backend, threads=threads, batch=batch)
        click.echo(f"bdm-serve: wrote Triton model repository {write_repository} (model {path}); start it with "
                   f"tritonserver --model-repository {write_repository}")
        return
    _serve(engine, host, (http_port, grpc_port, metrics_port), backend, threads, batch, cuda_graph, settings,
           max_batch is None)


def check_ports(host, ports):
    """Refuse a port another process holds (tritonserver would fail only after PyTriton's start-up wait)."""
    import errno
    import socket

    for flag, port in zip(("--http-port", "--grpc-port", "--metrics-port"), ports):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                why = "in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
                raise BdmError(f"{flag} {port}: cannot listen on {host}:{port} ({why}); pick another port or --host")


def _check_preferred(settings):
    for size in settings.preferred:
        if size > settings.max_batch:
            raise BdmError(f"--preferred-batch {size} exceeds --max-batch {settings.max_batch}")


def _serve(engine, host, ports, backend, threads, batch, cuda_graph, settings, default_max_batch):
    """Load the sampler (refusing a max batch whose images cannot fit in memory), then serve until signalled."""
    import bdm_runtime

    from ..limits import check_sample_memory
    from .server import quiet_pytriton, serve

    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise BdmError("bdm-serve needs PyTriton: pip install 'bdm[serve]' (nvidia-pytriton)")
    check_ports(host, ports)
    with bdm_runtime.load(engine, backend=backend, batch=batch, cuda_graph=cuda_graph, threads=threads) as sampler:
        if default_max_batch:  # the sampler's chunk: --batch, else an engine's profile maximum, else 64
            settings.max_batch = sampler.batch
            _check_preferred(settings)
        check_sample_memory(settings.max_batch, sampler.image_shape, min(settings.max_batch, sampler.batch))
        quiet_pytriton()
        why = serve(sampler, settings, host, ports, log=lambda line: click.echo(line, err=False))
    if why == "server exited":
        raise BdmError("tritonserver exited on its own (its log is above); the model is no longer served")


def main(argv=None):
    """Console entry point ``bdm-serve``."""
    run_cli(cli, argv, prog_name="bdm-serve")


if __name__ == "__main__":
    main()
