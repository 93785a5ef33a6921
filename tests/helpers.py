"""Shared test helpers (plain functions; fixtures live in conftest.py)."""
import numpy as np

from bdm_runtime import format as fmt
from bdm_runtime.noise import NoiseStream, time_grid


def export_mixture(folder, default_steps, default_eta=1.0, **kw):
    """The exact denoiser of a 4-image mixture (8x8, 1 channel) as a step graph (exports in ~1 s).

    Returns ``(path, model, process)``.
    """
    import torch

    from bdm_train.analytic import MixtureDenoiser
    from bdm_train.diffusion import BlurringDiffusion
    from bdm_export import export_onnx

    process = BlurringDiffusion(8)
    images = torch.from_numpy(np.random.default_rng(0).uniform(-0.9, 0.9, (4, 1, 8, 8))).float()
    model = MixtureDenoiser(images, process)
    path = str(folder / kw.pop("name", "mix.onnx"))
    export_onnx(model, process, path, channels=1, default_steps=default_steps, default_eta=default_eta, **kw)
    return path, model, process


def run_step(sess, z, t, s, eta, noise, label=None, guidance=None, t_prev=None, u_x_prev=None):
    """All outputs of one graph call; a format-2 graph without history gets ``t_prev = t`` (first order)."""
    feed = {fmt.Z: z, fmt.T: t, fmt.S: s, fmt.ETA: np.array([eta], np.float32), fmt.NOISE: noise}
    names = {i.name for i in sess.get_inputs()}
    if fmt.T_PREV in names:
        feed[fmt.T_PREV] = t if t_prev is None else t_prev
        feed[fmt.U_X_PREV] = np.zeros_like(z) if u_x_prev is None else u_x_prev
    if label is not None:
        feed[fmt.LABEL] = label
    if guidance is not None:
        feed[fmt.GUIDANCE] = np.array([guidance], np.float32)
    return sess.run([o.name for o in sess.get_outputs()], {k: np.ascontiguousarray(v) for k, v in feed.items()})


def graph_step(graph, **named):
    """Call a ``StepGraph`` with its inputs by name (first order where no ``t_prev`` is given)."""
    import torch

    named.setdefault(fmt.T_PREV, named[fmt.T])
    named.setdefault(fmt.U_X_PREV, torch.zeros_like(named[fmt.Z]))
    with torch.no_grad():
        return graph(*(named[n] for n in graph.input_names))


def ort_sample(sess, shape, n, seed, steps, eta, labels=None, guidance=None, first_index=0, solver="ddim",
               times=None):
    """The runtime's loop, written out: the noise protocol of runtime.noise, one graph call per step; with
    ``solver="dpmpp2m"`` every step after the first gets the previous step's time and ``u_x`` (B11)."""
    noise = NoiseStream(seed, first_index, n, shape)
    z = noise.draw()
    xi = np.zeros_like(z)
    grid = time_grid(steps) if times is None else times
    t_prev = u_x = None
    for t, s in zip(grid[:-1], grid[1:]):
        if eta > 0:
            xi = noise.draw()
        full = (lambda v: np.full(n, v, np.float32))
        out = run_step(sess, z, full(t), full(s), eta, xi, labels, guidance,
                       None if t_prev is None else full(t_prev), u_x)
        z, x0 = out[0], out[1]
        if solver == "dpmpp2m":
            t_prev, u_x = t, out[2]
    return x0


def in_process(entry, args, capsys):
    """``(exit code, stdout, stderr)`` of a console entry point called in this process."""
    try:
        entry([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
