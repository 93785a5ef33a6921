"""FD-FMNIST of OpenVINO's precisions against ONNX Runtime FP32, same models, sampler and seeds.

    python -m benchmarks.ov_quality                      # 3 seeds x 1,000 images, writes the JSON below
    python -m benchmarks.ov_quality --n 64 --seeds 1 --out /tmp/q   # a quick look

Models: the shipped one (``models/fmnist32``, at its own default sampler) and the study's best
blurring model (``runs/study/bdm10-spectral``, at its best 20-evaluation setting of
``benchmarks/results/study.json``: SDE-DPM-Solver++(2M), eta 1, logsnr grid, not clipped).
Backends: ONNX Runtime FP32 (the reference), OpenVINO at every reduced precision the CPU
really runs (``bdm_runtime.backends.openvino.native_precisions``; a type OpenVINO lists but
computes in fp32 is recorded as refused), and at fp32 with ``--with-fp32``. Each (model, backend) samples the same seeds, so the
paired differences of FD are what the precision changes; the seed spread says how large the
metric's own noise is. The speed columns come from a shared machine: see ``benchmarks.bench``.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "openvino_quality")
STUDY_BEST = dict(solver="dpmpp2m", grid="logsnr", steps=20, eta=1.0, clip=False)  # study.json, 20 evaluations
MODELS = {
    "fmnist32": dict(ckpt=os.path.join(ROOT, "models", "fmnist32", "model.pt"), sampler=None),
    "bdm10-spectral": dict(ckpt=os.path.join(ROOT, "runs", "study", "bdm10-spectral", "model.pt"),
                           sampler=STUDY_BEST),
}


def export(ckpt, sampler, folder):
    """``(path, sampler)``: the EMA weights as a step graph whose defaults are ``sampler`` (``None``: its config's)."""
    from bdm_train import checkpoint
    from bdm_export import export_onnx

    net, process, config = checkpoint.load(ckpt, ema=True)
    if sampler is None:
        s = config["sampler"]
        sampler = dict(solver=s["solver"], grid=s["grid"], steps=s["steps"], eta=s["eta"], clip=s["clip_denoised"])
    path = os.path.join(folder, os.path.basename(os.path.dirname(ckpt)) + ".onnx")
    export_onnx(net, process, path, channels=net.in_channels, num_classes=net.num_classes,
                clip_denoised=sampler["clip"], default_steps=sampler["steps"], default_eta=sampler["eta"],
                default_solver=sampler["solver"], default_grid=sampler["grid"])
    return path, sampler


def backends(threads, with_fp32=False):
    """``[(name, load keywords)]``: ONNX Runtime FP32, then OpenVINO at each native reduced type (and at
    fp32 with ``with_fp32``: equal to ONNX Runtime's images within 1e-3, tests/test_runtime_openvino.py)."""
    import openvino

    from bdm_runtime.backends.openvino import native_precisions

    rows = [("ort-fp32", dict(backend="ort", threads=threads))]
    if with_fp32:
        rows.append(("openvino-fp32", dict(backend="openvino", precision="fp32", threads=threads)))
    for p in native_precisions(openvino.Core(), "CPU"):
        rows.append((f"openvino-{p}", dict(backend="openvino", precision=p, threads=threads)))
    return rows


def measure_one(path, load_kw, seeds, n, batch, log):
    """FD (and KID, images/s) per seed for one backend; ``{"refused": message}`` if it cannot run here."""
    import bdm_runtime
    from bdm_runtime.errors import BdmError
    from bdm_runtime.images import to_uint8

    from . import metrics

    try:
        sampler = bdm_runtime.load(path, batch=batch, **load_kw)
    except BdmError as e:
        return {"refused": str(e)}
    rows = []
    with sampler:
        for seed in seeds:
            start = time.perf_counter()
            images = to_uint8(sampler.sample(n, seed=seed))
            seconds = time.perf_counter() - start
            res = metrics.evaluate(images)
            rows.append(dict(seed=seed, fd=res["fd"], kid=res["kid"], hist_tv=res["hist_tv"],
                             images_per_s=round(n / seconds, 2)))
            log(f"    seed {seed}: FD {res['fd']:.3f} ({n / seconds:.1f} images/s)")
        provider = sampler.provider
    fds = [r["fd"] for r in rows]
    return dict(provider=provider, seeds=rows, fd_mean=statistics.mean(fds),
                fd_std=statistics.stdev(fds) if len(fds) > 1 else None)


def run(n=1000, seeds=(1, 2, 3), batch=250, threads=2, models=None, with_fp32=False, log=print):
    """The result dict: per model, per backend, FD per seed and the paired difference to ONNX Runtime FP32."""
    import bdm_runtime

    from .bench.machine import machine_info

    out = dict(schema="bdm-openvino-quality/1", date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               machine=machine_info(), python=platform.python_version(), n=n, seeds=list(seeds), threads=threads,
               runtime=bdm_runtime.__version__, models={})
    with tempfile.TemporaryDirectory(prefix="bdm-ovq-") as tmp:
        for name in models or MODELS:
            spec = MODELS[name]
            path, sampler = export(spec["ckpt"], spec["sampler"], tmp)
            entry = dict(checkpoint=os.path.relpath(spec["ckpt"], ROOT), sampler=sampler, backends={})
            log(f"{name}: {sampler}")
            for label, kw in backends(threads, with_fp32):
                log(f"  {label}")
                entry["backends"][label] = measure_one(path, kw, seeds, n, batch, log)
            _paired(entry["backends"])
            out["models"][name] = entry
    return out


def _paired(rows):
    """Each backend's FD minus ONNX Runtime FP32's, seed by seed, and relative to it (the 10% criterion)."""
    ref = rows["ort-fp32"]["seeds"]
    for label, r in rows.items():
        if "seeds" not in r or label == "ort-fp32":
            continue
        diffs = [a["fd"] - b["fd"] for a, b in zip(r["seeds"], ref)]
        r["fd_minus_ort"] = [round(d, 4) for d in diffs]
        r["fd_ratio_to_ort"] = round(r["fd_mean"] / rows["ort-fp32"]["fd_mean"], 4)


def markdown(res):
    """The tables of ``res`` (one per model)."""
    m = res["machine"]
    lines = [f"# OpenVINO precision vs FD-FMNIST ({res['n']} images x seeds {res['seeds']}; "
             f"{m.get('cpu_model')}, {', '.join(m.get('simd', []))})", ""]
    for name, e in res["models"].items():
        s = e["sampler"]
        lines += [f"## {name} ({s['solver']}, {s['grid']} grid, {s['steps']} steps, eta {s['eta']:g}, "
                  f"{'clipped' if s['clip'] else 'not clipped'})", "",
                  "| backend | FD per seed | FD mean | vs ORT FP32 (per seed) | ratio | images/s |",
                  "|---|---|---:|---|---:|---:|"]
        for label, r in e["backends"].items():
            if "refused" in r:
                lines.append(f"| {label} | refused: {r['refused']} | | | | |")
                continue
            per = ", ".join(f"{x['fd']:.2f}" for x in r["seeds"])
            diff = ", ".join(f"{d:+.2f}" for d in r.get("fd_minus_ort", [])) or "reference"
            ips = statistics.median(x["images_per_s"] for x in r["seeds"])
            lines.append(f"| {label} | {per} | {r['fd_mean']:.2f} | {diff} | {r.get('fd_ratio_to_ort', 1.0):.3f} | "
                         f"{ips:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.ov_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="images per seed")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated sample seeds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models", default=None, help="comma-separated subset of: " + ", ".join(MODELS))
    p.add_argument("--with-fp32", action="store_true", help="also OpenVINO at fp32")
    p.add_argument("--out", default=OUT, help="output path without extension (.json and .md)")
    a = p.parse_args(argv)
    res = run(n=a.n, seeds=tuple(int(s) for s in a.seeds.split(",")), threads=a.threads,
              models=a.models.split(",") if a.models else None, with_fp32=a.with_fp32,
              log=lambda msg: print(msg, file=sys.stderr, flush=True))
    from bdm_runtime.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for ext, text in ((".json", json.dumps(res, indent=1) + "\n"), (".md", markdown(res))):
        with atomic_path(a.out + ext) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
