"""What a training run asks of the machine: its memory, checked before anything is allocated or
created, and its default number of CPU threads.

Memory (issue 22: ``--batch-size 100000`` on 1,797 8x8 images grew to 22 GB and was killed by
the kernel without a message): the run's network and forward process are built on PyTorch's
``meta`` device, which computes shapes only, and one loss evaluation there counts the bytes the
autograd graph keeps for the backward pass (``saved_tensors_hooks``) at one and two images; the
difference is the per-image cost, exact for this network, image size and batch, at no memory
cost. On top come the weights' five float32 copies (weights, gradients, EMA, AdamW's two moments).
That sum is a lower bound of the peak (the backward pass adds the gradients of a few activations
at a time): it is compared with the memory this machine has free now, so a run that cannot fit is
refused in one line before its first step, and one that is refused would not have finished.
"""
import os

from bdm_runtime.errors import BdmError
from bdm_runtime.limits import check_memory, cpu_count, gib

PARAM_COPIES = 5   # weights, gradients, EMA weights, AdamW's exp_avg and exp_avg_sq (float32 each)


def available_bytes():
    """Memory this process can take now: ``MemAvailable`` (and the cgroup's headroom when lower);
    ``None`` where unknown (then only the machine's total is checked)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        if limit.isdigit():
            room = max(0, int(limit) - used)
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def _saved_bytes(opts, channels, batch):
    """Bytes the autograd graph of one loss evaluation keeps at ``batch`` images (meta device: no memory)."""
    import torch

    from .diffusion import BlurringDiffusion
    from .unet import UNet

    size, total = opts["image_size"], [0]
    seen = set()

    def pack(t):
        if not (t.is_leaf and t.requires_grad) and id(t) not in seen:   # parameters are counted apart
            seen.add(id(t))
            total[0] += t.numel() * t.element_size()
        return t

    with torch.device("meta"):
        net = UNet(in_channels=channels, image_size=size, ch=opts["ch"], ch_mult=opts["ch_mult"],
                   num_res_blocks=opts["num_res_blocks"], attn_resolutions=opts["attn"], dropout=opts["dropout"],
                   num_classes=opts["num_classes"], param="eps")
        process = BlurringDiffusion(size, blur_sigma_max=opts["blur_sigma_max"], min_scale=opts["min_scale"])
        x = torch.zeros(batch, channels, size, size)
        t, eps = torch.zeros(batch), torch.zeros(batch, channels, size, size)
        y = torch.zeros(batch, dtype=torch.long) if opts["num_classes"] else None
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            process.loss(net, x, y, t=t, eps=eps)
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    return total[0], params


def training_bytes(opts, channels, batch):
    """A lower bound of one process's peak memory: saved activations at ``batch`` images, the weights'
    copies and the forward process's DCT matrices (B1)."""
    one, params = _saved_bytes(opts, channels, 1)
    two, _ = _saved_bytes(opts, channels, 2)
    per_image = max(two - one, 0)
    if opts.get("precision") == "bf16":   # autocast saves at most half the bytes (float32 -> bfloat16)
        one, per_image = one // 2, per_image // 2
    size = opts["image_size"]
    return (one - per_image) + per_image * batch + PARAM_COPIES * params + 3 * 4 * size * size


def check_training_memory(opts, channels, world, device):
    """Refuse, in one line and before anything is allocated, a run whose batch or image size cannot fit."""
    import torch

    batch = opts["batch_size"] // world
    size = opts["image_size"]
    if size ** 2 * channels * batch > 2 ** 62:   # beyond any memory; the meta count would overflow int64
        need = float("inf")
    else:
        need = training_bytes(opts, channels, batch)
    what = (f"training at --batch-size {opts['batch_size']}" + (f" ({batch} per process)" if world > 1 else "")
            + f" on {channels}x{size}x{size} images")
    fix = "lower --batch-size" + (" or --image-size" if size > 64 else "") + " (or --ch / --ch-mult)"
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        if need > have:
            raise BdmError(f"{what} needs at least {_size(need)} of GPU memory, {device} has {gib(have)}: {fix}")
        return need
    free = available_bytes()
    if free is not None and need > free:
        raise BdmError(f"{what} needs at least {_size(need)} of memory, this machine has {gib(free)} free: {fix}")
    check_memory(need, what, fix)
    return need


def _size(nbytes):
    return "more than any machine has" if nbytes == float("inf") else gib(nbytes)


def check_image_memory(n, channels, size, path):
    """Refuse fitting ``n`` images to ``size`` x ``size`` when their uint8 array cannot fit in memory."""
    need = n * channels * size * size
    free = available_bytes()
    what = f"--image-size {size}: {n} images of {channels}x{size}x{size} from {path}"
    if free is not None and need > free:
        raise BdmError(f"{what} need {gib(need)} of memory, this machine has {gib(free)} free: "
                       "choose a smaller --image-size")
    check_memory(need, what, "choose a smaller --image-size")


def default_threads():
    """torch threads when ``--threads`` is not given: ``OMP_NUM_THREADS`` if set, else the cores this
    process may run on (its affinity) that other processes leave idle (one-minute load average), at
    least 1.

    On a busy machine more threads than idle cores stall each other at every parallel region
    (measured on the digits demo: docs/training.md, Reliability); the count is stored with the run, so
    a resumed run keeps it and continues bit for bit (thread counts round differently).
    """
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return max(1, torch.get_num_threads())
    cores = cpu_count()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))
