"""``bdm-sample``: draw images from a checkpoint with the PyTorch sampler (B10, B11), the reference for the runtime."""

import click
import numpy as np

from bdm_runtime.errors import BdmError, run_cli
from bdm_runtime.grids import GRIDS, SOLVERS
from bdm_runtime.labels import normalize_labels, parse_labels


def sample_checkpoint(ckpt, n=64, steps=None, eta=None, seed=0, first_index=0, labels=None, guidance=0.0,
                      batch=None, device="auto", ema=True, clip_denoised=None, progress=False, solver=None,
                      grid=None):
    """float ``[n, C, H, W]`` in ``[-1, 1]`` and the labels used (or None).

    ``solver``, ``grid``, ``steps``, ``eta``, ``clip_denoised``: ``None`` takes the checkpoint's
    sampler config (``bdm_runtime.grids.settings``).
    """
    import torch

    from bdm_runtime.grids import settings

    from . import checkpoint
    from .sampling import sample

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, process, config = checkpoint.load(ckpt, ema=ema, device=device)  # refuses a device we lack
    sampler = config["sampler"]
    try:
        solver, grid, steps, eta = settings(sampler, solver, grid, steps, eta)
    except ValueError as e:
        raise BdmError(f"{ckpt}: {e}")
    clip_denoised = sampler["clip_denoised"] if clip_denoised is None else clip_denoised
    if labels is not None and model.num_classes == 0:
        raise BdmError(f"--label given, but {ckpt} is an unconditional model")
    if guidance and labels is None:
        raise BdmError("--guidance needs --label (guidance pulls towards a class)")
    if labels is not None:
        labels = normalize_labels(labels, n, model.num_classes, BdmError)
    x = sample(model, process, n, seed=seed, steps=steps, eta=eta, labels=labels, guidance=guidance,
               first_index=first_index, clip_denoised=clip_denoised, batch_size=batch, device=device,
               progress=progress, solver=solver, grid=grid)
    return x.cpu().numpy(), labels


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", required=True, type=click.Path(), help="Checkpoint (OUT/model.pt of bdm-train).")
@click.option("--n", default=64, show_default=True, type=click.IntRange(min=1), help="Number of images.")
@click.option("--solver", default=None, type=click.Choice(SOLVERS),
              help="ddim (B10, with --eta) or dpmpp2m (B11, deterministic) [checkpoint's, else ddim].")
@click.option("--grid", default=None, type=click.Choice(GRIDS), help="Time grid (B15) [checkpoint's, else uniform].")
@click.option("--steps", default=None, type=click.IntRange(min=1),
              help="Sampler steps = network evaluations [checkpoint's].")
@click.option("--eta", default=None, type=click.FloatRange(0, 1),
              help="ddim only: 0 deterministic .. 1 ancestral [checkpoint's].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--first-index", default=0, show_default=True, type=click.IntRange(min=0),
              help="Index of the first image in the seed's stream (split work across calls).")
@click.option("--label", default=None, help="Class label for all images, or one per image (comma-separated).")
@click.option("--guidance", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Classifier-free guidance w (B12).")
@click.option("--batch", default=None, type=click.IntRange(min=1), help="Images per network batch [n].")
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
    from bdm_runtime.images import save_grid, save_npz, to_uint8
    from bdm_runtime.io import check_outputs

    check_outputs(out, None, npz)  # before sampling: a bad path costs no compute and writes nothing
    labels = parse_labels(label)
    x, labels = sample_checkpoint(ckpt, n=n, steps=steps, eta=eta, seed=seed, first_index=first_index,
                                  labels=labels, guidance=guidance, batch=batch, device=device,
                                  ema=not raw, clip_denoised=clip, progress=not quiet, solver=solver, grid=grid)
    images = to_uint8(x)
    save_grid(images, out, scale=max(1, 64 // images.shape[1]))
    if npz:
        arrays = dict(images=images, samples=x.astype(np.float32))
        if labels is not None:
            arrays["labels"] = labels
        save_npz(npz, **arrays)
    click.echo(out)


def main(args=None):
    """Console entry point ``bdm-sample``."""
    run_cli(cli, args, prog_name="bdm-sample")


if __name__ == "__main__":
    main()
