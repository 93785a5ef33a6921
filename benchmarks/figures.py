"""The docs' pictures: the forward process (the paper's Figure 1) and quality vs sampler steps.

    python -m benchmarks.figures forward                              # docs/forward_process.png
    python -m benchmarks.figures study benchmarks/results/study.json  # docs/quality_vs_steps.png
"""
import json
import os

import click
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FORWARD_PNG = os.path.join(ROOT, "docs", "forward_process.png")
STUDY_PNG = os.path.join(ROOT, "docs", "quality_vs_steps.png")
TIMES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def forward_rows(x, times=TIMES, blur_sigma_max=20.0, seed=0):
    """The three processes of Figure 1 at ``times`` for one image ``x [1, H, W]`` in ``[-1, 1]``.

    Returns ``{name: float array [len(times), H, W]}``:
    diffusion ``z = a_t x + sigma_t eps`` (B4 with sigma_B_max = 0, B5); heat dissipation
    ``z = V(d_t * V^T x)`` (B4's d_t only: no a_t, no noise); blurring diffusion
    ``z = V(a_t d_t * V^T x) + sigma_t eps`` (B5). Both noisy rows use the same ``eps``.
    """
    import torch

    from bdm_train.diffusion import BlurringDiffusion

    h, w = x.shape[-2:]
    xt = torch.as_tensor(np.asarray(x, np.float64))[None].expand(len(times), -1, -1, -1)
    t = torch.tensor(times, dtype=torch.float64)
    eps = torch.randn(xt.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    plain = BlurringDiffusion((h, w), blur_sigma_max=0.0).double()
    blur = BlurringDiffusion((h, w), blur_sigma_max=blur_sigma_max).double()
    heat = blur.idct(blur.blur_scale(t) * blur.dct(xt))                  # B4: d_t only
    return {
        "Diffusion": plain.q_sample(xt, t, eps)[:, 0].numpy(),            # B5, d_t = 1
        "Heat dissipation": heat[:, 0].numpy(),
        "Blurring diffusion": blur.q_sample(xt, t, eps)[:, 0].numpy(),    # B5
    }


def forward_process(out=FORWARD_PNG, index=0, times=TIMES, blur_sigma_max=20.0, seed=0):
    """One Fashion-MNIST test image through the three processes, rows side by side; writes ``out``."""
    from . import fmnist

    images, labels = fmnist.load("test")
    x = images[index].astype(np.float64) / 127.5 - 1.0
    rows = forward_rows(x, times, blur_sigma_max, seed)
    sigma_b = [blur_sigma_max * np.sin(np.pi * t / 2) ** 2 for t in times]  # B4
    plt = _pyplot()
    n = len(times)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1.6, 1.45 * len(rows) + 0.9), squeeze=False)
    names = {"Diffusion": "Diffusion\n" r"($\sigma_{B,\max} = 0$)", "Heat dissipation": "Heat dissipation\n(blur only)",
             "Blurring diffusion": "Blurring diffusion\n" rf"($\sigma_{{B,\max}} = {blur_sigma_max:g}$)"}
    for r, (name, zs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(np.clip(zs[c], -1, 1), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"t = {times[c]:g}", fontsize=10)
            if c == 0:
                ax.set_ylabel(names[name], fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
            if r == len(rows) - 1:
                ax.set_xlabel(rf"$\sigma_B(t) = {sigma_b[c]:.1f}$", fontsize=8)
    fig.suptitle(f"Forward processes on a Fashion-MNIST test image ({fmnist.CLASSES[labels[index]]}, "
                 f"32x32); same noise in rows 1 and 3", fontsize=10)
    return _save(fig, out)


def _save(fig, out):
    """Write ``fig`` as a PNG atomically, close it, return ``out``."""
    from bdm_runtime.io import atomic_path

    plt = _pyplot()

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


# -- the study plot -----------------------------------------------------------------------------
FAMILIES = (("ddim", 0.0, "ddim, η=0 (B10)", "o", ":"), ("dpmpp2m", 0.0, "dpmpp2m (B11)", "s", "-"),
            ("ddim", 1.0, "ancestral, η=1 (B9)", "^", "--"), ("dpmpp2m", 1.0, "dpmpp2m-sde, η=1 (B16)", "D", "-."))


def envelope(points):
    """``{nfe: point}``: the lowest FD at each number of evaluations among ``points``."""
    out = {}
    for p in points:
        if p["nfe"] not in out or p["fd"] < out[p["nfe"]]["fd"]:
            out[p["nfe"]] = p
    return dict(sorted(out.items()))


def _solver_lines(ax, points):
    """One line per solver family, each the best over grids and clip settings, the grid at every point."""
    for solver, eta, name, marker, style in FAMILIES:
        env = envelope([p for p in points if p.get("solver", "ddim") == solver and float(p["eta"]) == eta])
        if not env:
            continue
        line, = ax.plot(list(env), [p["fd"] for p in env.values()], marker=marker, linestyle=style, markersize=4,
                        label=name)
        for k, p in env.items():
            ax.annotate(p.get("grid", "uniform") + ("" if p.get("clip", True) else "*"), (k, p["fd"]),
                        textcoords="offset points", xytext=(3, 3), fontsize=5.5, color=line.get_color())


def _log_axes(ax, nfes, plt):
    """Log-log axes with plain tick labels at the measured evaluation counts."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xticks(nfes)
    ax.set_xticklabels([str(v) for v in nfes])
    ax.set_yticks([1, 2, 5, 10, 20, 50, 100, 200, 500])
    ax.set_yticklabels(["1", "2", "5", "10", "20", "50", "100", "200", "500"])
    ax.yaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend(fontsize=6.5)


def plot_study(study_json, out=STUDY_PNG):
    """FD-FMNIST vs network evaluations; writes ``out``.

    First panel: every model's best FD at each cost (any sampler, grid and clip setting). Then one
    panel per model with one line per solver family (deterministic DDIM, DPM-Solver++(2M),
    ancestral), each the best over time grids and clip settings at that cost, the grid written at
    every point. ``study_json``: a path or the dict ``benchmarks.study`` writes (``points``: model,
    eta, nfe, fd, optional solver, grid, clip; optional ``reference.fd_train_<n>``: real images).
    """
    study = study_json
    if not isinstance(study, dict):
        with open(study_json) as f:
            study = json.load(f)
    points = [p for p in study["points"] if p.get("fd") is not None]
    models = list(dict.fromkeys(p["model"] for p in points))
    plt = _pyplot()
    cols = min(3, len(models) + 1)
    rows = (len(models) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.4 * cols, 4.3 * rows), squeeze=False, sharey=True)
    n = study.get("n_samples") or (points[0]["n"] if points else None)
    floor = study.get("reference", {}).get(f"fd_train_{n}")
    info = study.get("models", {})

    def title(model):
        i = info.get(model, {})
        return f"{model} (blur {i.get('blur_sigma_max', '?'):g}, {i.get('param', 'eps')})"

    first = axes.flat[0]
    for i, model in enumerate(models):
        env = envelope([p for p in points if p["model"] == model])
        first.plot(list(env), [p["fd"] for p in env.values()], marker="o", markersize=4, color=f"C{i}",
                   label=title(model))
    first.set_title("best of any sampler, per model", fontsize=9)
    for ax, model in zip(list(axes.flat)[1:], models):
        _solver_lines(ax, [p for p in points if p["model"] == model])
        ax.set_title(title(model) + "; * = x̂ not clipped", fontsize=9)
    nfes = sorted({p["nfe"] for p in points})
    for ax in list(axes.flat)[:len(models) + 1]:
        if floor is not None:
            ax.axhline(floor, color="gray", linewidth=0.8, linestyle=":", label=f"real images (n={n})")
        _log_axes(ax, nfes, plt)
    for ax in axes[:, 0]:
        ax.set_ylabel("FD-FMNIST (lower is better)")
    for ax in list(axes.flat)[len(models) + 1:]:
        ax.axis("off")
    fig.suptitle(f"Fashion-MNIST 32x32: sample quality vs network evaluations ({n} samples per point; "
                 f"own feature network, not Inception)", fontsize=10)
    return _save(fig, out)


# -- CLI ----------------------------------------------------------------------------------------
@click.group()
def cli():
    """Figures for the docs (docs/studies.md)."""


@cli.command("forward")
@click.option("--out", default=FORWARD_PNG, show_default=True, type=click.Path(dir_okay=False))
@click.option("--index", default=0, show_default=True, type=click.IntRange(0, 9999), help="Test image index.")
@click.option("--blur-sigma-max", default=20.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
def forward_cmd(out, index, blur_sigma_max, seed):
    """The forward process figure (diffusion / heat dissipation / blurring diffusion)."""
    click.echo(forward_process(out, index=index, blur_sigma_max=blur_sigma_max, seed=seed))


@cli.command("study")
@click.argument("study_json", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default=STUDY_PNG, show_default=True, type=click.Path(dir_okay=False))
def study_cmd(study_json, out):
    """The quality-vs-steps plot from benchmarks/results/study.json."""
    click.echo(plot_study(study_json, out))


def main(args=None):
    from bdm_runtime.errors import run_cli

    run_cli(cli, args)


if __name__ == "__main__":
    main()
