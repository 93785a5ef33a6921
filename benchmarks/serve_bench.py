"""``bdm-serve`` against direct sampling, in one interleaved run: requests/s and latency at 1, 4, 16 clients.

    python -m benchmarks.serve_bench                      # the shipped models/fmnist32, exported to a temp dir
    python -m benchmarks.serve_bench --rounds 3 --out benchmarks/results/serve
    python -m benchmarks.serve_bench --instances 2 --max-batch 8 --preferred-batch 8 --queue-delay-us 20000 --client grpc
    python -m benchmarks.serve_bench --standalone --max-batch 8 --preferred-batch 8 --queue-delay-us 20000

``--standalone`` serves the same step graph through the repository ``bdm-serve --write-repository``
writes (same batcher settings), on PyTriton's bundled ``tritonserver`` started by hand: Triton's C++
front end and the Python backend's stub running the repository's model, no PyTriton process.

Each round measures, one after the other on the same machine: the server with 1 and 4 concurrent
clients, each sending single-image requests back to back (latency per request, throughput, and
the batch size Triton's dynamic batcher formed, from its metrics); then, back to back, direct
``Sampler.sample`` of single images in a loop (batch 1), the server at 16 clients, direct sampling
at the batch size the batcher formed, and direct batch 1 again (the mean of the two). Medians over
rounds, and the median of the per-round (paired) ratios. Targets (issue 21), at 16 clients:
throughput >= 0.8x direct sampling at the batch size the batcher formed, and >= 0.8x of the gain
batching gives direct sampling over batch 1, i.e. (served - direct b1) / (direct formed - direct b1).
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import click
import numpy as np

from benchmarks.bench.machine import CpuShare, loadavg, machine_info
from benchmarks.serve_report import CLIENTS, SERVERS, markdown, summarize, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"


def free_ports(n=3):
    from bdm_runtime.serve.bundled import free_ports as free

    return free(n, HOST)


def export(ckpt, folder):
    """The shipped checkpoint as a step graph (``bdm-export``), its path."""
    subprocess.run([sys.executable, "-m", "bdm_export.cli", "--ckpt", ckpt, "--out-dir", folder], check=True,
                   capture_output=True, timeout=600)
    return os.path.join(folder, "bdm.onnx")


def start_server(engine, ports, threads, server_args, tmp):
    """``bdm-serve`` on ``ports`` with ``server_args`` (its batcher options), started (not yet ready)."""
    http, grpc, metrics = ports
    cmd = [sys.executable, "-m", "bdm_runtime.serve.cli", "--engine", engine, "--http-port", str(http),
           "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", str(threads)] + server_args
    with open(os.path.join(tmp, "server.log"), "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def start_standalone(engine, ports, threads, server_args, tmp):
    """The repository ``bdm-serve --write-repository`` writes with ``server_args``, on PyTriton's bundled
    ``tritonserver`` started by hand (no PyTriton: Triton's front end and the Python backend's stub
    running the repository's model), started (not yet ready)."""
    from bdm_runtime.serve import bundled

    repo = os.path.join(tmp, "repository")
    subprocess.run([sys.executable, "-m", "bdm_runtime.serve.cli", "--engine", engine, "--write-repository", repo,
                    "--threads", str(threads)] + server_args, cwd=ROOT, check=True, capture_output=True, timeout=120)
    work = os.path.join(tmp, "standalone")
    os.makedirs(work)
    return bundled.start(repo, ports, work, os.path.join(tmp, "server.log"), host=HOST)


def wait_ready(proc, http, log, deadline_s=180):
    """Until model bdm answers ``/v2/models/bdm/ready`` with 200, or ``RuntimeError`` (exited, or the deadline)."""
    import urllib.request

    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{http}/v2/models/bdm/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"the server did not become ready in {deadline_s} s; see {log}")


def stop(proc, timeout=120):
    """SIGTERM (both servers drain, then exit), SIGKILL after ``timeout`` s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def counts(metrics_port):
    """``(inferences, executions)`` of model bdm from Triton's Prometheus metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = []
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'^{name}{{model="bdm",version="1"}} (\d+)', text, re.M)
        out.append(int(m.group(1)) if m else 0)
    return tuple(out)


def _client(protocol, ports):
    """``(tritonclient module, client)`` for ``protocol`` ``"http"`` or ``"grpc"``."""
    if protocol == "grpc":
        import tritonclient.grpc as tc

        return tc, tc.InferenceServerClient(f"{HOST}:{ports[1]}")
    import tritonclient.http as tc

    return tc, tc.InferenceServerClient(f"{HOST}:{ports[0]}", connection_timeout=300, network_timeout=300)


def client_loop(protocol, ports, seed, indices, start, done, finished):
    """One client: connects, waits at the barrier ``start``, then sends single-image requests back to back;
    ``(answer time, latency)`` of each appended to ``done``, its last answer's time to ``finished``."""
    hc, client = _client(protocol, ports)
    try:
        start.wait(timeout=120)
        for i in indices:
            inputs = []
            for name, v in (("seed", seed), ("index", i)):
                x = hc.InferInput(name, [1, 1], "INT64")
                x.set_data_from_numpy(np.array([[v]], np.int64))
                inputs.append(x)
            begin = time.perf_counter()
            client.infer("bdm", inputs).as_numpy("image")
            end = time.perf_counter()
            done.append((end, end - begin))
        finished.append(time.perf_counter())
    finally:
        client.close()


def check_images(protocol, ports, sampler, seed=5, n=3):
    """The server's images equal ``Sampler.generate``'s for the same seed and indices (bit for bit), or
    ``RuntimeError``: a benchmark of a server that answers something else would measure nothing."""
    hc, client = _client(protocol, ports)
    try:
        x = [hc.InferInput(name, [n, 1], "INT64") for name in ("seed", "index")]
        x[0].set_data_from_numpy(np.full((n, 1), seed, np.int64))
        x[1].set_data_from_numpy(np.arange(n, dtype=np.int64).reshape(n, 1))
        got = client.infer("bdm", x).as_numpy("image")
    finally:
        client.close()
    want = np.concatenate([sampler.generate(1, seed=seed, first_index=i) for i in range(n)])
    if got is None or got.shape != want.shape or not np.array_equal(got, want):
        raise RuntimeError("the server's images differ from direct sampling's for the same seed and indices")
    return True


def served(protocol, ports, clients, per_client, seed):
    """Throughput and latency of ``clients`` concurrent clients, and the mean batch the batcher formed.

    Throughput: all requests over the time from the moment every client thread has its client
    (a barrier) to the last answer. ``requests_per_s_all_sending`` counts only the answers until the
    first client is done (every client still sending); it came out within a few percent of it.
    """
    done, finished, threads = [], [], []
    start = threading.Barrier(clients + 1)
    before = counts(ports[2])
    for c in range(clients):
        idx = range(c * per_client, (c + 1) * per_client)
        threads.append(threading.Thread(target=client_loop, args=(protocol, ports, seed, idx, start, done, finished),
                                        daemon=True))
    for t in threads:
        t.start()
    start.wait(timeout=120)
    begin = time.perf_counter()
    for t in threads:
        t.join(timeout=600)
    n = clients * per_client
    if len(done) != n:
        raise RuntimeError(f"{n - len(done)} of {n} requests failed or timed out")
    first = min(finished)
    steady = sum(1 for t, _ in done if t <= first)
    latencies = [lat for _, lat in done]
    time.sleep(0.2)
    after = counts(ports[2])
    executions = max(after[1] - before[1], 1)
    return {"clients": clients, "requests": n, "requests_per_s": n / (max(finished) - begin),
            "requests_per_s_all_sending": steady / (first - begin),
            "p50_ms": 1000 * float(np.percentile(latencies, 50)), "p99_ms": 1000 * float(np.percentile(latencies, 99)),
            "mean_batch": (after[0] - before[0]) / executions, "executions": executions}


def cpu_by_process(pid):
    """CPU seconds (user + system) used so far by process ``pid`` and its descendants (Linux ``/proc``), summed
    per process name (``tritonserver``, ``triton_python_b`` the Python backend's stub, ``python`` bdm-serve)."""
    tick, parents, used = os.sysconf("SC_CLK_TCK"), {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    head, tail = f.read().rsplit(")", 1)
            except OSError:
                continue
            fields = tail.split()
            parents[int(entry)] = int(fields[1])
            used[int(entry)] = (head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / tick)
    family, grew = {pid}, True
    while grew:
        new = {p for p, parent in parents.items() if parent in family} - family
        family |= new
        grew = bool(new)
    out = {}
    for p in family & set(used):
        name, seconds = used[p]
        out[name] = out.get(name, 0.0) + seconds
    return out


def direct(sampler, batch, images, seed):
    """``(images/s, images per CPU-second)`` of ``Sampler.sample`` in calls of ``batch`` images, in this process."""
    begin, cpu = time.perf_counter(), time.process_time()
    for start in range(0, images, batch):
        sampler.sample(min(batch, images - start), seed=seed, first_index=start)
    return images / (time.perf_counter() - begin), images / max(time.process_time() - cpu, 1e-9)


def one_round(sampler, protocol, ports, server, images, seed):
    """The server at 1 and 4 clients; then, back to back: direct batch 1, the server at 16 clients, direct
    at the batch the batcher formed, direct batch 1 again (its mean with the first cancels a steady drift
    of the other processes' load over the ~5 s that the three measurements of the targets take).

    Beside wall-clock rates, images per CPU-second: of this process for direct sampling, of the
    server's processes (``bdm-serve``, ``tritonserver``, the Python backend stub) when served. They
    do not move with the other processes' load, but do not see the server's idle time either."""
    row = {}
    for c in CLIENTS[:-1]:
        row[f"served_c{c}"] = served(protocol, ports, c, max(1, -(-images // c)), seed)
    first = direct(sampler, 1, images, seed)
    c, cpu = CLIENTS[-1], cpu_by_process(server)
    row[f"served_c{c}"] = served(protocol, ports, c, max(2, -(-2 * images // c)), seed)
    after = cpu_by_process(server)
    row["served_c16_cpu_s_by_process"] = {k: v - cpu.get(k, 0.0) for k, v in after.items()}
    row["served_c16_per_cpu_s"] = row[f"served_c{c}"]["requests"] / max(sum(after.values()) - sum(cpu.values()), 1e-9)
    b = max(1, int(round(row[f"served_c{c}"]["mean_batch"])))
    row["formed_batch"] = b
    row["direct_formed"], row["direct_formed_per_cpu_s"] = direct(sampler, b, max(2 * images, 2 * b), seed)
    last = direct(sampler, 1, images, seed)
    row["direct_b1"], row["direct_b1_per_cpu_s"] = (first[0] + last[0]) / 2, (first[1] + last[1]) / 2
    return row


@click.command()
@click.option("--ckpt", default=os.path.join(ROOT, "models", "fmnist32", "model.pt"), show_default=True)
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True)
@click.option("--images", type=click.IntRange(4, 10000), default=32, show_default=True,
              help="Images per measurement (16 clients send twice as many).")
@click.option("--threads", type=click.IntRange(1, 64), default=None,
              help="ONNX Runtime threads of the server and of direct sampling.  [default: one per core, as "
                   "bdm-serve and bdm-run]")
@click.option("--max-batch", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--queue-delay-us", type=click.IntRange(0, 10 ** 7), default=2000, show_default=True)
@click.option("--preferred-batch", type=click.IntRange(1, 256), multiple=True,
              help="bdm-serve --preferred-batch (repeatable; default none).")
@click.option("--instances", type=click.IntRange(1, 8), default=1, show_default=True,
              help="bdm-serve --instances: model instances over the one sampler.")
@click.option("--client", "protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True,
              help="tritonclient protocol of the benchmark's clients.")
@click.option("--standalone", is_flag=True,
              help="Serve the repository `bdm-serve --write-repository` writes on PyTriton's bundled tritonserver "
                   "(no PyTriton); --instances is then instance_group's count: processes, each its own sampler.")
@click.option("--out", default=None,
              help="Write OUT.json and OUT.md.  [default: benchmarks/results/serve, or serve_standalone]")
def main(ckpt, rounds, images, threads, max_batch, queue_delay_us, preferred_batch, instances, protocol, standalone,
         out):
    import bdm_runtime
    from bdm_runtime.limits import cpu_count

    threads = threads or cpu_count()
    out = out or os.path.join(ROOT, "benchmarks", "results", "serve_standalone" if standalone else "serve")
    server_args = ["--max-batch", str(max_batch), "--queue-delay-us", str(queue_delay_us),
                   "--instances", str(instances)]
    for size in preferred_batch:
        server_args += ["--preferred-batch", str(size)]
    with tempfile.TemporaryDirectory() as tmp:
        engine = export(ckpt, tmp)
        ports = free_ports()
        load_before, share = loadavg(), CpuShare()
        proc = (start_standalone if standalone else start_server)(engine, ports, threads, server_args, tmp)
        try:
            wait_ready(proc, ports[0], os.path.join(tmp, "server.log"))
            with bdm_runtime.load(engine, threads=threads) as sampler:
                sampler.sample(2)  # warm-up
                equal = check_images(protocol, ports, sampler)
                results = []
                for r in range(rounds):
                    results.append(one_round(sampler, protocol, ports, proc.pid, images, seed=r))
                    click.echo(f"round {r + 1}/{rounds}: {json.dumps(results[-1], default=float)}", err=True)
        finally:
            stop(proc)
    result = {"model": os.path.relpath(ckpt, ROOT), "machine": machine_info(), "threads": threads,
              "server": SERVERS[standalone], "images_equal_direct": equal,
              "max_batch": max_batch, "queue_delay_us": queue_delay_us, "preferred_batch": list(preferred_batch),
              "instances": instances, "client": protocol, "rounds": rounds, "images": images,
              "load_before": load_before, "load_after": loadavg(), "cpu_share": share.result(),
              "per_round": results, "summary": summarize(results)}
    write(result, out)
    click.echo(markdown(result))


if __name__ == "__main__":
    main()
