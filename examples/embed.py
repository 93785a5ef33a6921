"""Embedding the bdm runtime in an application (no torch): python examples/embed.py bdm.onnx|bdm.plan [out.png]"""
import sys

import numpy as np

import bdm_runtime
from bdm_runtime.images import save_grid

path, out = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "embed.png")
with bdm_runtime.load(path) as sampler:                       # .onnx: ONNX Runtime; .plan: TensorRT
    c, h, w = sampler.image_shape
    images = np.empty((16, h, w, c), dtype=np.uint8)      # the host application's own buffer
    sampler.generate(16, seed=0, out=images)              # same seed -> same images on every backend
    used = f"{sampler.backend} ({sampler.provider})"
save_grid(images, out)                                    # written atomically
print(f"16 images with {used} -> {out}")
