"""Deployment numbers, in one process run: the runtime (ONNX Runtime; TensorRT where present)
against the PyTorch reference ``bdm_train.sampling.sample``, on the same weights, steps, eta,
seed and batch.

    python -m benchmarks.bench                  # full run, ~5 min on 2 cores: benchmarks/results/bench_cpu.{json,md}
    python -m benchmarks.bench --quick          # a tiny network in seconds (the smoke test); prints the table
    python -m benchmarks.bench --max-load 0.5   # first wait (up to --wait s) for a quiet machine

Method. Networks get random weights (every parameter re-drawn: the UNet zero-initialises its
output convolutions, which would make eps = 0), are exported as FP32 and FP16 step graphs, and
sampled through ``runtime.load(...).sample`` and ``bdm_train.sampling.sample``. The backends of
one (network, batch) are interleaved repeat by repeat (their order rotated), so each repeat gives
one runtime/PyTorch pair measured under the same machine conditions; ratios are the median of the
per-pair ratios, times the medians. Loop overhead comes from the same timed calls: the runtime's
public step-timing hook (``Sampler.sample(..., timing=)``) gives each step's own time, and overhead
= (sampling time - sum of step times) / sum of step times. Thread settings are pinned:
``torch.set_num_threads(T)`` and ONNX Runtime ``intra_op_num_threads = T``, in an ONNX Runtime
``SessionOptions`` given to ``runtime.load(..., session_options=)`` (``ort_session_options``). The
sampler default section (``benchmarks.defaults``) times the shipped model at its sampler default
against the old one (100 ancestral DDIM steps) in the same run. Cold start, peak
RSS and ``import runtime`` are measured in fresh subprocesses (the runtime ones check that torch
never enters ``sys.modules``). FLOPs per network evaluation come from the exported graph's
shapes (``benchmarks.flops``), the peak from a float32 matmul with the same thread count.
"""
import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "bdm-bench/1"
DEFAULT_OUT = os.path.join("benchmarks", "results", "bench_cpu")
SEED = 0
ETA = 1.0  # the paper's ancestral sampler (B9): the loop then also draws noise every step
TARGET_RATIO, TARGET_OVERHEAD, TARGET_IMPORT_S = 1.5, 0.05, 0.5
TARGET_NET, TARGET_BATCH = "demo-8x8", 16

# The networks. ``batches``: timed batch sizes; ``fp16``: batches where the FP16 graph is timed too
# (ONNX Runtime's CPU provider has no FP16 convolutions: it inserts casts and computes in FP32, so
# the FP16 graph is recorded, not expected to be faster); ``steps`` x ``repeats`` per pair.
NETWORKS = (
    dict(name="demo-8x8", about="the `make demo-train` network (8x8 digits)", blur_sigma_max=5.0,
         unet=dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0),
         steps=20, repeats=5, batches=(1, 16, 64), fp16=(1, 16, 64), rss_batch=64),
    dict(name="study-32x32", about="a 32x32 Fashion-MNIST network (ch 32; the study now uses ch 16)", blur_sigma_max=20.0,
         unet=dict(in_channels=1, image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0),
         steps=5, repeats=3, batches=(1, 16, 64), fp16=(1, 16, 64), rss_batch=64),
    # DDPM's CIFAR-10 UNet (Ho et al. 2020, as its public configs give it: ch 128, multipliers
    # 1,2,2,2, two blocks per level, attention at 16x16, dropout 0.1), the network BDM's CIFAR-10
    # experiments build on; sigma_B,max = 20, the paper's value (see benchmarks/study.py).
    dict(name="cifar10-32x32", about="the paper's CIFAR-10 configuration (DDPM's UNet)", blur_sigma_max=20.0,
         unet=dict(in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,), dropout=0.1),
         steps=2, repeats=3, batches=(1, 16, 64), fp16=(1, 16), rss_batch=16, repeats_at={64: 2}),
)
QUICK_NETWORKS = (
    dict(name="tiny-8x8", about="a tiny network (--quick: checks the wiring, not a measurement)", blur_sigma_max=5.0,
         unet=dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0),
         steps=2, repeats=2, batches=(1, 16), fp16=(16,), rss_batch=16),
)


# -- small helpers --------------------------------------------------------------------------------
def median(values):
    return float(statistics.median(values))


def loadavg():
    """1, 5 and 15-minute load averages."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class CpuShare:
    """CPU time other processes took while open: /proc/stat's busy time minus this process's own.

    The load average counts this benchmark's own threads too; this does not. ``others_cores`` is
    the average number of cores other processes kept busy, ``steal`` the hypervisor's share.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        import resource

        try:
            with open("/proc/stat", encoding="utf-8") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(w), k) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for k in ("ru_utime", "ru_stime"))
        busy = (v[0] + v[1] + v[2] + v[5] + v[6]) / hz  # user nice system irq softirq
        return time.perf_counter(), busy, own, v[7] / hz, sum(v[:8]) / hz

    def result(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        others = max(0.0, (end[1] - self.start[1]) - (end[2] - self.start[2]))
        total = max(end[4] - self.start[4], 1e-9)
        return {"wall_s": round(wall, 1), "others_cores": round(others / max(wall, 1e-9), 3),
                "steal": round((end[3] - self.start[3]) / total, 3)}


def wait_for_quiet(max_load, wait_s, log):
    """Wait (up to ``wait_s``) until the 1-minute load average is below ``max_load``; True if it was."""
    deadline = time.time() + wait_s
    while True:
        load = os.getloadavg()[0]
        if load < max_load:
            return True
        if time.time() > deadline:
            log(f"load {load:.2f} still >= {max_load} after {wait_s:.0f} s: measuring anyway")
            return False
        log(f"load {load:.2f} >= {max_load}: waiting")
        time.sleep(15)


def _python(code, timeout=600):
    """Run ``code`` in a fresh interpreter (cwd = repo root); its last stdout line as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"subprocess failed: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- machine --------------------------------------------------------------------------------------
def machine_info():
    """CPU model, cores, SIMD flags, memory and library versions."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "logical_cpus": os.cpu_count()}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            text = f.read()
        lines = [ln.split(":", 1) for ln in text.splitlines() if ":" in ln]
        fields = {}
        for k, v in lines:
            fields.setdefault(k.strip(), v.strip())
        info["cpu_model"] = fields.get("model name")
        flags = set(fields.get("flags", "").split())
        info["simd"] = sorted(flags & {"avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16",
                                       "avx512_vnni", "amx_tile"})
    except OSError:
        info["cpu_model"] = platform.processor() or None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {"numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "onnx", "tensorrt"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    info["versions"] = versions
    return info


def matmul_peak(threads, n, repeats):
    """Measured float32 matmul GFLOP/s (best of ``repeats``) with torch and numpy on ``threads`` threads."""
    import torch

    out = {"n": n, "threads": threads}
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    out["torch_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    x, y = a.numpy(), b.numpy()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    with (threadpool_limits(threads) if threadpool_limits else contextlib.nullcontext()):
        x @ y
        best = min(_timed(lambda: x @ y) for _ in range(repeats))
    out["numpy_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    out["numpy_threads_pinned"] = threadpool_limits is not None
    out["peak_gflops"] = max(out["torch_gflops"], out["numpy_gflops"])
    return out


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- networks -------------------------------------------------------------------------------------
def build(net, seed=SEED):
    """``(model, process)``: the UNet of ``net`` with every parameter drawn at random, and its process."""
    import torch

    from bdm_train.diffusion import BlurringDiffusion
    from bdm_train.unet import UNet

    torch.manual_seed(seed)
    model = UNet(**net["unet"]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:       # conv/linear/embedding weights: fan-in scaling keeps activations O(1)
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # GroupNorm gains around 1
                p.copy_(1.0 + 0.1 * noise)
            else:                  # biases
                p.copy_(0.1 * noise)
    process = BlurringDiffusion(net["unet"]["image_size"], blur_sigma_max=net["blur_sigma_max"])
    return model, process


def eps_std(model, net):
    """Standard deviation of eps on a random latent at t = 0.5 (0 would mean an untrained-zero network)."""
    import torch

    c, s = net["unet"]["in_channels"], net["unet"]["image_size"]
    z = torch.randn(4, c, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(model(z, torch.full((4,), 0.5)).std())


def export_graphs(model, process, net, folder):
    """Write ``<name>.onnx`` (FP32) and ``<name>_fp16.onnx``; returns their paths and export times."""
    from export.onnx_export import export_onnx

    paths, times = {}, {}
    for precision, fp16 in (("fp32", False), ("fp16", True)):
        path = os.path.join(folder, f"{net['name']}{'_fp16' if fp16 else ''}.onnx")
        t = time.perf_counter()
        export_onnx(model, process, path, channels=net["unet"]["in_channels"], fp16=fp16,
                    default_steps=net["steps"], default_eta=ETA)
        times[precision] = round(time.perf_counter() - t, 2)
        paths[precision] = path
    return paths, times


def flops_check(model, process, net):
    """FLOPs of one step (network + DCT update) at batch 1 by torch's own FLOP counter: an independent check."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bdm_train.sampling import conditioned, ddim_step

    c, s = net["unet"]["in_channels"], net["unet"]["image_size"]
    z = torch.randn(1, c, s, s)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ddim_step(conditioned(model, None), process, z, torch.full((1,), 0.5), torch.full((1,), 0.45), ETA,
                  torch.randn_like(z))
    return int(counter.get_total_flops())


# -- ONNX Runtime settings, given to the runtime as ONNX Runtime's own SessionOptions ----------------
def ort_session_options(settings):
    """``onnxruntime.SessionOptions`` as the runtime makes its own (all graph optimisations, errors-only
    logging) with ``settings`` applied; ``None`` without settings (the runtime's own, as shipped)."""
    import onnxruntime as ort

    if not settings:
        return None
    o = ort.SessionOptions()
    o.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                         settings.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    o.log_severity_level = 3
    if "intra_op_num_threads" in settings:
        o.intra_op_num_threads = int(settings["intra_op_num_threads"])
    if "inter_op_num_threads" in settings:
        o.inter_op_num_threads = int(settings["inter_op_num_threads"])
    if "execution_mode" in settings:
        o.execution_mode = getattr(ort.ExecutionMode, settings["execution_mode"])
    if "allow_spinning" in settings:
        flag = "1" if settings["allow_spinning"] else "0"
        o.add_session_config_entry("session.intra_op.allow_spinning", flag)
        o.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return o


def load_timed(path, settings):
    """``(sampler, step_times)``: ``runtime.load(path)`` on the CPU provider with ``settings``; the list
    receives the step times of the runtime's timing hook when passed as ``sample(..., timing=step_times.append)``."""
    import runtime

    sampler = runtime.load(path, backend="ort", providers=["CPUExecutionProvider"],
                           session_options=ort_session_options(settings))
    return sampler, []


def session_options(sampler):
    """The options the session actually runs with, read back from it (proof the settings arrived)."""
    o = sampler.session_options
    return {"intra_op_num_threads": o.intra_op_num_threads, "inter_op_num_threads": o.inter_op_num_threads,
            "graph_optimization_level": str(o.graph_optimization_level).split(".")[-1],
            "execution_mode": str(o.execution_mode).split(".")[-1],
            "allow_spinning": _config_entry(o, "session.intra_op.allow_spinning")}


def _config_entry(options, key):
    """A session config entry, or ``"default"`` when unset (ORT raises for unset keys)."""
    try:
        return options.get_session_config_entry(key)
    except Exception:
        return "default"


# -- timing -------------------------------------------------------------------------------------
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
        if r["step_sums_s"]:
            sums = r["step_sums_s"]
            frac = [(t - s) / s for t, s in zip(times, sums)]
            row["loop_overhead"] = {"step_sums_s": sums,
                                    "per_repeat": [round(x, 5) for x in frac], "median": round(median(frac), 5),
                                    "us_per_step": round(1e6 * median([(t - s) for t, s in zip(times, sums)]) / steps, 1)}
        rows.append(row)
    return rows


def time_network(net, model, process, paths, threads, quick, peak, flops, log):
    """All timed rows of one network (every batch, every backend)."""
    import torch

    from bdm_train.sampling import sample

    settings = {"intra_op_num_threads": threads}
    ort32, times32 = load_timed(paths["fp32"], settings)
    ort16, times16 = load_timed(paths["fp16"], settings)
    options = session_options(ort32)
    c = net["unet"]["in_channels"]

    def torch_call(b, steps):
        return sample(model, process, b, SEED, steps, eta=ETA, batch_size=b, channels=c, num_classes=0).numpy()

    runners = {"pytorch": Runner("pytorch", torch_call),
               "ort-fp32": Runner("ort-fp32", lambda b, s: ort32.sample(b, seed=SEED, steps=s, eta=ETA,
                                                                        timing=times32.append), times32),
               "ort-fp16": Runner("ort-fp16", lambda b, s: ort16.sample(b, seed=SEED, steps=s, eta=ETA,
                                                                        timing=times16.append), times16)}
    rows = []
    torch.set_num_threads(threads)
    for b in net["batches"]:
        names = ["pytorch", "ort-fp32"] + (["ort-fp16"] if b in net["fp16"] else [])
        repeats = net.get("repeats_at", {}).get(b, net["repeats"])
        t = time.perf_counter()
        rec = interleaved([runners[n] for n in names], b, net["steps"], repeats)
        rows += summarise(rec, b, net["steps"], flops, peak)
        log(f"  {net['name']} batch {b}: " + ", ".join(
            f"{r['backend']} {r['images_per_s']:.1f} img/s" for r in rows if r["batch"] == b)
            + f" ({time.perf_counter() - t:.0f} s, load {loadavg()[0]})")
    ort32.close()
    ort16.close()
    return rows, options


# -- ONNX Runtime settings sweep (what it takes to be fast) -------------------------------------------
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


# -- fresh processes: cold start, memory, import time -------------------------------------------------
# Peak RSS is VmHWM of /proc/self/status: ru_maxrss would carry the benchmark process's own peak
# over fork + exec (Linux keeps the larger of the old and new address space's high-water mark).
_PEAK = "max(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024"

_RUNTIME_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import runtime
t1 = time.perf_counter()
torch_at_import = "torch" in sys.modules
s = runtime.load({path!r}, backend="ort", providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
s.sample(1, seed=0, steps={steps}, eta={eta})
t3 = time.perf_counter()
s.sample({batch}, seed=0, steps=1, eta={eta})
print(json.dumps({{"import_runtime_s": t1 - t0, "load_s": t2 - t1, "first_image_s": t3 - t1,
                  "torch_in_sys_modules": torch_at_import or "torch" in sys.modules,
                  "peak_rss_mib": {peak}}}))
'''

_TORCH_CHILD = r'''
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from bdm_train.diffusion import BlurringDiffusion
from bdm_train.sampling import sample
from bdm_train.unet import UNet
t1 = time.perf_counter()
ck = torch.load({pt!r}, weights_only=True)
model = UNet(**ck["unet"]).eval()
model.load_state_dict(ck["state"])
process = BlurringDiffusion(ck["unet"]["image_size"], blur_sigma_max=ck["blur_sigma_max"])
sample(model, process, 1, 0, {steps}, eta={eta})
t2 = time.perf_counter()
sample(model, process, {batch}, 0, 1, eta={eta})
print(json.dumps({{"import_torch_s": t1 - t0, "first_image_s": t2 - t1,
                  "peak_rss_mib": {peak}}}))
'''

_BASELINE_CHILD = r'''
import json
import numpy
print(json.dumps({{"peak_rss_mib": {peak}}}))
'''.format(peak=_PEAK)

_IMPORT_CHILD = r'''
import json, sys, time
t = time.perf_counter()
import runtime
d = time.perf_counter() - t
t = time.perf_counter()
import runtime.sampler
d2 = time.perf_counter() - t
print(json.dumps({"import_runtime_s": d, "import_runtime_sampler_s": d2, "torch_in_sys_modules": "torch" in sys.modules}))
'''


def import_times(repeats):
    """``import runtime`` in fresh interpreters: median seconds, and whether torch was ever loaded."""
    runs = [_python(_IMPORT_CHILD) for _ in range(repeats)]
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
        out["ort-" + precision] = _python(_RUNTIME_CHILD.format(path=paths[precision], steps=steps, eta=ETA, batch=b,
                                                                peak=_PEAK))
    if quick:
        out["pytorch"] = {"skipped": "--quick (importing torch in a fresh process takes seconds)"}
    else:
        pt = os.path.join(folder, net["name"] + ".pt")
        torch.save({"unet": net["unet"], "blur_sigma_max": net["blur_sigma_max"], "state": model.state_dict()}, pt)
        out["pytorch"] = _python(_TORCH_CHILD.format(pt=pt, steps=steps, eta=ETA, batch=b, threads=threads,
                                                      peak=_PEAK))
    for k, v in out.items():
        if isinstance(v, dict):
            out[k] = {kk: (round(vv, 4) if isinstance(vv, float) else vv) for kk, vv in v.items()}
    return out


# -- GPU (where CUDA is available) ------------------------------------------------------------------
def gpu_section(nets, models, paths, quick, log):
    """PyTorch eager / CUDA graph / torch.compile images/s, and TensorRT where importable; else a note.

    Every figure is guarded: an error is recorded in its row, never fatal to the run.
    """
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device here: PyTorch eager / CUDA-graph / torch.compile and "
                                            "TensorRT figures not measured"}
    import importlib.util

    out = {"available": True, "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
           "tensorrt": None, "networks": []}
    have_trt = importlib.util.find_spec("tensorrt") is not None
    if have_trt:
        try:
            import tensorrt

            out["tensorrt"] = tensorrt.__version__
        except Exception as e:
            have_trt = False
            out["tensorrt_note"] = f"tensorrt does not import: {e}"
    else:
        out["tensorrt_note"] = "tensorrt is not importable here: TensorRT figures not measured"
    steps, repeats = (2, 2) if quick else (20, 5)
    kinds = ("torch-eager", "torch-cuda-graph", "torch-compile") + (("trt-fp32", "trt-fp16") if have_trt else ())
    for net in nets:
        model, process = models[net["name"]]
        entry = {"network": net["name"], "steps": steps, "rows": []}
        for kind in kinds:
            try:
                extra, call = _gpu_backend(kind, net, model, process, paths[net["name"]])
            except Exception as e:
                entry["rows"].append({"backend": kind, "error": _err(e)})
                continue
            for b in net["batches"]:
                row = {"backend": kind, "batch": b}
                try:
                    torch.cuda.reset_peak_memory_stats()
                    free0 = torch.cuda.mem_get_info()[0]
                    call(b, 1)  # warm-up (and, for torch.compile, compilation at this shape)
                    times = [_timed(lambda: call(b, steps)) for _ in range(repeats)]
                    med = median(times)
                    row.update(times_s=times, median_s=med, images_per_s=round(b / med, 2),
                               ms_per_step=round(1000 * med / steps, 3),
                               device_mib=round(max(torch.cuda.max_memory_allocated(),
                                                    free0 - torch.cuda.mem_get_info()[0]) / 2 ** 20, 1))
                    row.update(extra)
                except Exception as e:
                    row["error"] = _err(e)
                entry["rows"].append(row)
                log(f"  gpu {net['name']} batch {b} {kind}: {row.get('images_per_s', row.get('error'))}")
            torch.cuda.empty_cache()
        out["networks"].append(entry)
    return out


def _err(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _gpu_backend(kind, net, model, process, paths):
    """``(extra figures, call(b, steps))`` for one GPU way of sampling (synchronised on return)."""
    import torch

    from bdm_train.sampling import conditioned, ddim_step, sample
    from runtime.noise import NoiseStream, time_grid

    dev = torch.device("cuda")
    c, size = net["unet"]["in_channels"], net["unet"]["image_size"]
    shape = (c, size, size)
    extra = {}
    if kind.startswith("trt"):
        import runtime

        folder = tempfile.mkdtemp(prefix="bdm-trt-")
        t = time.perf_counter()
        sampler = runtime.load(paths[kind.split("-")[1]], backend="trt", engine_cache=folder)
        extra["engine_build_and_load_s"] = round(time.perf_counter() - t, 2)
        plans = [f for f in os.listdir(folder) if f.endswith(".plan")]
        extra["engine_mib"] = round(os.path.getsize(os.path.join(folder, plans[0])) / 2 ** 20, 2) if plans else None
        return extra, lambda b, s: sampler.sample(b, seed=SEED, steps=s, eta=ETA)
    m = copy.deepcopy(model).to(dev).eval()
    p = copy.deepcopy(process).to(dev)

    def eager(net_fn):
        def call(b, s):
            x = sample(net_fn, p, b, SEED, s, eta=ETA, batch_size=b, channels=c, num_classes=0, device=dev)
            torch.cuda.synchronize()
            return x
        return call

    if kind == "torch-eager":
        return extra, eager(m)
    if kind == "torch-compile":
        return extra, eager(torch.compile(m))
    graphs = {}  # batch -> (graph, static tensors): one step captured as a CUDA graph per batch size

    def capture(b):
        z = torch.randn((b,) + shape, device=dev)
        tt, ss = torch.full((b,), 0.5, device=dev), torch.full((b,), 0.45, device=dev)
        xi = torch.randn_like(z)
        eps_model = conditioned(m, None)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(2):
                ddim_step(eps_model, p, z, tt, ss, ETA, xi)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            z_next, x0 = ddim_step(eps_model, p, z, tt, ss, ETA, xi)
        return graph, z, tt, ss, xi, z_next, x0

    def call(b, s):  # the same noise protocol as sample(): drawn on the host, copied up each step
        if b not in graphs:
            graphs[b] = capture(b)
        graph, z, tt, ss, xi, z_next, x0 = graphs[b]
        stream = NoiseStream(SEED, 0, b, shape)
        z.copy_(torch.from_numpy(stream.draw()))
        grid = time_grid(s)
        for t_i, s_i in zip(grid[:-1], grid[1:]):
            tt.fill_(float(t_i))
            ss.fill_(float(s_i))
            xi.copy_(torch.from_numpy(stream.draw()))
            graph.replay()
            z.copy_(z_next)
        torch.cuda.synchronize()
        return x0

    return extra, call


# -- targets and report -------------------------------------------------------------------------------
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
    imp = result.get("import_runtime", {})
    if "median_s" in imp:
        ok = imp["median_s"] < TARGET_IMPORT_S and not imp["torch_in_sys_modules"]
        out.append({"target": f"`import runtime` < {TARGET_IMPORT_S} s, no torch in sys.modules",
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
    m, th, pk = res["machine"], res["threads"], res["matmul_peak"]
    L = [f"# bdm sampling benchmark ({'QUICK: wiring check, not a measurement' if res['run']['quick'] else 'CPU'})",
         "",
         f"Machine: {m.get('cpu_model')}, {m.get('affinity_cpus', m.get('logical_cpus'))} cores "
         f"({', '.join(m.get('simd', []))}), {m.get('mem_total_gib')} GiB; {m['platform']}; "
         f"Python {m['python']}, torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}, "
         f"numpy {m['versions']['numpy']}. Date {res['run']['date']}; load average (1/5/15 min) "
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
         "PyTorch = `bdm_train.sampling.sample` (eager, no_grad); ort = `runtime.load(...).sample` (I/O binding). "
         "x PyTorch = median over repeats of the pairwise ratio of images/s (each pair measured back to back). "
         "Loop overhead = (sampling time - sum of the session's own step times) / sum of step times. "
         "% peak = achieved GFLOP/s (Conv/Gemm/MatMul FLOPs of the graph x images x steps / time) over the "
         "measured matmul peak. ort-fp16: ONNX Runtime's CPU provider has no FP16 convolutions; it folds the FP16 "
         "weights to FP32 at load (more memory) and runs FP32 NCHWc convolutions between Cast nodes, so the "
         "FP16 graph is timed for completeness, not expected to be faster on a CPU.",
         ""]
    for n in res["networks"]:
        L += [f"## {n['name']}: {n['about']}", "",
              f"UNet {json.dumps(n['unet'])}, blur_sigma_max {n['blur_sigma_max']}; {n['params_m']:.2f} M parameters; "
              f"{n['gflop_per_eval']:.4f} GFLOP per network evaluation per image (from the graph's shapes; "
              f"torch's FLOP counter: {n['gflop_torch_counter']:.4f}); ONNX {n['onnx_mib']['fp32']:.1f} MiB FP32, "
              f"{n['onnx_mib']['fp16']:.1f} MiB FP16; {n['steps']} steps per timed call; other processes used "
              f"{_share(n.get('cpu_share'))} while it was timed.", "",
              "| batch | backend | images/s | ms/step | x PyTorch | GFLOP/s | % peak | loop overhead |",
              "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in n["rows"]:
            ratio = r.get("ratio_vs_pytorch", {}).get("median")
            lo = r.get("loop_overhead")
            over = "{:.1f}% ({:.0f} us/step)".format(100 * lo["median"], lo["us_per_step"]) if lo else "-"
            L.append(f"| {r['batch']} | {r['backend']} | {_f(r['images_per_s'])} | {_f(r['ms_per_step'])} | "
                     f"{_f(ratio) + 'x' if ratio is not None else '-'} | {_f(r['gflops_per_s'], 1)} | "
                     f"{_f(r['pct_of_peak'], 1)} | {over} |")
        fp = n["fresh_process"]
        L += ["", f"Fresh processes (peak RSS = VmHWM after also sampling batch {fp['rss_batch']}; first image = "
                  f"one image, {fp['first_image_steps']} steps; the runtime's load includes importing onnxruntime, "
                  "PyTorch's import column is `import torch` + bdm_train, its load is building the UNet from a "
                  "state dict; ort processes as shipped, default ORT threads):", "",
              "| process | peak RSS MiB | import s | load s | load to first image s | import + first image s |",
              "|---|---:|---:|---:|---:|---:|"]
        L.append(f"| python + numpy | {_f(res['baseline_rss_mib'], 1)} | - | - | - | - |")
        for k in ("ort-fp32", "ort-fp16", "pytorch"):
            v = fp.get(k, {})
            if "error" in v or "skipped" in v:
                L.append(f"| {k} | {v.get('error') or v.get('skipped')} | | | | |")
                continue
            imp = v.get("import_runtime_s", v.get("import_torch_s"))
            L.append(f"| {k} | {_f(v['peak_rss_mib'], 1)} | {_f(imp, 3)} | {_f(v.get('load_s'), 3)} | "
                     f"{_f(v['first_image_s'], 3)} | {_f(imp + v['first_image_s'], 3)} |")
        L.append("")
    imp = res["import_runtime"]
    if "median_s" in imp:
        L += [f"`import runtime` (fresh interpreter, median of {imp['repeats']}): {imp['median_s'] * 1000:.1f} ms; "
              f"then `import runtime.sampler` (numpy): {imp['then_runtime_sampler_median_s'] * 1000:.1f} ms; "
              f"torch in sys.modules: {imp['torch_in_sys_modules']}.", ""]
    sw = res.get("ort_sweep")
    if sw:
        L += [f"## ONNX Runtime settings ({sw['network']}, batch {sw['batch']}, {sw['steps']} steps, through the runtime loop)",
              "", "| settings | ms/step | x PyTorch | session create s |", "|---|---:|---:|---:|"]
        for r in sw["rows"]:
            ratio = r.get("ratio_vs_pytorch", {}).get("median")
            L.append(f"| {r['backend']} | {_f(r['ms_per_step'])} | {_f(ratio) + 'x' if ratio else '-'} | "
                     f"{_f(r.get('session_create_s'), 3)} |")
        L.append("")
    if "defaults" in res:
        from benchmarks.defaults import markdown as defaults_markdown

        L += defaults_markdown(res["defaults"])
    gpu = res["gpu"]
    L += ["## GPU", ""]
    if not gpu.get("available"):
        L += [gpu["note"], ""]
    else:
        L += [f"{gpu['gpu']}, CUDA {gpu['cuda']}, TensorRT {gpu.get('tensorrt') or '(not importable)'}.", "",
              "| network | batch | backend | images/s | ms/step | device MiB | notes |", "|---|---:|---|---:|---:|---:|---|"]
        for e in gpu["networks"]:
            for r in e["rows"]:
                note = r.get("error") or ", ".join(f"{k} {r[k]}" for k in ("engine_build_and_load_s", "engine_mib")
                                                   if k in r)
                L.append(f"| {e['network']} | {r.get('batch', 'all')} | {r['backend']} | {_f(r.get('images_per_s'))} | "
                         f"{_f(r.get('ms_per_step'))} | {_f(r.get('device_mib'), 1)} | {note} |")
        L.append("")
    L += ["## Targets (evaluated, never asserted)", ""]
    for t in res["targets"]:
        L.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['target']}: measured {t['value']:.4g} "
                 f"(threshold {t['threshold']:g})")
    return "\n".join(L) + "\n"


# -- the run -------------------------------------------------------------------------------------------
def run(quick=False, threads=2, networks=None, sweep=True, log=print, default=None):
    """Measure everything; returns the result dict (see the module docstring).

    ``default``: the new sampler default to time against the old one (``benchmarks.defaults``;
    ``None``: the shipped model's own).
    """
    import torch

    from benchmarks import defaults

    t_start = time.perf_counter()
    share = CpuShare()
    nets = QUICK_NETWORKS if quick else NETWORKS
    if networks:
        pool = {n["name"]: n for n in NETWORKS + QUICK_NETWORKS}
        nets = tuple(pool[n] for n in networks)
    torch.set_num_threads(threads)
    res = {"schema": SCHEMA,
           "run": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "quick": bool(quick), "argv": sys.argv[1:], "pid": os.getpid(), "eta": ETA, "seed": SEED,
                   "load_before": loadavg()},
           "machine": machine_info(),
           "threads": {"torch_num_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
                       "ort_intra_op_num_threads": threads, "ort_graph_optimization_level": "ORT_ENABLE_ALL",
                       "how": "ONNX Runtime SessionOptions given to runtime.load(session_options=) "
                              "(benchmarks.bench.ort_session_options)"}}
    log(f"machine: {res['machine'].get('cpu_model')}, load {res['run']['load_before']}, threads {threads}")
    res["matmul_peak"] = pk = matmul_peak(threads, 512 if quick else 2048, 3 if quick else 5)
    log(f"matmul peak: {pk['peak_gflops']} GFLOP/s")
    res["import_runtime"] = import_times(3 if quick else 7)
    res["baseline_rss_mib"] = round(_python(_BASELINE_CHILD).get("peak_rss_mib", float("nan")), 1)
    from benchmarks.flops import count_flops

    res["networks"], models, paths_all = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bdm-bench-") as folder:
        for net in nets:
            t = time.perf_counter()
            model, process = build(net)
            paths, export_s = export_graphs(model, process, net, folder)
            models[net["name"]], paths_all[net["name"]] = (model, process), paths
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
            entry["rows"], entry["ort_session_options"] = time_network(net, model, process, paths, threads, quick, pk["peak_gflops"], flops, log)
            entry["cpu_share"] = net_share.result()
            entry["fresh_process"] = fresh_process_figures(net, model, paths, folder, threads, quick)
            entry["seconds"] = round(time.perf_counter() - t, 1)
            res["networks"].append(entry)
        target = next((n for n in nets if n["name"] == TARGET_NET), None)
        if sweep and not quick and target is not None:
            model, process = models[TARGET_NET]
            res["ort_sweep"] = ort_sweep(target, model, process, paths_all[TARGET_NET]["fp32"], threads,
                                         target["repeats"], log)
        res["gpu"] = gpu_section(nets, models, paths_all, quick, log)
    res["defaults"] = defaults.measure(default, threads=threads, quick=quick, log=log)
    res["targets"] = targets(res)
    res["run"]["load_after"] = loadavg()
    res["run"]["cpu_share"] = share.result()
    res["run"]["duration_s"] = round(time.perf_counter() - t_start, 1)
    return res


def write(res, out):
    """``out.json`` and ``out.md`` (atomically)."""
    from runtime.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out + ".json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
    with atomic_path(out + ".md") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(markdown(res))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny network, 2 steps x 2 repeats: checks the wiring")
    p.add_argument("--out", default=None, help=f"output path without extension (default {DEFAULT_OUT}; "
                                               "--quick writes only when given)")
    p.add_argument("--threads", type=int, default=min(2, len(os.sched_getaffinity(0))),
                   help="torch and ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--networks", default=None, help="comma-separated subset of: "
                   + ", ".join(n["name"] for n in NETWORKS + QUICK_NETWORKS))
    p.add_argument("--no-sweep", action="store_true", help="skip the ONNX Runtime settings sweep")
    p.add_argument("--default", default=None, help="new sampler default SOLVER:GRID:STEPS[:ETA] timed against the "
                   "old one (100 ancestral DDIM steps) on the shipped model (default: its own config)")
    p.add_argument("--max-load", type=float, default=None, help="first wait until the 1-min load is below this")
    p.add_argument("--wait", type=float, default=600, help="longest wait for --max-load, seconds")
    a = p.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if a.max_load is not None:
        wait_for_quiet(a.max_load, a.wait, log)
    from benchmarks.defaults import parse_default

    default = parse_default(a.default) if a.default else None
    res = run(quick=a.quick, threads=a.threads, networks=a.networks.split(",") if a.networks else None,
              sweep=not a.no_sweep, log=log, default=default)
    out = a.out or (None if a.quick else DEFAULT_OUT)
    if out:
        write(res, out)
        log(f"wrote {out}.json and {out}.md")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
