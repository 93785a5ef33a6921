"""The third study (issue 19): blurring diffusion against DDPM as blur strength, budget and capacity grow.

The second study's network (ch 16, 0.27 M parameters) at its budget (6,000 steps, 6.4 epochs) left the best
blurring model 2.3x behind the eps DDPM. The paper's claim comes from a 36 M network trained far longer, so
this study measures the trend rather than assuming it:

- blur strength at the second study's budget: ``blur_sigma_max`` 3 and 5 (spectral) join 0, 10 and 20;
- budget: the eps DDPM and ``bdm10-spectral`` continued to 12,000 and 24,000 steps (resumed runs are exact);
- capacity: the same two at ch 32 (1.06 M parameters), 6,000 and 12,000 steps.

Every (model, budget) is sampled at the settings the second study found best per cost (SDE-DPM-Solver++(2M),
B16, at 20 and 50 evaluations on the grids that suited each family; ancestral DDIM, B9, at 100), with the clip
setting that suits the parameterisation (eps: clipped; spectral: not), 1,000 samples at seed 1, then seeds 2
and 3 at each point's best setting (the seed spread at 1,000 samples is about +-0.5 FD).

Runs live in ``runs/scale/NAME`` (``model.pt`` resumable, ``model_stepN.pt`` per budget, samples per step,
seed and setting); results in ``results/scale.{json,md}`` and ``docs/scale_blur.png``. Every stage resumes.
The shipping rule and the ``ship`` stage (explicit: it may replace ``models/fmnist32``) are in ``scale_ship``.
"""
import glob
import os
import shutil
import time

import numpy as np

from .common import NET, OPT, RESULTS, ROOT, RUNS, STEPS, Setting, ckpt_step, log, point_name, read_json, write_json

SCALE_RUNS = os.path.join(ROOT, "runs", "scale")
PLOT = os.path.join(ROOT, "docs", "scale_blur.png")

# name -> blur_sigma_max (B4), parameterisation, base channels, budgets (steps measured), training precision,
# the second study's run it continues (its checkpoint at 6,000 steps, resumed bit for bit), and the second
# study's model whose seed-1 measurements at 6,000 steps it reuses (only where the EMA weights are equal).
# The eps DDPM is trained anew: the second study reused the first study's weights, which carry no optimizer
# state, and training is deterministic, so its 6,000-step checkpoint is checked against the shipped one.
# The continued runs keep float32 (their first 6,000 steps were); new runs train in bf16 autocast where
# benchmarks.train_precision found it equal to float32 within the run-to-run spread.
LINES = {
    "ddpm": dict(blur_sigma_max=0.0, param="eps", ch=16, budgets=(6000, 12000, 24000), precision="fp32",
                 reuse="ddpm"),
    "bdm10-spectral": dict(blur_sigma_max=10.0, param="spectral", ch=16, budgets=(6000, 12000, 24000),
                           precision="fp32", source="bdm10-spectral", reuse="bdm10-spectral"),
    "bdm-spectral": dict(blur_sigma_max=20.0, param="spectral", ch=16, budgets=(6000,), precision="fp32",
                         source="bdm-spectral", reuse="bdm-spectral"),
    "bdm3-spectral": dict(blur_sigma_max=3.0, param="spectral", ch=16, budgets=(6000,), precision="bf16"),
    "bdm5-spectral": dict(blur_sigma_max=5.0, param="spectral", ch=16, budgets=(6000,), precision="bf16"),
    "ddpm-ch32": dict(blur_sigma_max=0.0, param="eps", ch=32, budgets=(6000, 12000), precision="bf16"),
    "bdm10-spectral-ch32": dict(blur_sigma_max=10.0, param="spectral", ch=32, budgets=(6000, 12000),
                                precision="bf16"),
}
SEEDS = (1, 2, 3)


def settings(param):
    """The second study's best settings per cost for a parameterisation: B16 at 20 and 50, ancestral at 100."""
    if param == "eps":
        return [Setting("dpmpp2m", "edm", 1.0, 20, True), Setting("dpmpp2m", "logsnr", 1.0, 50, True),
                Setting("ddim", "uniform", 1.0, 100, True)]
    return [Setting("dpmpp2m", "logsnr", 1.0, 20, False), Setting("dpmpp2m", "uniform", 1.0, 50, False),
            Setting("ddim", "uniform", 1.0, 100, False)]


def folder(name, runs=SCALE_RUNS):
    return os.path.join(runs, name)


def snapshot_path(name, step, runs=SCALE_RUNS):
    """The checkpoint of ``name`` at ``step``: ``model_stepN.pt``, or the second study's for its 6,000 steps."""
    spec = LINES[name]
    path = os.path.join(folder(name, runs), f"model_step{step}.pt")
    if not os.path.isfile(path) and spec.get("source") and step == STEPS:
        path = os.path.join(RUNS, spec["source"], "model.pt")
    return path if os.path.isfile(path) and ckpt_step(path) == step else None


# -- training ------------------------------------------------------------------------------------
def budgets(name, upto=None):
    """The budgets of a line, up to ``upto`` steps (a sitting that cannot reach the largest stops short)."""
    return tuple(b for b in LINES[name]["budgets"] if upto is None or b <= upto)


def train(names, hours=None, runs=SCALE_RUNS, upto=None):
    """Train each line to its largest budget, keeping a checkpoint at every budget (resumable; the learning
    rate is constant after warm-up, so training to 12,000 and then on to 24,000 equals training to 24,000)."""
    from .stages import Study

    deadline = time.time() + 3600 * hours if hours else None
    # Budget by budget: every line reaches its first budget before any goes on to its second, so a study cut
    # short by a sitting's end has measured points on every line.
    order = sorted(((k, name, b) for name in names for k, b in enumerate(budgets(name, upto))),
                   key=lambda r: (r[0], names.index(r[1])))
    for _, name, budget in order:
        if deadline and time.time() >= deadline:
            log("time budget of this sitting used up; run again to continue")
            return
        spec = LINES[name]
        out = folder(name, runs)
        if spec.get("source") and not os.path.isfile(os.path.join(out, "model.pt")):
            os.makedirs(out, exist_ok=True)
            for f in ("model.pt", "log.jsonl", "budget.json"):   # the second study's run, continued
                src = os.path.join(RUNS, spec["source"], f)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(out, f))
        study = Study(runs=runs, models={name: dict(blur_sigma_max=spec["blur_sigma_max"], param=spec["param"])},
                      steps=budget, net=dict(NET, ch=spec["ch"]),
                      opt=dict(OPT, precision=spec["precision"]), device="cpu", threads=1)
        left = None if deadline is None else max(1e-6, (deadline - time.time()) / 3600)
        study.train(hours=left, keep=spec["budgets"])


# -- sampling and evaluation -----------------------------------------------------------------------
def point_dir(name, step, seed, setting, runs=SCALE_RUNS):
    return os.path.join(folder(name, runs), "samples", f"step{step}", f"seed{seed}", point_name(setting))


def _export(name, step, clip, runs):
    """The snapshot's EMA weights as a step graph (rebuilt when missing: graphs are not committed)."""
    from bdm_export import export_onnx
    from bdm_train import checkpoint

    path = os.path.join(folder(name, runs), f"step{step}{'' if clip else '_noclip'}.onnx")
    if not os.path.isfile(path):
        net, process, _ = checkpoint.load(snapshot_path(name, step, runs), ema=True)
        export_onnx(net, process, path, channels=net.in_channels, num_classes=net.num_classes,
                    clip_denoised=clip, default_steps=50, default_eta=0.0)
    return path


def measure_point(name, step, seed, setting, n=1000, chunk=250, threads=1, runs=SCALE_RUNS, ref=None):
    """Sample ``n`` images at one setting and seed (chunked, resumable) and write their ``eval.json``."""
    import bdm_runtime
    from bdm_runtime.images import save_npz, to_uint8

    from .. import metrics

    out = point_dir(name, step, seed, setting, runs)
    cached = read_json(os.path.join(out, "eval.json")) or study2_eval(name, step, seed, setting, runs)
    if cached is not None and cached.get("n") == n:
        return cached
    os.makedirs(out, exist_ok=True)
    extra = dict(solver=setting.solver, grid=setting.grid)
    with bdm_runtime.load(_export(name, step, setting.clip, runs), batch=chunk, threads=threads) as s:
        for first in range(0, n, chunk):
            path = os.path.join(out, f"{first:06d}.npz")
            if not os.path.isfile(path):
                b, t = min(chunk, n - first), time.perf_counter()
                x = s.sample(b, seed=seed, steps=setting.steps, eta=setting.eta, first_index=first, **extra)
                save_npz(path, images=to_uint8(x), seconds=np.float64(time.perf_counter() - t))
    parts = [np.load(p)["images"] for p in sorted(glob.glob(os.path.join(out, "[0-9]*.npz")))]
    res = metrics.evaluate(np.concatenate(parts)[:n], ref if ref is not None else metrics.reference_stats())
    write_json(os.path.join(out, "eval.json"), res)
    log(f"{name} step {step} seed {seed} {point_name(setting)}: FD {res['fd']:.3f}")
    return res


def study2_eval(name, step, seed, setting, runs=SCALE_RUNS):
    """The second study's measurement of the same weights, setting and seed (``None`` if it has none)."""
    from .common import SAMPLE_SEED

    reuse = LINES[name].get("reuse")
    if not reuse or step != STEPS or seed != SAMPLE_SEED:
        return None
    res = read_json(os.path.join(RUNS, reuse, "samples", f"step{STEPS}", point_name(setting), "eval.json"))
    mine = snapshot_path(name, step, runs)
    if res is None or mine is None or not same_ema(mine, os.path.join(RUNS, reuse, "model.pt")):
        return None
    return dict(res, reused=f"runs/study/{reuse}")


def same_ema(a, b):
    """Whether two checkpoints hold bit-identical EMA weights."""
    import torch

    from bdm_train import checkpoint

    ea, eb = checkpoint.load_state(a)["ema"], checkpoint.load_state(b)["ema"]
    return ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)


def measure(names, n=1000, threads=1, runs=SCALE_RUNS, upto=None):
    """Every available (line, budget): its settings at seed 1, then seeds 2 and 3 at its best setting."""
    from .. import metrics

    ref = metrics.reference_stats()
    for name in names:
        spec = LINES[name]
        for step in budgets(name, upto):
            if snapshot_path(name, step, runs) is None:
                log(f"{name}: no checkpoint at step {step} yet; train first")
                continue
            fds = {s: measure_point(name, step, 1, s, n, threads=threads, runs=runs, ref=ref)["fd"]
                   for s in settings(spec["param"])}
            best = min(fds, key=fds.get)
            for seed in SEEDS[1:]:
                measure_point(name, step, seed, best, n, threads=threads, runs=runs, ref=ref)
