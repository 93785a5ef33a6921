"""Which convolutions cost INT8 its quality: leave-one-out sensitivity with the final-image proxy.

    python -m benchmarks.int8_sensitivity --ckpt models/fmnist32/model.pt --out benchmarks/results/int8_sensitivity

On the shipped 24,000-step DDPM the default INT8 graph costs FD x1.14 of FP32 at its 50-evaluation default
(docs/int8.md). This ranks the network's quantized convolutions by how much of the final-image error
(``bdm_export.int8_auto``'s proxy: rms of the INT8 graph's final images against the FP32 graph's, on seeds that
are not calibration's) goes away when that one convolution stays in float: the calibration trajectories are
recorded once, then for each convolution the graph is quantized without it (``--method``) and sampled. Then the
``--keep`` most sensitive ones are kept in float together, and that graph is measured the same way.
"""
import os
import tempfile
import time

import click
import numpy as np

from .bench.output import write_results


def _proxy(fp32, proto, images, seeds, ref):
    """Final-image rms of ``proto`` against the FP32 images ``ref`` (one array per seed)."""
    import onnx

    from bdm_export.int8_auto import final_images, rms

    with tempfile.TemporaryDirectory(prefix="bdm-sens-") as tmp:
        path = os.path.join(tmp, "int8.onnx")
        onnx.save(proto, path)
        return [rms(final_images(path, images, s), r) for s, r in zip(seeds, ref)]


@click.command()
@click.option("--ckpt", default="models/fmnist32/model.pt", show_default=True)
@click.option("--method", type=click.Choice(["max", "percentile"]), default="max", show_default=True,
              help="Calibration (the shipped model's auto pick is max).")
@click.option("--n", type=click.IntRange(1, 4096), default=64, show_default=True, help="Images per seed.")
@click.option("--seeds", default="1000,2000", show_default=True, help="Held-out seeds, comma-separated.")
@click.option("--keep", type=click.IntRange(0, 64), default=3, show_default=True,
              help="Then keep this many of the most sensitive convolutions in float together.")
@click.option("--out", default="benchmarks/results/int8_sensitivity", show_default=True, help="OUT.json and OUT.md.")
def main(ckpt, method, n, seeds, keep, out):
    """Leave-one-out INT8 sensitivity of each convolution, by the final-image error against FP32."""
    import onnx

    from bdm_export import int8
    from bdm_export.int8_auto import final_images

    from .bench.machine import machine_info
    from .int8 import _export_fp32

    seeds = [int(s) for s in seeds.split(",")]
    with tempfile.TemporaryDirectory(prefix="bdm-sens-") as folder:
        fp32 = _export_fp32(ckpt, folder)
        ref = [final_images(fp32, n, s) for s in seeds]
        feeds, _ = int8.record_inputs(fp32)
        convs, kept = int8.network_convs(onnx.load(fp32))
        t = time.perf_counter()
        base = _proxy(fp32, int8.quantize(fp32, feeds, method, nodes=convs)[0], n, seeds, ref)
        rows = []
        with click.progressbar(convs, label="leave one out", file=None) as bar:
            for name in bar:
                err = _proxy(fp32, int8.quantize(fp32, feeds, method, nodes=[c for c in convs if c != name])[0],
                             n, seeds, ref)
                rows.append(dict(conv=name, rms=[round(e, 5) for e in err], rms_mean=round(float(np.mean(err)), 5)))
        rows.sort(key=lambda r: r["rms_mean"])
        top = [r["conv"] for r in rows[:keep]]
        both = _proxy(fp32, int8.quantize(fp32, feeds, method, nodes=[c for c in convs if c not in top])[0],
                      n, seeds, ref) if top else None
    res = dict(machine=machine_info(), ckpt=ckpt, method=method, n=n, seeds=seeds, already_float=kept,
               default_rms=[round(e, 5) for e in base], default_rms_mean=round(float(np.mean(base)), 5),
               leave_one_out=rows, keep=top, keep_rms=None if both is None else [round(e, 5) for e in both],
               keep_rms_mean=None if both is None else round(float(np.mean(both)), 5),
               seconds=round(time.perf_counter() - t, 1))
    lines = [f"# INT8 leave-one-out sensitivity: `{ckpt}`, {method} calibration", "",
             f"Final-image rms against FP32, {n} images at seeds {seeds}; the default graph (first, last and skip "
             f"convolutions in float): **{res['default_rms_mean']}**. Each row: that convolution also in float.", "",
             "| convolution also kept in float | rms per seed | rms mean | x default |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['conv']}` | {', '.join(map(str, r['rms']))} | {r['rms_mean']} | "
                     f"x{r['rms_mean'] / res['default_rms_mean']:.2f} |")
    if top:
        lines += ["", f"The {len(top)} most sensitive together in float: rms {res['keep_rms_mean']} "
                      f"(x{res['keep_rms_mean'] / res['default_rms_mean']:.2f} of the default)."]
    write_results(res, out, "\n".join(lines) + "\n")
    click.echo("\n".join(lines))


if __name__ == "__main__":
    main()
