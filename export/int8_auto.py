"""``--calib-method auto``: calibrate with each method, keep the one whose images stay closest to FP32's.

Why (docs/int8.md, "Choosing the method"): which calibration is best depends on the model. FD-FMNIST
against FP32 put percentile first on the 6,000-step DDPM (x1.000 against max's x1.123) and max first on
the 12,000-step one (x1.009 against percentile's x1.09), and FD needs thousands of samples, far too many
for an export. The error of the INT8 graph's final images against the FP32 graph's, from the same seeded
noise on held-out seeds (not calibration's), ranked the methods as FD did on both models, and costs a few
seconds of sampling per candidate. The candidates share one recording of the calibration trajectories;
each is quantized, finished (metadata, shapes, checker) and sampled; the smallest rms wins (ties: the
first in ``CANDIDATES``). The cost: one more quantization and ``1 + len(CANDIDATES)`` short sampling
runs. The graph records the method chosen as ``method`` (so any runtime reads it as an ordinary INT8
graph) and, under ``auto``, every candidate's error and the held-out images and seed.
"""
import os
import tempfile

import numpy as np

from bdm_runtime import format as fmt

AUTO = "auto"
# Not "entropy": with our options ONNX Runtime's entropy calibrator has as many histogram bins (128) as quantized
# bins (128), so its KL search has one candidate threshold, the whole range: it writes max's graph byte for byte
# (tests/test_export_int8_auto.py checks it, and so fails if that changes). Sampling it again would cost time only.
CANDIDATES = ("max", "percentile")
HELD_OUT_IMAGES = 64        # final images per candidate; sampling them costs far less than quantizing
HELD_OUT_SEED_OFFSET = 1    # held-out seed = calibration seed + 1: other images (noise protocol: rng([S, i]))


def final_images(path, images, seed):
    """``images`` final images of the step graph ``path`` from ``seed`` (its default sampler; ONNX Runtime,
    one thread: reproducible), float64; conditional models get the labels ``0, 1, ...`` as in calibration."""
    import bdm_runtime
    from bdm_runtime.step_info import onnx_info

    info = onnx_info(path)
    labels = None if info.num_classes == 0 else np.arange(images) % info.num_classes
    with bdm_runtime.load(path, backend="ort", providers=["CPUExecutionProvider"], threads=1) as s:
        return np.asarray(s.sample(images, seed=seed, labels=labels), dtype=np.float64)


def rms(a, b):
    """Root mean square of ``a - b`` in float64."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def restamp(proto, meta):
    """``proto`` with its metadata replaced by ``meta`` (``fmt.encode``)."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, fmt.encode(meta))
    return proto


def choose(fp32_path, build, seed, images=HELD_OUT_IMAGES, candidates=CANDIDATES):
    """``(proto, meta)`` of the candidate whose final images are closest (rms) to the FP32 graph's.

    ``build(method)`` gives a finished INT8 ``(proto, meta)`` calibrated with ``method``; each is sampled
    from ``seed`` (``images`` images) and compared with ``fp32_path`` sampled alike. The chosen graph's
    ``meta[K_CALIBRATION]`` gets ``auto``: the candidates' errors, ``images``, ``seed`` and the error's name.
    """
    import onnx

    ref = final_images(fp32_path, images, seed)
    errors, graphs = {}, {}
    with tempfile.TemporaryDirectory(prefix="bdm-int8-auto-") as tmp:
        for method in candidates:
            graphs[method] = build(method)
            path = os.path.join(tmp, f"{method}.onnx")
            onnx.save(graphs[method][0], path)
            e = rms(final_images(path, images, seed), ref)
            errors[method] = round(e, 6) if np.isfinite(e) else None   # JSON has no NaN; never chosen
    best = min(candidates, key=lambda m: np.inf if errors[m] is None else errors[m])
    proto, meta = graphs[best]
    meta[fmt.K_CALIBRATION]["auto"] = {"errors": errors, "images": int(images), "seed": int(seed),
                                       "error": "rms of final images against the FP32 graph's"}
    return restamp(proto, meta), meta
