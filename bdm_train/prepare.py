"""Set-up of a training run: data, B14 statistics, network, EMA, optimiser, and a resumed run's states.

:func:`setup` returns a :class:`Run`, the state the step loop (``train.py``) advances and
checkpoints. The order of the draws is part of reproducibility: the statistics' subset comes from
numpy before the torch RNG is seeded for the initial weights, so both follow from the options alone.
"""
import copy
import os

import numpy as np

from bdm_runtime.errors import BdmError

from . import data as datalib
from .options import DEFAULTS, STATS_IMAGES
from .resources import check_training_memory


# -- the model ----------------------------------------------------------------------------------
def build_model(opts, channels, stats=None):
    """UNet and process from the options (weights from the global torch RNG).

    ``stats`` is ``(data_mean, data_std)`` for ``param = "spectral"`` (B14): from
    :func:`spectral_statistics` for a new run, from the checkpoint for a resumed one.
    """
    from .diffusion import BlurringDiffusion
    from .unet import UNet

    mean, std = stats if opts["param"] == "spectral" else (None, None)
    model = UNet(in_channels=channels, image_size=opts["image_size"], ch=opts["ch"], ch_mult=opts["ch_mult"],
                 num_res_blocks=opts["num_res_blocks"], attn_resolutions=opts["attn"], dropout=opts["dropout"],
                 num_classes=opts["num_classes"], param=opts["param"], data_mean=mean, data_std=std)
    process = BlurringDiffusion(opts["image_size"], blur_sigma_max=opts["blur_sigma_max"],
                                min_scale=opts["min_scale"])
    return model, process


def spectral_statistics(images, image_size, seed, limit=STATS_IMAGES):
    """B14's per-frequency data mean and std, from a fixed subset of at most ``limit`` images.

    The subset is drawn with numpy from ``seed`` (the torch RNG, which draws the initial weights,
    is untouched), so the statistics, like the rest of a run, follow from the options alone.
    """
    import torch

    from .diffusion import BlurringDiffusion, data_statistics

    n = len(images)
    idx = np.sort(np.random.default_rng([int(seed), 14]).permutation(n)[:min(n, limit)])
    x = datalib.to_float(torch.from_numpy(images[idx]))
    return data_statistics(x, BlurringDiffusion(image_size))


def make_config(model, process, opts, ds, data_path):
    """The checkpoint config (plain types only)."""
    info = ds.info()
    info.update(path=os.path.abspath(os.fspath(data_path)), fit=opts["fit"], size=[opts["image_size"]] * 2)
    return {"model": model.config(), "process": process.config(),
            "sampler": {"clip_denoised": True, "steps": opts["sample_steps"], "eta": opts["sample_eta"]},
            "train": dict(opts), "data": info}


# -- set-up -------------------------------------------------------------------------------------
class Run:
    """One training process's state, what the step loop advances and :meth:`save` writes.

    ``opts`` (resolved options), ``dist`` (:class:`~bdm_train.batches.Dist`), ``device``, ``out`` and
    ``path`` (the run folder and its ``model.pt``), ``model`` (the UNet), ``net`` (the same, wrapped
    by DDP under ``torchrun``), ``ema``, ``process`` (B3-B5), ``opt`` and ``sched``, ``step`` (done
    so far), ``config`` (stored in every checkpoint), ``images`` / ``labels`` (the data, on the
    device), ``shape`` (one image's) and ``n`` (the number of images).
    """

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def save(self):
        """``model.pt`` (atomic, by the main process only)."""
        from . import checkpoint as ckpt

        if self.dist.main:   # with the losses since the last log line: a resumed run logs what this one would
            meter = {"sum": self.meter["sum"].detach().cpu().clone(), "count": self.meter["count"]} if self.meter else None
            ckpt.save(self.path, self.config, self.model, self.ema, self.step, self.opt, self.sched,
                      extra={"log_meter": meter})


def load_data(data, opts, state, path):
    """The training images (and labels), checked against the options and a resumed checkpoint."""
    ds = datalib.load(data, opts["image_size"], opts["fit"], opts["workers"])
    opts["image_size"] = ds.size[0]
    if state is not None and opts["image_size"] != state["config"]["model"]["image_size"]:
        raise BdmError(f"data {data} is {ds.size[0]}x{ds.size[1]}, the checkpoint {path} was trained at "
                       f"{state['config']['model']['image_size']}")
    stored = state["config"]["model"].get("in_channels") if state is not None else None
    if stored is not None and ds.channels != stored:
        raise BdmError(f"data {data} has {ds.channels} channel(s), the checkpoint {path} was trained on {stored}: "
                       "resume with the run's own data (or train anew into another --out)")
    down = 2 ** (len(opts["ch_mult"]) - 1)
    if opts["image_size"] % down:
        raise BdmError(f"image size {opts['image_size']} is not divisible by {down}, as --ch-mult "
                       f"{','.join(map(str, opts['ch_mult']))} needs ({len(opts['ch_mult'])} levels): "
                       "change --ch-mult, or --image-size with --fit")
    if state is None and opts["attn"] != list(DEFAULTS["attn"]):   # the default applies where there is a 16x16 level
        check_attention(opts)
    nc = opts["num_classes"]
    if nc:
        if ds.labels is None:
            raise BdmError(f"--num-classes {nc} needs labels, but {data} has none")
        if ds.labels.min() < 0 or ds.labels.max() >= nc:
            raise BdmError(f"labels in {data} span {ds.labels.min()}..{ds.labels.max()}, "
                           f"outside 0..{nc - 1} of --num-classes {nc}")
    return ds


def check_attention(opts):
    """Refuse attention resolutions the network does not have (they would be silently ignored)."""
    levels = [opts["image_size"] >> k for k in range(len(opts["ch_mult"]))]
    unused = [r for r in opts["attn"] if r not in levels]
    if unused:
        raise BdmError(f"--attn {','.join(map(str, opts['attn']))}: this network has no {unused[0]}x{unused[0]} "
                       f"level (its levels are {', '.join(map(str, levels))} for --image-size {opts['image_size']} "
                       f"and --ch-mult {','.join(map(str, opts['ch_mult']))}): give some of these, or none")


def setup(data, out, path, opts, state, dist):
    """Data, B14 statistics, network, EMA and optimiser; a resumed run's states restored."""
    import torch

    device = dist.device
    ds = load_data(data, opts, state, path)
    if opts["batch_size"] % dist.world:
        raise BdmError(f"--batch-size {opts['batch_size']} is not divisible by the {dist.world} processes")
    check_training_memory(opts, ds.channels, dist.world, device)
    stats = None
    if opts["param"] == "spectral":   # B14: measured before step 1; a resumed run keeps the stored ones
        m = state["config"]["model"] if state is not None else None
        stats = ((m["data_mean"], m["data_std"]) if m is not None
                 else spectral_statistics(ds.images, opts["image_size"], opts["seed"]))
    torch.manual_seed(opts["seed"])  # same initial weights on every rank
    model, process = build_model(opts, ds.channels, stats)
    try:
        model, process = model.to(device), process.to(device)
    except RuntimeError as e:
        raise BdmError(f"cannot move the model to {device}: {e}") from None
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=opts["lr"], weight_decay=opts["weight_decay"])
    warmup = opts["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    run = Run(opts=opts, dist=dist, device=device, out=out, path=path, model=model, net=model, ema=ema,
              process=process, opt=opt, sched=sched, step=0, meter={}, config=make_config(model, process, opts, ds, data),
              images=torch.from_numpy(ds.images).to(device), shape=tuple(ds.images.shape[1:]), n=len(ds),
              labels=torch.from_numpy(ds.labels).to(device) if opts["num_classes"] else None)
    if state is not None:
        restore(run, state)
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        run.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    return run


def restore(run, state):
    """A resumed run's weights, optimiser, schedule, RNG and step; explicitly changed options win."""
    from . import checkpoint as ckpt

    ckpt.load_weights(run.model, state["model"], run.path)
    ckpt.load_weights(run.ema, state["ema"], run.path)
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    for g in run.opt.param_groups:
        g["initial_lr"], g["weight_decay"] = run.opts["lr"], run.opts["weight_decay"]
    run.sched.base_lrs = [run.opts["lr"]] * len(run.opt.param_groups)
    ckpt.set_rng_state(state["rng"])
    run.step = int(state["step"])
    meter = state.get("log_meter")
    if isinstance(meter, dict):   # checkpoints from before issue 22 have none: their log lines were aligned
        run.meter = {"sum": meter["sum"].to(run.device), "count": int(meter["count"])}
