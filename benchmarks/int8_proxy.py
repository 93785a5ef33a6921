"""A cheap proxy for choosing INT8 calibration: final-image error of INT8 against FP32 on held-out seeds.

    python -m benchmarks.int8_proxy --ckpt models/fmnist32/model.pt --ckpt runs/study/ddpm/model.pt \
        --out benchmarks/results/int8_proxy

FD-FMNIST (``benchmarks.int8``) ranks the calibration methods differently on the two FMNIST DDPMs (6,000
steps: percentile best; 12,000 steps: max best) and costs minutes of sampling per graph. This measures whether
the error of the INT8 graph's final images against the FP32 graph's, from the same seeds (not calibration's),
ranks the methods as FD does: per checkpoint, its FP32 graph, one INT8 graph per method (``bdm_export.int8``,
default 32 calibration images, seed 0), ``--n`` images at each of ``--seeds`` through ``bdm_runtime`` (ONNX
Runtime CPU, one thread, the model's default sampler); rms and max |error| per seed, and the wall time of each
export (CPU model and flags recorded).
"""
import json
import os
import tempfile
import time

import click
import numpy as np

from .bench.output import write_results


METHODS = ("max", "percentile", "entropy")


def _images(path, n, seed):
    import bdm_runtime

    with bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"], threads=1) as s:
        return np.asarray(s.sample(n, seed=seed), dtype=np.float64)


def run_ckpt(ckpt, n, seeds, log=print):
    """Rows of final-image errors for each method on ``ckpt``."""
    from bdm_export import read_metadata
    from bdm_export.int8 import export_int8
    from bdm_runtime import format as fmt

    from .int8 import _export_fp32

    with tempfile.TemporaryDirectory(prefix="bdm-int8-proxy-") as folder:
        fp32 = _export_fp32(ckpt, folder)
        ref = {s: _images(fp32, n, s) for s in seeds}
        rows = []
        for method in METHODS:
            path = os.path.join(folder, f"int8_{method}.onnx")
            t = time.perf_counter()
            export_int8(fp32, path, method=method)
            export_s = time.perf_counter() - t
            rms, mx = [], []
            for s in seeds:
                d = _images(path, n, s) - ref[s]
                rms.append(round(float(np.sqrt(np.mean(d ** 2))), 5))
                mx.append(round(float(np.max(np.abs(d))), 4))
            rows.append(dict(method=method, rms=rms, rms_mean=round(float(np.mean(rms)), 5), max_abs=mx,
                             export_s=round(export_s, 1)))
            log(f"{ckpt} {method}: rms {rms} max {mx} export {export_s:.1f} s")
        m = read_metadata(fp32)
        sampler = dict(solver=m.get(fmt.K_DEFAULT_SOLVER, "ddim"), grid=m.get(fmt.K_DEFAULT_GRID, "uniform"),
                       steps=m[fmt.K_DEFAULT_STEPS], eta=m[fmt.K_DEFAULT_ETA])
    return dict(checkpoint=ckpt, sampler=sampler, rows=rows)


def auto_timing(ckpt, rounds, log=print):
    """Wall seconds of ``export_int8`` (the INT8 step only) with percentile, max and auto, interleaved round by round;
    auto's choice and its candidates' errors (held-out seed, ``HELD_OUT_IMAGES`` images)."""
    from bdm_export.int8 import export_int8
    from bdm_runtime import format as fmt

    from .int8 import _export_fp32

    rows = []
    with tempfile.TemporaryDirectory(prefix="bdm-int8-auto-time-") as folder:
        fp32 = _export_fp32(ckpt, folder)
        for r in range(rounds):
            for method in ("percentile", "max", "auto"):
                t = time.perf_counter()
                calib = export_int8(fp32, os.path.join(folder, f"{method}.onnx"), method=method)[fmt.K_CALIBRATION]
                rows.append(dict(checkpoint=ckpt, round=r, method=method, seconds=round(time.perf_counter() - t, 1),
                                 chosen=calib["method"], auto=calib.get("auto"), steps=calib["steps"]))
                log(json.dumps(rows[-1]))
    return rows


def markdown(res):
    m = res["machine"]
    out = [f"{res['n']} images per seed, seeds {res['seeds']}, ONNX Runtime CPU (1 thread) on {m.get('cpu_model')} "
           f"({', '.join(m.get('simd', []))}).", "",
           "| checkpoint | default sampler | method | final rms per seed | rms mean | max abs per seed | "
           "INT8 export s |", "|---|---|---|---|---|---|---|"]
    for c in res["checkpoints"]:
        p = c.get("sampler", {})
        sampler = f"{p.get('solver')} {p.get('grid')}, {p.get('steps')} steps, eta {p.get('eta')}"
        for r in c["rows"]:
            out.append(f"| {c.get('label', '`' + c['checkpoint'] + '`')} | {sampler} | {r['method']} | "
                       f"{', '.join(f'{x:.4f}' for x in r['rms'])} | "
                       f"{r['rms_mean']:.4f} | {', '.join(f'{x:.3f}' for x in r['max_abs'])} | {r['export_s']} |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--ckpt", "ckpts", multiple=True, default=("models/fmnist32/model.pt",), show_default=True)
@click.option("--n", type=click.IntRange(1, 100000), default=64, show_default=True, help="Images per seed.")
@click.option("--seeds", default="1000,2000", show_default=True, help="Held-out seeds, comma-separated.")
@click.option("--out", default="benchmarks/results/int8_proxy", show_default=True, help="OUT.json and OUT.md.")
@click.option("--auto-rounds", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Instead: time export_int8 with percentile, max and auto, this many interleaved rounds (OUT.json).")
def main(ckpts, n, seeds, out, auto_rounds):
    """Final-image error of each calibration method's INT8 graph against FP32."""
    from .bench.machine import machine_info

    if auto_rounds:
        res = dict(machine=machine_info(), rows=[r for c in ckpts for r in auto_timing(c, auto_rounds)])
        write_results(res, out)
        return
    seeds = [int(s) for s in seeds.split(",")]
    res = dict(schema="bdm-int8-proxy/1", n=n, seeds=seeds, threads=1, machine=machine_info(),
               checkpoints=[run_ckpt(c, n, seeds) for c in ckpts])
    write_results(res, out, markdown(res))
    click.echo(markdown(res))


if __name__ == "__main__":
    main()
