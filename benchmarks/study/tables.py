"""The study's text: the markdown tables (``study.md``) and the shipped model's card."""
import os

from .common import point_name, sha256, solver_label


def _sampler_name(eta, steps):
    return f"{'ancestral' if eta == 1 else 'deterministic' if eta == 0 else f'eta={eta:g}'} {steps}"


def _cell(points, **key):
    return next((p for p in points if all(p.get(k, d) == v for k, (v, d) in key.items())), None)


def legacy_table(study):
    """Rows model x clip, columns the first study's (eta, steps) on the uniform grid: FD / KID, then noise."""
    points = [p for p in study["points"] if (p.get("solver", "ddim"), p.get("grid", "uniform")) == ("ddim", "uniform")]
    legacy = {tuple(c) for c in study.get("legacy_points") or [(p["eta"], p["steps"]) for p in points]}
    cols = sorted({(p["eta"], p["steps"]) for p in points} & legacy)
    clips = sorted({p.get("clip", True) for p in points}, reverse=True) or [True]
    head = "| model | blur_sigma_max | param | trained steps | x_hat clipped | " + " | ".join(
        _sampler_name(e, k) for e, k in cols) + " |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    noise = ["| model | x_hat clipped | " + " | ".join(_sampler_name(e, k) for e, k in cols) + " |",
             "|" + "---|" * (2 + len(cols))]
    for model, info in study["models"].items():
        for clip in clips:
            cells = [_cell(points, model=(model, None), eta=(e, None), steps=(k, None), clip=(clip, True))
                     for e, k in cols]
            lines.append(f"| {model} | {info['blur_sigma_max']:g} | {info.get('param', 'eps')} | "
                         f"{info['trained_steps']} | {'yes' if clip else 'no'} | " + " | ".join(
                             "-" if p is None else f"{p['fd']:.2f} / {p['kid']:.3f}" for p in cells) + " |")
            noise.append(f"| {model} | {'yes' if clip else 'no'} | " + " | ".join(
                "-" if p is None or "noisy" not in p else f"{100 * p['noisy']:.1f}%" for p in cells) + " |")
    return lines, noise


def sweep_table(study):
    """Rows model x solver (eta) x grid x clip, columns network evaluations: FD (share of noise).

    Every sampler with at least two measured evaluation counts: the legacy uniform-grid points
    appear in their rows, beside the sweep's deterministic and ancestral points on the other grids.
    """
    points = study["points"]
    nfes = sorted({p["steps"] for p in points})
    rows = sorted({(p["model"], p.get("solver", "ddim"), p["eta"], p.get("grid", "uniform"), p.get("clip", True))
                   for p in points}, key=lambda r: (list(study["models"]).index(r[0]), r[1], r[2], r[3], not r[4]))
    lines = ["| model | solver | grid | x_hat clipped | " + " | ".join(f"{k} evals" for k in nfes) + " |",
             "|" + "---|" * (4 + len(nfes))]
    for model, solver, eta, grid, clip in rows:
        cells = [_cell(points, model=(model, None), solver=(solver, "ddim"), eta=(eta, None), grid=(grid, "uniform"),
                       steps=(k, None), clip=(clip, True)) for k in nfes]
        if sum(c is not None for c in cells) < 2:
            continue
        name = solver_label(solver, eta)
        lines.append(f"| {model} | {name} | {grid} | {'yes' if clip else 'no'} | " + " | ".join(
            "-" if p is None else f"{p['fd']:.2f} ({100 * p.get('noisy', 0):.1f}%)" for p in cells) + " |")
    return lines


def best_per_cost_table(study):
    """Rows models, columns network evaluations: the best FD at that cost and the sampler that gave it."""
    points = study["points"]
    nfes = sorted({p["steps"] for p in points})
    lines = ["| model | " + " | ".join(f"{k} evals" for k in nfes) + " |", "|" + "---|" * (1 + len(nfes))]
    for model in study["models"]:
        cells = []
        best = _best_per_nfe(points, model)
        for k in nfes:
            cells.append(f"{best[k]['fd']:.2f} ({_short(best[k])})" if k in best else "-")
        if any(c != "-" for c in cells):
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _best_per_nfe(points, model):
    """``{evaluations: the point with the lowest FD}`` of one model."""
    out = {}
    for p in points:
        if p["model"] == model and (p["steps"] not in out or p["fd"] < out[p["steps"]]["fd"]):
            out[p["steps"]] = p
    return out


def _short(p):
    solver = p.get("solver", "ddim")
    name = solver_label(solver, p["eta"])
    return f"{name}, {p.get('grid', 'uniform')}" + ("" if p.get("clip", True) else ", no clip")


def markdown(study):
    """``study.md``: the legacy table, the noise table, the solver x grid sweep, and the per-model picks."""
    n = study["n_samples"]
    legacy, noise = legacy_table(study)
    lines = [f"Fashion-MNIST 32x32, {n} samples per point, FD-FMNIST / KID (own feature network: comparable "
             "within this table, not with Inception FIDs).", "",
             "B10 on the uniform grid (the first study's settings):", ""] + legacy
    lines += ["", "Share of samples that ended as noise (rougher than 99.9% of the test images; 10,000 real "
              "training images: 0.07%):", ""] + noise
    best = best_per_cost_table(study)
    if len(best) > 2:
        lines += ["", "Best FD-FMNIST per number of network evaluations, and the sampler that gave it:", ""] + best
    sweep = sweep_table(study)
    if len(sweep) > 2:
        lines += ["", "Solvers (B10 `ddim` at eta 0 and at eta 1, i.e. ancestral B9; B11 `dpmpp2m`; B16 "
                  "`dpmpp2m-sde`, dpmpp2m at eta 1) x time grids "
                  "(B15) x network evaluations: FD-FMNIST (share of samples that ended as noise):", ""] + sweep
    ref = study.get("reference", {})
    if f"fd_train_{n}" in ref:
        lines += ["", f"Real training images (n={n}) against the test set: FD {ref[f'fd_train_{n}']:.2f}, "
                  f"KID {ref.get(f'kid_train_{n}', float('nan')):.3f} (the floor at this sample count)."]
    lines.append("")
    for model, info in study["models"].items():
        line = (f"- {model}: {info['trained_steps']} steps, {info['train_seconds'] / 3600:.2f} h of training on "
                f"{', '.join(info['devices']) or 'unknown'}")
        picks = study.get("cheapest", {}).get(model)
        if picks:
            b, c = picks["best"], picks["cheapest"]
            line += (f"; best FD {b['fd']:.2f} ({_describe(b)}); cheapest within 10%: {_describe(c)}, "
                     f"FD {c['fd']:.2f}")
        lines.append(line + ".")
    if study.get("recommended"):
        r = study["recommended"]
        lines.append(f"- Recommended (shipped): {r['model']}, {_describe(r)} (FD {r['fd']:.2f}; {r['rule']}).")
    for model, p in (study.get("parity") or {}).items():
        lines.append(f"- Runtime (ONNX) vs PyTorch sampler, {model}: max |difference| {p['max_abs_diff']:.1e} "
                     f"over {p['n']} images ({p['steps']} steps, eta={p['eta']:g}).")
    lines += ["", "Regenerate: `python -m benchmarks.study run` (resumable; see benchmarks/study/__init__.py).", ""]
    return "\n".join(lines)


def _describe(p):
    solver, grid = p.get("solver", "ddim"), p.get("grid", "uniform")
    eta = f", eta {p['eta']:g}" if solver == "ddim" or p["eta"] else ""
    return f"{solver}{eta} on the {grid} grid, {p['steps']} evaluations, x_hat {'' if p.get('clip', True) else 'not '}clipped"


def model_card(study, state, path):
    """The second study's shipped model's card: data, network, budget, default sampler and its measured quality."""
    rec = study["recommended"]
    name, info = rec["model"], study["models"][rec["model"]]
    point = next(p for p in study["points"] if p["model"] == name and point_name(_key(p)) == point_name(_key(rec)))
    n = study["n_samples"]
    return card(state, path, dict(
        source=("the model recommended by the quality study (`benchmarks/study/`, `benchmarks/results/study.md`): "
                f"{rec['rule']}"),
        steps=info["trained_steps"], seconds=info["train_seconds"], devices=info["devices"], setting=rec,
        point=point, floor=study.get("reference", {}).get(f"fd_train_{n}"),
        cheaper=[p for k, p in sorted(_best_per_nfe(study["points"], name).items()) if k < rec["steps"]],
        regenerate="`python -m benchmarks.study run` then `python -m benchmarks.study run --stages ship`"))


def card(state, path, facts):
    """A shipped model's card from its release ``state`` (at ``path``, hashed here) and measured ``facts``.

    ``facts``: ``source`` (which study picked it, and why), ``steps``, ``seconds``, ``devices`` (its training),
    ``setting`` (the default sampler), ``point`` (``eval.json`` at the default), ``floor`` (real images' FD or
    ``None``), ``cheaper`` (the best points below the default's cost), ``regenerate``; optional ``seeds``
    (a sentence on the seed spread) and ``notes`` (more bullet lines). Both studies write their card here, so
    the two cards say the same things the same way.
    """
    cfg, point, sha = state["config"], facts["point"], sha256(path)
    model, train = cfg["model"], cfg["train"]
    params = sum(v.numel() for k, v in state["ema"].items() if k not in ("data_mean", "data_std"))
    blur, param = cfg["process"]["blur_sigma_max"], model.get("param", "eps")
    reading = ("eps prediction (B8)" if param == "eps" else
               "spectral preconditioning (B14: per-frequency Wiener skip and unit-variance target, with the "
               "training data's DCT mean and std stored as buffers in `model.pt`)")
    noisy = f"; {100 * point['noisy']:.1f}% of samples ended as noise" if "noisy" in point else ""
    floor = facts.get("floor")
    lines = [
        f"# Model card: `{os.path.basename(os.path.dirname(os.path.abspath(path)))}`", "",
        f"- **What**: an unconditional {'blurring diffusion' if blur else 'DDPM'} model (`blur_sigma_max = "
        f"{blur:g}`, `param = {param}`) of Fashion-MNIST at 32x32x1 (28x28 centre-padded with black), "
        f"{facts['source']}.",
        "- **Data**: the 60,000 Fashion-MNIST training images (Debian's `dataset-fashion-mnist`), no labels, "
        "no augmentation.",
        f"- **Network**: UNet read as {reading}; `ch {model['ch']}`, multipliers "
        f"`{','.join(map(str, model['ch_mult']))}`, {model['num_res_blocks']} residual block(s) per "
        f"level, attention at {list(model['attn_resolutions']) or 'none'}, {params / 1e6:.2f} M parameters; "
        f"EMA weights (decay {train['ema_decay']:g}) only: no optimizer state, so it samples and exports "
        "but cannot be resumed.",
        f"- **Training**: {facts['steps']} steps of batch {train['batch_size']} "
        f"({facts['steps'] * train['batch_size'] / 60000:.1f} epochs), AdamW lr {train['lr']:g} (warm-up "
        f"{train['warmup']}), seed {train['seed']}, {train.get('precision', 'fp32')} precision; "
        f"{facts['seconds'] / 3600:.2f} h on {', '.join(facts['devices'])}.",
        f"- **Default sampler** (stored here and in every graph `bdm-export` makes of it): "
        f"{_describe(facts['setting'])}.",
        f"- **Measured at the default** ({point['n']} samples through the runtime on the exported FP32 ONNX, "
        f"ONNX Runtime CPU): FD-FMNIST {point['fd']:.2f}, KID {point['kid']:.4f} +- {point['kid_std']:.4f}"
        + (f" (real training images: FD {floor:.2f} at the same count)" if floor is not None else "") + noisy
        + (f"; {facts['seeds']}" if facts.get("seeds") else "") + ". "
        "FD-FMNIST is the Frechet distance on the project's own Fashion-MNIST classifier "
        "(`benchmarks/feature_net.py`): comparable within this project, not with Inception FIDs.",
        "- **Cheaper settings, measured** (the best at each smaller cost; pass them to `bdm-run`/`bdm-export` with "
        "`--solver --grid --steps --eta`): " + (", ".join(
            f"{p['steps']} evaluations: FD {p['fd']:.2f} ({_describe(p)})" for p in facts["cheaper"]) or "none") + ".",
        f"- **Class histogram** of those samples (classifier's labels, T-shirt .. ankle boot): {point['hist']} "
        f"(total variation from the test set's {point['hist_tv']:.3f}).",
    ] + [f"- {note}" for note in facts.get("notes", ())] + [
        f"- **File**: `model.pt`, sha256 `{sha}`; `config.json` is its config in readable form (without the "
        "data statistics, which are in `model.pt`).",
        "- **Use**: `bdm-export --ckpt models/fmnist32/model.pt --out-dir out && "
        "bdm-run --engine out/bdm.onnx --n 64 --out grid.png` (what `make demo` does).",
        "- **Limits**: a small network trained for a CPU budget: samples are recognisable garments with "
        f"artefacts, not state of the art. Regenerate with {facts['regenerate']}.",
        "",
    ]
    return "\n".join(lines)


def _key(p):
    from .common import Setting

    return Setting(p.get("solver", "ddim"), p.get("grid", "uniform"), p["eta"], p["steps"], p.get("clip", True))
