"""``bdm-run``: sample images from a bdm step graph (``.onnx``) or TensorRT engine (``.plan``), no torch.

    bdm-run --engine bdm.plan --n 64 --out grid.png
    bdm-run --engine bdm.onnx --n 1000 --seed 7 --out-dir samples/ --npz samples.npz --batch 100

User mistakes print one line ``Error: ...`` on stderr and exit non-zero, before anything is
written; every output file is written atomically (an interrupted run leaves none half-written).
"""
import time

import click

from .errors import BdmError, run_cli
from .grids import GRIDS, SOLVERS
from .io import check_outputs
from .labels import normalize_labels, parse_labels


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "engine", required=True, type=click.Path(dir_okay=False),
              help="Step graph .onnx (ONNX Runtime) or TensorRT engine .plan (with X.plan.json beside it).")
@click.option("--n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the noise protocol.")
@click.option("--first-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the first image in the seed's sequence (to split a run across processes).")
@click.option("--solver", type=click.Choice(SOLVERS), default=None,
              help="ddim (B10, with --eta) or dpmpp2m (B11, deterministic; format-2 graphs). Default: the model's own.")
@click.option("--grid", type=click.Choice(GRIDS), default=None, help="Time grid (B15). Default: the model's own.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps = network evaluations (default: the model's own).")
@click.option("--eta", type=click.FloatRange(0, 1), default=None,
              help="ddim only: 0 deterministic .. 1 ancestral (default: the model's own).")
@click.option("--label", default=None, help="Class label for conditional models: one id, or one per image "
              "(comma-separated). Default: the null label (unconditional).")
@click.option("--guidance", type=click.FloatRange(min=0), default=None, help="Classifier-free guidance weight w (needs a guided graph).")
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Images per chunk (default: the engine's profile maximum, "
              "or 64 for ONNX Runtime).")
@click.option("--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True,
              help="auto: ONNX Runtime for .onnx, TensorRT for .plan; trt on an .onnx builds and caches an engine.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime CPU threads (default: one per core; 1 suits a busy, shared machine).")
@click.option("--cuda-graph/--no-cuda-graph", default=False, show_default=True,
              help="TensorRT: replay each step as a captured CUDA graph.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write a sample grid PNG here.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Write one PNG per image here.")
@click.option("--npz", type=click.Path(dir_okay=False), default=None,
              help="Write uint8 images [n, H, W, C] (key 'images', plus 'labels') to this .npz.")
@click.option("--grid-scale", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Upscale the grid PNG by this factor (nearest).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(engine, n, seed, first_index, solver, grid, steps, eta, label, guidance, batch, backend, threads, cuda_graph, out,
        out_dir, npz, grid_scale, quiet):
    """Sample images from a bdm step graph or TensorRT engine."""
    import bdm_runtime
    from .images import save_dir, save_grid, save_npz, to_uint8

    check_outputs(out, out_dir, npz)
    if n < 1:
        raise BdmError(f"--n must be at least 1, got {n}")
    labels = parse_labels(label)
    with bdm_runtime.load(engine, backend=backend, batch=batch, cuda_graph=cuda_graph,
                      threads=threads) as sampler:
        start = time.perf_counter()
        x = sampler.sample(n, seed=seed, steps=steps, eta=eta, labels=labels, guidance=guidance,
                           first_index=first_index, progress=not quiet, solver=solver, grid=grid)
        seconds = time.perf_counter() - start
        used = f"{sampler.backend} ({sampler.provider})"
        num_classes = sampler.num_classes
    images = to_uint8(x)
    written = []
    if npz:
        arrays = {"images": images}
        if num_classes:
            arrays["labels"] = normalize_labels(labels, n, num_classes, BdmError)  # the labels used
        save_npz(npz, **arrays)
        written.append(npz)
    if out:
        save_grid(images, out, scale=grid_scale)
        written.append(out)
    if out_dir:
        save_dir(images, out_dir, first_index=first_index)
        written.append(out_dir.rstrip("/") + "/")
    click.echo(f"bdm-run: {n} images in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} images/s), "
               f"backend {used} -> {', '.join(written)}")


def main(argv=None):
    """Console entry point ``bdm-run``."""
    run_cli(cli, argv, prog_name="bdm-run")


if __name__ == "__main__":
    main()
