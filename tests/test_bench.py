"""Smoke test of the benchmark command (``python -m benchmarks.bench --quick``): the wiring, not speed.

One fresh process runs the quick mode (a tiny network, 2 steps x 2 repeats, one thread) and writes
its JSON and markdown. Nothing here is timed: the test checks the schema, that every ratio and
overhead is computed from times recorded in the same run (recomputed here from the raw times),
that the runtime and PyTorch sampled the same images, that the ONNX Runtime settings reached the
session, and that the FLOPs counted from the graph's shapes equal torch's own FLOP counter.
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

pytest.importorskip("onnxruntime")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "bench_quick")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--quick", "--threads", "1", "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out + ".json", encoding="utf-8") as f:
        res = json.load(f)
    with open(out + ".md", encoding="utf-8") as f:
        md = f.read()
    return res, md, proc.stdout


def _close(a, b, rel=2e-3):
    # values are stored rounded to 4-6 significant digits: compare at that precision
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-9)


def test_schema_and_machine(quick):
    res, _, _ = quick
    assert res["schema"] == "bdm-bench/1"
    assert res["run"]["quick"] is True
    for key in ("date", "load_before", "load_after", "duration_s", "eta"):
        assert key in res["run"]
    m = res["machine"]
    for key in ("cpu_model", "logical_cpus", "python", "versions", "platform"):
        assert key in m
    assert m["versions"]["onnxruntime"] and m["versions"]["torch"]
    assert res["threads"]["torch_num_threads"] == 1 == res["threads"]["ort_intra_op_num_threads"]
    assert res["matmul_peak"]["peak_gflops"] > 0
    assert res["gpu"]["available"] in (True, False) and (res["gpu"]["available"] or res["gpu"]["note"])
    assert [n["name"] for n in res["networks"]] == ["tiny-8x8"]


def test_ort_settings_reached_the_session(quick):
    res, _, _ = quick
    opts = res["networks"][0]["ort_session_options"]
    assert opts["intra_op_num_threads"] == 1            # injected into the runtime's own SessionOptions
    assert opts["graph_optimization_level"] == "ORT_ENABLE_ALL"  # the runtime's own choice kept


def test_ratios_and_overheads_come_from_the_same_run(quick):
    res, _, _ = quick
    net = res["networks"][0]
    rows = {(r["batch"], r["backend"]): r for r in net["rows"]}
    assert {b for b, _ in rows} == {1, 16}
    assert (16, "ort-fp16") in rows and (1, "ort-fp16") not in rows  # fp16 only where configured
    for b in (1, 16):                                                   # INT8 at every batch, against FP32
        r8, r32 = rows[(b, "ort-int8")], rows[(b, "ort-fp32")]
        pairs = [f / t for f, t in zip(r32["times_s"], r8["times_s"])]
        assert all(_close(x, y) for x, y in zip(pairs, r8["ratio_vs_ort_fp32"]["per_repeat"]))
        assert "ratio_vs_ort_fp32" not in r32
    for (b, name), r in rows.items():
        assert len(r["times_s"]) == r["repeats"] == 2
        assert _close(r["median_s"], statistics.median(r["times_s"]))
        assert _close(r["images_per_s"], b / r["median_s"])
        assert _close(r["ms_per_step"], 1000 * r["median_s"] / r["steps"])
        if name == "pytorch":
            assert "ratio_vs_pytorch" not in r and "loop_overhead" not in r
            continue
        ref = rows[(b, "pytorch")]["times_s"]
        pairs = [p / t for p, t in zip(ref, r["times_s"])]  # repeat i of PyTorch against repeat i of this backend
        assert all(_close(x, y) for x, y in zip(pairs, r["ratio_vs_pytorch"]["per_repeat"]))
        assert _close(r["ratio_vs_pytorch"]["median"], statistics.median(pairs))
        if name != "ort-fp32":  # every other row also against ONNX Runtime FP32, repeat by repeat
            ort = [o / t for o, t in zip(rows[(b, "ort-fp32")]["times_s"], r["times_s"])]
            assert _close(r["ratio_vs_ort_fp32"]["median"], statistics.median(ort))
        if name == "pytorch-bf16":  # PyTorch has no step-timing hook
            assert "loop_overhead" not in r
            continue
        lo = r["loop_overhead"]
        # each step is part of the call, so the steps' sum is positive and below the call's time
        assert all(0 < s < t for s, t in zip(lo["step_sums_s"], r["times_s"]))
        frac = [(t - s) / s for t, s in zip(r["times_s"], lo["step_sums_s"])]
        assert all(abs(x - y) < 1e-4 for x, y in zip(frac, lo["per_repeat"]))  # stored to 5 decimals
        assert abs(lo["median"] - statistics.median(frac)) < 1e-4


def test_runtime_and_pytorch_sample_the_same_images(quick):
    res, _, _ = quick
    net = res["networks"][0]
    assert net["eps_std"] > 0.05  # random weights, not the UNet's zero-initialised output
    for r in net["rows"]:
        if r["backend"] == "ort-fp32":
            # Same seed, same noise protocol, float32 both sides: only kernel rounding differs, but
            # B8 divides by alpha_t (down to min_scale = 1e-3 at high frequencies), so with random
            # weights (eps of order 1) a 1e-6 rounding becomes ~1e-3 in x0 (measured: up to 6e-3 at
            # batch 16). A wrong noise draw or step would differ by O(1).
            assert r["max_abs_diff_vs_pytorch"] < 0.03, r
        if r["backend"] == "openvino-fp32":
            assert r["max_abs_diff_vs_pytorch"] < 0.03, r  # as ort-fp32: float32 on both sides
        if r["backend"] == "ort-fp16":
            assert r["max_abs_diff_vs_pytorch"] < 0.5, r  # fp16 network: a loose sanity bound


def test_flops_from_graph_match_torch_counter(quick):
    res, _, _ = quick
    net = res["networks"][0]
    # Conv/Gemm/MatMul multiply-adds from the ONNX shapes against torch's FlopCounterMode on the same
    # step (network + the DCT matmuls): both count exactly the same products, so they agree exactly.
    assert net["gflop_per_eval"] > 0
    assert abs(net["gflop_per_eval"] - net["gflop_torch_counter"]) <= 1e-9 * net["gflop_per_eval"] + 1e-12
    assert set(net["gflop_by_op"]) <= {"Conv", "Gemm", "MatMul"} and net["gflop_by_op"]["Conv"] > 0


def test_fresh_processes_and_import(quick):
    res, _, _ = quick
    imp = res["import_runtime"]
    assert imp["torch_in_sys_modules"] is False and imp["median_s"] > 0
    fp = res["networks"][0]["fresh_process"]
    for k in ("ort-fp32", "ort-fp16"):
        assert "error" not in fp[k], fp[k]
        assert fp[k]["torch_in_sys_modules"] is False
        assert fp[k]["peak_rss_mib"] > res["baseline_rss_mib"] > 0
        assert 0 < fp[k]["load_s"] < fp[k]["first_image_s"]


def test_targets_evaluated_from_the_rows(quick):
    res, md, stdout = quick
    t = {x["target"].split(" ")[0]: x for x in res["targets"]}
    # the three runtime targets, then OpenVINO's (issue 23) where this CPU has a reduced precision to run
    assert len(res["targets"]) >= 3 and all(isinstance(x["met"], bool) for x in res["targets"])
    row = next(r for r in res["networks"][0]["rows"] if r["batch"] == 16 and r["backend"] == "ort-fp32")
    assert t["ONNX"]["value"] == row["ratio_vs_pytorch"]["median"]
    assert t["ONNX"]["met"] == (row["ratio_vs_pytorch"]["median"] >= 1.5)
    assert t["loop"]["value"] == row["loop_overhead"]["median"]
    assert t["`import"]["value"] == res["import_runtime"]["median_s"]
    for x in res["targets"]:
        assert ("MET" if x["met"] else "MISSED") + ": " + x["target"] in md
    assert "| batch | backend | images/s |" in md and md in stdout  # the table is printed too


def test_sampler_default_section_times_old_and_new_in_the_same_run(quick):
    """The new default's images/s against the old one's, from times of the same run (recomputed here)."""
    from benchmarks.defaults import OLD_DEFAULT, parse_default, shipped_default

    res, md, _ = quick
    sec = res["defaults"]
    rows = {r["setting"]: r for r in sec["rows"]}
    assert set(rows) == {"old", "new"} and sec["quick"] is True
    new = shipped_default()   # --quick divides the steps by 25 (at least 1)
    for name, want in (("old", OLD_DEFAULT), ("new", new)):
        r = rows[name]
        assert (r["solver"], r["grid"], r["eta"]) == (want["solver"], want["grid"], want["eta"])
        assert r["steps"] == max(1, want["steps"] // 25)
        assert len(r["times_s"]) == sec["repeats"] and _close(r["median_s"], statistics.median(r["times_s"]))
        assert _close(r["images_per_s"], sec["batch"] / r["median_s"])
        assert all(0 < s < t for s, t in zip(r["step_sums_s"], r["times_s"]))   # the timing hook, per call
    pairs = [o / n for o, n in zip(rows["old"]["times_s"], rows["new"]["times_s"])]
    assert _close(sec["speedup"]["median"], statistics.median(pairs))
    assert "## Sampler default: new against old" in md
    assert ("both rows time the same sampler" in md) == (new == OLD_DEFAULT)   # said when they coincide
    assert parse_default("dpmpp2m:spectral:10") == dict(solver="dpmpp2m", grid="spectral", steps=10, eta=0.0)
    assert parse_default("ddim:power:50:0.5") == dict(solver="ddim", grid="power", steps=50, eta=0.5)
    assert parse_default("dpmpp2m:edm:20:1") == dict(solver="dpmpp2m", grid="edm", steps=20, eta=1.0)
    for bad in ("dpmpp2m:spectral", "dpmpp2m:spectral:x", "dpmpp2m:spectral:10:2", "heun:uniform:10"):
        with pytest.raises(ValueError):
            parse_default(bad)


def test_openvino_rows_and_the_shipped_run(quick):
    res, md, _ = quick
    pytest.importorskip("openvino")
    rows = {(r["batch"], r["backend"]) for r in res["networks"][0]["rows"]}
    assert {(16, "pytorch-bf16"), (16, "openvino-fp32")} <= rows
    assert res["machine"]["versions"]["openvino"] and res["machine"]["openvino_cpu_capabilities"]
    run = res["shipped_run"]
    assert run["quick"] is True
    assert {"bdm-run ort", "bdm-run openvino fp32", "pytorch", "pytorch-bf16"} <= set(run["rows"])
    for k, r in run["rows"].items():
        if "refused" in r:
            continue
        assert len(r["wall_s"]) == run["repeats"] and all(w >= s > 0 for w, s in zip(r["wall_s"], r["sampling_s"]))
    assert "network fp32, update fp32" in run["rows"]["bdm-run openvino fp32"]["summary"]
    assert "## Whole default run" in md
