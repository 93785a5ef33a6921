"""OpenVINO rows (each precision the CPU runs) and PyTorch bf16 autocast, in the same interleaved runs,
and the shipped model's whole default run (``bdm-run``, 64 images) per backend.

Why PyTorch bf16 autocast: it is the peer a user of a CPU with BF16 units would otherwise pick
(``torch.autocast("cpu", dtype=torch.bfloat16)`` around ``bdm_train.sampling.sample``). OpenVINO
runs the network in the chosen precision and the update in FP32 (``bdm_runtime.backends.openvino``);
a precision OpenVINO lists but computes in fp32 on this CPU is recorded as refused, not timed.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from .config import ETA, ROOT, SEED
from .timing import Runner

RUN_N = 64  # bdm-run's whole default run: the README's demo command


def precisions():
    """``["fp32", reduced types this CPU runs natively...]``, or ``[]`` without OpenVINO."""
    try:
        import openvino
    except ImportError:
        return []
    from bdm_runtime.backends.openvino import native_precisions

    return ["fp32"] + native_precisions(openvino.Core(), "CPU")


def ov_runners(path, threads, cache_dir):
    """``({name: Runner}, {name: refusal})`` for OpenVINO at each precision on the FP32 graph ``path``."""
    import bdm_runtime
    from bdm_runtime.errors import BdmError

    runners, refused = {}, {}
    for p in precisions():
        name = f"openvino-{p}"
        try:
            s = bdm_runtime.load(path, backend="openvino", precision=p, threads=threads, cache_dir=cache_dir)
        except BdmError as e:
            refused[name] = str(e)
            continue
        times = []
        runners[name] = Runner(name, (lambda sm, ts: lambda b, st: sm.sample(b, seed=SEED, steps=st, eta=ETA,
                                                                             timing=ts.append))(s, times), times)
        runners[name].sampler = s
    return runners, refused


def torch_bf16_runner(model, process, channels):
    """PyTorch's bf16 autocast around the reference loop (images returned as float32)."""
    import torch

    from bdm_train.sampling import sample

    def call(b, steps):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            x = sample(model, process, b, SEED, steps, eta=ETA, batch_size=b, channels=channels, num_classes=0)
        return x.float().numpy()

    return Runner("pytorch-bf16", call)


def close(runners):
    for r in runners.values():
        s = getattr(r, "sampler", None)
        if s is not None:
            s.close()


# -- the shipped model's whole default run ---------------------------------------------------------
def _bdm_run(path, out, threads, extra, n=RUN_N):
    """Wall seconds of one ``bdm-run`` process and the sampling seconds its summary line reports."""
    cmd = [sys.executable, "-m", "bdm_runtime.cli", "--engine", path, "--n", str(n), "--quiet",
           "--threads", str(threads), "--npz", out] + extra
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "bdm-run failed")
    m = re.search(r"images in ([0-9.e+-]+) s", done.stdout)
    return wall, float(m.group(1)), done.stdout.strip()


def _torch_run(model, process, sampler, bf16, n=RUN_N):
    """Seconds of ``bdm_train.sampling.sample`` for the same images (eager, or bf16 autocast)."""
    import contextlib

    import torch

    from bdm_train.sampling import sample

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    start = time.perf_counter()
    with torch.no_grad(), ctx:
        sample(model, process, n, SEED, sampler["steps"], eta=sampler["eta"], batch_size=n, channels=1,
               num_classes=0, solver=sampler["solver"], grid=sampler["grid"])
    return time.perf_counter() - start


def shipped_run(threads=2, repeats=3, quick=False, log=print):
    """The shipped model's default run (64 images) by ``bdm-run`` per backend and by PyTorch, interleaved.

    ``quick``: 2 images, 1 step, 1 repeat: the wiring, not a measurement."""
    import torch

    from benchmarks.defaults import SHIPPED, shipped_default
    from bdm_train import checkpoint
    from bdm_export.onnx_export import export_onnx

    sampler, n = shipped_default(), RUN_N
    if quick:
        sampler, n, repeats = dict(sampler, steps=1), 2, 1
    model, process, config = checkpoint.load(os.path.join(SHIPPED, "model.pt"))
    torch.set_num_threads(threads)
    rows = {"bdm-run ort": ["--backend", "ort", "--steps", str(sampler["steps"])]}
    for p in precisions():
        rows[f"bdm-run openvino {p}"] = rows["bdm-run ort"][2:] + ["--backend", "openvino", "--precision", p]
    rec = {k: {"wall_s": [], "sampling_s": []} for k in list(rows) + ["pytorch", "pytorch-bf16"]}
    with tempfile.TemporaryDirectory(prefix="bdm-bench-run-") as tmp:
        path = os.path.join(tmp, "bdm.onnx")
        export_onnx(model, process, path, channels=1, clip_denoised=config["sampler"]["clip_denoised"],
                    default_steps=sampler["steps"], default_eta=sampler["eta"], default_solver=sampler["solver"],
                    default_grid=sampler["grid"])
        for k, extra in list(rows.items()):  # warm-up (OpenVINO's compiled-model cache filled); drop refusals
            try:
                rec[k]["summary"] = _bdm_run(path, os.path.join(tmp, "w.npz"), threads, extra, n)[2]
            except RuntimeError as e:
                rec[k] = {"refused": str(e)}
                rows.pop(k)
        names = list(rows) + ["pytorch", "pytorch-bf16"]
        for rep in range(repeats):
            for k in names[rep % len(names):] + names[:rep % len(names)]:
                if k in rows:
                    wall, sampling, _ = _bdm_run(path, os.path.join(tmp, f"{rep}.npz"), threads, rows[k], n)
                else:
                    wall = sampling = _torch_run(model, process, sampler, k == "pytorch-bf16", n)
                # microseconds: --quick's 2 images x 1 step can take under half a millisecond
                rec[k]["wall_s"].append(round(wall, 6))
                rec[k]["sampling_s"].append(round(sampling, 6))
    _ratios(rec)
    log("  shipped run: " + ", ".join(f"{k} {statistics.median(v['wall_s']):.2f} s" for k, v in rec.items()
                                      if v.get("wall_s")))
    return dict(model="models/fmnist32", n=n, threads=threads, repeats=repeats, quick=quick, sampler=sampler,
                rows=rec)


def _ratios(rec):
    """Per backend: the median of the pairwise ratios of ONNX Runtime's time to its own (wall and sampling)."""
    ref = rec["bdm-run ort"]
    for k, r in rec.items():
        if r.get("wall_s"):
            for what in ("wall_s", "sampling_s"):
                # bdm-run reports sampling to 0.01 s: --quick's 2 images x 1 step can read 0.00 (no ratio then)
                pairs = [a / b for a, b in zip(ref[what], r[what]) if b > 0]
                if pairs:
                    r[f"x_ort_{what[:-2]}"] = round(statistics.median(pairs), 3)


def markdown(sec):
    """The shipped-run section as markdown lines."""
    s = sec["sampler"]
    L = [f"## Whole default run: {sec['model']}, {sec['n']} images, {s['solver']} on the {s['grid']} grid, "
         f"{s['steps']} steps, eta {s['eta']:g} ({sec['threads']} threads)", "",
         "`bdm-run` rows: a fresh process each (import, load from OpenVINO's warm compiled-model cache, sample, "
         "write an .npz); wall = the whole command, sampling = the time its summary line reports. PyTorch rows: "
         "`bdm_train.sampling.sample` in the benchmark's process (sampling only).", "",
         "| run | wall s (median) | sampling s (median) | x ORT wall | x ORT sampling |", "|---|---:|---:|---:|---:|"]
    for k, r in sec["rows"].items():
        if "refused" in r:
            L.append(f"| {k} | refused: {r['refused']} | | | |")
            continue
        L.append(f"| {k} | {statistics.median(r['wall_s']):.2f} | {statistics.median(r['sampling_s']):.2f} | "
                 f"{r.get('x_ort_wall', 0):.2f}x | {r.get('x_ort_sampling', 0):.2f}x |")
    return L + [""]


def _pairwise(num, den):
    return round(statistics.median(a / b for a, b in zip(num, den)), 4)


def targets(result, net="cifar10-32x32", batch=16, step_ratio=3.0, run_ratio=1.4):
    """Issue 23's targets (evaluated, never asserted) for the precision ``auto`` picks on this CPU."""
    auto = next((p for p in precisions() if p != "fp32"), None)
    if auto is None:
        return []
    out, name = [], f"openvino-{auto}"
    rows = {(n["name"], r["batch"], r["backend"]): r for n in result["networks"] for r in n["rows"]}
    ov, ort, pt = (rows.get((net, batch, k)) for k in (name, "ort-fp32", "pytorch-bf16"))
    if ov and ort:
        v = ov["ratio_vs_ort_fp32"]["median"]
        out.append({"target": f"OpenVINO {auto} >= {step_ratio}x ONNX Runtime FP32, {net} step, batch {batch}",
                    "value": v, "threshold": step_ratio, "met": v >= step_ratio})
    if ov and pt:
        v = _pairwise(pt["times_s"], ov["times_s"])
        out.append({"target": f"OpenVINO {auto} ahead of PyTorch bf16 autocast, {net} step, batch {batch}",
                    "value": v, "threshold": 1.0, "met": v > 1.0})
    run = result.get("shipped_run", {}).get("rows", {})
    mine = run.get(f"bdm-run openvino {auto}", {})
    if mine.get("wall_s"):
        v = mine["x_ort_wall"]
        out.append({"target": f"bdm-run --backend openvino ({auto}) >= {run_ratio}x ONNX Runtime, shipped model's "
                              f"whole default run ({result['shipped_run']['n']} images, wall)",
                    "value": v, "threshold": run_ratio,
                    "met": v >= run_ratio})
        if run.get("pytorch-bf16", {}).get("sampling_s"):
            v = _pairwise(run["pytorch-bf16"]["sampling_s"], mine["sampling_s"])
            out.append({"target": f"OpenVINO {auto} ahead of PyTorch bf16 autocast, shipped default run "
                                  "(sampling time)", "value": v, "threshold": 1.0, "met": v > 1.0})
    return out
