"""INT8 quality and speed, measured: FD-FMNIST of INT8 step graphs against FP32, per-step x0 error, ablations.

    python -m benchmarks.int8 --ckpt models/fmnist32/model.pt --out benchmarks/results/int8_fmnist32

For one checkpoint: its FP32 graph (``bdm-export``), then one INT8 graph per ablation variant (what
is kept in float, which calibration method, how many calibration trajectories), each sampled with
the model's own default sampler (from the graph's metadata) through ``bdm_runtime`` on ONNX Runtime
CPU, ``--n`` samples at each of ``--seeds``, scored with FD-FMNIST (``benchmarks.metrics``) against
the test set; FP32 on the same seeds is the reference. Also: the per-step error of ``x0`` along one
trajectory (the INT8 graph on the FP32 trajectory's inputs: the local error of a step; and the INT8
graph's own trajectory from the same seed: the accumulated one), and the step time of every graph
at batch 16, interleaved round by round (CPU model and flags recorded).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import click
import numpy as np

from .bench.output import write_results


# (label, calibration method, layers kept in float, calibration trajectories); the first is bdm-export's default
# and gets the per-step x0 error
VARIANTS = (
    ("recipe, percentile", "percentile", ("first", "last", "skip"), 32),
    ("recipe, max", "max", ("first", "last", "skip"), 32),
    ("recipe, entropy", "entropy", ("first", "last", "skip"), 32),
    ("all convs INT8, max", "max", (), 32),
    ("first+last float, max", "max", ("first", "last"), 32),
    ("skip float, max", "max", ("skip",), 32),
    ("all convs INT8, percentile", "percentile", (), 32),
    ("recipe, percentile, 8 images", "percentile", ("first", "last", "skip"), 8),
)
TIMING_BATCH = 16


def _export_fp32(ckpt, folder):
    subprocess.run([sys.executable, "-m", "bdm_export.cli", "--ckpt", ckpt, "--out-dir", folder, "--no-engine"],
                   check=True, stdout=subprocess.DEVNULL)
    return os.path.join(folder, "bdm.onnx")


def _fd(path, n, seed, threads):
    import bdm_runtime

    from .metrics import evaluate, reference_stats

    with bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"], threads=threads) as s:
        x = s.sample(n, seed=seed)
    r = evaluate(x, reference_stats(), kid_subsets=10)
    return round(r["fd"], 4)


def _x0_errors(fp32, int8, seed):
    """Per step: rms(x0_int8 - x0_fp32) on the FP32 trajectory's inputs (local) and along INT8's own (accumulated)."""
    import onnxruntime as ort

    from bdm_export.int8 import record_inputs

    def x0s(path, feeds):
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return [sess.run(["x0"], f)[0] for f in feeds]

    f32_feeds, _ = record_inputs(fp32, images=16, seed=seed)
    i8_feeds, _ = record_inputs(int8, images=16, seed=seed)
    ref = x0s(fp32, f32_feeds)
    local = x0s(int8, f32_feeds)
    own = x0s(int8, i8_feeds)
    rms = lambda a, b: float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))  # noqa: E731
    return [dict(step=i, t=float(f32_feeds[i]["t"][0]), local_rms=round(rms(local[i], ref[i]), 5),
                 accumulated_rms=round(rms(own[i], ref[i]), 5)) for i in range(len(ref))]


def _timings(paths, rounds, threads):
    """Median step time (ms) of each graph at batch ``TIMING_BATCH``, interleaved round by round."""
    import onnxruntime as ort

    from bdm_export.int8 import record_inputs

    feed = record_inputs(paths["fp32"], images=TIMING_BATCH, seed=0)[0][5]
    sessions = {}
    for name, path in paths.items():
        o = ort.SessionOptions()
        o.intra_op_num_threads = threads
        sessions[name] = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
        sessions[name].run(None, feed)
    times = {name: [] for name in paths}
    for r in range(rounds):
        for name, sess in sessions.items():
            t = time.perf_counter()
            for _ in range(5):
                sess.run(None, feed)
            times[name].append((time.perf_counter() - t) / 5 * 1e3)
    return {name: round(float(np.median(v)), 3) for name, v in times.items()}


def _int8_graphs(fp32, folder, variants):
    from bdm_export.int8 import export_int8

    paths = {}
    for k, (label, method, keep, images) in enumerate(variants):
        paths[label] = os.path.join(folder, f"int8_{k}.onnx")
        export_int8(fp32, paths[label], images=images, method=method, float_layers=keep)
    return paths


def run(ckpt, n, seeds, threads, rounds, variants=VARIANTS, log=print):
    """Every figure for ``ckpt`` as a JSON-able dict."""
    from .bench.machine import machine_info

    with tempfile.TemporaryDirectory(prefix="bdm-int8-study-") as folder:
        fp32 = _export_fp32(ckpt, folder)
        paths = {"fp32": fp32}
        paths.update(_int8_graphs(fp32, folder, variants))
        rows = []
        for name, path in paths.items():
            fds = []
            for seed in seeds:
                fds.append(_fd(path, n, seed, threads))
                log(f"{name}: seed {seed}: FD {fds[-1]}")
            spec = next((v for v in variants if v[0] == name), None)
            rows.append(dict(graph=name, method=spec and spec[1], float_layers=spec and list(spec[2]),
                             calib_images=spec and spec[3], fd=fds, fd_mean=round(float(np.mean(fds)), 4)))
        ms = _timings(paths, rounds, threads)
        x0 = _x0_errors(fp32, paths[variants[0][0]], seed=seeds[0])
    ref = rows[0]["fd_mean"]
    for r in rows:
        r["fd_vs_fp32"] = round(r["fd_mean"] / ref, 4)
        r["step_ms_b16"] = ms[r["graph"]]
        r["speed_vs_fp32"] = round(ms["fp32"] / ms[r["graph"]], 3)
    return dict(schema="bdm-int8/1", checkpoint=ckpt, n=n, seeds=list(seeds), threads=threads,
                timing_batch=TIMING_BATCH, machine=machine_info(), rows=rows, x0_error=x0,
                x0_error_graph=variants[0][0])


def speed(name, batch=16, threads=2, repeats=3):
    """ONNX Runtime INT8 against FP32 on benchmark network ``name`` (random weights) at ``batch``: whole
    sampler calls through the runtime, interleaved repeat by repeat, as ``python -m benchmarks.bench`` times
    them (its ``Runner``, ``interleaved`` and settings), without the rest of that run."""
    from .bench.config import NETWORKS
    from .bench.machine import machine_info, median
    from .bench.networks import build, export_graphs
    from .bench.ort_settings import load_timed
    from .bench.timing import Runner, interleaved

    net = next(n for n in NETWORKS if n["name"] == name)
    with tempfile.TemporaryDirectory(prefix="bdm-int8-speed-") as folder:
        model, process = build(net)
        paths, export_s = export_graphs(model, process, net, folder)
        runners = []
        for precision in ("fp32", "int8"):
            sampler, times = load_timed(paths[precision], {"intra_op_num_threads": threads})
            runners.append(Runner(f"ort-{precision}", (lambda sm, ts: lambda b, s: sm.sample(
                b, seed=0, steps=s, timing=ts.append))(sampler, times), times))
        rec = interleaved(runners, batch, net["steps"], repeats)
    t32, t8 = rec["ort-fp32"]["times_s"], rec["ort-int8"]["times_s"]
    pairs = [a / b for a, b in zip(t32, t8)]
    return dict(network=name, batch=batch, steps=net["steps"], threads=threads, repeats=repeats,
                fp32_s=t32, int8_s=t8, ratio_per_repeat=[round(x, 4) for x in pairs],
                ratio_median=round(median(pairs), 4), export_s=export_s, machine=machine_info())


def sensitivity(ckpt, images=16, method="max"):
    """Per network conv: the rms error of eps (relative to eps's rms, averaged over the steps) when only that
    conv is INT8, on ``images`` trajectories of the default sampler (seed 0; calibrated on the same)."""
    import onnx
    import onnxruntime as ort

    from bdm_export.int8 import network_convs, quantize, record_inputs

    eps = "/model/conv_out/Conv_output_0"   # the network's output inside the step graph
    with tempfile.TemporaryDirectory(prefix="bdm-int8-sens-") as folder:
        step = _export_fp32(ckpt, folder)
        feeds, _ = record_inputs(step, images=images)
        m = onnx.load(step)
        m.graph.output.append(onnx.helper.make_tensor_value_info(eps, onnx.TensorProto.FLOAT, None))
        fp32 = os.path.join(folder, "eps.onnx")   # the step graph with the network's output exposed
        onnx.save(m, fp32)

        def run(model):
            sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return [sess.run([eps], f)[0].astype(np.float64) for f in feeds]

        ref = run(m)
        out = {}
        for name in network_convs(m, ())[0]:
            got = run(quantize(fp32, feeds, method, (), nodes=[name])[0])
            out[name] = round(float(np.mean([np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2))
                                             for a, b in zip(got, ref)])), 5)
    return dict(checkpoint=ckpt, images=images, method=method, eps_rel_rms=out)


def merge(parts):
    """One result from runs on different seeds (run in parallel), of the same or of other variants: each
    graph's FDs joined by seed (a graph measured twice on a seed, FP32 in every run, keeps its first, equal,
    value); rows in first-seen order; the timings and x0 errors of the last run of the lowest seed."""
    parts = sorted(parts, key=lambda p: p["seeds"][0])
    res = dict(parts[-1] if len({p["seeds"][0] for p in parts}) == 1 else
               [p for p in parts if p["seeds"][0] == parts[0]["seeds"][0]][-1])
    res["seeds"] = sorted({s for p in parts for s in p["seeds"]})
    rows, fds = {}, {}
    for p in parts:
        for row in p["rows"]:
            rows.setdefault(row["graph"], row)
            for s, f in zip(p["seeds"], row["fd"]):
                fds.setdefault(row["graph"], {}).setdefault(s, f)
    rows = [dict(row, fd=[fds[g][s] for s in sorted(fds[g])], seeds=sorted(fds[g]),
                 fd_mean=round(float(np.mean(list(fds[g].values()))), 4)) for g, row in rows.items()]
    ref = rows[0]["fd_mean"]
    for r in rows:
        r["fd_vs_fp32"] = round(r["fd_mean"] / ref, 4)
    res["rows"] = rows
    return res


def _write(res, out):
    write_results(res, out, markdown(res))


def markdown(res):
    """The tables of docs/int8.md."""
    m = res["machine"]
    out = [f"Checkpoint `{res['checkpoint']}`, {res['n']} samples per seed, seeds {res['seeds']}, ONNX Runtime "
           f"CPU ({res['threads']} threads) on {m.get('cpu_model')} ({', '.join(m.get('simd', []))}).", "",
           "| graph | kept in float | method | calib. images | FD per seed | FD mean | vs FP32 | step ms (b16) | "
           "speed vs FP32 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        kept = "everything (FP32)" if r["method"] is None else (", ".join(r["float_layers"]) or "none")
        out.append(f"| {r['graph']} | {kept} | {r['method'] or '-'} | {r['calib_images'] or '-'} | "
                   f"{', '.join(f'{x:.2f}' for x in r['fd'])} | {r['fd_mean']:.3f} | x{r['fd_vs_fp32']:.3f} | "
                   f"{r['step_ms_b16']:.2f} | x{r['speed_vs_fp32']:.2f} |")
    out += ["", f"Per-step rms error of x0 against FP32 ({res['x0_error_graph']}, seed {res['seeds'][0]}, 16 images):",
            "", "| step | t | local (FP32 inputs) | accumulated (own trajectory) |", "|---|---|---|---|"]
    for e in res["x0_error"]:
        out.append(f"| {e['step']} | {e['t']:.4f} | {e['local_rms']:.5f} | {e['accumulated_rms']:.5f} |")
    return "\n".join(out) + "\n"


@click.command()
@click.option("--ckpt", default="models/fmnist32/model.pt", show_default=True, type=click.Path(dir_okay=False))
@click.option("--n", type=click.IntRange(1, 100000), default=1000, show_default=True, help="Samples per seed.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Sample seeds, comma-separated.")
@click.option("--threads", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--rounds", type=click.IntRange(1, 1000), default=15, show_default=True, help="Timing rounds.")
@click.option("--variants", default=None, help="Only these variant indices (comma-separated; default all).")
@click.option("--out", default="benchmarks/results/int8_fmnist32", show_default=True, help="OUT.json and OUT.md.")
@click.option("--speed", "speed_net", default=None, help="Instead: time ONNX Runtime INT8 against FP32 on this "
              "benchmark network (e.g. cifar10-32x32) at batch 16, interleaved; writes OUT.json.")
@click.option("--sensitivity", is_flag=True, help="Instead: each network conv quantized alone, its eps error.")
@click.option("--merge", "parts", default=None, help="Instead of measuring: join these result JSONs (same variants, "
              "other seeds; comma-separated) into OUT.")
def main(ckpt, n, seeds, threads, rounds, variants, out, speed_net, sensitivity, parts):
    """Measure INT8 step graphs of one checkpoint against its FP32 graph."""
    if speed_net or sensitivity:
        res = speed(speed_net, threads=threads) if speed_net else globals()["sensitivity"](ckpt)
        write_results(res, out)
        click.echo(json.dumps({k: v for k, v in res.items() if k != "machine"}))
        return
    if parts:
        loaded = []
        for p in parts.split(","):
            with open(p, encoding="utf-8") as f:
                loaded.append(json.load(f))
        res = merge(loaded)
    else:
        chosen = VARIANTS if not variants else tuple(VARIANTS[int(k)] for k in variants.split(","))
        res = run(ckpt, n, [int(s) for s in seeds.split(",")], threads, rounds, chosen)
    _write(res, out)
    click.echo(markdown(res))


if __name__ == "__main__":
    main()
