"""What this CPU computes natively: the instruction-set flags that decide a reduced precision's speed.

BF16 has matrix or vector units on Intel Xeons with AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``),
FP16 with AVX512-FP16 or AMX-FP16; elsewhere (e.g. an AMD EPYC without them) a bf16 matmul is emulated
and slower than float32, so "auto" precisions pick float32 there. Read from ``/proc/cpuinfo`` (Linux);
other systems report no flags, which only makes "auto" choose float32.
"""
import functools

BF16_FLAGS = ("amx_bf16", "avx512_bf16")
FP16_FLAGS = ("amx_fp16", "avx512_fp16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@functools.lru_cache(maxsize=1)
def cpu_info():
    """``(model name, frozenset of flags)`` of the first CPU in ``/proc/cpuinfo`` (``(None, {})`` elsewhere)."""
    model, flags = None, frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def has_any(names):
    """Whether the CPU reports any of the flags ``names``."""
    return bool(cpu_info()[1] & set(names))


def native_bf16():
    """Whether the CPU has BF16 matrix or vector units (AMX-BF16 or AVX512-BF16)."""
    return has_any(BF16_FLAGS)


def native_fp16():
    """Whether the CPU has FP16 arithmetic units (AVX512-FP16 or AMX-FP16)."""
    return has_any(FP16_FLAGS)
