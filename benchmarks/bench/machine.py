"""The machine: CPU, memory, library versions, load, the CPU share of other processes, matmul peak."""
import contextlib
import os
import platform
import statistics
import time

import numpy as np


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
                                       "avx512_vnni", "amx_tile", "amx_bf16", "amx_fp16", "amx_int8",
                                       "avx_vnni"})
    except OSError:
        info["cpu_model"] = platform.processor() or None
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    versions = {"numpy": np.__version__}
    for mod in ("torch", "onnxruntime", "onnx", "tensorrt", "openvino"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    info["versions"] = versions
    info["openvino_cpu_capabilities"] = _openvino_capabilities()
    return info


def _openvino_capabilities():
    """OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES`` (what it says it runs natively), ``None`` without it."""
    try:
        import openvino
    except ImportError:
        return None
    return sorted(str(c) for c in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))



def matmul_peak(threads, n, repeats):
    """Measured float32 matmul GFLOP/s (best of ``repeats``) with torch and numpy on ``threads`` threads."""
    import torch

    out = {"n": n, "threads": threads}
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    out["torch_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    x, y = a.numpy(), b.numpy()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    with (threadpool_limits(threads) if threadpool_limits else contextlib.nullcontext()):
        x @ y
        best = min(timed(lambda: x @ y) for _ in range(repeats))
    out["numpy_gflops"] = round(2 * n ** 3 / best / 1e9, 1)
    out["numpy_threads_pinned"] = threadpool_limits is not None
    out["peak_gflops"] = max(out["torch_gflops"], out["numpy_gflops"])
    return out



def timed(fn):
    """Seconds one call of ``fn()`` takes."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
