"""Embedding the bdm runtime in an application (no torch): python examples/embed.py bdm.onnx|bdm.plan [out.png]"""
import click
import numpy as np

import bdm_runtime
from bdm_runtime.errors import run_cli
from bdm_runtime.images import save_grid


@click.command()
@click.argument("engine", type=click.Path(dir_okay=False))
@click.argument("out", default="embed.png")
def main(engine, out):
    """Draw 16 images from ENGINE (a step graph .onnx or a TensorRT .plan) into the grid OUT."""
    with bdm_runtime.load(engine) as sampler:                     # .onnx: ONNX Runtime; .plan: TensorRT
        c, h, w = sampler.image_shape
        images = np.empty((16, h, w, c), dtype=np.uint8)      # the host application's own buffer
        sampler.generate(16, seed=0, out=images)              # same seed -> same images on every backend
        used = f"{sampler.backend} ({sampler.provider})"
    save_grid(images, out)                                    # written atomically
    print(f"16 images with {used} -> {out}")


if __name__ == "__main__":
    run_cli(main, prog_name="embed.py")   # a mistake is one "Error: ..." line, not a traceback
