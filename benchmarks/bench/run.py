"""One benchmark run: the stages in order (machine, imports, each network, sweep, GPU, targets), and
the result written as JSON and markdown."""
import datetime
import os
import sys
import tempfile
import time

from .config import ETA, NETWORKS, QUICK_NETWORKS, SCHEMA, SEED, TARGET_NET
from .fresh import baseline_rss, fresh_process_figures, import_times
from .gpu import gpu_section
from .machine import CpuShare, loadavg, machine_info, matmul_peak
from .networks import build, eps_std, export_graphs, flops_check
from .openvino import precisions, shipped_run
from .report import markdown, targets
from .timing import ort_sweep, time_network


def run(quick=False, threads=2, networks=None, sweep=True, log=print, default=None, batches=None):
    """Measure everything; returns the result dict (see the package docstring).

    ``default``: the new sampler default timed against the old one (``benchmarks.defaults``;
    ``None``: the shipped model's own). ``batches``: time only these batch sizes.
    """
    from benchmarks import defaults

    t_start = time.perf_counter()
    share = CpuShare()
    nets = QUICK_NETWORKS if quick else NETWORKS
    if networks:
        pool = {n["name"]: n for n in NETWORKS + QUICK_NETWORKS}
        nets = tuple(pool[n] for n in networks)
    if batches:  # a subset of the batch sizes (a loaded machine: batch 64 of the CIFAR-10 UNet takes long)
        nets = tuple(dict(n, batches=tuple(b for b in n["batches"] if b in batches)) for n in nets)
    res = _setup(quick, threads, log)
    pk = res["matmul_peak"]
    res["networks"], models, paths_all = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bdm-bench-") as folder:
        for net in nets:
            entry, models[net["name"]], paths_all[net["name"]] = _network(net, folder, threads, quick, pk, log)
            res["networks"].append(entry)
        target = next((n for n in nets if n["name"] == TARGET_NET), None)
        if sweep and not quick and target is not None:
            model, process = models[TARGET_NET]
            res["ort_sweep"] = ort_sweep(target, model, process, paths_all[TARGET_NET]["fp32"], threads,
                                         target["repeats"], log)
        res["gpu"] = gpu_section(nets, models, paths_all, quick, log)
    res["defaults"] = defaults.measure(default, threads=threads, quick=quick, log=log)
    if precisions():
        res["shipped_run"] = shipped_run(threads=threads, quick=quick, log=log)
    res["targets"] = targets(res)
    res["run"]["load_after"] = loadavg()
    res["run"]["cpu_share"] = share.result()
    res["run"]["duration_s"] = round(time.perf_counter() - t_start, 1)
    return res


def _setup(quick, threads, log):
    """The result's head: run settings, machine, threads, matmul peak, import time, baseline memory."""
    import torch

    torch.set_num_threads(threads)
    res = {"schema": SCHEMA,
           "run": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "quick": bool(quick), "argv": sys.argv[1:], "pid": os.getpid(), "eta": ETA, "seed": SEED,
                   "load_before": loadavg()},
           "machine": machine_info(),
           "threads": {"torch_num_threads": torch.get_num_threads(),
                       "torch_interop_threads": torch.get_num_interop_threads(),
                       "ort_intra_op_num_threads": threads, "ort_graph_optimization_level": "ORT_ENABLE_ALL",
                       "how": "ONNX Runtime SessionOptions given to bdm_runtime.load(session_options=) "
                              "(benchmarks.bench.ort_settings.ort_session_options)"}}
    log(f"machine: {res['machine'].get('cpu_model')}, load {res['run']['load_before']}, threads {threads}")
    res["matmul_peak"] = pk = matmul_peak(threads, 512 if quick else 2048, 3 if quick else 5)
    log(f"matmul peak: {pk['peak_gflops']} GFLOP/s")
    res["import_runtime"] = import_times(3 if quick else 7)
    res["baseline_rss_mib"] = baseline_rss()
    return res


def _network(net, folder, threads, quick, pk, log):
    """``(entry, (model, process), paths)``: one network built, exported, counted, timed and cold-started."""
    from benchmarks.flops import count_flops

    t = time.perf_counter()
    model, process = build(net)
    paths, export_s = export_graphs(model, process, net, folder)
    flops, by_op = count_flops(paths["fp32"], batch=1)
    entry = {"name": net["name"], "about": net["about"],
             "unet": dict(net["unet"], ch_mult=list(net["unet"]["ch_mult"]),
                          attn_resolutions=list(net["unet"]["attn_resolutions"])),
             "blur_sigma_max": net["blur_sigma_max"], "steps": net["steps"], "eta": ETA,
             "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
             "eps_std": round(eps_std(model, net), 4),
             "gflop_per_eval": flops / 1e9, "gflop_by_op": {k: v / 1e9 for k, v in by_op.items()},
             "gflop_torch_counter": flops_check(model, process, net) / 1e9,
             "onnx_mib": {k: os.path.getsize(p) / 2 ** 20 for k, p in paths.items()}, "export_s": export_s,
             "load_before": loadavg()}
    log(f"{net['name']}: exported in {sum(export_s.values()):.0f} s, {entry['gflop_per_eval']:.4f} GFLOP/eval")
    net_share = CpuShare()
    entry["rows"], entry["ort_session_options"], entry["openvino_refused"] = time_network(
        net, model, process, paths, threads, quick, pk["peak_gflops"], flops, log)
    entry["cpu_share"] = net_share.result()
    entry["fresh_process"] = fresh_process_figures(net, model, paths, folder, threads, quick)
    entry["seconds"] = round(time.perf_counter() - t, 1)
    return entry, (model, process), paths


def write(res, out):
    """``out.json`` and ``out.md`` (atomically)."""
    from .output import write_results

    write_results(res, out, markdown(res))
