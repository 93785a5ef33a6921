"""The sizes a request may have: refused up front, in one line, instead of a traceback or a hang.

Every command and the Python API check their requests here before allocating or creating
anything: the number of sampler steps, the CPU threads, the memory an output needs (against this
machine's memory) and the disk an output needs (against the free space of its folder).
"""
import os
import shutil

from .errors import BdmError

# Sampler steps. The graph's times are float32: near t = 1 adjacent times are 2^-24 apart, so past
# ~1.7e7 steps t and s coincide; a million steps is 10^3 times the paper's largest sampler and its
# time grid is 4 MB, where 10^9 steps needed 3.5 GB before the first step.
MAX_STEPS = 1000000
# Images per chunk when the backend has no profile maximum (ONNX Runtime, the torch sampler):
# memory stays bounded whatever --n is (measured: bdm-sample at n = 2000 took 2.25 GB with one
# chunk, 358 MB in chunks of 64).
DEFAULT_BATCH = 64
# Float32 image-sized arrays per image of a chunk alive at once while sampling: the latent, the noise
# draw, the backend's buffers (two latents, two u_x states, noise, x0) and the step graph's own
# intermediates of the DCT-domain update. Measured: the mixture step graph (tests/helpers.py, no
# convolutions, format 2) peaks at 11.6 KB more per 8x8x1 image (peak RSS slope from batch 1,000 to
# 100,000, ONNX Runtime CPU, Intel Xeon with AMX): 45 copies. The network's activations come on top (below).
CHUNK_COPIES = 48
# The network's activations per image: ACTIVATION_FACTOR x its widest layer's channels (the most output
# channels of a convolution weight) x H x W float32 values. Measured as the slope of peak RSS between
# batch 64 and 256 (2 steps, 1 thread, Intel Xeon with AMX/AVX512-BF16/FP16/VNNI; probe: load, sample,
# ru_maxrss), as a factor of widest x H x W x 4 bytes:
#   ONNX Runtime CPU  tiny 16x16 ch 16 (widest 96)   0.49 MB/image  5.0
#                     tiny 32x32 ch 32 (widest 192)  3.89 MB/image  4.9
#                     shipped fmnist32 (widest 96)   2.01 MB/image  5.1
#   torch (bdm-sample) the same three models         0.58, 1.77, 0.95 MB/image: 5.9, 2.3, 2.4
# 7 covers every measurement with 18% to spare; a guided graph runs each image twice (B12).
ACTIVATION_FACTOR = 7
# CPU threads per core: more only adds contention (bdm-run --threads 100000 hung for minutes).
THREADS_PER_CORE = 4


def gib(nbytes):
    """``nbytes`` in words: ``"3.7 TiB"``, ``"238 GiB"``, ``"12.0 MiB"``."""
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if nbytes >= size:
            value = nbytes / size
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{nbytes / 2 ** 10:.1f} KiB"


def check_steps(steps, name="steps"):
    """``int(steps)`` if it is an integer in ``1 .. MAX_STEPS`` (not a bool), else ``BdmError`` naming ``name``."""
    if isinstance(steps, bool) or not hasattr(steps, "__index__"):
        raise BdmError(f"{name} must be a positive integer, got {steps!r}")
    steps = steps.__index__()
    if not 1 <= steps <= MAX_STEPS:
        raise BdmError(f"{name} must be in 1..{MAX_STEPS}, got {steps}")
    return steps


def cpu_count():
    """The CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_threads():
    """The most CPU threads a command may ask for here: ``THREADS_PER_CORE`` per core."""
    return THREADS_PER_CORE * cpu_count()


def check_threads(threads, name="threads", allow_zero=False):
    """``int(threads)`` if in ``1 .. max_threads()`` (or 0 with ``allow_zero``), else ``BdmError`` naming ``name``."""
    low = 0 if allow_zero else 1
    if isinstance(threads, bool) or not hasattr(threads, "__index__") or threads.__index__() < low:
        raise BdmError(f"{name} must be an integer >= {low}, got {threads!r}")
    threads = threads.__index__()
    if threads > max_threads():
        raise BdmError(f"{name} {threads} is too many: at most {max_threads()} here "
                       f"({THREADS_PER_CORE} per CPU core, {cpu_count()} cores)")
    return threads


def memory_bytes():
    """This machine's memory in bytes (or its cgroup limit, or this process's address-space limit, when lower);
    ``None`` where unknown."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = int(limit) if total is None else min(total, int(limit))
    except OSError:
        pass
    try:  # an address-space limit (ulimit -v) bounds what this process can allocate too
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            total = soft if total is None else min(total, soft)
    except (ImportError, AttributeError, ValueError, OSError):
        pass
    return total


def check_memory(need, what, fix):
    """Refuse a request whose memory ``need`` (bytes) exceeds this machine's, saying how much it needs."""
    have = memory_bytes()
    if have is not None and need > have:
        raise BdmError(f"{what} needs {gib(need)} of memory, this machine has {gib(have)}: {fix}")


def check_disk(path, need, what):
    """Refuse writing ``need`` bytes to ``path`` when its folder's file system has less free space."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise BdmError(f"{what} {path} needs {gib(need)} of disk, {folder} has {gib(free)} free")


def activation_bytes(widest, image_shape, guided=False):
    """The network's activation memory per image (see ``ACTIVATION_FACTOR``) for a widest layer of ``widest``
    channels on ``image_shape`` ``(C, H, W)`` images; 0 where ``widest`` is unknown (0)."""
    _, h, w = (int(d) for d in image_shape)
    return ACTIVATION_FACTOR * int(widest) * h * w * 4 * (2 if guided else 1)


def check_sample_memory(n, image_shape, chunk, output=True, activations=0, fix=None):
    """Refuse sampling ``n`` images of ``image_shape`` in chunks of ``chunk`` when this machine's memory cannot
    hold the working set of a chunk (its images and ``activations`` bytes per image of network activations)
    plus (``output``) the whole float32 result. ``fix``: what to change, in the caller's terms."""
    per_image = 4
    for d in image_shape:
        per_image *= int(d)
    need = (CHUNK_COPIES * per_image + int(activations)) * chunk + (n * per_image if output else 0)
    fix = fix or ("sample fewer at a time (first_index continues the sequence), give an out= array, "
                  "or load with a smaller batch=")
    what = f"sampling {n} images of {'x'.join(map(str, image_shape))} in chunks of {chunk}"
    if activations:
        what += f" (network activations {gib(int(activations) * chunk)})"
    check_memory(need, what, fix)


def out_of_memory(error):
    """Whether ``error`` (from a backend or torch) says an allocation failed: the user asked for too much."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return any(w in text for w in ("out of memory", "bad_alloc", "failed to allocate", "can't allocate",
                                   "cannot allocate", "allocation fail"))
