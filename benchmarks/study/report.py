"""The study's results: collect what is on disk, recommend, write tables, the plot, grids, and ship."""
import os

from bdm_runtime.errors import BdmError

from .common import SAMPLE_SEED, SHIPPED, Setting, ckpt_step, log, read_json, write_json

TOLERANCE = 1.10   # "within 10% of the best FD": the rule of issues 11 and 12


def collect(study):
    """``study.json``'s content from what is on disk."""
    from .. import metrics

    points, models = [], {}
    for model, spec in study.models.items():
        step = ckpt_step(study.ckpt(model))
        budget = read_json(os.path.join(study.folder(model), "budget.json"), {})
        models[model] = dict(spec, trained_steps=step, train_seconds=round(budget.get("seconds", 0), 1),
                             devices=sorted({s["device"] for s in budget.get("chunks", [])}))
        for setting in study.settings(model):
            res = read_json(os.path.join(study.point_dir(model, step, setting), "eval.json"))
            if res is not None:
                points.append(dict(model=model, **spec, **setting._asdict(), nfe=setting.steps, **res))
    ref = {}
    try:
        r = metrics.reference_stats()
        ref = {k: float(r[k]) for k in r if k.startswith(("fd_train", "kid_train", "test_accuracy"))}
    except BdmError:
        pass
    return dict(dataset="Fashion-MNIST, 32x32 (28x28 centre-padded)", n_samples=study.n, sample_seed=SAMPLE_SEED,
                network=study.net, optimizer=study.opt, target_steps=study.steps, backend=study.backend,
                legacy_points=[list(p) for p in study.points],
                models=models, points=points, reference=ref, cheapest=cheapest_per_model(points),
                recommended=recommend(points), parity=read_json(os.path.join(study.runs, "parity.json")))


def cheapest(points, tolerance=TOLERANCE):
    """The fewest network evaluations within ``tolerance`` x the best FD of ``points`` (ties: lower FD)."""
    best = min(p["fd"] for p in points)
    return min((p for p in points if p["fd"] <= tolerance * best), key=lambda p: (p["nfe"], p["fd"]))


def cheapest_per_model(points, tolerance=TOLERANCE):
    """``{model: (best point, cheapest point within tolerance)}`` as plain dicts."""
    out = {}
    for model in dict.fromkeys(p["model"] for p in points):
        own = [p for p in points if p["model"] == model]
        out[model] = dict(best=_brief(min(own, key=lambda p: p["fd"])), cheapest=_brief(cheapest(own, tolerance)))
    return out


def _brief(p):
    return {k: p[k] for k in ("solver", "grid", "eta", "steps", "clip", "fd", "kid") if k in p}


def recommend(points, tolerance=TOLERANCE):
    """The model to ship and its default sampler.

    The model: the best FD of the study, unless a blurring model (``blur_sigma_max > 0``) comes within
    ``tolerance`` of it: then the best blurring model (the toolkit is named after it). Its sampler:
    the fewest evaluations within ``tolerance`` x that model's own best FD.
    """
    if not points:
        return None
    best = min(points, key=lambda p: p["fd"])
    blurred = [p for p in points if p.get("blur_sigma_max", 0) > 0]
    best_blur = min(blurred, key=lambda p: p["fd"]) if blurred else None
    model, why = best["model"], "the best FD of the study"
    if best_blur is not None and best_blur["model"] != model and best_blur["fd"] <= tolerance * best["fd"]:
        model, why = best_blur["model"], (f"the best blurring model, within {tolerance:g} x the study's best FD "
                                          f"({best['fd']:.2f}, {best['model']})")
    pick = cheapest([p for p in points if p["model"] == model], tolerance)
    return dict(model=model, solver=pick.get("solver", "ddim"), grid=pick.get("grid", "uniform"), eta=pick["eta"],
                steps=pick["steps"], clip=pick.get("clip", True), fd=pick["fd"], kid=pick["kid"],
                rule=f"{why}; its fewest evaluations with FD <= {tolerance:g} x its best FD")


def setting_of(rec):
    return Setting(rec.get("solver", "ddim"), rec.get("grid", "uniform"), rec["eta"], rec["steps"], rec["clip"])


def report(study):
    """``study.json``, ``study.md``, sample grids and the plot."""
    from bdm_runtime.io import atomic_path

    from .. import figures
    from .tables import markdown

    res = collect(study)
    write_json(os.path.join(study.results, "study.json"), res)
    with atomic_path(os.path.join(study.results, "study.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(res))
    grids(study, res)
    if res["points"]:
        figures.plot_study(res, study.plot)
    log(f"wrote {study.results}/study.json, study.md" + (f" and {study.plot}" if res["points"] else ""))
    return res


def grids(study, res):
    """8x8 grids of the first 64 samples of each model at its own best and its cheapest good setting.

    Where the point's images are not on disk (a fresh machine has only the committed ``eval.json``),
    the 64 are sampled again from the exported graph: the noise protocol makes them the same images.
    """
    from bdm_runtime.images import save_grid

    from .common import point_name

    for model, picks in res["cheapest"].items():
        step = res["models"][model]["trained_steps"]
        for rec in {point_name(setting_of(r)): r for r in picks.values()}.values():
            setting = setting_of(rec)
            images, _ = study.images(model, step, setting)
            if len(images) < 64 and os.path.isfile(study.onnx(model, setting.clip)):
                sampler = study._sampler(model, setting.clip)
                images = sampler(64, setting, 0)
                if hasattr(sampler, "close"):
                    sampler.close()
            if len(images) >= 64:
                save_grid(images[:64], os.path.join(study.results, f"samples_{model}_{point_name(setting)}.png"),
                          ncols=8, scale=2)


def ship(study, folder=SHIPPED):
    """The recommended model's EMA weights, config and model card into ``folder`` (what ``make demo`` uses).

    The sampler defaults stored with it (and so in every graph ``bdm-export`` makes of it) are the
    study's recommended setting. Refused once the third study has shipped a model (``scale_ship.json``): its
    rule picked that one over this study's, and only its own stage may replace it.
    """
    from .tables import model_card

    later = read_json(os.path.join(study.results, "scale_ship.json"))   # the third study's ship record
    if later and os.path.abspath(folder) == os.path.abspath(SHIPPED):
        raise BdmError(f"{folder} holds the third study's {later['model']} ({later['steps']} steps, shipped by its "
                       "rule over this study's pick): run `python -m benchmarks.study scale --stages ship` instead")
    res = collect(study)
    rec = res["recommended"]
    if rec is None:
        raise BdmError("nothing evaluated yet: run the sample and eval stages before ship")
    sampler = dict(steps=int(rec["steps"]), eta=float(rec["eta"]), clip_denoised=bool(rec["clip"]),
                   solver=rec["solver"], grid=rec["grid"])
    state = release(study.ckpt(rec["model"]), folder, sampler, lambda st, path: model_card(res, st, path))
    log(f"shipped {rec['model']} (step {state['step']}, {sampler}) to {folder}")
    return os.path.join(folder, "model.pt")


def release(src, folder, sampler, card, record=None):
    """Checkpoint ``src`` as a release in ``folder``: ``model.pt`` (EMA weights only, ``sampler`` as its
    defaults), ``config.json`` and ``MODEL_CARD.md`` (``card(state, path)``'s text); ``record(state, sha256)``
    lets a study keep what it shipped. ``model.pt`` is renamed into place last, after everything else is
    written: a ship cut short leaves the previous weights, which the study then sees as shipped and replaces
    again, never new weights under an old card. Returns the release's state.
    """
    from bdm_runtime.io import atomic_path

    from bdm_train import checkpoint

    from .common import sha256

    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, "model.pt")) as tmp:
        checkpoint.release(src, tmp, sampler=sampler)
        state = checkpoint.load_state(tmp)
        cfg = dict(state["config"], step=int(state["step"]))
        cfg["model"] = {k: v for k, v in cfg["model"].items() if k not in ("data_mean", "data_std")}   # in model.pt
        write_json(os.path.join(folder, "config.json"), cfg)
        with atomic_path(os.path.join(folder, "MODEL_CARD.md")) as t, open(t, "w") as f:
            f.write(card(state, tmp))
        if record is not None:
            record(state, sha256(tmp))
    return state
