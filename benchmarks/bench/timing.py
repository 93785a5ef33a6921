"""Timing the runtime against PyTorch: interleaved repeats, pairwise ratios, loop overhead, the ORT sweep."""
import time

import numpy as np

from .config import ETA, SEED, TARGET_BATCH
from .machine import loadavg, median
from .ort_settings import load_timed, session_options


class Runner:
    """One way of sampling: ``call(b, steps) -> images``; ``step_times``: the list the runtime's timing hook fills."""

    def __init__(self, name, call, step_times=None):
        self.name, self.call, self.step_times = name, call, step_times

    def timed(self, b, steps):
        if self.step_times is not None:
            self.step_times.clear()
        t = time.perf_counter()
        x = self.call(b, steps)
        dt = time.perf_counter() - t
        step_sum = sum(self.step_times) if self.step_times is not None else None
        return dt, step_sum, np.asarray(x, dtype=np.float32)



def interleaved(runners, b, steps, repeats):
    """Times of every runner at batch ``b``, interleaved repeat by repeat (order rotated each repeat)."""
    for r in runners:
        r.timed(b, 1)  # warm-up: allocations, ORT's arena, first-call paths
    rec = {r.name: {"times_s": [], "step_sums_s": [], "out": None} for r in runners}
    for rep in range(repeats):
        k = rep % len(runners)
        for r in runners[k:] + runners[:k]:
            dt, step_sum, x = r.timed(b, steps)
            rec[r.name]["times_s"].append(dt)
            if step_sum is not None:
                rec[r.name]["step_sums_s"].append(step_sum)
            if rec[r.name]["out"] is None:
                rec[r.name]["out"] = x
    return rec



def summarise(rec, b, steps, flops_per_image, peak):
    """Per-runner figures at batch ``b``, with pairwise ratios against ``pytorch``."""
    ref = rec["pytorch"]["times_s"]
    rows = []
    for name, r in rec.items():
        times = r["times_s"]
        med = median(times)
        row = {"backend": name, "batch": b, "steps": steps, "repeats": len(times),
               "times_s": times, "median_s": med,
               "images_per_s": round(b / med, 3), "ms_per_step": round(1000 * med / steps, 3),
               "gflops_per_s": round(flops_per_image * b * steps / med / 1e9, 2)}
        row["pct_of_peak"] = round(100 * row["gflops_per_s"] / peak, 1) if peak else None
        if name != "pytorch":
            pairs = [p / t for p, t in zip(ref, times)]
            row["ratio_vs_pytorch"] = {"per_repeat": [round(x, 4) for x in pairs], "median": round(median(pairs), 4)}
            row["max_abs_diff_vs_pytorch"] = float(np.abs(r["out"] - rec["pytorch"]["out"]).max())
        if "ort-fp32" in rec and name != "ort-fp32":
            pairs = [o / t for o, t in zip(rec["ort-fp32"]["times_s"], times)]
            row["ratio_vs_ort_fp32"] = {"per_repeat": [round(x, 4) for x in pairs], "median": round(median(pairs), 4)}
        if r["step_sums_s"]:
            sums = r["step_sums_s"]
            frac = [(t - s) / s for t, s in zip(times, sums)]
            row["loop_overhead"] = {"step_sums_s": sums,
                                    "per_repeat": [round(x, 5) for x in frac], "median": round(median(frac), 5),
                                    "us_per_step": round(1e6 * median([(t - s) for t, s in zip(times, sums)]) / steps, 1)}
        rows.append(row)
    return rows



def time_network(net, model, process, paths, threads, quick, peak, flops, log):
    """``(rows, ORT session options, OpenVINO refusals)``: all timed rows of one network (every batch, every
    backend: PyTorch FP32 and bf16 autocast, ONNX Runtime FP32/FP16, OpenVINO per precision)."""
    import torch

    from bdm_train.sampling import sample

    settings = {"intra_op_num_threads": threads}
    ort32, times32 = load_timed(paths["fp32"], settings)
    ort16, times16 = load_timed(paths["fp16"], settings)
    ort8, times8 = load_timed(paths["int8"], settings)
    options = session_options(ort32)
    c = net["unet"]["in_channels"]

    def torch_call(b, steps):
        return sample(model, process, b, SEED, steps, eta=ETA, batch_size=b, channels=c, num_classes=0).numpy()

    from .openvino import close, ov_runners, torch_bf16_runner

    ov, refused = ov_runners(paths["fp32"], threads, cache_dir=False)
    ov8, refused8 = ov_runners(paths["int8"], threads, cache_dir=False)   # INT8 graph: i8 convs, float rest
    for k in list(ov8):
        r = ov8.pop(k)
        r.name = k.replace("openvino-", "openvino-int8-")
        ov[r.name] = r
    refused.update({k.replace("openvino-", "openvino-int8-"): v for k, v in refused8.items()})
    runners = {"pytorch": Runner("pytorch", torch_call), "pytorch-bf16": torch_bf16_runner(model, process, c),
               "ort-fp32": Runner("ort-fp32", lambda b, s: ort32.sample(b, seed=SEED, steps=s, eta=ETA,
                                                                        timing=times32.append), times32),
               "ort-fp16": Runner("ort-fp16", lambda b, s: ort16.sample(b, seed=SEED, steps=s, eta=ETA,
                                                                        timing=times16.append), times16),
               "ort-int8": Runner("ort-int8", lambda b, s: ort8.sample(b, seed=SEED, steps=s, eta=ETA,
                                                                       timing=times8.append), times8)}
    runners.update(ov)
    rows = []
    torch.set_num_threads(threads)
    for b in net["batches"]:
        names = (["pytorch", "ort-fp32"] + (["ort-fp16"] if b in net["fp16"] else []) + ["ort-int8", "pytorch-bf16"]
                 + [k for k in ov if b in net.get("openvino", net["batches"])])
        repeats = net.get("repeats_at", {}).get(b, net["repeats"])
        t = time.perf_counter()
        rec = interleaved([runners[n] for n in names], b, net["steps"], repeats)
        rows += summarise(rec, b, net["steps"], flops, peak)
        log(f"  {net['name']} batch {b}: " + ", ".join(
            f"{r['backend']} {r['images_per_s']:.1f} img/s" for r in rows if r["batch"] == b)
            + f" ({time.perf_counter() - t:.0f} s, load {loadavg()[0]})")
    ort32.close()
    ort16.close()
    ort8.close()
    close(ov)
    return rows, options, refused



def ort_sweep(net, model, process, path, threads, repeats, log):
    """ONNX Runtime session settings at ``TARGET_BATCH`` through the runtime's loop, interleaved with PyTorch."""
    import torch

    from bdm_train.sampling import sample

    T = threads
    variants = [
        ("as shipped (ORT default threads)", {}),
        (f"intra_op={T} (this benchmark)", {"intra_op_num_threads": T}),
        (f"intra_op={T}, no spinning", {"intra_op_num_threads": T, "allow_spinning": False}),
        ("intra_op=1", {"intra_op_num_threads": 1}),
        (f"intra_op={T}, ORT_ENABLE_EXTENDED (no NCHWc layout)",
         {"intra_op_num_threads": T, "graph_optimization_level": "ORT_ENABLE_EXTENDED"}),
        (f"intra_op={T}, ORT_ENABLE_BASIC", {"intra_op_num_threads": T, "graph_optimization_level": "ORT_ENABLE_BASIC"}),
        (f"intra_op={T}, ORT_DISABLE_ALL", {"intra_op_num_threads": T, "graph_optimization_level": "ORT_DISABLE_ALL"}),
        (f"intra_op={T}, ORT_PARALLEL, inter_op={T}",
         {"intra_op_num_threads": T, "execution_mode": "ORT_PARALLEL", "inter_op_num_threads": T}),
    ]
    runners, loads = [], {}
    c = net["unet"]["in_channels"]
    torch.set_num_threads(threads)
    runners.append(Runner("pytorch", lambda b, s: sample(model, process, b, SEED, s, eta=ETA, batch_size=b,
                                                          channels=c, num_classes=0).numpy()))
    samplers = []
    for label, settings in variants:
        t = time.perf_counter()
        sampler, times = load_timed(path, settings)
        loads[label] = (time.perf_counter() - t, session_options(sampler))
        samplers.append(sampler)
        runners.append(Runner(label, (lambda sm, ts: lambda b, s: sm.sample(b, seed=SEED, steps=s, eta=ETA,
                                                                            timing=ts.append))(sampler, times),
                              times))
    rec = interleaved(runners, TARGET_BATCH, net["steps"], repeats)
    rows = summarise(rec, TARGET_BATCH, net["steps"], 0.0, None)
    for (label, settings), row in zip(variants, rows[1:]):
        row["settings"] = settings
        row["session_create_s"] = round(loads[label][0], 3)
        row["session_options"] = loads[label][1]
    for s in samplers:
        s.close()
    log("  sweep: " + ", ".join(f"{r['backend']}: {r['ms_per_step']:.2f} ms" for r in rows))
    return {"network": net["name"], "batch": TARGET_BATCH, "steps": net["steps"], "rows": rows}
