"""The third study's report: every measured (line, budget), the blur curve per budget and capacity, the answer."""
import os

import numpy as np

from .common import RESULTS, log, point_name, read_json, write_json
from .scale import LINES, PLOT, SCALE_RUNS, SEEDS, point_dir, settings, study2_eval

RATIO = 1.5      # the question: does a blurring model come within 1.5x of the best DDPM?


def _fd(name, step, seed, setting, runs):
    res = read_json(os.path.join(point_dir(name, step, seed, setting, runs), "eval.json"))
    res = res or study2_eval(name, step, seed, setting, runs)
    return None if res is None else float(res["fd"])


def collect(runs=SCALE_RUNS):
    """One row per measured (line, budget): FD per setting at seed 1, the best, its three-seed mean and spread."""
    rows = []
    for name, spec in LINES.items():
        for step in spec["budgets"]:
            fds = {s: _fd(name, step, 1, s, runs) for s in settings(spec["param"])}
            fds = {s: v for s, v in fds.items() if v is not None}
            if not fds:
                continue
            best = min(fds, key=fds.get)
            seeds = [v for v in (_fd(name, step, k, best, runs) for k in SEEDS) if v is not None]
            rows.append(dict(model=name, blur_sigma_max=spec["blur_sigma_max"], param=spec["param"], ch=spec["ch"],
                             steps=step, precision=spec["precision"],
                             fd={point_name(s): round(v, 3) for s, v in fds.items()},
                             best=point_name(best), best_fd=round(fds[best], 3),
                             seeds=len(seeds), seed_fd=[round(v, 3) for v in seeds],
                             mean_fd=round(float(np.mean(seeds)), 3),
                             spread=round(float(np.ptp(seeds)), 3) if len(seeds) > 1 else None))
    return rows


def _ratio_se(a, b, floor=0.0):
    """Standard error of ``(mean(a) - floor) / (mean(b) - floor)`` from the seeds' spread (first-order error
    propagation, independent samples: the two models' seeds are different runs)."""
    a, b = np.asarray(a, float) - floor, np.asarray(b, float) - floor
    r = a.mean() / b.mean()
    rel = [x.std(ddof=1) / np.sqrt(len(x)) / x.mean() for x in (a, b)]
    return round(float(abs(r) * np.hypot(*rel)), 2)


def gaps(rows, floor=None, blur=None):
    """Best blurring FD / DDPM FD at equal (capacity, budget): the trend the issue asks about.

    ``blur``: only blurring rows of that ``blur_sigma_max`` (the same model across budgets and capacities, where
    the best blurring model may change strength from one to the next). ``floor``: the FD of real images at the
    same sample count; ``ratio_above_floor`` compares what each model adds to it. A ratio of raw FDs tends to 1
    as both approach the floor, so a shrinking raw ratio alone could be the floor; the second ratio shows
    whether the gap itself shrinks.
    """
    out = []
    for ch, steps in sorted({(r["ch"], r["steps"]) for r in rows}):
        same = [r for r in rows if (r["ch"], r["steps"]) == (ch, steps)]
        ddpm = [r for r in same if r["blur_sigma_max"] == 0]
        fuzzy = [r for r in same if r["blur_sigma_max"] > 0 and (blur is None or r["blur_sigma_max"] == blur)]
        if ddpm and fuzzy:
            b = min(fuzzy, key=lambda r: r["mean_fd"])
            d = min(ddpm, key=lambda r: r["mean_fd"])
            g = dict(ch=ch, steps=steps, ddpm=d["model"], ddpm_fd=d["mean_fd"], blur=b["model"],
                     blur_fd=b["mean_fd"], ratio=round(b["mean_fd"] / d["mean_fd"], 2),
                     within=b["mean_fd"] <= RATIO * d["mean_fd"])
            f = floor if floor is not None and d["mean_fd"] > floor else None
            if f is not None:
                g.update(floor=round(float(f), 3),
                         ratio_above_floor=round((b["mean_fd"] - f) / (d["mean_fd"] - f), 2))
            if len(b.get("seed_fd") or ()) > 1 and len(d.get("seed_fd") or ()) > 1:
                g["ratio_se"] = _ratio_se(b["seed_fd"], d["seed_fd"])
                if f is not None:
                    g["ratio_above_floor_se"] = _ratio_se(b["seed_fd"], d["seed_fd"], f)
            out.append(g)
    return out


def markdown(rows, gap_rows, rule=None, shipped=None, blur10=None):
    """``scale.md``: the rows, the gaps (best blurring model; ``blur10``: blur 10 alone), and (when given) the
    shipping rule's verdict and what was shipped."""
    from .scale_ship import shipping_lines

    lines = ["# Third study: blur strength, budget and capacity (issue 19)", "",
             "FD-FMNIST, 1,000 samples; seed 1 at every setting, seeds 1-3 at each row's best (mean).", "",
             "| model | blur | ch | steps | precision | FD per setting (seed 1) | best | 3-seed mean (spread) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{k} {v}" for k, v in r["fd"].items())
        spread = f" ({r['spread']})" if r["spread"] is not None else ""
        lines.append(f"| {r['model']} | {r['blur_sigma_max']:g} | {r['ch']} | {r['steps']} | {r['precision']} | "
                     f"{per} | {r['best_fd']} | {r['mean_fd']} over {r['seeds']}{spread} |")
    for title, table in (("Best blurring model / best DDPM at equal capacity and budget:", gap_rows),
                         ("Blur 10 (`blur_sigma_max` 10, the blur measured at every budget and capacity) / best DDPM:",
                          blur10 or [])):
        if not table:
            continue
        floor = next((g["floor"] for g in table if "floor" in g), None)
        above = f" | ratio above real images' FD ({floor})" if floor is not None else ""
        lines += ["", title, "", f"| ch | steps | DDPM (FD) | blurring (FD) | ratio (+- standard error from the seeds)"
                                 f"{above} | within 1.5x |",
                  "|---|---|---|---|---|" + ("---|" if floor is not None else "") + "---|"]
        for g in table:
            pm = (lambda k: f" +- {g[k + '_se']}" if k + "_se" in g else "")
            extra = f" | {g.get('ratio_above_floor', '-')}{pm('ratio_above_floor')}" if floor is not None else ""
            lines.append(f"| {g['ch']} | {g['steps']} | {g['ddpm']} ({g['ddpm_fd']}) | {g['blur']} ({g['blur_fd']}) | "
                         f"{g['ratio']}{pm('ratio')}{extra} | {'yes' if g['within'] else 'no'} |")
    if rule or shipped:
        lines += shipping_lines(rule, shipped)
    return "\n".join(lines) + "\n"


def plot(rows, out=PLOT):
    """FD against blur strength, one line per (capacity, budget); hollow markers: one seed only."""
    from matplotlib.ticker import FixedLocator, NullLocator

    from ..figures import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for ch, steps in sorted({(r["ch"], r["steps"]) for r in rows}):
        pts = sorted((r["blur_sigma_max"], r["mean_fd"], r["seeds"]) for r in rows
                     if (r["ch"], r["steps"]) == (ch, steps))
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", label=f"ch {ch}, {steps:,} steps")
        for x, y, seeds in pts:
            ax.plot([x], [y], "o", color=line.get_color(), markerfacecolor=line.get_color() if seeds > 1 else "white")
    ax.set_xlabel("blur_sigma_max (0 = DDPM)")
    ax.set_ylabel("FD-FMNIST (best setting; mean of 3 seeds, hollow: 1)")
    ax.set_yscale("log")
    ticks = [v for v in (3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30) if v <= 1.3 * max(r["mean_fd"] for r in rows)]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{v:g}" for v in ticks])
    ax.set_xticks(sorted({r["blur_sigma_max"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, out)


def report(runs=SCALE_RUNS, results=RESULTS, out=PLOT):
    """``scale.json``/``.md`` from the runs, with the shipping rule's verdict against ``models/fmnist32`` now
    and the ship stage's last record (``scale_ship.json``), and the figure."""
    from .scale_ship import RECORD, rule

    from .. import metrics

    rows = collect(runs)
    floor = metrics.reference_stats().get("fd_train_1000")   # real training images against the test set, n = 1,000
    floor = None if floor is None else float(floor)
    gap_rows, blur10 = gaps(rows, floor), gaps(rows, floor, blur=10.0)
    write(results, dict(rows=rows, gaps=gap_rows, gaps_blur10=blur10, rule=rule(rows, runs=runs) if rows else None,
                        shipped=read_json(os.path.join(results, RECORD))))
    if rows:
        plot(rows, out)
    log(f"scale report: {len(rows)} rows, {len(gap_rows)} comparisons")
    return rows, gap_rows


def write(results, data):
    """``scale.json`` and ``scale.md`` (atomically) from ``data``: rows, gaps, rule, shipped."""
    from bdm_runtime.io import atomic_path

    write_json(os.path.join(results, "scale.json"), data)
    with atomic_path(os.path.join(results, "scale.md")) as tmp, open(tmp, "w") as f:
        f.write(markdown(data["rows"], data["gaps"], data.get("rule"), data.get("shipped"), data.get("gaps_blur10")))
