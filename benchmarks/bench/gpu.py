"""The GPU section (where CUDA is available): PyTorch eager, CUDA graphs, torch.compile and TensorRT.

Every figure is guarded: an error is recorded in its row, never fatal to the run.
"""
import copy
import os
import tempfile
import time

from .config import ETA, SEED
from .machine import median, timed


def gpu_section(nets, models, paths, quick, log):
    """PyTorch eager / CUDA graph / torch.compile images/s, and TensorRT where importable; else a note."""
    import torch

    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device here: PyTorch eager / CUDA-graph / torch.compile and "
                                            "TensorRT figures not measured"}
    out = {"available": True, "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda,
           "tensorrt": None, "networks": []}
    have_trt = _tensorrt(out)
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
                row = dict(_gpu_row(call, b, steps, repeats, extra), backend=kind, batch=b)
                entry["rows"].append(row)
                log(f"  gpu {net['name']} batch {b} {kind}: {row.get('images_per_s', row.get('error'))}")
            torch.cuda.empty_cache()
        out["networks"].append(entry)
    return out


def _tensorrt(out):
    """Whether TensorRT imports here; records its version (or why not) in ``out``."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        out["tensorrt_note"] = "tensorrt is not importable here: TensorRT figures not measured"
        return False
    try:
        import tensorrt
    except Exception as e:
        out["tensorrt_note"] = f"tensorrt does not import: {e}"
        return False
    out["tensorrt"] = tensorrt.__version__
    return True


def _gpu_row(call, b, steps, repeats, extra):
    """Images/s, ms/step and device memory of ``call`` at batch ``b`` (or the error)."""
    import torch

    row = {}
    try:
        torch.cuda.reset_peak_memory_stats()
        free0 = torch.cuda.mem_get_info()[0]
        call(b, 1)  # warm-up (and, for torch.compile, compilation at this shape)
        times = [timed(lambda: call(b, steps)) for _ in range(repeats)]
        med = median(times)
        row.update(times_s=times, median_s=med, images_per_s=round(b / med, 2),
                   ms_per_step=round(1000 * med / steps, 3),
                   device_mib=round(max(torch.cuda.max_memory_allocated(),
                                        free0 - torch.cuda.mem_get_info()[0]) / 2 ** 20, 1))
        row.update(extra)
    except Exception as e:
        row["error"] = _err(e)
    return row


def _err(e):
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _gpu_backend(kind, net, model, process, paths):
    """``(extra figures, call(b, steps))`` for one GPU way of sampling (synchronised on return)."""
    import torch

    from bdm_train.sampling import sample

    if kind.startswith("trt"):
        return _trt_backend(paths[kind.split("-")[1]])
    dev = torch.device("cuda")
    c = net["unet"]["in_channels"]
    m = copy.deepcopy(model).to(dev).eval()
    p = copy.deepcopy(process).to(dev)
    if kind == "torch-cuda-graph":
        return {}, _cuda_graph_call(m, p, (c, net["unet"]["image_size"], net["unet"]["image_size"]), dev)
    net_fn = torch.compile(m) if kind == "torch-compile" else m

    def call(b, s):
        x = sample(net_fn, p, b, SEED, s, eta=ETA, batch_size=b, channels=c, num_classes=0, device=dev)
        torch.cuda.synchronize()
        return x

    return {}, call


def _trt_backend(path):
    """The runtime's TensorRT backend on ``path``: engine built into a fresh cache, build time and size."""
    import bdm_runtime

    folder = tempfile.mkdtemp(prefix="bdm-trt-")
    t = time.perf_counter()
    sampler = bdm_runtime.load(path, backend="trt", engine_cache=folder)
    extra = {"engine_build_and_load_s": round(time.perf_counter() - t, 2)}
    plans = [f for f in os.listdir(folder) if f.endswith(".plan")]
    extra["engine_mib"] = round(os.path.getsize(os.path.join(folder, plans[0])) / 2 ** 20, 2) if plans else None
    return extra, lambda b, s: sampler.sample(b, seed=SEED, steps=s, eta=ETA)


def _cuda_graph_call(m, p, shape, dev):
    """``call(b, steps)``: one B10 step captured as a CUDA graph per batch size, replayed every step, with
    the noise protocol of ``sample()`` (drawn on the host, copied up each step)."""
    import torch

    from bdm_runtime.noise import NoiseStream, time_grid
    from bdm_train.sampling import conditioned, ddim_step

    graphs = {}  # batch -> (graph, static tensors)

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

    def call(b, s):
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

    return call
