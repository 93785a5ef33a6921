"""``bdm-sample``: draw images from a checkpoint with the PyTorch sampler (B10, B11), the reference for the runtime.

Images are drawn in chunks of ``--batch`` (64 by default), so memory does not grow with ``--n``
beyond the grid itself (every image, as uint8); the ``.npz``'s float samples are streamed to a
temporary file. The outputs appear together at the end, or not at all (see ``bdm_runtime.io.Staging``).
"""

import click
import numpy as np

from bdm_runtime.errors import BdmError, echo_result, run_cli
from bdm_runtime.grids import GRIDS, SOLVERS
from bdm_runtime.labels import normalize_labels, parse_labels
from bdm_runtime.limits import DEFAULT_BATCH, MAX_STEPS, out_of_memory


def _prepare(ckpt, n, steps, eta, labels, guidance, device, ema, clip_denoised, solver=None, grid=None):
    """Load and check everything before any sampling:
    ``(model, process, sampler kwargs (solver, grid, steps, eta, clip_denoised), labels, device)``."""
    import torch

    from bdm_runtime.grids import settings

    from . import checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, process, config = checkpoint.load(ckpt, ema=ema, device=device)  # refuses a device we lack
    steps, _, clip_denoised = checkpoint.sampler_settings(config, ckpt, steps, eta, clip_denoised)  # checked, named
    try:
        solver, grid, steps, eta = settings(config["sampler"], solver, grid, steps, eta)
    except ValueError as e:
        raise BdmError(f"{ckpt}: {e}")
    if labels is not None and model.num_classes == 0:
        raise BdmError(f"--label given, but {ckpt} is an unconditional model")
    if guidance and labels is None:
        raise BdmError("--guidance needs --label (guidance pulls towards a class)")
    if labels is not None:
        labels = normalize_labels(labels, n, model.num_classes, BdmError)
    kw = dict(solver=solver, grid=grid, steps=steps, eta=eta, clip_denoised=clip_denoised)
    return model, process, kw, labels, device


def _chunks(model, process, n, batch, labels, first_index, **kwargs):
    """Yield ``(start, float32 [b, C, H, W])`` for chunks of ``batch`` images (each image depends only on
    ``(seed, index)``, so the chunking never changes a result)."""
    from .sampling import sample

    for start in range(0, n, batch):
        b = min(batch, n - start)
        lab = None if labels is None else labels[start:start + b]
        x = sample(model, process, b, labels=lab, first_index=first_index + start, batch_size=b, **kwargs)
        yield start, x.cpu().numpy().astype(np.float32, copy=False)


def sample_checkpoint(ckpt, n=64, steps=None, eta=None, seed=0, first_index=0, labels=None, guidance=0.0,
                      batch=None, device="auto", ema=True, clip_denoised=None, progress=False, solver=None,
                      grid=None):
    """float ``[n, C, H, W]`` in ``[-1, 1]`` and the labels used (or None); ``batch`` images at a time (default 64).

    ``solver``, ``grid``, ``steps``, ``eta``, ``clip_denoised``: ``None`` takes the checkpoint's
    sampler config (``bdm_runtime.grids.settings``).
    """
    model, process, kw, labels, device = _prepare(ckpt, n, steps, eta, labels, guidance, device, ema, clip_denoised,
                                                  solver, grid)
    parts = [x for _, x in _chunks(model, process, n, batch or DEFAULT_BATCH, labels, first_index, seed=seed,
                                   guidance=guidance, device=device, progress=progress, **kw)]
    return np.concatenate(parts), labels


def _check_sizes(model, process, n, batch, out, npz, guidance=0.0):
    """Refuse up front a grid that cannot fit in memory, or an ``.npz`` that cannot fit on its disk."""
    from bdm_runtime.images import grid_memory, npz_bytes
    from bdm_runtime.limits import activation_bytes, check_disk, check_memory, check_sample_memory

    c, (h, w) = model.in_channels, tuple(process.image_size)
    scale = _grid_scale(h)
    widest = max((p.shape[0] for p in model.parameters() if p.ndim == 4), default=0)
    chunk = min(n, batch)  # a chunk's latents, noise and network activations (measured: bdm_runtime.limits)
    check_sample_memory(chunk, (c, h, w), chunk, True, activation_bytes(widest, (c, h, w), guidance > 0),
                        f"lower --batch (now {batch})")
    working = 8 * chunk * c * h * w * 4
    check_memory(grid_memory(n, h, w, c, scale) + working, f"--out {out}: a grid of {n} images",
                 "lower --n (use --first-index to draw the rest in further calls)")
    if npz:
        arrays = [((n, h, w, c), "uint8"), ((n, c, h, w), "float32")] + ([((n,), "int64")] if model.num_classes else [])
        check_disk(npz, npz_bytes(*arrays), "--npz")
    return c, h, w


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (OUT/model.pt of bdm-train).")
@click.option("--n", default=64, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--solver", default=None, type=click.Choice(SOLVERS),
              help="ddim (B10) or dpmpp2m (B11 at --eta 0, SDE-DPM-Solver++(2M) at --eta 1, B16) "
                   "[checkpoint's, else ddim].")
@click.option("--grid", default=None, type=click.Choice(GRIDS), help="Time grid (B15) [checkpoint's, else uniform].")
@click.option("--steps", default=None, type=click.IntRange(1, MAX_STEPS),
              help="Sampler steps = network evaluations [checkpoint's].")
@click.option("--eta", default=None, type=click.FloatRange(0, 1),
              help="0 deterministic .. 1 stochastic (ddim: ancestral) [checkpoint's for ddim and the "
                   "checkpoint's solver, else 0].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--first-index", default=0, show_default=True, type=click.IntRange(min=0),
              help="Index of the first image in the seed's stream (split work across calls).")
@click.option("--label", default=None, help="Class label for all images, or one per image (comma-separated).")
@click.option("--guidance", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Classifier-free guidance w (B12).")
@click.option("--batch", default=DEFAULT_BATCH, show_default=True, type=click.IntRange(min=1),
              help="Images per network batch (memory grows with it, not with --n).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--raw", is_flag=True, help="Use the raw weights instead of the EMA weights.")
@click.option("--clip/--no-clip", default=None,
              help="Clip x_hat to [-1, 1] at every step [checkpoint's]; --no-clip suits blurring models.")
@click.option("--out", default="grid.png", show_default=True, type=click.Path(dir_okay=False),
              help="Grid of all images (PNG).")
@click.option("--npz", default=None, type=click.Path(dir_okay=False),
              help="Also write images (uint8 [n,H,W,C]), samples (float32 [n,C,H,W]) and labels.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def cli(ckpt, n, solver, grid, steps, eta, seed, first_index, label, guidance, batch, device, raw, clip, out, npz, quiet):
    """Sample a trained Blurring Diffusion Model with PyTorch."""
    from bdm_runtime.io import check_outputs

    check_outputs(out, None, npz)  # before sampling: a bad path costs no compute and writes nothing
    labels = parse_labels(label)
    model, process, kw, labels, device = _prepare(ckpt, n, steps, eta, labels, guidance, device, not raw, clip,
                                                  solver, grid)
    shape = _check_sizes(model, process, n, batch, out, npz, guidance)
    chunks = _chunks(model, process, n, batch, labels, first_index, seed=seed, guidance=guidance, device=device,
                     **kw)
    try:
        _write(chunks, n, shape, labels, first_index, out, npz, ckpt, quiet)
    except (RuntimeError, MemoryError) as e:  # torch's or numpy's allocation failure; else a bug: its traceback
        if not out_of_memory(e):
            raise
        raise BdmError(f"{ckpt}: out of memory in a batch of {min(n, batch)} images: lower --batch") from None
    echo_result(out, "bdm-sample")


def _write(chunks, n, shape, labels, first_index, out, npz, source, quiet):
    """Stream the float samples into the staged ``.npz``, keep the uint8 images for the grid; publish together."""
    import contextlib
    import sys

    from bdm_runtime.images import NpzWriter, check_finite, save_grid, to_uint8
    from bdm_runtime.io import Staging, writing

    c, h, w = shape
    images = np.empty((n, h, w, c), dtype=np.uint8)
    bar = None
    if not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="sampling", unit="image", file=sys.stderr, leave=False)
    with Staging() as stage:
        npz_file = None
        try:
            with writing(npz or out), contextlib.ExitStack() as member:  # closing the member writes too
                for start, x in chunks:
                    check_finite(x, source, first_index + start)
                    if npz and npz_file is None:  # after the first chunk: a refused request creates nothing
                        with writing(npz):
                            npz_file = NpzWriter(stage.file(npz))
                            write = member.enter_context(npz_file.array("samples", (n, c, h, w), np.float32))
                    if npz:
                        with writing(npz):
                            write(x)
                    images[start:start + len(x)] = to_uint8(x)
                    if bar is not None:
                        bar.update(len(x))
            if npz:
                for name, array in (("images", images), ("labels", labels)):
                    if array is not None:
                        with writing(npz), npz_file.array(name, array.shape, array.dtype) as write:
                            write(array)
        except BaseException:
            if npz_file is not None:
                with contextlib.suppress(Exception):  # the first error is the one to report
                    npz_file.close()
            raise
        finally:
            if bar is not None:
                bar.close()
        if npz_file is not None:
            with writing(npz):
                npz_file.close()
        with writing(out):
            save_grid(images, stage.file(out), scale=_grid_scale(h))


def _grid_scale(h):
    """Small images are upscaled in the grid to about 64 pixels."""
    return max(1, 64 // h)


def main(args=None):
    """Console entry point ``bdm-sample``."""
    run_cli(cli, args, prog_name="bdm-sample")


if __name__ == "__main__":
    main()
