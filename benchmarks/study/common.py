"""What the study compares (models, sampler settings, budget) and its small file helpers."""
import json
import os
import time
from collections import namedtuple

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # benchmarks/
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
RUNS = os.path.join(ROOT, "runs", "study")
SHIPPED = os.path.join(ROOT, "models", "fmnist32")   # the model `make demo` uses

# name -> blur_sigma_max (B4) and parameterisation (eps: B8; spectral: B14). Same network, data,
# seed and budget for all; blur 10 is gDDIM's value, 20 the paper's for 32x32.
MODELS = {
    "bdm": dict(blur_sigma_max=20.0, param="eps"),
    "ddpm": dict(blur_sigma_max=0.0, param="eps"),
    "bdm-spectral": dict(blur_sigma_max=20.0, param="spectral"),
    "ddpm-spectral": dict(blur_sigma_max=0.0, param="spectral"),
    "bdm10-spectral": dict(blur_sigma_max=10.0, param="spectral"),
}

# One sampler setting: solver (B10 "ddim" or B11 "dpmpp2m"), time grid (B15), eta (ddim only),
# network evaluations, and whether x_hat is clipped to [-1, 1] at every step.
Setting = namedtuple("Setting", "solver grid eta steps clip")
# The first study's points: B10 on the uniform grid, (eta, steps), each with and without the clip.
# Clipping is measured, not assumed: with eps and blur, x_hat divides the network's error by
# alpha_t ~ d_min a_t, and a pixel-space clip of that estimate also corrupts the low frequencies.
LEGACY_POINTS = ((0.0, 10), (0.0, 20), (0.0, 50), (1.0, 50), (1.0, 100))
CLIPS = (True, False)
# Quality per cost (issue 11): deterministic solvers x time grids x evaluations, at the clip
# setting that measured better on the legacy points for that model.
SOLVERS = ("ddim", "dpmpp2m")
GRIDS = ("uniform", "power", "logsnr", "edm", "spectral")
NFES = (5, 10, 20, 50)
# Ancestral DDIM (B9: ddim at eta 1) on every grid, at these evaluations only: the first study found
# it the best sampler of the eps DDPM at 50-100 steps, so the grid is tried as a factor there too;
# below 20 steps an ancestral sampler is far from its best (first study: FD x1.3 from 100 to 50).
ANCESTRAL_NFES = (20, 50)
# SDE-DPM-Solver++(2M) (B16: dpmpp2m at eta 1) on every grid at every count of the sweep: added after
# the sweep above found the deterministic solvers converged by 10 evaluations to 1.9x the ancestral
# sampler's FD on the eps DDPM, i.e. the network's error, which the SDE's noise contracts.
SDE_NFES = NFES
SAMPLE_SEED = 1            # the same initial noise for every model: paired samples

# Network and optimiser, the same for every model. Sized so that a training fits a ~1.3 h sitting
# on one CPU core: 0.27M parameters, no attention, no dropout (a few epochs underfit, they do not
# overfit), lr 1e-3. Measured on one core with PyTorch: 111 training images/s and 251 images/s per
# network evaluation, against 35 and 79 for ch 32; bdm-train's default (ch 64, 2 blocks, attention
# at 16; 6.5M) costs ~20x more per step and per sample than this one.
# On a GPU use --ch 64 --num-res-blocks 2 --attn 16 --batch-size 128 --lr 2e-4 --steps 30000.
NET = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn=(), dropout=0.0)
OPT = dict(batch_size=64, lr=1e-3, warmup=500, ema_decay=0.9995, grad_clip=1.0, seed=0)
STEPS = 6000
SMOKE = dict(net=dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), dropout=0.0),
             steps=4, n=16, chunk=8, points=((0.0, 2), (1.0, 3)), nfes=(2,), ancestral_nfes=(2,), sde_nfes=(2,),
             grids=("uniform", "spectral"))


def legacy_settings(points=LEGACY_POINTS, clips=CLIPS):
    """The first study's settings: B10 on the uniform grid, every (eta, steps) with and without the clip."""
    return [Setting("ddim", "uniform", float(eta), int(k), bool(c)) for c in clips for eta, k in points]


def sweep_settings(clip, solvers=SOLVERS, grids=GRIDS, nfes=NFES, ancestral_nfes=ANCESTRAL_NFES, sde_nfes=SDE_NFES):
    """Deterministic solver x grid x evaluations at one clip setting, then ancestral DDIM x grid at
    ``ancestral_nfes`` and SDE-DPM-Solver++(2M) x grid at ``sde_nfes`` (those also in ``nfes``); 10 and
    20 evaluations first (the issue's targets), so that a study cut short by a sitting's end has answered them."""
    order = sorted(nfes, key=lambda k: (k not in (10, 20), k))
    out = [Setting(sv, g, 0.0, int(k), bool(clip)) for k in order for sv in solvers for g in grids]
    out += [Setting("ddim", g, 1.0, int(k), bool(clip)) for k in order if k in ancestral_nfes for g in grids]
    if "dpmpp2m" in solvers:
        out += [Setting("dpmpp2m", g, 1.0, int(k), bool(clip)) for k in order if k in sde_nfes for g in grids]
    return out


def solver_label(solver, eta):
    """A sampler's short name: ``ancestral`` (ddim at eta 1, B9), ``dpmpp2m`` (B11), ``dpmpp2m-sde``
    (dpmpp2m at eta 1, B16), else the solver with its eta (``ddim eta 0``)."""
    eta = float(eta)
    names = {("ddim", 1.0): "ancestral", ("dpmpp2m", 0.0): "dpmpp2m",
             ("dpmpp2m", 1.0): "dpmpp2m-sde"}
    return names.get((solver, eta), f"{solver} eta {eta:g}")


def point_name(setting):
    """The folder name of one setting, e.g. ``dpmpp2m-spectral_eta0_steps10_noclip``."""
    sv, g, eta, k, clip = setting
    return f"{sv}-{g}_eta{eta:g}_steps{k}" + ("" if clip else "_noclip")


def write_json(path, obj):
    from bdm_runtime.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def sha256(path):
    """The file's sha256 (hex): what a model card names, so a card and its weights can be checked together."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ckpt_step(path):
    from bdm_train import checkpoint

    return int(checkpoint.load_state(path)["step"]) if os.path.isfile(path) else 0


def log(msg):
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)
