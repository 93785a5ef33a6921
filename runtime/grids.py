"""Solvers and time grids (B11, B15), in numpy: the one implementation the runtime and the torch sampler share.

Every grid runs from ``t = 1`` (where the initial latent is drawn) to ``t = 0`` in ``steps`` steps,
one network evaluation per step, as float32 (the dtype the step graph reads): the torch sampler
and every backend step through exactly these times. ``B`` labels refer to ``docs/maths.md``.

- ``uniform``: ``t_i = i / N`` (the paper's grid; ``bdm_runtime.noise.time_grid``).
- ``power``: ``t_i = (i / N)^rho``, ``rho = 2`` by default: denser near ``t = 0``, where the high
  frequencies leave ``d_min``.
- ``logsnr``: uniform in B3's log-SNR between ``logsnr(1)`` and ``logsnr(0)``.
- ``edm``: EDM's ``sigma_i`` (B13, ``rho = 7``) with ``sigma_min``/``sigma_max`` clamped to the
  trained range, as log-SNR ``-2 log sigma``.
- ``spectral`` (this project's own): every step has the same largest per-frequency increment of
  ``ell_k = log(alpha_k / sigma)`` (B11), which bounds the factor ``alpha_s / alpha_t`` by which a
  step multiplies the remaining error where a frequency un-blurs. Without blur it equals ``logsnr``.
"""
import json
import math
from functools import lru_cache

import numpy as np

from .errors import BdmError
from .limits import MAX_STEPS
from .noise import check_positive_int, time_grid as uniform_grid

# B10 (DDIM-eta), B11 (second order; eta 0) and B16 (B11 with eta > 0: SDE-DPM-Solver++(2M) at eta 1).
# Every solver takes eta in [0, 1]: 0 draws only the initial latent, > 0 one noise draw per step.
SOLVERS = ("ddim", "dpmpp2m")
GRIDS = ("uniform", "power", "logsnr", "edm", "spectral")
DEFAULT_RHO = {"power": 2.0, "edm": 7.0}
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0   # B13, before clamping to the trained range
_TABLE = 4097                       # log-SNR points of the spectral grid's table of ell_k
_BRACKET = 40                       # most widenings of the spectral solver's bracket (2% to 1e6x: ~12 suffice)


class Schedule:
    """B2-B4 in float64 from a process config (``BlurringDiffusion.config()``, the ``bdm.process`` metadata).

    Only what the grids need: the log-SNR and its inverse, and ``ell_k(t)`` for every distinct
    frequency ``lambda_k`` (frequencies with equal ``lambda`` have equal ``alpha``).
    """

    def __init__(self, process):
        from .format import check_process

        check_process(process, "process config", fix="give BlurringDiffusion(...).config()")  # finite, in range
        try:
            h, w = (int(d) for d in process["image_size"])
            self.blur_sigma_max = float(process["blur_sigma_max"])
            self.min_scale = float(process["min_scale"])
            self.logsnr_min = float(process["logsnr_min"])
            self.logsnr_max = float(process["logsnr_max"])
        except (KeyError, TypeError, ValueError) as e:
            raise BdmError(f"not a blurring-diffusion process config ({type(e).__name__}: {e}): {process!r}")
        self.c0 = math.atan(math.exp(-self.logsnr_max / 2))                      # B3
        self.c1 = math.atan(math.exp(-self.logsnr_min / 2)) - self.c0
        lam = (math.pi * np.arange(h) / h)[:, None] ** 2 + (math.pi * np.arange(w) / w)[None, :] ** 2  # B2
        self.freqs = np.unique(lam)

    def logsnr(self, t):
        """``logsnr(t) = -2 log tan(c1 t + c0)`` (B3)."""
        return -2.0 * np.log(np.tan(self.c1 * np.asarray(t, np.float64) + self.c0))

    def time_of_logsnr(self, logsnr):
        """The inverse of B3: ``t = (atan(exp(-logsnr / 2)) - c0) / c1``, clipped to ``[0, 1]``."""
        t = (np.arctan(np.exp(-np.asarray(logsnr, np.float64) / 2)) - self.c0) / self.c1
        return np.clip(t, 0.0, 1.0)

    def ell(self, t):
        """``ell_k(t) = log(alpha_k / sigma) = logsnr / 2 + log d_k`` (B3, B4, B11): ``[len(t), K]``."""
        t = np.atleast_1d(np.asarray(t, np.float64))
        tau = (self.blur_sigma_max * np.sin(t * math.pi / 2) ** 2) ** 2 / 2                # B4
        d = (1 - self.min_scale) * np.exp(-self.freqs[None, :] * tau[:, None]) + self.min_scale
        return self.logsnr(t)[:, None] / 2 + np.log(d)


def _key(process):
    """A hashable form of a process config (for the grid cache): its JSON text."""
    try:
        return json.dumps(dict(process), sort_keys=True)
    except (TypeError, ValueError):
        raise BdmError(f"not a blurring-diffusion process config: {process!r}")


def time_grid(steps, grid="uniform", process=None, rho=None):
    """``steps + 1`` float32 times from 1 down to 0 on ``grid`` (one of ``GRIDS``; B15).

    ``process`` (a ``BlurringDiffusion.config()`` dict) is needed by ``logsnr``, ``edm`` and
    ``spectral``; ``rho`` is the exponent of ``power`` (default 2) and ``edm`` (default 7).
    """
    steps = check_positive_int(steps, "steps")
    if grid not in GRIDS:
        raise BdmError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    if rho is not None and grid not in DEFAULT_RHO:
        raise BdmError(f"rho applies to the power and edm grids, not to {grid!r}")
    if grid == "uniform":
        return uniform_grid(steps)
    rho = float(DEFAULT_RHO.get(grid, 0.0) if rho is None else rho)
    if grid in DEFAULT_RHO and not (math.isfinite(rho) and rho > 0):
        raise BdmError(f"rho must be positive, got {rho!r}")
    if grid == "power":
        times = (np.arange(steps, -1, -1, dtype=np.float64) / steps) ** rho
        return check_times(times)
    if process is None:
        raise BdmError(f"the {grid} grid needs the process config (bdm.process)")
    return _cached(steps, grid, _key(process), rho).copy()


@lru_cache(maxsize=64)
def _cached(steps, grid, key, rho):
    sched = Schedule(json.loads(key))
    if grid == "logsnr":
        logsnr = np.linspace(sched.logsnr_min, sched.logsnr_max, steps + 1)
    elif grid == "edm":
        logsnr = _edm_logsnr(sched, steps, rho)
    else:
        logsnr = _spectral_logsnr(sched, steps)
    times = sched.time_of_logsnr(logsnr)
    times[0], times[-1] = 1.0, 0.0   # the ends are the ends of B3's range (exact, not rounded)
    return check_times(times)


def _edm_logsnr(sched, steps, rho):
    """EDM's ``sigma_i`` (B13), ``i = 0 .. N`` over ``N`` intervals, clamped to the trained range.

    With B3's truncation ``sigma = exp(-logsnr / 2)`` spans ``[exp(-logsnr_max/2), exp(-logsnr_min/2)]``
    (``[0.0067, 148]``): ``sigma_min = 0.002`` clamps to the bottom, which *is* ``t = 0`` (so it is
    the last point, where EDM appends ``sigma_N = 0``); ``sigma_max = 80`` stays, and the first
    point is then moved to ``t = 1`` (``sigma = 148``), where the initial latent is drawn.
    """
    lo, hi = math.exp(-sched.logsnr_max / 2), math.exp(-sched.logsnr_min / 2)
    s_min = min(max(EDM_SIGMA_MIN, lo), hi)
    s_max = min(max(EDM_SIGMA_MAX, lo), hi)
    i = np.arange(steps + 1, dtype=np.float64) / steps
    sigma = (s_max ** (1 / rho) + i * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return -2.0 * np.log(sigma)


def _spectral_logsnr(sched, steps):
    """Log-SNR points with an equal largest per-frequency increment of ``ell_k`` per step (B15).

    ``ell_k`` rises with the log-SNR ``L`` for every ``k``, so from a point ``L_i`` the step of
    largest increment ``delta`` ends at ``L_{i+1} = min_k ell_k^{-1}(ell_k(L_i) + delta)``. ``ell_k``
    is tabulated on a fine uniform ``L`` grid (smooth in ``L``: interpolation error ~1e-5) and
    inverted by interpolation; ``delta`` is solved so that exactly ``steps`` steps reach the end,
    starting from the small-step estimate (the integral of ``max_k d ell_k / dL``, split evenly).
    """
    table_l = np.linspace(sched.logsnr_min, sched.logsnr_max, _TABLE)
    dl = table_l[1] - table_l[0]
    table = sched.ell(sched.time_of_logsnr(table_l))                    # [M, K], rising along M
    m, k = table.shape
    # Every column rises, so column j shifted by j * span is one sorted array: a single
    # searchsorted finds each column's crossing (no per-column loop).
    span = float(table.max() - table.min()) + 1.0
    offset = np.arange(k) * span
    flat = (table.T + offset[:, None]).ravel()

    def next_point(l_now, delta):
        x = (l_now - table_l[0]) / dl
        i = min(int(x), m - 2)
        e_now = table[i] + (x - i) * (table[i + 1] - table[i])          # ell_k(L_i) from the same table
        pos = np.searchsorted(flat, e_now + delta + offset) - np.arange(k) * m
        hi = np.clip(pos, 1, m - 1)
        lo = hi - 1
        e_lo, e_hi = table[lo, np.arange(k)], table[hi, np.arange(k)]
        frac = np.clip((e_now + delta - e_lo) / np.maximum(e_hi - e_lo, 1e-300), 0.0, 1.0)
        return float(min(np.min(table_l[lo] + frac * dl), sched.logsnr_max))

    def residual(delta):  # the last step's largest increment minus delta: falls as delta grows
        pts = [sched.logsnr_min]
        for _ in range(steps - 1):
            pts.append(next_point(pts[-1], delta))
        x = (pts[-1] - table_l[0]) / dl
        i = min(int(x), m - 2)
        e_last = table[i] + (x - i) * (table[i + 1] - table[i])
        return float(np.max(table[-1] - e_last)) - delta, pts

    whole = float(np.max(table[-1] - table[0]))                         # one step: delta = whole
    guess = float(np.sum(np.max(np.diff(table, axis=0), axis=1))) / steps
    return np.array(_illinois(residual, min(guess, whole), whole) + [sched.logsnr_max])


def _illinois(residual, guess, whole):
    """The points of the ``delta`` in ``(0, whole]`` where ``residual`` (falling) crosses zero.

    ``residual(delta) -> (value, points)`` is positive for a tiny ``delta`` and not positive at
    ``whole``. The root is bracketed around ``guess`` (widening by 2%, 4%, 8%, ...), then found by
    regula falsi with the Illinois modification (always bracketed, superlinear).
    """
    best = []

    def ev(delta):
        f, pts = residual(delta)
        best.append((abs(f), pts))
        return f

    a = b = guess
    fa = fb = ev(guess)
    widen = 1.02
    for _ in range(_BRACKET):
        if not fa <= 0 < best[0][0]:
            break
        a = a / widen
        fa = ev(a)
        widen = min(widen * widen, 1e6)
    widen = 1.02
    for _ in range(_BRACKET):
        if not fb > 0:
            break
        b = min(b * widen, whole)
        fb = ev(b)
        widen = min(widen * widen, 1e6)
    if fb > 0 or fa <= 0 < best[0][0] or not (math.isfinite(fa) and math.isfinite(fb)):
        raise BdmError(f"the spectral grid found no step size for this process ({len(best)} tries): "
                       "use another grid (--grid edm, logsnr, power or uniform)")
    for _ in range(100):
        if fa == fb or abs(fb) <= 1e-12 * whole or abs(b - a) <= 1e-14 * whole:
            break
        c = b - fb * (b - a) / (fb - fa)
        fc = ev(c)
        if fc * fb < 0:
            a, fa = b, fb
        else:
            fa /= 2
        b, fb = c, fc
    return min(best, key=lambda v: v[0])[1]


def check_times(times):
    """``times`` as float32 after checking it is a grid: 1-D, from exactly 1 down to exactly 0, strictly falling."""
    t = np.asarray(times, dtype=np.float64)
    if t.ndim != 1 or len(t) < 2 or not np.all(np.isfinite(t)):
        raise BdmError("a time grid is a 1-D sequence of at least two finite times")
    t32 = t.astype(np.float32)
    if t32[0] != 1.0 or t32[-1] != 0.0 or not np.all(np.diff(t32) < 0):
        raise BdmError("a time grid must fall strictly from t = 1 to t = 0 (in float32): "
                         f"got {len(t) - 1} steps from {t[0]:g} to {t[-1]:g}")
    return t32


def resolve(steps, grid, process=None, default_steps=None):
    """The float32 time grid for ``steps`` on ``grid`` (a name, or an explicit sequence of times)."""
    if grid is None or isinstance(grid, str):
        steps = default_steps if steps is None else steps
        return time_grid(steps, grid or "uniform", process)
    try:
        count = len(grid)
    except TypeError:
        raise BdmError(f"grid must be a name ({', '.join(GRIDS)}) or a sequence of times, got {type(grid).__name__}")
    if count - 1 > MAX_STEPS:  # before converting it: the bound of every other way to ask for steps
        raise BdmError(f"the explicit grid has {count - 1} steps, at most {MAX_STEPS} are allowed")
    times = check_times(grid)
    if steps is not None and check_positive_int(steps, "steps") != len(times) - 1:
        raise BdmError(f"steps={steps} but the explicit grid has {len(times) - 1} steps")
    return times


def previous_times(times, solver):
    """``t_prev`` of every step (B11's history): the previous step's ``t``; ``t`` itself where there is none.

    ``t_prev <= t`` marks a first-order step: every ``ddim`` step, and the first ``dpmpp2m`` step.
    """
    times = np.asarray(times, dtype=np.float32)
    prev = times[:-1].copy()
    if solver == "dpmpp2m":
        prev[1:] = times[:-2]
    elif solver != "ddim":
        raise BdmError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    return prev


def solver_eta(solver, eta, default_eta, default_solver="ddim"):
    """The ``eta`` a solver runs with: ``eta`` if given, else the model's ``default_eta`` where
    ``solver`` is ``ddim`` or the model's ``default_solver``, else 0.

    ``ddim`` (B10) has always taken the model's eta; ``dpmpp2m`` is deterministic (B11) unless asked
    for noise, by ``eta`` or by a model whose default is stochastic ``dpmpp2m`` (B16).
    """
    if solver not in SOLVERS:
        raise BdmError(f"solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
    if eta is None:
        eta = default_eta if solver in ("ddim", default_solver) else 0.0
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise BdmError(f"eta must be in [0, 1], got {eta!r}")
    return eta


def settings(sampler, solver=None, grid=None, steps=None, eta=None):
    """``(solver, grid, steps, eta)``: those given, else a checkpoint's ``sampler`` config, else ddim/uniform.

    ``eta`` not given follows ``solver_eta``: the config's eta for ddim and for the config's own
    solver, 0 for a dpmpp2m the config does not name. An inconsistent setting raises ``BdmError``
    (a ``ValueError``).
    """
    default_solver = sampler.get("solver", "ddim")
    solver = default_solver if solver is None else solver
    grid = sampler.get("grid", "uniform") if grid is None else grid
    steps = check_positive_int(sampler["steps"] if steps is None else steps, "steps")
    if grid not in GRIDS:
        raise BdmError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
    return solver, grid, steps, solver_eta(solver, eta, sampler.get("eta", 0.0), default_solver)
