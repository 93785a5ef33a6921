"""Fresh processes: cold start, peak memory and ``import bdm_runtime``, each in its own interpreter.

The children are real modules, ``benchmarks/bench/children/*.py``, run with ``python -m`` from the
repository root; their arguments travel as one JSON string, their result as one JSON line.
"""
import json
import os
import subprocess
import sys

from .config import ETA, ROOT
from .machine import median


def child(name, timeout=600, **arguments):
    """Run ``benchmarks.bench.children.<name>`` in a fresh interpreter: its JSON line, or ``{"error"}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench.children." + name, json.dumps(arguments)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"subprocess failed: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def baseline_rss():
    """Peak RSS (MiB) of a process with numpy and nothing else: the floor of the memory table."""
    return round(child("baseline").get("peak_rss_mib", float("nan")), 1)


def import_times(repeats):
    """``import bdm_runtime`` in fresh interpreters: median seconds, and whether torch was ever loaded."""
    runs = [child("import_runtime") for _ in range(repeats)]
    bad = [r["error"] for r in runs if "error" in r]
    if bad:
        return {"error": bad[0]}
    return {"repeats": repeats, "import_runtime_s": [round(r["import_runtime_s"], 5) for r in runs],
            "median_s": round(median([r["import_runtime_s"] for r in runs]), 5),
            "then_runtime_sampler_median_s": round(median([r["import_runtime_sampler_s"] for r in runs]), 5),
            "torch_in_sys_modules": any(r["torch_in_sys_modules"] for r in runs)}


def fresh_process_figures(net, model, paths, folder, threads, quick):
    """Cold start and peak RSS of the runtime (FP32, FP16) and of PyTorch, each in its own process."""
    import torch

    b, steps = net["rss_batch"], net["steps"]
    out = {"rss_batch": b, "first_image_steps": steps}
    for precision in ("fp32", "fp16"):
        out["ort-" + precision] = child("runtime_sample", path=paths[precision], steps=steps, eta=ETA, batch=b)
    if quick:
        out["pytorch"] = {"skipped": "--quick (importing torch in a fresh process takes seconds)"}
    else:
        pt = os.path.join(folder, net["name"] + ".pt")
        torch.save({"unet": net["unet"], "blur_sigma_max": net["blur_sigma_max"], "state": model.state_dict()}, pt)
        out["pytorch"] = child("torch_sample", pt=pt, steps=steps, eta=ETA, batch=b, threads=threads)
    for k, v in out.items():
        if isinstance(v, dict):
            out[k] = {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
    return out
