"""The third study's ship stage (issue 19, item 6): the shipping rule applied to ``scale.json``, and the release.

The rule is the earlier studies' (issues 11, 12): a blurring model ships as ``models/fmnist32`` if its three-seed
mean FD is within 10% of the best model's at the same cost; a better DDPM ships if it beats the shipped one by
more than the seed spread. Read here as:

- *the same cost*: the same network (``ch``) and the same number of network evaluations as the blurring model's
  best setting. The DDPM's figure at that cost is its three-seed mean where its own best setting costs that
  much, else its seed-1 FD there (the study measures seeds 2 and 3 at each row's best setting only);
- *the seed spread*: max - min over the three seeds, the larger of the candidate's and the shipped model's;
- *candidates*: rows of the shipped model's network size only (ch 16 today). A ch 32 network costs about 4x per
  evaluation, and every speed figure of the README is for the ch 16 network the toolkit ships.

A blurring model that qualifies ships even over a better DDPM (the toolkit is named after it). The stage is
explicit (``python -m benchmarks.study scale --stages ship``) and may be rerun whenever new rows are measured:
it replaces ``models/fmnist32`` only when the rule says so, else it says why not and writes nothing.
"""
import json
import os

import numpy as np

from bdm_runtime.errors import BdmError

from .common import NET, RESULTS, ROOT, SHIPPED, log, point_name, read_json, sweep_settings, write_json
from .report import TOLERANCE
from .scale import LINES, SCALE_RUNS, folder, measure_point, same_ema, settings, snapshot_path

RECORD = "scale_ship.json"   # beside scale.json: what the ship stage last shipped (only that stage writes it)
CHEAPER = (5, 10, 20)   # the card's cheaper settings: the second study's solver x grid sweep at these evaluations
KEYS = ("model", "steps", "ch", "blur_sigma_max", "param", "best", "best_fd", "seed_fd", "mean_fd", "spread")
RULE = ("a blurring model ships if its three-seed mean FD is within {tol:.0%} of the best DDPM's at the same cost "
        "(ch {ch}, the same network evaluations); else a DDPM ships if its three-seed mean beats the shipped "
        "model's by more than the seed spread (max - min of three seeds, the larger of the two); candidates: "
        "ch {ch}, the shipped network's size (ch 32 costs ~4x per evaluation; the README's speed figures are "
        "for ch 16)")


def evaluations(row, name):
    """Network evaluations of one of ``row``'s measured settings, by its point name."""
    return next(s.steps for s in settings(row["param"]) if point_name(s) == name)


def fd_at(row, k):
    """``row``'s FD at ``k`` evaluations: its three-seed mean where its best setting costs ``k``, else seed 1."""
    if evaluations(row, row["best"]) == k and row["seeds"] >= 3:
        return row["mean_fd"]
    return next((v for name, v in row["fd"].items() if evaluations(row, name) == k), None)


def brief(row):
    return None if row is None else {k: row.get(k) for k in KEYS}


def _same(a, b):
    return a is not None and b is not None and (a["model"], a["steps"]) == (b["model"], b["steps"])


def blurring_pick(rows, ch, tolerance=TOLERANCE):
    """The best blurring row of network ``ch`` (three seeds) within ``tolerance`` x the best DDPM's FD at its
    best setting's cost, and that DDPM figure; ``(None, None)`` when none qualifies."""
    ddpm = [r for r in rows if r["blur_sigma_max"] == 0 and r["ch"] == ch]
    fit = []
    for r in rows:
        if r["blur_sigma_max"] > 0 and r["ch"] == ch and r["seeds"] >= 3:
            ref = [v for v in (fd_at(d, evaluations(r, r["best"])) for d in ddpm) if v is not None]
            if ref and r["mean_fd"] <= tolerance * min(ref):
                fit.append((r, min(ref)))
    return min(fit, key=lambda x: x[0]["mean_fd"], default=(None, None))


def decide(rows, shipped, ch, present=True, tolerance=TOLERANCE):
    """What the rule says about ``rows`` against the ``shipped`` row (``None``: not among them; ``present``:
    whether a model is shipped at all): ``verdict`` (ship or keep), ``candidate``, ``recommended`` (what
    ``models/fmnist32`` should hold: the candidate if it ships, else the shipped model) and the numbers."""
    out = dict(rule=RULE.format(tol=tolerance - 1, ch=ch), ch=ch, shipped=brief(shipped), verdict="keep")
    blur, ref = blurring_pick(rows, ch, tolerance)
    if blur is not None:
        out.update(branch="blurring", candidate=brief(blur), reference_fd=ref, ratio=round(blur["mean_fd"] / ref, 3))
        if _same(blur, shipped):
            return dict(out, recommended=brief(shipped), reason=f"{blur['model']} at {blur['steps']:,} steps is shipped")
        return dict(out, verdict="ship", recommended=brief(blur), reason=(
            f"blurring {blur['model']} at {blur['steps']:,} steps: three-seed mean FD {blur['mean_fd']:.2f} is "
            f"{blur['mean_fd'] / ref:.2f}x the best DDPM's {ref:.2f} at its cost (<= {tolerance:g}x)"))
    ddpm = [r for r in rows if r["blur_sigma_max"] == 0 and r["ch"] == ch and r["seeds"] >= 3]
    if not ddpm:
        return dict(out, branch=None, candidate=None, recommended=brief(shipped),
                    reason=f"no blurring model qualifies and no ch {ch} DDPM has three seeds measured")
    best = min(ddpm, key=lambda r: r["mean_fd"])
    out.update(branch="ddpm", candidate=brief(best))
    head = f"no blurring model within {tolerance:g}x of the best DDPM at its cost; "
    if not present:
        return dict(out, verdict="ship", recommended=brief(best), reason=head + "nothing shipped yet")
    if shipped is None or shipped["seeds"] < 3:
        return dict(out, recommended=brief(shipped), reason=head + (
            "the shipped model is not one of the study's rows with three seeds: measure it before comparing"))
    if _same(best, shipped):
        return dict(out, recommended=brief(shipped), reason=head + f"the shipped {best['model']} at "
                    f"{best['steps']:,} steps is the best ch {ch} DDPM ({best['mean_fd']:.2f})")
    margin, spread = shipped["mean_fd"] - best["mean_fd"], max(best["spread"], shipped["spread"])
    out.update(margin=round(margin, 3), spread=round(spread, 3))
    verdict = "ship" if margin > spread else "keep"
    return dict(out, verdict=verdict, recommended=brief(best if verdict == "ship" else shipped), reason=head + (
        f"{best['model']} at {best['steps']:,} steps: three-seed mean FD {best['mean_fd']:.2f} against the shipped "
        f"{shipped['model']} at {shipped['steps']:,} steps' {shipped['mean_fd']:.2f}, better by {margin:.2f}, "
        f"{'more' if verdict == 'ship' else 'not more'} than the seed spread {spread:.2f}"))


def shipped_row(rows, path, runs=SCALE_RUNS):
    """The row that stands for the weights at ``path``, and how: ``"same weights"`` (its snapshot's EMA is
    bit-identical) or ``"same recipe"`` (the same line's retraining to the same step: the second study's DDPM
    carries no optimizer state, so this study retrained it; deterministic, but not bit for bit across
    machines and library versions); ``(None, None)`` if no row matches."""
    from bdm_train import checkpoint

    state = checkpoint.load_state(path)
    cfg = state["config"]
    key = (int(state["step"]), cfg["model"]["ch"], cfg["process"]["blur_sigma_max"], cfg["model"].get("param", "eps"))
    same = [r for r in rows if (r["steps"], r["ch"], r["blur_sigma_max"], r["param"]) == key]
    for r in same:
        snap = snapshot_path(r["model"], r["steps"], runs)
        if snap is not None and same_ema(snap, path):
            return r, "same weights"
    return (same[0], "same recipe") if len(same) == 1 else (None, None)


def copies(row, path, runs=SCALE_RUNS):
    """Checkpoints in ``runs/`` holding the same EMA weights as ``path`` (where a replaced model still is)."""
    from .common import RUNS

    if row is None:
        return []
    spec = LINES.get(row["model"], {})
    paths = [snapshot_path(row["model"], row["steps"], runs)]
    paths += [os.path.join(RUNS, spec[k], "model.pt") for k in ("source", "reuse") if spec.get(k)]
    return [os.path.relpath(p, ROOT) for p in dict.fromkeys(paths)
            if p and os.path.isfile(p) and same_ema(p, path)]


def rule(rows, shipped_folder=SHIPPED, runs=SCALE_RUNS):
    """The rule's verdict on ``rows`` against what ``shipped_folder`` holds now."""
    from bdm_train import checkpoint

    path = os.path.join(shipped_folder, "model.pt")
    if not os.path.isfile(path):
        return decide(rows, None, NET["ch"], present=False)
    ch = checkpoint.load_state(path)["config"]["model"]["ch"]
    row, match = shipped_row(rows, path, runs)
    out = dict(decide(rows, row, ch), shipped_match=match)
    if match == "same recipe":
        out["reason"] += (f" (the shipped model's figures are this study's retraining of it: {row['model']}, same "
                          f"recipe and {row['steps']:,} steps, weights equal to float rounding, not bit for bit)")
    return out


# -- the stage ------------------------------------------------------------------------------------------
def ship(runs=SCALE_RUNS, results=RESULTS, shipped_folder=SHIPPED, n=1000, threads=1):
    """Apply the rule to ``results/scale.json``; when it says ship, measure the candidate's cheaper settings
    (resumable), release it into ``shipped_folder`` with its card, and record it: ``results/scale_ship.json``
    (its own file, so that a report or a merge that rewrites ``scale.json`` cannot lose it; every report copies
    it into ``scale.json``'s ``shipped`` and ``scale.md``)."""
    from .report import release
    from .scale_report import write

    path = os.path.join(results, "scale.json")
    data = read_json(path) or {}
    if not data.get("rows"):
        raise BdmError(f"{path} has no measured rows: run `python -m benchmarks.study scale --stages measure,report` "
                       "first")
    decision = rule(data["rows"], shipped_folder, runs)
    if decision["verdict"] != "ship":
        log(f"ship: {shipped_folder} unchanged: {decision['reason']}")
        return decision
    row = next(r for r in data["rows"] if _same(r, decision["candidate"]))
    last = read_json(os.path.join(results, RECORD))
    facts, record = facts_of(row, decision, previous(shipped_folder, decision, last, runs), n, threads, runs)

    def keep(state, sha):
        write_json(os.path.join(results, RECORD), dict(record, sha256=sha))
        data.update(shipped=dict(record, sha256=sha), rule=decision)
        write(results, data)

    src = snapshot_path(row["model"], row["steps"], runs)
    s = facts["setting"]
    sampler = dict(steps=int(s["steps"]), eta=float(s["eta"]), clip_denoised=bool(s["clip"]), solver=s["solver"],
                   grid=s["grid"])
    release(src, shipped_folder, sampler, lambda state, p: _card(state, p, facts), keep)
    data["rule"] = rule(data["rows"], shipped_folder, runs)   # now the shipped model is the one it recommends
    write(results, data)
    log(f"shipped {row['model']} at {row['steps']:,} steps ({sampler}) to {shipped_folder}: {decision['reason']}")
    return decision


def _card(state, path, facts):
    from .tables import card

    return card(state, path, facts)


def measured(row, n=1000, threads=1, runs=SCALE_RUNS):
    """The row's best setting, its seed-1 ``eval.json``, its FDs over the three seeds, and the best point at
    each of ``CHEAPER`` evaluations over the second study's solver x grid sweep there (seed 1; measured here
    when missing, through the same resumable ``measure_point`` as the study's own points)."""
    from .. import metrics
    from .scale import SEEDS

    ref = metrics.reference_stats()
    setting = next(s for s in settings(row["param"]) if point_name(s) == row["best"])

    def at(s, seed=1):
        return measure_point(row["model"], row["steps"], seed, s, n, threads=threads, runs=runs, ref=ref)

    point = at(setting)
    seeds = [float(at(setting, k)["fd"]) for k in SEEDS]
    cheaper = []
    for k in (k for k in CHEAPER if k < setting.steps):
        sweep = sweep_settings(setting.clip, nfes=(k,), ancestral_nfes=(), sde_nfes=(k,))
        cheaper.append(min((dict(at(s), **s._asdict()) for s in sweep), key=lambda p: p["fd"]))
    floor = ref[f"fd_train_{n}"] if f"fd_train_{n}" in ref else None
    return setting, point, seeds, cheaper, None if floor is None else float(floor)


def training(name, step, runs=SCALE_RUNS):
    """Seconds and devices of a line's training up to ``step`` (its ``budget.json`` chunks)."""
    budget = read_json(os.path.join(folder(name, runs), "budget.json"), {})
    chunks = [c for c in budget.get("chunks", []) if c["steps"][1] <= step]
    return sum(c["seconds"] for c in chunks), sorted({c["device"] for c in chunks})


def previous(shipped_folder, decision, last, runs=SCALE_RUNS):
    """What ``shipped_folder`` holds before a ship replaces it: sha256, which study shipped it (``last``: this
    study's previous record), the FD its card gives, and where the same weights still are."""
    import re

    from .common import sha256

    path = os.path.join(shipped_folder, "model.pt")
    if not os.path.isfile(path):
        return None
    sha = sha256(path)
    card = os.path.join(shipped_folder, "MODEL_CARD.md")
    found = None
    if os.path.isfile(card):
        with open(card) as f:
            found = re.search(r"FD-FMNIST (\d+\.\d+)", f.read())
    return dict(decision["shipped"] or {}, sha256=sha, match=decision.get("shipped_match"),
                by="this study's earlier ship" if last and last.get("sha256") == sha else
                "the second study's pick (`benchmarks/results/study.md`)",
                card_fd=float(found.group(1)) if found else None, copies=copies(decision["shipped"], path, runs))


def facts_of(row, decision, old, n=1000, threads=1, runs=SCALE_RUNS):
    """The card's facts and the record ``scale.json`` keeps of a ship (both from the same measurements)."""
    setting, point, seeds, cheaper, floor = measured(row, n, threads, runs)
    seconds, devices = training(row["model"], row["steps"], runs)
    mean, spread = float(np.mean(seeds)), float(np.ptp(seeds))
    from bdm_train import checkpoint

    snap = snapshot_path(row["model"], row["steps"], runs)
    src = os.path.relpath(snap, ROOT)
    precision = checkpoint.load_state(snap)["config"]["train"].get("precision", "fp32")
    notes = [f"**Network size**: ch {row['ch']}. The shipping rule compared only candidates of the shipped "
             f"network's size: a ch 32 network costs about 4x per evaluation, and every speed figure of the README "
             f"is for this ch {row['ch']} network.",
             f"**Weights**: `{src}` (the study's snapshot at {row['steps']:,} steps), EMA only.",
             replaced_note(old)]
    facts = dict(source=("the model the third study's shipping rule picked (`benchmarks/study/scale_ship.py`, "
                         f"`benchmarks/results/scale.md`): {decision['reason']}"),
                 steps=row["steps"], seconds=seconds, devices=devices, setting=setting._asdict(), point=point,
                 floor=floor, cheaper=cheaper, notes=notes,
                 seeds=(f"over sample seeds 1 / 2 / 3 ({point['n']:,} samples each): "
                        f"{' / '.join(f'{v:.2f}' for v in seeds)}, mean **{mean:.2f}** (spread {spread:.2f})"),
                 regenerate=("`python -m benchmarks.study scale` (train, measure, report), then "
                             "`python -m benchmarks.study scale --stages ship` (the rule: "
                             "`benchmarks/results/scale.md`)"))
    record = dict(study="scale (issue 19)", model=row["model"], steps=row["steps"], ch=row["ch"],
                  blur_sigma_max=row["blur_sigma_max"], param=row["param"], precision=precision, source=src,
                  train_seconds=round(seconds, 1), sampler=setting._asdict(), n=point["n"], fd=float(point["fd"]),
                  kid=float(point["kid"]), seed_fd=[round(v, 3) for v in seeds], mean_fd=round(mean, 3),
                  spread=round(spread, 3), cheaper={str(p["steps"]): {k: p[k] for k in (
                      "solver", "grid", "eta", "steps", "clip", "fd", "kid")} for p in cheaper},
                  replaced=old, decision=decision)
    return facts, json.loads(json.dumps(record))


def replaced_note(old):
    """The card's line on the model this one replaces (``previous()``): what it was, its FD, where it still is."""
    if old is None:
        return "**Replaces**: nothing (no model was shipped before)."
    where = " and ".join(["git history (`git log -- models/fmnist32/model.pt`)"] + [f"`{p}`" for p in old["copies"]])
    text = f"**Replaces** the previous `models/fmnist32`, {old['by']}: sha256 `{old['sha256']}`"
    text += f", FD-FMNIST {old['card_fd']:.2f} at its default by its card" if old["card_fd"] else ""
    if old.get("model"):
        twin = "this study's retraining of it (same recipe and budget, weights not bit for bit the same)"
        text += (f"; `{old['model']}` at {old['steps']:,} steps (ch {old['ch']}), three-seed mean FD-FMNIST "
                 f"{old['mean_fd']:.2f} ({' / '.join(f'{v:.2f}' for v in old.get('seed_fd') or ())}) at its best "
                 f"setting, measured on {'the same weights' if old['match'] == 'same weights' else twin}")
    return text + f". The replaced weights are still in {where}."


def shipping_lines(decision, shipped):
    """``scale.md``'s shipping section: the rule's verdict now, and what this study shipped."""
    from .tables import _describe

    lines = ["", "## Shipping (`python -m benchmarks.study scale --stages ship`)", ""]
    if decision:
        rec = decision.get("recommended")
        lines.append(f"Rule: {decision['rule']}. Verdict against `models/fmnist32` now: **{decision['verdict']}**"
                     + (f" ({rec['model']} at {rec['steps']:,} steps)" if rec else "") + f": {decision['reason']}.")
    if shipped:
        cheap = ", ".join(f"{k} evaluations FD {p['fd']:.2f} ({_describe(p)})" for k, p in shipped["cheaper"].items())
        old = shipped["replaced"]
        lines += ["", f"Shipped by this study: `{shipped['model']}` at {shipped['steps']:,} steps (ch {shipped['ch']}, "
                  f"{shipped['precision']}; sha256 `{shipped['sha256'][:16]}...`), default "
                  f"{_describe(shipped['sampler'])}: "
                  f"FD {shipped['fd']:.2f} at seed 1, {shipped['mean_fd']:.2f} over seeds 1-3 "
                  f"({' / '.join(f'{v:.2f}' for v in shipped['seed_fd'])}); cheaper: {cheap or 'none'}."
                  + (f" It replaced `{old['model']}` at {old['steps']:,} steps ({old['mean_fd']:.2f} over three seeds)."
                     if old.get("model") else "")]
    return lines
