"""The summary and the report (``OUT.json``, ``OUT.md``) of ``benchmarks.serve_bench``: medians over rounds,
the issue's two target ratios, wall-clock and per CPU-second."""
import json

from benchmarks.bench.machine import median

CLIENTS = (1, 4, 16)
SERVERS = {False: "bdm-serve (PyTriton)",
           True: "standalone tritonserver (bdm-serve --write-repository on PyTriton's bundled server, no PyTriton)"}


def shares(s16, d1, db):
    """``(s16 / db, (s16 - d1) / (db - d1))``: the two targets (the second ``None`` where batching gains nothing)."""
    return s16 / db, ((s16 - d1) / (db - d1) if db > d1 else None)


def summarize(rounds):
    """Medians over rounds and the two target ratios."""
    med = lambda f: median([f(r) for r in rounds])  # noqa: E731
    out = {"direct_b1_images_per_s": med(lambda r: r["direct_b1"]),
           "direct_formed_images_per_s": med(lambda r: r["direct_formed"]),
           "formed_batch": med(lambda r: r["formed_batch"]), "served": {}}
    for c in CLIENTS:
        k = f"served_c{c}"
        out["served"][c] = {m: med(lambda r: r[k][m]) for m in ("requests_per_s", "p50_ms", "p99_ms", "mean_batch")}
    s16, d1, db = out["served"][16]["requests_per_s"], out["direct_b1_images_per_s"], out["direct_formed_images_per_s"]
    out["ratio_vs_direct_at_formed_batch"], out["ratio_of_gains"] = shares(s16, d1, db)
    out["gain_direct"] = db / d1
    out["gain_served"] = s16 / d1
    paired = [shares(r["served_c16"]["requests_per_s"], r["direct_b1"], r["direct_formed"]) for r in rounds]
    out["paired_ratio_vs_direct_at_formed_batch"] = median([p[0] for p in paired])
    gains = [p[1] for p in paired if p[1] is not None]
    out["paired_ratio_of_gains"] = median(gains) if len(gains) == len(paired) else None
    names = sorted({k for r in rounds for k in r.get("served_c16_cpu_s_by_process", {})})
    out["served_c16_cpu_s_by_process"] = {k: med(lambda r: r["served_c16_cpu_s_by_process"].get(k, 0.0))
                                          for k in names}
    cpu = [shares(r["served_c16_per_cpu_s"], r["direct_b1_per_cpu_s"], r["direct_formed_per_cpu_s"]) for r in rounds]
    out["per_cpu_s"] = {"direct_b1": med(lambda r: r["direct_b1_per_cpu_s"]),
                        "direct_formed": med(lambda r: r["direct_formed_per_cpu_s"]),
                        "served_c16": med(lambda r: r["served_c16_per_cpu_s"]),
                        "paired_ratio_vs_direct_at_formed_batch": median([p[0] for p in cpu]),
                        "paired_ratio_of_gains": (median([p[1] for p in cpu])
                                                  if all(p[1] is not None for p in cpu) else None)}
    return out


def markdown(result):
    s, m = result["summary"], result["machine"]
    cpu = s["per_cpu_s"]
    server = result.get("server", SERVERS[False])
    lines = [f"# {server} vs direct sampling ({result['model']})", "",
             f"Images served equal direct sampling's: {result.get('images_equal_direct', 'not checked')}.", "",
             f"CPU: {m.get('cpu_model')} ({', '.join(m.get('simd', []))}), {m.get('affinity_cpus')} cores; "
             f"ONNX Runtime threads {result['threads']} in both; Triton max batch {result['max_batch']}, "
             f"queue delay {result['queue_delay_us']} us, preferred batch {result.get('preferred_batch') or 'none'}, "
             f"{result.get('instances', 1)} model instance(s); {result.get('client', 'http').upper()} clients "
             f"(tritonclient); {result['rounds']} interleaved rounds (medians); "
             f"load average {result['load_before']} -> {result['load_after']}; other processes' CPU "
             f"{result['cpu_share']}.", "",
             "| clients | requests/s | p50 ms | p99 ms | mean batch formed |", "|---|---|---|---|---|"]
    for c, v in s["served"].items():
        lines.append(f"| {c} | {v['requests_per_s']:.2f} | {v['p50_ms']:.0f} | {v['p99_ms']:.0f} "
                     f"| {v['mean_batch']:.2f} |")
    lines += ["", f"Direct `Sampler.sample`: batch 1 {s['direct_b1_images_per_s']:.2f} images/s; batch "
              f"{s['formed_batch']:.0f} (the batch formed at 16 clients) {s['direct_formed_images_per_s']:.2f} "
              f"images/s (batching gain x{s['gain_direct']:.2f}).", "",
              f"- 16 clients / direct at the formed batch: **{s['ratio_vs_direct_at_formed_batch']:.2f}** "
              "(target >= 0.8)",
              f"- gain over batch 1: served x{s['gain_served']:.2f} against direct x{s['gain_direct']:.2f}; share of "
              f"the gain kept: **{_fmt(s['ratio_of_gains'])}** (target >= 0.8)",
              f"- the same two ratios per round (paired measurements ~5 s apart), median over rounds: "
              f"{s['paired_ratio_vs_direct_at_formed_batch']:.2f} and {_fmt(s['paired_ratio_of_gains'])}",
              f"- per CPU-second (images per CPU-second of the server's processes against this process's for "
              f"direct sampling; blind to idle time, steady under load): direct batch 1 {cpu['direct_b1']:.1f}, batch "
              f"{s['formed_batch']:.0f} {cpu['direct_formed']:.1f}, served at 16 clients {cpu['served_c16']:.1f}; paired "
              f"ratios {cpu['paired_ratio_vs_direct_at_formed_batch']:.2f} and {_fmt(cpu['paired_ratio_of_gains'])}"]
    if s.get("served_c16_cpu_s_by_process"):
        lines.append("- CPU-seconds of the server's processes at 16 clients, by process name (medians): " + ", ".join(
            f"{k} {v:.2f}" for k, v in s["served_c16_cpu_s_by_process"].items()))
    lines.append("")
    return "\n".join(lines)


def _fmt(v):
    return "n/a (batching gives direct sampling no gain here)" if v is None else f"{v:.2f}"


def write(result, out):
    from bdm_runtime.io import atomic_path

    for ext, text in ((".json", json.dumps(result, indent=1, sort_keys=True) + "\n"), (".md", markdown(result))):
        with atomic_path(out + ext) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
