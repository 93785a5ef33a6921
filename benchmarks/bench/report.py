"""The issue's targets, evaluated from the rows (never asserted), and the markdown report."""
import json

from .config import (INT8_TARGET_NET, INT8_TARGET_RATIO, SEED, TARGET_BATCH, TARGET_IMPORT_S, TARGET_NET,
                     TARGET_OVERHEAD, TARGET_RATIO)


def targets(result):
    """The issue's targets, evaluated (never asserted): each with value, threshold and met."""
    out = []
    rows = {(n["name"], r["batch"], r["backend"]): r for n in result["networks"] for r in n["rows"]}
    name = TARGET_NET if any(n["name"] == TARGET_NET for n in result["networks"]) else result["networks"][0]["name"]
    r = rows.get((name, TARGET_BATCH, "ort-fp32"))
    if r is not None:
        v = r["ratio_vs_pytorch"]["median"]
        out.append({"target": f"ONNX Runtime >= {TARGET_RATIO}x eager PyTorch images/s, {name}, batch {TARGET_BATCH}",
                    "value": v, "threshold": TARGET_RATIO, "met": v >= TARGET_RATIO})
    over = [(n["name"], rows[(n["name"], TARGET_BATCH, "ort-fp32")]["loop_overhead"]["median"])
            for n in result["networks"] if (n["name"], TARGET_BATCH, "ort-fp32") in rows]
    if over:
        worst = max(over, key=lambda x: x[1])
        out.append({"target": f"loop overhead < {100 * TARGET_OVERHEAD:g}% of step time at batch {TARGET_BATCH} "
                              f"(worst network: {worst[0]})",
                    "value": worst[1], "threshold": TARGET_OVERHEAD, "met": worst[1] < TARGET_OVERHEAD,
                    "per_network": dict(over)})
    r = rows.get((INT8_TARGET_NET, TARGET_BATCH, "ort-int8"))
    if r is not None:
        v = r["ratio_vs_ort_fp32"]["median"]
        out.append({"target": f"ONNX Runtime INT8 >= {INT8_TARGET_RATIO}x ONNX Runtime FP32 images/s, "
                              f"{INT8_TARGET_NET}, batch {TARGET_BATCH}",
                    "value": v, "threshold": INT8_TARGET_RATIO, "met": v >= INT8_TARGET_RATIO})
    from .openvino import targets as openvino_targets

    out += openvino_targets(result)
    imp = result.get("import_runtime", {})
    if "median_s" in imp:
        ok = imp["median_s"] < TARGET_IMPORT_S and not imp["torch_in_sys_modules"]
        out.append({"target": f"`import bdm_runtime` < {TARGET_IMPORT_S} s, no torch in sys.modules",
                    "value": imp["median_s"], "threshold": TARGET_IMPORT_S, "met": ok})
    return out


def _f(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _share(cs):
    if not cs:
        return "(unknown)"
    return f"{cs['others_cores']:.2f} cores on average (hypervisor steal {100 * cs['steal']:.1f}% of CPU time)"


def markdown(res):
    """The report as markdown: machine, settings, throughput table, overhead, memory, cold start, targets."""
    L = _head(res)
    for n in res["networks"]:
        L += _network(n) + _fresh(n["fresh_process"], res["baseline_rss_mib"])
    imp = res["import_runtime"]
    if "median_s" in imp:
        L += [f"`import bdm_runtime` (fresh interpreter, median of {imp['repeats']}): {imp['median_s'] * 1000:.1f} ms; "
              f"then `import bdm_runtime.sampler` (numpy): {imp['then_runtime_sampler_median_s'] * 1000:.1f} ms; "
              f"torch in sys.modules: {imp['torch_in_sys_modules']}.", ""]
    if res.get("ort_sweep"):
        L += _sweep(res["ort_sweep"])
    if "defaults" in res:
        from benchmarks.defaults import markdown as defaults_markdown

        L += defaults_markdown(res["defaults"])
    if "shipped_run" in res:
        from .openvino import markdown as openvino_markdown

        L += openvino_markdown(res["shipped_run"])
    L += _gpu(res["gpu"])
    L += ["## Targets (evaluated, never asserted)", ""]
    for t in res["targets"]:
        L.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: measured {t['value']:.4g} "
                 f"(threshold {t['threshold']:g})")
    return "\n".join(L) + "\n"


def _head(res):
    """Title, machine, threads and the method, as markdown lines."""
    m, th, pk = res["machine"], res["threads"], res["matmul_peak"]
    return [
        f"# bdm sampling benchmark ({'QUICK: wiring check, not a measurement' if res['run']['quick'] else 'CPU'})",
        "",
        f"Machine: {m.get('cpu_model')}, {m.get('affinity_cpus', m.get('logical_cpus'))} cores "
        f"({', '.join(m.get('simd', []))}), {m.get('mem_total_gib')} GiB; {m['platform']}; "
        f"Python {m['python']}, torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}, "
        f"numpy {m['versions']['numpy']}, openvino {m['versions'].get('openvino')} (CPU capabilities "
        f"{', '.join(m.get('openvino_cpu_capabilities') or []) or '-'}). Date {res['run']['date']}; load average (1/5/15 min) "
        f"{res['run']['load_before']} before, {res['run']['load_after']} after (the run's own threads count "
        f"in the latter); other processes used {_share(res['run'].get('cpu_share'))} during the run; "
        f"run took {res['run']['duration_s']:.0f} s.",
        "",
        f"Threads: torch.set_num_threads({th['torch_num_threads']}); ONNX Runtime intra_op_num_threads = "
        f"{th['ort_intra_op_num_threads']} (graph optimisation {th['ort_graph_optimization_level']}, "
        f"sequential execution, CPUExecutionProvider). Float32 matmul peak ({pk['n']}x{pk['n']}, "
        f"{pk['threads']} threads): torch {pk['torch_gflops']} GFLOP/s, numpy {pk['numpy_gflops']} GFLOP/s.",
        "",
        f"Sampler: eta = {res['run']['eta']} (ancestral, noise drawn every step), seed {SEED}, clip_denoised; "
        "PyTorch = `bdm_train.sampling.sample` (eager, no_grad); ort = `bdm_runtime.load(...).sample` (I/O binding). "
        "x PyTorch = median over repeats of the pairwise ratio of images/s (each pair measured back to back). "
        "Loop overhead = (sampling time - sum of the session's own step times) / sum of step times. "
        "% peak = achieved GFLOP/s (Conv/Gemm/MatMul FLOPs of the graph x images x steps / time) over the "
        "measured matmul peak. ort-fp16: ONNX Runtime's CPU provider has no FP16 convolutions; it folds the FP16 "
        "weights to FP32 at load (more memory) and runs FP32 NCHWc convolutions between Cast nodes, so the "
        "FP16 graph is timed for completeness, not expected to be faster on a CPU. pytorch-bf16 = the same loop "
        "under `torch.autocast('cpu', dtype=torch.bfloat16)`; openvino-P = `bdm_runtime.load(..., "
        "backend='openvino', precision=P)`: the network in P, the update in FP32 (docs/openvino.md); "
        "x ORT FP32 = median of the pairwise ratios to ort-fp32.",
        ""]


def _network(n):
    """One network's description and throughput table."""
    L = [f"## {n['name']}: {n['about']}", "",
         f"UNet {json.dumps(n['unet'])}, blur_sigma_max {n['blur_sigma_max']}; {n['params_m']:.2f} M parameters; "
         f"{n['gflop_per_eval']:.4f} GFLOP per network evaluation per image (from the graph's shapes; "
         f"torch's FLOP counter: {n['gflop_torch_counter']:.4f}); ONNX {n['onnx_mib']['fp32']:.1f} MiB FP32, "
         f"{n['onnx_mib']['fp16']:.1f} MiB FP16, {n['onnx_mib'].get('int8', float('nan')):.1f} MiB INT8 (x FP32: "
         f"ort-int8's speed over ort-fp32, repeat by repeat); {n['steps']} steps per timed call; other processes used "
         f"{_share(n.get('cpu_share'))} while it was timed.", "",
         "| batch | backend | images/s | ms/step | x PyTorch | x ORT FP32 | GFLOP/s | % peak | loop overhead |",
         "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in n["rows"]:
        ratio = r.get("ratio_vs_pytorch", {}).get("median")
        vs_ort = r.get("ratio_vs_ort_fp32", {}).get("median")
        lo = r.get("loop_overhead")
        over = "{:.1f}% ({:.0f} us/step)".format(100 * lo["median"], lo["us_per_step"]) if lo else "-"
        L.append(f"| {r['batch']} | {r['backend']} | {_f(r['images_per_s'])} | {_f(r['ms_per_step'])} | "
                 f"{_f(ratio) + 'x' if ratio is not None else '-'} | {_f(vs_ort) + 'x' if vs_ort else '-'} | "
                 f"{_f(r['gflops_per_s'], 1)} | {_f(r['pct_of_peak'], 1)} | {over} |")
    for name, why in n.get("openvino_refused", {}).items():
        L.append(f"| all | {name} | refused: {why} | | | | | | |")
    return L


def _fresh(fp, baseline_rss_mib):
    """The fresh-process table of one network: peak RSS and cold start."""
    L = ["", f"Fresh processes (peak RSS = VmHWM after also sampling batch {fp['rss_batch']}; first image = "
             f"one image, {fp['first_image_steps']} steps; the runtime's load includes importing onnxruntime, "
             "PyTorch's import column is `import torch` + bdm_train, its load is building the UNet from a "
             "state dict; ort processes as shipped, default ORT threads):", "",
         "| process | peak RSS MiB | import s | load s | load to first image s | import + first image s |",
         "|---|---:|---:|---:|---:|---:|"]
    L.append(f"| python + numpy | {_f(baseline_rss_mib, 1)} | - | - | - | - |")
    for k in ("ort-fp32", "ort-fp16", "pytorch"):
        v = fp.get(k, {})
        if "error" in v or "skipped" in v:
            L.append(f"| {k} | {v.get('error') or v.get('skipped')} | | | | |")
            continue
        imp = v.get("import_runtime_s", v.get("import_torch_s"))
        L.append(f"| {k} | {_f(v['peak_rss_mib'], 1)} | {_f(imp, 3)} | {_f(v.get('load_s'), 3)} | "
                 f"{_f(v['first_image_s'], 3)} | {_f(imp + v['first_image_s'], 3)} |")
    L.append("")
    return L


def _sweep(sw):
    """The ONNX Runtime settings sweep table."""
    L = [f"## ONNX Runtime settings ({sw['network']}, batch {sw['batch']}, {sw['steps']} steps, through the runtime loop)",
         "", "| settings | ms/step | x PyTorch | session create s |", "|---|---:|---:|---:|"]
    for r in sw["rows"]:
        ratio = r.get("ratio_vs_pytorch", {}).get("median")
        L.append(f"| {r['backend']} | {_f(r['ms_per_step'])} | {_f(ratio) + 'x' if ratio else '-'} | "
                 f"{_f(r.get('session_create_s'), 3)} |")
    L.append("")
    return L


def _gpu(gpu):
    """The GPU section: a note where no GPU was seen, else one row per network, batch and backend."""
    L = ["## GPU", ""]
    if not gpu.get("available"):
        return L + [gpu["note"], ""]
    L += [f"{gpu['gpu']}, CUDA {gpu['cuda']}, TensorRT {gpu.get('tensorrt') or '(not importable)'}.", "",
          "| network | batch | backend | images/s | ms/step | device MiB | notes |", "|---|---:|---|---:|---:|---:|---|"]
    for e in gpu["networks"]:
        for r in e["rows"]:
            note = r.get("error") or ", ".join(f"{k} {r[k]}" for k in ("engine_build_and_load_s", "engine_mib")
                                               if k in r)
            L.append(f"| {e['network']} | {r.get('batch', 'all')} | {r['backend']} | {_f(r.get('images_per_s'))} | "
                     f"{_f(r.get('ms_per_step'))} | {_f(r.get('device_mib'), 1)} | {note} |")
    L.append("")
    return L
