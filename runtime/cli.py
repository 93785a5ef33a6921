"""``bdm-run``: sample images from a bdm step graph (``.onnx``) or TensorRT engine (``.plan``), no torch.

    bdm-run --engine bdm.plan --n 64 --out grid.png
    bdm-run --engine bdm.onnx --n 1000 --seed 7 --out-dir samples/ --npz samples.npz --batch 100

User mistakes print one line ``Error: ...`` on stderr and exit non-zero, before anything is
written. The outputs of a run appear together at its end or not at all: images are written chunk
by chunk into temporary files beside their targets (so ``--n`` is bounded by the disk, not the
memory, for ``--out-dir`` and ``--npz``), and renamed into place when every image is done; a
failure, Ctrl-C or SIGTERM removes them.
"""
import contextlib
import itertools
import time

import click

from .errors import BdmError, echo_result, run_cli
from .grids import GRIDS, SOLVERS
from .io import check_outputs
from .labels import normalize_labels, parse_labels
from .limits import MAX_STEPS


# The options bdm-serve shares (bdm_runtime.serve.cli): defined once, so both take them alike.
ENGINE_OPTION = click.option(
    "--engine", "engine", required=True, type=click.Path(dir_okay=False),
    help="Step graph .onnx (ONNX Runtime) or TensorRT engine .plan (with X.plan.json beside it).")
BATCH_OPTION = click.option(
    "--batch", type=click.IntRange(min=1), default=None,
    help="Images per chunk (default: the engine's profile maximum, or 64 for ONNX Runtime).")
BACKEND_OPTION = click.option(
    "--backend", type=click.Choice(["auto", "trt", "ort"]), default="auto", show_default=True,
    help="auto: ONNX Runtime for .onnx, TensorRT for .plan; trt on an .onnx builds and caches an engine.")
THREADS_OPTION = click.option(
    "--threads", type=click.IntRange(min=1), default=None,
    help="ONNX Runtime / OpenVINO CPU threads (default: one per core; at most 4 per core; 1 suits a busy, "
         "shared machine).")
CUDA_GRAPH_OPTION = click.option(
    "--cuda-graph/--no-cuda-graph", default=False, show_default=True,
    help="TensorRT: replay each step as a captured CUDA graph.")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@ENGINE_OPTION
@click.option("--n", "n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the noise protocol.")
@click.option("--first-index", type=click.IntRange(min=0), default=0, show_default=True,
              help="Index of the first image in the seed's sequence (to split a run across processes).")
@click.option("--solver", type=click.Choice(SOLVERS), default=None,
              help="ddim (B10) or dpmpp2m (format-2 graphs: B11 at --eta 0, SDE-DPM-Solver++(2M) at --eta 1, "
                   "B16). Default: the model's own.")
@click.option("--grid", type=click.Choice(GRIDS), default=None, help="Time grid (B15). Default: the model's own.")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=None,
              help="Sampler steps = network evaluations (default: the model's own).")
@click.option("--eta", type=click.FloatRange(0, 1), default=None,
              help="0 deterministic .. 1 stochastic (ddim: ancestral). Default: the model's own for ddim and "
                   "the model's solver, else 0.")
@click.option("--label", default=None, help="Class label for conditional models: one id, or one per image "
              "(comma-separated). Default: the null label (unconditional).")
@click.option("--guidance", type=click.FloatRange(min=0), default=None,
              help="Classifier-free guidance weight w of B12 (needs a guided graph and --label).")
@BATCH_OPTION
@click.option("--backend", type=click.Choice(["auto", "trt", "ort", "openvino"]), default="auto", show_default=True,
              help="auto: ONNX Runtime for .onnx, TensorRT for .plan; trt on an .onnx builds and caches an engine; "
                   "openvino runs the .onnx with OpenVINO (--device, --precision).")
@click.option("--device", default=None, help="OpenVINO device: CPU, GPU, NPU, AUTO (default CPU).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default=None,
              help="OpenVINO: the network's type; the sampler update stays FP32. auto: the fastest type the "
                   "device runs natively (bf16 on CPUs with AMX or AVX512-BF16, else fp32). Default: auto.")
@click.option("--ov-cache", type=click.Path(file_okay=False), default=None,
              help="OpenVINO's compiled-model cache folder (default: $BDM_OPENVINO_CACHE, else "
                   "~/.cache/bdm/openvino); 'none' disables it.")
@THREADS_OPTION
@CUDA_GRAPH_OPTION
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write a sample grid PNG here.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Write one PNG per image here.")
@click.option("--npz", type=click.Path(dir_okay=False), default=None,
              help="Write uint8 images [n, H, W, C] (key 'images', plus 'labels') to this .npz.")
@click.option("--grid-scale", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Upscale the grid PNG by this factor (nearest).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(engine, n, seed, first_index, solver, grid, steps, eta, label, guidance, batch, backend, device, precision,
        ov_cache, threads, cuda_graph, out, out_dir, npz, grid_scale, quiet):
    """Sample images from a bdm step graph or TensorRT engine."""
    import bdm_runtime

    check_outputs(out, out_dir, npz, range(first_index, first_index + n))
    if n < 1:
        raise BdmError(f"--n must be at least 1, got {n}")
    labels = parse_labels(label)
    with bdm_runtime.load(engine, backend=backend, batch=batch, cuda_graph=cuda_graph, threads=threads,
                          **_openvino_options(backend, device, precision, ov_cache)) as sampler:
        labels = _check_labels(labels, n, sampler.num_classes)
        _check_sizes(sampler, n, labels, out, npz, grid_scale)
        used = f"{sampler.backend} ({sampler.provider})"
        timer = [0.0]
        chunks = _sample_chunks(sampler, n, timer, quiet, seed=seed, steps=steps, eta=eta, labels=labels,
                                guidance=guidance, first_index=first_index, solver=solver, grid=grid)
        with contextlib.closing(chunks):  # on a failure, the progress bar is gone before the Error line
            first = next(chunks)  # the first chunk has checked every argument: only now is anything created
            written = _write(itertools.chain([first], chunks), sampler, n, labels, first_index, out, out_dir, npz,
                             grid_scale, engine)
    seconds = timer[0]
    shown = f"{seconds:.2f}" if seconds >= 0.1 else f"{seconds:.2g}"   # a tiny run is not "0.00 s"
    echo_result(f"bdm-run: {n} images in {shown} s ({n / max(seconds, 1e-9):.1f} images/s), "
                f"backend {used} -> {', '.join(written)}", "bdm-run")


def _openvino_options(backend, device, precision, ov_cache):
    """The OpenVINO keywords of ``load`` from the CLI's options (refused with another backend)."""
    given = {"--device": device, "--precision": precision, "--ov-cache": ov_cache}
    if backend != "openvino":
        named = [k for k, v in given.items() if v is not None]
        if named:
            raise BdmError(f"{', '.join(named)}: OpenVINO options; add --backend openvino")
        return {}
    cache = None if ov_cache is None else (False if ov_cache.lower() == "none" else ov_cache)
    return {"device": device, "precision": precision, "cache_dir": cache}


def _check_labels(labels, n, num_classes):
    """The ``--label`` values checked (one for all images, or one per image); they stay a short list."""
    if labels is not None:
        normalize_labels(labels, 1 if len(labels) == 1 else n, num_classes, BdmError)
    return labels


def _chunk_labels(labels, start, b):
    """The labels of images ``start .. start + b - 1`` as given to the sampler (``None``: the null label)."""
    if labels is None:
        return None
    return labels if len(labels) == 1 else labels[start:start + b]


def _check_sizes(sampler, n, labels, out, npz, grid_scale):
    """Refuse up front what cannot fit: the grid (all images at once) in memory, the ``.npz`` on its disk."""
    from .images import grid_memory, npz_bytes
    from .limits import check_disk, check_memory, check_sample_memory

    c, h, w = sampler.image_shape
    chunk = min(n, sampler.batch)
    check_sample_memory(chunk, sampler.image_shape, chunk, True, sampler.activation_bytes,
                        f"lower --batch (images per chunk; now {sampler.batch})")
    if out:
        check_memory(grid_memory(n, h, w, c, grid_scale), f"--out {out}: a grid of {n} images",
                     "lower --n, or write --out-dir/--npz, which stream")
    if npz:
        arrays = [((n, h, w, c), "uint8")] + ([((n,), "int64")] if sampler.num_classes else [])
        check_disk(npz, npz_bytes(*arrays), "--npz")


def _sample_chunks(sampler, n, timer, quiet, labels, first_index, **kwargs):
    """Yield ``(start, float images)`` chunk by chunk; ``timer[0]`` accumulates the sampling seconds."""
    import sys

    steps = kwargs["steps"] or sampler.info.default_steps
    chunk = sampler.batch
    bar = []  # made at the first step, once the sampler has accepted the arguments (a refusal prints one line)

    def tick(done, total):
        if not bar:
            from tqdm import tqdm

            bar.append(tqdm(total=steps * ((n + chunk - 1) // chunk), desc="sampling", unit="step",
                            file=sys.stderr, leave=False))
        bar[0].update(1)

    try:
        for start in range(0, n, chunk):
            b = min(chunk, n - start)
            begin = time.perf_counter()
            x = sampler.sample(b, labels=_chunk_labels(labels, start, b), first_index=first_index + start,
                               progress=False if quiet else tick, **kwargs)
            timer[0] += time.perf_counter() - begin
            yield start, x
    finally:
        for b in bar:
            b.close()


def _write(chunks, sampler, n, labels, first_index, out, out_dir, npz, grid_scale, source):
    """Write every chunk to the staged outputs; publish them together at the end. Returns what was written."""
    import numpy as np

    from .images import NpzWriter, check_finite, save_dir, save_grid, to_uint8
    from .io import ImageNames, Staging, writing

    c, h, w = sampler.image_shape
    k = sampler.num_classes
    with Staging() as stage:
        folder = stage.folder(out_dir, ImageNames(range(first_index, first_index + n))) if out_dir else None
        with writing(npz):
            npz_file = NpzWriter(stage.file(npz)) if npz else None
        grid = np.empty((n, h, w, c), dtype=np.uint8) if out else None
        try:
            member = npz_file.array("images", (n, h, w, c), np.uint8) if npz else contextlib.nullcontext()
            with writing(npz or out_dir or out), member as write_npz:  # closing the member writes too
                for start, x in chunks:
                    check_finite(x, source, first_index + start)
                    images = to_uint8(x)
                    if folder:
                        with writing(out_dir):
                            save_dir(images, folder, first_index=first_index + start)
                    if npz:
                        with writing(npz):
                            write_npz(images)
                    if out:
                        grid[start:start + len(images)] = images
            if npz and k:  # the labels used, chunk by chunk (the null label k where none was given)
                with writing(npz), npz_file.array("labels", (n,), np.int64) as write_labels:
                    for start in range(0, n, sampler.batch):
                        b = min(sampler.batch, n - start)
                        lab = _chunk_labels(labels, start, b)
                        write_labels(np.full((b,), k, np.int64) if lab is None
                                     else normalize_labels(lab, b, k, BdmError))
        except BaseException:
            if npz_file is not None:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    npz_file.close()
            raise
        if npz_file is not None:
            with writing(npz):
                npz_file.close()
        if out:
            with writing(out):
                save_grid(grid, stage.file(out), scale=grid_scale)
    return [p for p in (npz, out) if p] + ([out_dir.rstrip("/") + "/"] if out_dir else [])


def main(argv=None):
    """Console entry point ``bdm-run``."""
    run_cli(cli, argv, prog_name="bdm-run")


if __name__ == "__main__":
    main()
