"""Images/s of the shipped model at its sampler default against the old default, in one run.

    python -m benchmarks.defaults                                  # the shipped model's own default vs the old one
    python -m benchmarks.defaults --default dpmpp2m:logsnr:20      # a candidate default vs the old one

The old default is the shipped model's before few-step solvers existed: DDIM with ``eta = 1``
(the paper's ancestral sampler, B9) on the uniform grid, 100 steps. The new one is the shipped
model's ``sampler`` config (``models/fmnist32/config.json``: ``solver``, ``grid``, ``steps``,
``eta``), or ``--default SOLVER:GRID:STEPS[:ETA]``. Both run through the runtime (ONNX Runtime
CPU, one format-2 step graph exported from the shipped weights, so only the sampler differs),
interleaved repeat by repeat with the order rotated; the speed-up is the median of the pairwise
ratios. ``python -m benchmarks.bench`` runs this as one of its sections.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "models", "fmnist32")
OLD_DEFAULT = dict(solver="ddim", grid="uniform", steps=100, eta=1.0)
SEED = 0


def parse_default(spec):
    """``"SOLVER:GRID:STEPS[:ETA]"`` -> ``dict(solver, grid, steps, eta)`` (checked by ``bdm_runtime.grids.settings``)."""
    from bdm_runtime.grids import settings

    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"--default wants SOLVER:GRID:STEPS[:ETA], got {spec!r}")
    try:
        steps, eta = int(parts[2]), (float(parts[3]) if len(parts) == 4 else None)
    except ValueError:
        raise ValueError(f"--default wants SOLVER:GRID:STEPS[:ETA] with numbers, got {spec!r}")
    solver, grid, steps, eta = settings({}, parts[0], parts[1], steps, eta)
    return dict(solver=solver, grid=grid, steps=steps, eta=eta)


def shipped_default(folder=SHIPPED):
    """The shipped model's sampler default, from its ``config.json``."""
    from bdm_runtime.grids import settings

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        sampler = json.load(f)["sampler"]
    solver, grid, steps, eta = settings(sampler)
    return dict(solver=solver, grid=grid, steps=steps, eta=eta)


def _export(folder, tmp):
    """The shipped weights as a format-2 step graph (its own clip setting); the path."""
    from bdm_train import checkpoint
    from bdm_export.onnx_export import export_onnx

    model, process, config = checkpoint.load(os.path.join(folder, "model.pt"))
    path = os.path.join(tmp, "shipped.onnx")
    export_onnx(model, process, path, channels=model.in_channels, num_classes=model.num_classes,
                clip_denoised=config["sampler"]["clip_denoised"])
    return path


def measure(new=None, threads=2, batch=16, repeats=3, quick=False, folder=SHIPPED, log=print):
    """Time the old and the new default on the shipped model; the section's result dict.

    ``quick``: batch 2, two repeats, steps divided by 25 (at least 1): the wiring, not a measurement.
    """
    import onnxruntime as ort

    import bdm_runtime

    new = dict(new or shipped_default(folder))
    settings = {"old": dict(OLD_DEFAULT), "new": new}
    if quick:
        batch, repeats = 2, 2
        for s in settings.values():
            s["steps"] = max(1, s["steps"] // 25)
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    times = {k: [] for k in settings}
    step_sums = {k: [] for k in settings}
    with tempfile.TemporaryDirectory(prefix="bdm-defaults-") as tmp:
        path = _export(folder, tmp)
        with bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"], session_options=so) as sampler:
            for s in settings.values():
                sampler.sample(batch, seed=SEED, **dict(s, steps=1))     # warm-up: allocations, grid tables
            names = list(settings)
            for rep in range(repeats):
                for k in names[rep % 2:] + names[:rep % 2]:
                    steps_t = []
                    start = time.perf_counter()
                    sampler.sample(batch, seed=SEED, timing=steps_t.append, **settings[k])
                    times[k].append(time.perf_counter() - start)
                    step_sums[k].append(sum(steps_t))
    rows = []
    for k, s in settings.items():
        med = statistics.median(times[k])
        rows.append(dict(setting=k, **s, times_s=times[k], step_sums_s=step_sums[k], median_s=med,
                         images_per_s=round(batch / med, 3), ms_per_step=round(1000 * med / s["steps"], 3)))
    pairs = [o / n for o, n in zip(times["old"], times["new"])]
    out = dict(model=os.path.relpath(folder, ROOT), batch=batch, threads=threads, repeats=repeats, quick=quick,
               rows=rows, speedup={"per_repeat": [round(x, 4) for x in pairs],
                                   "median": round(statistics.median(pairs), 4)})
    log(f"  defaults: old {rows[0]['images_per_s']:.2f} img/s, new {rows[1]['images_per_s']:.2f} img/s, "
        f"x{out['speedup']['median']:.2f}")
    return out


def markdown(sec):
    """The section as markdown lines."""
    lines = [f"## Sampler default: new against old ({sec['model']}, batch {sec['batch']}, {sec['threads']} threads, "
             f"{sec['repeats']} repeats{', QUICK' if sec['quick'] else ''})", "",
             "| default | solver | grid | steps | eta | images/s | ms/step |", "|---|---|---|---:|---:|---:|---:|"]
    for r in sec["rows"]:
        lines.append(f"| {r['setting']} | {r['solver']} | {r['grid']} | {r['steps']} | {r['eta']:g} | "
                     f"{r['images_per_s']:.2f} | {r['ms_per_step']:.2f} |")
    lines += ["", f"New default: x{sec['speedup']['median']:.2f} the old one's images/s (median of the pairwise "
                  "ratios, each pair measured back to back).", ""]
    old, new = ({k: r[k] for k in ("solver", "grid", "steps", "eta")} for r in sec["rows"])
    if old == new:
        lines += ["The new default is the old one (the quality study found no cheaper setting within 10% of the "
                  "model's best FD): both rows time the same sampler; `--default SOLVER:GRID:STEPS` times a "
                  "candidate.", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.defaults", description=__doc__.split("\n\n")[0])
    p.add_argument("--default", default=None, help="SOLVER:GRID:STEPS[:ETA] (default: the shipped model's config)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    new = parse_default(a.default) if a.default else None
    sec = measure(new, threads=a.threads, batch=a.batch, repeats=a.repeats,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print("\n".join(markdown(sec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
