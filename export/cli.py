"""``bdm-export``: a checkpoint to step graphs (``bdm.onnx``, ``bdm_fp16.onnx``, ``bdm_int8.onnx``,
``bdm_int8_fp16.onnx``: ``bdm_runtime.format.EXPORT_FILES``) and engines.

    bdm-export --ckpt runs/x/model.pt --fp16 --check
    bdm-export --ckpt runs/x/model.pt --int8 --calib-images 32       # + INT8 (QDQ), docs/int8.md
    bdm-export --ckpt runs/x/model.pt --int8 --fp16                  # + INT8 in the FP16 graph (TensorRT 10/11)
    bdm-export --onnx bdm_fp16.onnx --out bdm.plan          # on the target; no torch needed

User mistakes print one line ``Error: ...`` on stderr and exit non-zero, having created nothing.
A run's files (graphs, engines and their side files) are written under temporary names and
appear together when all are done (and, with ``--check``, checked), or not at all: a failure,
Ctrl-C or SIGTERM leaves nothing. torch is imported only on the ``--ckpt`` path.
"""
import os

import click

from bdm_runtime.errors import BdmError, run_cli
from bdm_runtime.grids import GRIDS, SOLVERS
from bdm_runtime.limits import MAX_STEPS

from . import CHECK_TOLERANCES
from .int8 import CHOICES, DEFAULT_IMAGES, DEFAULT_METHOD

_TOL = "; ".join(f"{p}: {a:g} abs / {r:g} rel" for p, (a, r) in CHECK_TOLERANCES.items())


def graph_names(fp16, int8):
    """The graphs an export with these flags writes, in writing order (an INT8 one after those it comes from)."""
    from bdm_runtime import format as fmt

    chosen = {"--fp16"} if fp16 else set()
    chosen |= {"--int8"} if int8 else set()
    return [name for name, flags in fmt.EXPORT_FILES.values() if set(flags) <= chosen]


def _precision_of(name):
    from bdm_runtime import format as fmt

    return next(p for p, (n, _) in fmt.EXPORT_FILES.items() if n == name)


def _out_dir(out_dir, ckpt):
    """The output folder (default: the checkpoint's); ``BdmError`` if it cannot be written or created."""
    from bdm_runtime.io import check_writable_dir

    out_dir = out_dir or os.path.dirname(os.path.abspath(ckpt))
    check_writable_dir("--out-dir", out_dir)
    return out_dir


def _describe(meta):
    from bdm_runtime import format as fmt

    c, h, w = meta[fmt.K_IMAGE_SHAPE]
    k = meta[fmt.K_NUM_CLASSES]
    kind = "unconditional" if not k else f"{k} classes, " + ("guided" if meta[fmt.K_GUIDANCE] else "no guidance")
    solver = meta.get(fmt.K_DEFAULT_SOLVER, "ddim")
    eta = f" eta {meta[fmt.K_DEFAULT_ETA]:g}" if solver == "ddim" or meta[fmt.K_DEFAULT_ETA] else ""
    return (f"{meta[fmt.K_PRECISION]}, {c}x{h}x{w}, {kind}, default {solver}{eta}, {meta[fmt.K_DEFAULT_STEPS]} "
            f"steps on the {meta.get(fmt.K_DEFAULT_GRID, 'uniform')} grid")


def _engine(onnx_path, plan, batch, workspace, timing_cache, shown, note=True):
    """Build engine ``plan`` (a staged path); returns the line that reports it as ``shown``."""
    from bdm_runtime import format as fmt

    from bdm_runtime.trt_build import build_engine

    side = build_engine(onnx_path, plan, batch=batch, workspace_mib=workspace, timing_cache=timing_cache,
                        note=note)
    p = side[fmt.K_PROFILE]
    return (f"wrote {shown} (+ .json): TensorRT {side[fmt.K_TRT_VERSION]} engine, {side[fmt.K_PRECISION]}, "
            f"batch profile {p['min']}:{p['opt']}:{p['max']} images")


def export_checkpoint(ckpt, out_dir, ema, fp16, guidance, steps, eta, batch, workspace, timing_cache, check,
                      engine, clip=None, solver=None, grid=None, int8=None):
    """The ``--ckpt`` path: export, build engines where possible, optionally check; returns exit status.

    Everything is checked before anything is created; the files are staged and appear together.
    ``int8``: ``None``, or ``{"images": n, "method": m}`` to write ``bdm_int8.onnx`` too (``bdm_export.int8``).
    """
    from bdm_runtime.errors import check_terminated
    from bdm_runtime.grids import settings
    from bdm_runtime.io import Staging
    from bdm_runtime.trt_build import unavailable_reason
    from bdm_train import checkpoint

    model, process, config = checkpoint.load(ckpt, ema=ema)
    steps, _, clip = checkpoint.sampler_settings(config, ckpt, steps, eta, clip)   # checked, named
    try:
        solver, grid, steps, eta = settings(config["sampler"], solver, grid, steps, eta)
    except ValueError as e:
        raise BdmError(f"{ckpt}: {e}")
    if guidance and model.num_classes <= 0:
        raise BdmError("--guidance needs a class-conditional checkpoint; this one is unconditional")
    if int8:
        from .int8 import require_quantizer

        require_quantizer()
    out_dir = _out_dir(out_dir, ckpt)
    names = graph_names(fp16, int8)
    reason = unavailable_reason() if engine else "--no-engine"
    skip = {} if reason else _engine_refusals(names)
    refuse_stale(out_dir, names, [n for n in names if n not in skip] if reason is None else False)
    if check:
        from .check import preload

        preload()
    with Staging() as stage:
        folder = stage.folder(out_dir)
        try:
            lines = _export_staged(model, process, folder, out_dir, names, guidance, steps, eta, clip, batch,
                                   workspace, timing_cache, check, reason, solver, grid, int8, skip)
        except Exception:
            check_terminated()   # a SIGTERM a library swallowed surfaces as another error: report it as SIGTERM
            raise
        check_terminated()       # never publish after a SIGTERM
    for line in lines:
        click.echo(line)
    if check:
        click.echo("check passed")
    return 0


def _write_graph(model, process, folder, name, guidance, steps, eta, clip, solver, grid, int8):
    """One graph into ``folder``; the INT8 one is calibrated from the FP32 ``bdm.onnx`` written before it, and the
    INT8-FP16 one is that INT8 graph's quantization on the FP16 graph (both written before it)."""
    from bdm_runtime import format as fmt

    from .onnx_export import export_onnx

    path = os.path.join(folder, name)
    precision = _precision_of(name)
    first = {p: os.path.join(folder, n) for p, (n, _) in fmt.EXPORT_FILES.items()}
    if precision == "int8":
        from .int8 import export_int8

        return export_int8(first["fp32"], path, images=int8["images"], method=int8["method"], progress=True)
    if precision == fmt.INT8_FP16:
        from .int8_fp16 import export_int8_fp16

        return export_int8_fp16(first["int8"], first["fp16"], path)
    return export_onnx(model, process, path, channels=model.in_channels, num_classes=model.num_classes,
                       fp16=precision == "fp16", guidance=guidance, clip_denoised=clip,
                       default_steps=steps, default_eta=eta, default_solver=solver, default_grid=grid)


def refuse_stale(out_dir, names, engines):
    """Refuse an export that would leave files of an earlier one beside the new graphs.

    An export writes the set ``bdm.onnx``, ``bdm_fp16.onnx`` (``--fp16``), ``bdm_int8.onnx`` (``--int8``),
    ``bdm_int8_fp16.onnx`` (both; ``bdm_runtime.format.EXPORT_FILES``) and their engines (``.plan`` +
    ``.plan.json``, where TensorRT builds them: ``engines``, a bool or the names that get one). A file of
    that set that this export does not write would stay from an earlier export and no longer match
    (``make demo`` would even run an old FP16 engine): the export is refused, naming it (graphs before
    engines), and nothing is deleted.
    """
    from bdm_runtime import format as fmt

    built = set(names) if engines is True else set(engines or ())
    written = set(names) | {os.path.splitext(n)[0] + ext for n in built for ext in (".plan", ".plan.json")}
    given = {flag for name, flags in fmt.EXPORT_FILES.values() if name in names for flag in flags}
    stems = [(os.path.splitext(n)[0], flags) for n, flags in fmt.EXPORT_FILES.values()]
    for name, flags in [(stem + ext, flags) for ext in (".onnx", ".plan", ".plan.json") for stem, flags in stems]:
        path = os.path.join(out_dir, name)
        if name in written or not os.path.lexists(path):
            continue
        flag = " ".join(f for f in flags if f not in given)
        fix = (f"add {flag} to replace it too" if name.endswith(".onnx") else
               f"add {flag} to rebuild it too" if flag and engines else
               "build engines too (TensorRT and a GPU; without --no-engine)" if not engines else
               "this TensorRT builds no engine from it")
        raise BdmError(f"{path} is left from an earlier export and would not match the new graphs: {fix}, "
                       "or move it away, or export into another --out-dir")


def _engine_refusals(names):
    """``{name: why}`` for the graphs this TensorRT builds no engine from (``trt_build.route_refusal``)."""
    from bdm_runtime.trt_build import route_refusal

    reasons = {n: route_refusal(_precision_of(n)) for n in names}
    return {n: why for n, why in reasons.items() if why}


def _export_staged(model, process, folder, out_dir, names, guidance, steps, eta, clip, batch, workspace,
                   timing_cache, check, reason, solver="ddim", grid="uniform", int8=None, skip=None):
    """Graphs (and engines, unless ``reason`` says why not, or ``skip`` does for one) into the staging
    ``folder``, checked if asked; returns the lines to report."""
    from bdm_runtime import format as fmt

    lines, plans = [], {}
    for name in names:
        try:
            meta = _write_graph(model, process, folder, name, guidance, steps, eta, clip, solver, grid, int8)
        except OSError as e:
            raise BdmError(f"cannot write {os.path.join(out_dir, name)}: {e.strerror or e}")
        lines.append(f"wrote {os.path.join(out_dir, name)} ({_describe(meta)}, "
                     f"{os.path.getsize(os.path.join(folder, name)) / 2**20:.1f} MiB)")
    if reason:
        lines.append(f"no TensorRT engine built: {reason} (bdm-run runs the .onnx with ONNX Runtime)")
    else:
        # bdm_int8.onnx's engine on TensorRT 10/11 notes its FP32 float layers, unless the FP16 twin is here too
        note = fmt.EXPORT_FILES[fmt.INT8_FP16][0] not in names
        for name in names:
            plan = os.path.splitext(name)[0] + ".plan"
            if name in (skip or {}):
                lines.append(f"no TensorRT engine built from {os.path.join(out_dir, name)}: {skip[name]}")
                continue
            plans[name] = os.path.join(folder, plan)
            lines.append(_engine(os.path.join(folder, name), plans[name], batch, workspace, timing_cache,
                                 os.path.join(out_dir, plan), note))
    if check:
        from .check import check_onnx

        failed = []
        for name in names:
            if _precision_of(name) in fmt.INT8_PRECISIONS:  # differs from torch by design: docs/int8.md
                from .check import check_int8

                click.echo(f"check {name}: ONNX Runtime runs it to finite outputs (INT8 differs from FP32 by "
                           "its quantization error: docs/int8.md)")
                if not check_int8(os.path.join(folder, name), model, process, log=click.echo):
                    failed.append(name)
                continue
            click.echo(f"check {name}: torch vs ONNX Runtime" + (" vs TensorRT" if name in plans else ""))
            if not check_onnx(os.path.join(folder, name), model, process, plan_path=plans.get(name), log=click.echo):
                failed.append(name)
        if failed:
            raise BdmError(f"check failed for {', '.join(failed)}: errors over the tolerances ({_TOL}); nothing "
                           "was written (export without --check to keep the graphs)")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--ckpt", type=click.Path(dir_okay=False), default=None,
              help="Checkpoint from bdm-train: export its step graph(s) (needs torch).")
@click.option("--ema/--no-ema", default=True, show_default=True, help="Use the EMA weights.")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Where bdm.onnx (and bdm_fp16.onnx, engines) go. Default: the checkpoint's folder.")
@click.option("--fp16", is_flag=True, help="Also write bdm_fp16.onnx: network in FP16, sampler update in FP32 "
              "(with --int8 also bdm_int8_fp16.onnx: the INT8 convolutions in that graph, for TensorRT 10/11).")
@click.option("--int8", is_flag=True, help="Also write bdm_int8.onnx: the network's convolutions in INT8 (QDQ, "
              "symmetric, per-channel weights; first/last/shortcut convs, time embedding, norms and the sampler "
              "update in FP32), calibrated on the FP32 graph's own trajectories (docs/int8.md).")
@click.option("--calib-images", type=click.IntRange(1, 4096), default=DEFAULT_IMAGES, show_default=True,
              help="With --int8: seeded trajectories of the default sampler whose every step calibrates it.")
@click.option("--calib-method", type=click.Choice(list(CHOICES)), default=DEFAULT_METHOD, show_default=True,
              help="With --int8: activation ranges from the max, a percentile (99.999) or entropy (KL) of "
                   "the calibration activations; auto: each, keeping the one whose images on held-out seeds "
                   "are closest to FP32's (slower; docs/int8.md).")
@click.option("--guidance/--no-guidance", default=None,
              help="Include the classifier-free guidance branch (doubles the batch inside the graph). "
                   "Default: yes for conditional checkpoints.")
@click.option("--solver", type=click.Choice(SOLVERS), default=None,
              help="Default solver stored in the graph: ddim (B10) or dpmpp2m (B11 at --eta 0, B16 above); "
                   "the runtime can choose either (default: the checkpoint's sampler config, else ddim).")
@click.option("--grid", type=click.Choice(GRIDS), default=None,
              help="Default time grid stored in the graph (B15; default: the checkpoint's, else uniform).")
@click.option("--steps", type=click.IntRange(1, MAX_STEPS), default=None, help="Default sampler steps (network "
              "evaluations) stored in the graph (default: the checkpoint's sampler config).")
@click.option("--eta", type=click.FloatRange(0, 1), default=None,
              help="Default eta stored in the graph, 0 deterministic .. 1 stochastic (default: the checkpoint's "
                   "for ddim and the checkpoint's solver, else 0).")
@click.option("--clip/--no-clip", default=None, help="Clip x_hat to [-1, 1] at every step, stored in the graph "
              "(default: the checkpoint's sampler config); --no-clip suits blurring models (see docs/studies.md).")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False), default=None,
              help="Build a TensorRT engine from this step graph only (no torch needed); with --out.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Engine path for --onnx (X.plan; "
              "X.plan.json is written beside it).")
@click.option("--batch", default="1:16:64", show_default=True,
              help="TensorRT optimization profile MIN:OPT:MAX, in images.")
@click.option("--workspace", type=click.IntRange(min=1), default=None, help="TensorRT workspace limit, MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="TensorRT timing cache file (read if present, updated).")
@click.option("--engine/--no-engine", default=True, show_default=True,
              help="With --ckpt: build TensorRT engines when TensorRT and a GPU are present.")
@click.option("--check", is_flag=True,
              help="Compare torch, ONNX Runtime (and TensorRT if built) on random realistic inputs with "
                   "Polygraphy's Comparator; print max abs/rel error per output; exit non-zero when an element "
                   f"differs by more than both tolerances ({_TOL}).")
def cli(ckpt, ema, out_dir, fp16, int8, calib_images, calib_method, guidance, solver, grid, steps, eta, clip,
        onnx_path, out, batch, workspace, timing_cache, engine, check):
    """Export a bdm checkpoint as step graphs (ONNX) and TensorRT engines."""
    from bdm_runtime.trt_build import parse_batch

    if (ckpt is None) == (onnx_path is None):
        raise BdmError("give either --ckpt CHECKPOINT (export) or --onnx GRAPH.onnx --out ENGINE.plan (engine only)")
    batch = parse_batch(batch)
    if onnx_path is not None:
        if out is None:
            raise BdmError("--onnx needs --out ENGINE.plan")
        if check or fp16 or int8 or out_dir or steps is not None or eta is not None or guidance is not None \
                or clip is not None or solver is not None or grid is not None:
            raise BdmError("--onnx builds an engine only: --check, --fp16, --int8, --out-dir, --solver, --grid, "
                           "--steps, --eta, --clip and --guidance need --ckpt")
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise BdmError(f"--out {out}: folder {folder} does not exist or is not writable")
        from bdm_runtime.io import Staging

        with Staging() as stage:  # the engine and its side file appear together
            line = _engine(onnx_path, os.path.join(stage.folder(folder), os.path.basename(out)), batch, workspace,
                           timing_cache, out)
        click.echo(line)
        return 0
    if out is not None:
        raise BdmError("--out is for --onnx; with --ckpt use --out-dir")
    return export_checkpoint(ckpt, out_dir, ema, fp16, guidance, steps, eta, batch, workspace, timing_cache,
                             check, engine, clip, solver, grid,
                             dict(images=calib_images, method=calib_method) if int8 else None)


def main(argv=None):
    """Console entry point ``bdm-export``."""
    run_cli(cli, argv, prog_name="bdm-export")


if __name__ == "__main__":
    main()
