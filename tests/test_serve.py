"""``bdm-serve`` on Triton (PyTriton) and the repository for a standalone tritonserver, on 127.0.0.1 only.

One server per module (start ~5 s, stop ~6 s) takes the concurrent, merged and bad requests; one
more runs two model instances over its sampler; one more is stopped with SIGTERM mid-request and
started again. Images are compared bit for bit with
the runtime's direct sampling of the same (seed, index) on the same backend (ONNX Runtime, 1 thread).
Every wait has a deadline and every process is stopped in a ``finally``.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import serving
from serving import HOST

import bdm_runtime
from bdm_runtime.errors import BdmError
from bdm_runtime.serve import requests as rq

MAX_BATCH = 8
DELAY_US = 300000  # 0.3 s: concurrent requests of a test reliably share a batch


@pytest.fixture(scope="module")
def graph(tiny_checkpoint, tmp_path_factory):
    """The tiny unconditional UNet (16x16x1) as a step graph, 4 default steps, eta 1 (noise every step)."""
    import torch

    from bdm_export import export_onnx
    from bdm_train.checkpoint import load

    torch.set_num_threads(1)
    model, process, _ = load(tiny_checkpoint)
    path = str(tmp_path_factory.mktemp("serve_graph") / "bdm.onnx")
    export_onnx(model, process, path, channels=1, default_steps=4, default_eta=1.0)
    return path


@pytest.fixture(scope="module")
def sampler(graph):
    with bdm_runtime.load(graph, threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def server(graph, tmp_path_factory):
    """``(http, grpc, metrics)`` ports of a running ``bdm-serve`` (stopped after the module)."""
    pytest.importorskip("pytriton")
    pytest.importorskip("tritonclient.http")
    ports = serving.free_ports()
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    proc = serving.start_bdm_serve(graph, ports, log, "--max-batch", MAX_BATCH, "--queue-delay-us", DELAY_US,
                                   "--exit-timeout", 20)
    try:
        serving.wait_ready(ports[0], proc)
        yield ports
    finally:
        code = serving.stop(proc)
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert "bdm-serve: stopped (SIGTERM)" in text.strip().splitlines()[-1], text[-3000:]


def concurrently(calls, deadline_s=120.0):
    """Run the callables together (released at once by a barrier); their results or exceptions, in order."""
    barrier, out = threading.Barrier(len(calls)), [None] * len(calls)

    def run(k):
        barrier.wait(timeout=30)
        try:
            out[k] = calls[k]()
        except Exception as e:  # the caller asserts on it
            out[k] = e

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=deadline_s)
    assert not any(t.is_alive() for t in threads), "a request did not finish in time"
    return out


# -- without a server: the batch logic the server and the repository's model share ---------------------
def test_sample_images_equals_sample_at_any_mix(sampler):
    a = sampler.sample(6, seed=5, steps=3)
    b = sampler.sample(2, seed=9, steps=3)
    mixed = sampler.sample_images([9, 5, 5, 9, 5], [1, 4, 0, 0, 5], steps=3)
    for got, want in zip(mixed, (b[1], a[4], a[0], b[0], a[5])):
        assert np.array_equal(got, want)


def test_run_groups_settings_and_refuses_per_request(sampler):
    one = lambda v, t: np.array([[v]], t)  # noqa: E731
    batch = [{"seed": one(1, np.int64), "index": one(0, np.int64)},
             {"seed": one(1, np.int64), "index": one(1, np.int64), "steps": one(2, np.int32),
              "float_output": one(True, np.bool_)},
             {"seed": one(1, np.int64), "index": one(2, np.int64), "eta": one(np.nan, np.float32)},
             {"seed": one(1, np.int64), "index": one(3, np.int64), "solver": np.array([[b"euler"]], object)}]
    out = rq.run(sampler, batch, MAX_BATCH, 100)
    assert np.array_equal(out[0][rq.IMAGE], sampler.generate(1, seed=1, first_index=0))
    assert rq.SAMPLE not in out[0]
    assert np.array_equal(out[1][rq.SAMPLE], sampler.sample(1, seed=1, first_index=1, steps=2))
    assert isinstance(out[2], BdmError) and "input 'eta'" in str(out[2])
    assert isinstance(out[3], BdmError) and "input 'solver'" in str(out[3]) and "euler" in str(out[3])


def test_labels_and_guidance_rows_equal_direct_sampling(tiny_cond_checkpoint, tmp_path):
    """A conditional guided graph: rows with labels (and guidance) beside rows without (the null label)."""
    import torch

    from bdm_export import export_onnx
    from bdm_train.checkpoint import load

    torch.set_num_threads(1)
    model, process, _ = load(tiny_cond_checkpoint)
    path = str(tmp_path / "cond.onnx")
    export_onnx(model, process, path, channels=1, num_classes=model.num_classes, default_steps=3, default_eta=1.0)
    col = lambda *v, t=np.int64: np.array([[x] for x in v], t)  # noqa: E731
    with bdm_runtime.load(path, threads=1) as s:
        out = rq.run(s, [{"seed": col(3, 3), "index": col(0, 1), "label": col(2, 0)},
                         {"seed": col(3), "index": col(2)},
                         {"seed": col(5), "index": col(4), "label": col(1), "guidance": col(2.0, t=np.float32)}],
                     MAX_BATCH, 100)
        assert np.array_equal(out[0][rq.IMAGE], s.generate(2, seed=3, labels=[2, 0]))
        assert np.array_equal(out[1][rq.IMAGE], s.generate(1, seed=3, first_index=2))
        assert np.array_equal(out[2][rq.IMAGE], s.generate(1, seed=5, first_index=4, labels=[1], guidance=2.0))
        bad = rq.run(s, [{"seed": col(0), "index": col(0), "label": col(3 + 1)}], MAX_BATCH, 100)[0]
        assert isinstance(bad, BdmError) and "input 'label'" in str(bad)


@pytest.mark.parametrize("inputs, words", [
    ({"seed": np.zeros((2, 1), np.int32)}, ("input 'seed'", "int64")),
    ({"seed": np.zeros((2, 2), np.int64)}, ("input 'seed'", "shape")),
    ({"seed": np.zeros((9, 1), np.int64), "index": np.zeros((9, 1), np.int64)}, ("input 'seed'", "9 rows", "1..8")),
    ({"label": np.zeros((2, 1), np.int64)}, ("input 'label'", "unconditional")),
    ({"steps": np.full((2, 1), 101, np.int32)}, ("input 'steps'", "--max-steps")),
    ({"index": np.full((2, 1), -1, np.int64)}, ("input 'index'", ">= 0")),
    ({"grid": np.array([[b"edm"], [b"nope"]], object)}, ("input 'grid'", "nope")),
    ({"guidance": np.full((2, 1), 2.0, np.float32)}, ("input 'guidance'", "unconditional")),
    ({"colour": np.zeros((2, 1), np.int64)}, ("input 'colour'",)),
])
def test_parse_names_the_input(sampler, inputs, words):
    request = dict({"seed": np.zeros((2, 1), np.int64), "index": np.zeros((2, 1), np.int64)}, **inputs)
    with pytest.raises(BdmError) as e:
        rq.parse(request, sampler, MAX_BATCH, 100, {})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_memory_refused_before_sampling(sampler, monkeypatch):
    import bdm_runtime.limits as limits

    monkeypatch.setattr(limits, "memory_bytes", lambda: 1024)  # a machine with 1 KiB: nothing fits
    with pytest.raises(BdmError, match="needs .* of memory"):
        rq.respond(sampler, rq.check(sampler, [{"seed": np.zeros((2, 1), np.int64),
                                                "index": np.zeros((2, 1), np.int64)}], MAX_BATCH, 100)[0], 1)


# -- bdm-serve -----------------------------------------------------------------------------------------
def test_health_endpoints(server):
    http = server[0]
    assert serving.http_status(f"http://{HOST}:{http}/v2/health/live") == 200
    assert serving.http_status(f"http://{HOST}:{http}/v2/health/ready") == 200
    assert serving.http_status(f"http://{HOST}:{http}/v2/models/bdm/ready") == 200


def test_concurrent_requests_are_merged_and_equal_direct_sampling(server, sampler):
    http, _, metrics = server
    rows = [[(7, k)] for k in range(6)] + [[(3, 0), (3, 5)]]  # 7 requests, 8 images
    calls = [lambda r=r: serving.infer(http, r) for r in rows]
    calls.append(lambda: serving.infer(http, [(7, 1)], steps=np.array([[2]], np.int32),
                                       float_output=np.array([[True]])))  # another setting, same batch
    before = serving.counts(metrics)
    results = concurrently(calls)
    for r, res in zip(rows, results):
        assert not isinstance(res, Exception), res
        seed = r[0][0]
        want = np.concatenate([sampler.generate(1, seed=seed, first_index=i) for _, i in r])
        assert np.array_equal(res.as_numpy("image"), want)
    assert np.array_equal(results[-1].as_numpy("sample"), sampler.sample(1, seed=7, first_index=1, steps=2))
    after = before
    for _ in range(40):  # the counters follow the responses closely; bounded wait
        after = serving.counts(metrics)
        if after[0] - before[0] >= 9:
            break
        time.sleep(0.1)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 9                     # every image (row) counted once
    assert executions < len(calls)            # the batcher merged requests: fewer model calls than requests


@pytest.mark.parametrize("name, array, words", [
    ("seed", np.zeros((1, 1), np.int32), ("seed", "INT32", "INT64")),                # wrong dtype (Triton)
    ("eta", np.zeros((1, 2), np.float32), ("eta", "shape")),                          # wrong shape (Triton)
    ("solver", np.array([[b"euler"]], object), ("input 'solver'", "euler")),
    ("label", np.array([[1]], np.int64), ("input 'label'", "unconditional")),
    ("eta", np.array([[np.nan]], np.float32), ("input 'eta'", "nan")),
    ("colour", np.zeros((1, 1), np.int64), ("colour",)),                              # unknown input (Triton)
])
def test_bad_requests_get_an_error_naming_the_input(server, name, array, words):
    from tritonclient.utils import InferenceServerException

    http = server[0]
    extra = {name: array} if name != "seed" else {}
    rows = [(1, 0)]
    if name == "seed":  # a seed of the wrong type replaces the right one
        extra["seed"] = array
    with pytest.raises(InferenceServerException) as e:
        serving.infer(http, rows, **extra)
    for w in words:
        assert w in str(e.value), (w, str(e.value)[-500:])
    assert serving.infer(http, [(1, 0)]).as_numpy("image").shape == (1, 16, 16, 1)  # still serving


def test_a_refused_request_fails_alone_in_its_batch(server, sampler):
    """Bad values in one request of a merged batch: it alone gets the error; its batch-mates their images."""
    from tritonclient.utils import InferenceServerException

    http, _, metrics = server
    rows = [[(6, k)] for k in range(4)] + [[(2, 3), (2, 0)]]
    calls = [lambda r=r: serving.infer(http, r) for r in rows]
    calls.insert(2, lambda: serving.infer(http, [(6, 9)], solver=np.array([[b"euler"]], object)))
    before = serving.counts(metrics)
    results = concurrently(calls)
    bad = results.pop(2)
    assert isinstance(bad, InferenceServerException), bad
    assert "input 'solver'" in str(bad) and "euler" in str(bad) and "Traceback" not in str(bad), str(bad)[-500:]
    assert str(bad.status()) == "400", bad.status()  # INVALID_ARG: the client's mistake, not the server's
    for r, res in zip(rows, results):
        assert not isinstance(res, Exception), res
        want = np.concatenate([sampler.generate(1, seed=s, first_index=i) for s, i in r])
        assert np.array_equal(res.as_numpy("image"), want)
    after = serving.counts(metrics)
    assert after[1] - before[1] < len(calls)  # the batcher merged the bad request with good ones


def test_proxy_patch_applies_to_this_pytriton():
    """The per-request branch goes into PyTriton's proxy model, which still compiles; other text is left alone."""
    pytest.importorskip("pytriton")
    from pytriton.models.model import Model

    from bdm_runtime.serve import per_request

    path = os.path.join(os.path.dirname(os.path.dirname(sys.modules[Model.__module__].__file__)), "proxy", "model.py")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    patched = per_request.patch_source(source)
    assert patched is not None and per_request.ERROR_OUTPUT in patched
    compile(patched, path, "exec")
    assert per_request.patch_source(patched) is None  # never twice
    assert per_request.patch_source("def _wrap_response(response):\n    pass\n") is None


def test_too_many_images_refused(server):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="batch-size must be <= 8"):
        serving.infer(server[0], [(0, k) for k in range(MAX_BATCH + 1)])


def test_two_instances_share_the_sampler(graph, sampler, tmp_path):
    """--instances 2: two PyTriton callables over one sampler; images still equal direct sampling, batches
    still merge (a preferred batch of 4 with a long delay), and a refused request still fails alone."""
    pytest.importorskip("pytriton")
    from tritonclient.utils import InferenceServerException

    ports = serving.free_ports()
    log = tmp_path / "two.log"
    proc = serving.start_bdm_serve(graph, ports, log, "--instances", 2, "--max-batch", 4, "--preferred-batch", 4,
                                   "--queue-delay-us", DELAY_US)
    try:
        serving.wait_ready(ports[0], proc)
        rows = [[(4, k)] for k in range(7)]
        calls = [lambda r=r: serving.infer(ports[0], r) for r in rows]
        calls.append(lambda: serving.infer(ports[0], [(4, 7)], eta=np.array([[2.0]], np.float32)))
        results = concurrently(calls)
        for r, res in zip(rows, results):
            assert not isinstance(res, Exception), res
            assert np.array_equal(res.as_numpy("image"), sampler.generate(1, seed=4, first_index=r[0][1]))
        assert isinstance(results[-1], InferenceServerException) and "input 'eta'" in str(results[-1])
        inferences, executions = serving.counts(ports[2])
        assert inferences == 8 and executions < len(calls)  # Triton counts the refused row too: it ran in a batch
    finally:
        code = serving.stop(proc)
    text = log.read_text()
    assert code == 0 and "2 instance(s)" in text, text[-3000:]


# -- SIGTERM drains, and the server starts again -------------------------------------------------------
def test_sigterm_drains_then_restart_then_tritonserver_death(graph, sampler, tmp_path):
    pytest.importorskip("pytriton")
    begin = time.perf_counter()
    sampler.sample(1, steps=50)
    steps = int(min(1000, max(50, 50 * 1.5 / max(time.perf_counter() - begin, 1e-3))))  # ~1.5 s of sampling
    want = sampler.generate(1, seed=4, first_index=2, steps=steps)
    ports = serving.free_ports()
    for attempt in ("drain", "restart"):
        log = tmp_path / f"{attempt}.log"
        proc = serving.start_bdm_serve(graph, ports, log, "--queue-delay-us", 0, "--exit-timeout", 30)
        try:
            serving.wait_ready(ports[0], proc)
            if attempt == "restart":
                got = serving.infer(ports[0], [(4, 2)], steps=np.array([[steps]], np.int32)).as_numpy("image")
                assert np.array_equal(got, want)
                # then tritonserver dies under it: bdm-serve notices, says so in one line, exits 1
                os.kill(serving.descendant(proc.pid, "bin/tritonserver"), signal.SIGKILL)
                proc.wait(timeout=60)
                errors = [ln for ln in log.read_text().splitlines() if ln.startswith("Error:")]
                assert proc.returncode == 1 and len(errors) == 1, errors
                assert errors[0].startswith("Error: tritonserver exited on its own"), errors
                continue
            done = {}

            def request():
                done["image"] = serving.infer(ports[0], [(4, 2)], steps=np.array([[steps]], np.int32)).as_numpy("image")
                done["at"] = time.monotonic()

            t = threading.Thread(target=request, daemon=True)
            t.start()
            time.sleep(0.4)  # the request is on the model now (no queue delay; ~1.5 s of work)
            signalled = time.monotonic()
            code = serving.stop(proc)
            t.join(timeout=60)
            assert done.get("at", 0) > signalled  # answered after SIGTERM: drained, not dropped
            assert np.array_equal(done["image"], want)
            assert code == 0
            last = log.read_text().strip().splitlines()[-1]
            assert last.startswith("bdm-serve: stopped (SIGTERM) after 1 requests"), last
        finally:
            serving.stop(proc)


# -- mistakes on the command line ----------------------------------------------------------------------
def bdm_serve(*args):
    return subprocess.run([sys.executable, "-m", "bdm_runtime.serve.cli"] + [str(a) for a in args], cwd=serving.ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args, words", [
    (["--engine", "missing.onnx"], ("missing.onnx", "no such file")),
    (["--http-port", 9000, "--grpc-port", 9000], ("--grpc-port", "differ")),
    (["--max-batch", 4, "--preferred-batch", 8], ("--preferred-batch 8", "--max-batch 4")),
    (["--model-name", "a/b"], ("--model-name",)),
])
def test_cli_mistakes_are_one_line(graph, args, words):
    if "--engine" not in args:
        args = ["--engine", graph] + args
    proc = bdm_serve(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_port_in_use_is_one_line(graph):
    import socket

    pytest.importorskip("pytriton")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = bdm_serve("--engine", graph, "--http-port", port)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: --http-port {port}") and "in use" in lines[0]


# -- the repository for a standalone tritonserver ------------------------------------------------------
def test_write_repository_is_all_or_nothing(graph, tmp_path):
    repo = tmp_path / "repo"
    proc = bdm_serve("--engine", graph, "--write-repository", repo, "--max-batch", 4, "--queue-delay-us", 1000,
                     "--preferred-batch", 2, "--instances", 2)
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(repo / "bdm")) == ["1", "config.pbtxt"]
    assert sorted(os.listdir(repo / "bdm" / "1")) == ["bdm.onnx", "model.py"]
    with open(graph, "rb") as a, open(repo / "bdm" / "1" / "bdm.onnx", "rb") as b:
        assert a.read() == b.read()
    config = (repo / "bdm" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in config and "max_queue_delay_microseconds: 1000" in config
    assert 'name: "image" data_type: TYPE_UINT8 dims: [ 16, 16, 1 ]' in config
    assert "preferred_batch_size: [ 2 ]" in config and "instance_group [ { count: 2 kind: KIND_CPU } ]" in config
    again = bdm_serve("--engine", graph, "--write-repository", repo)
    assert again.returncode == 1 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["repo"]  # no temporary left beside it
    bad = bdm_serve("--engine", tmp_path / "none.onnx", "--write-repository", tmp_path / "r2")
    assert bad.returncode == 1 and not (tmp_path / "r2").exists()
    assert bdm_serve("--engine", graph, "--write-repository", tmp_path / "r1").returncode == 0
    assert "instance_group [ { count: 1 kind: KIND_CPU } ]" in (tmp_path / "r1" / "bdm" / "config.pbtxt").read_text()


def test_repository_loads_and_answers_on_bundled_tritonserver(graph, sampler, tmp_path):
    pytest.importorskip("pytriton")
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    assert bdm_serve("--engine", graph, "--write-repository", repo, "--max-batch", MAX_BATCH, "--threads", 1,
                     "--queue-delay-us", DELAY_US).returncode == 0
    ports = serving.free_ports()
    proc = serving.start_tritonserver(repo, ports, str(tmp_path), tmp_path / "tritonserver.log")
    try:
        serving.wait_ready(ports[0], proc)
        rows = [[(2, 0)], [(2, 1), (8, 3)], [(5, 9)]]
        calls = [lambda r=r: serving.infer(ports[0], r) for r in rows]
        calls.append(lambda: serving.infer(ports[0], [(1, 1)], eta=np.array([[np.nan]], np.float32)))
        results = concurrently(calls)
        for r, res in zip(rows, results):
            assert not isinstance(res, Exception), res
            want = np.concatenate([sampler.generate(1, seed=s, first_index=i) for s, i in r])
            assert np.array_equal(res.as_numpy("image"), want)
        # refused alone: its batch-mates above were answered (the repository's model refuses per request)
        assert isinstance(results[-1], InferenceServerException) and "input 'eta'" in str(results[-1])
        inferences, executions = serving.counts(ports[2])
        assert inferences >= 4 and executions < len(calls)
    finally:
        code = serving.stop(proc)
        log = (tmp_path / "tritonserver.log").read_text()
    assert code == 0, log[-3000:]


def test_serving_never_imports_torch(graph, tmp_path):
    """bdm-serve's modules, PyTriton's binding and a batch through ``requests.run``, with torch unimportable."""
    pytest.importorskip("pytriton")
    code = (
        "import importlib.abc, json, sys\n"
        "class _Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'bdm_train', 'bdm_export', 'onnx'):\n"
        "            raise ImportError('blocked in this test: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n"
        "import numpy as np, bdm_runtime, pytriton.triton, pytriton.model_config\n"
        "from bdm_runtime.serve import cli, repository, requests as rq, server, triton_model\n"
        "with bdm_runtime.load(sys.argv[1], threads=1) as s:\n"
        "    out = rq.run(s, [{'seed': np.zeros((1, 1), np.int64), 'index': np.zeros((1, 1), np.int64)}], 4, 10)\n"
        "assert out[0]['image'].shape == (1, 16, 16, 1)\n"
        "cli.main(['--engine', sys.argv[1], '--write-repository', sys.argv[2]])\n")
    proc = subprocess.run([sys.executable, "-c", code, graph, str(tmp_path / "repo")], cwd=serving.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wrote Triton model repository" in proc.stdout, proc.stderr[-2000:]
