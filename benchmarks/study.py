"""The quality study: Blurring Diffusion vs DDPM on Fashion-MNIST 32x32, quality vs sampler steps.

Two models with the same network, data, seed and training budget, differing only in
``blur_sigma_max`` (B4): BDM (20) and the DDPM baseline (0, the same code with d_t = 1). Each is
evaluated with the deterministic sampler (eta = 0, B10) at 10/20/50 steps and the paper's
ancestral sampler (eta = 1, B9) at 50/100 steps, on ``--n`` samples per point, with FD-FMNIST,
KID and the class histogram (``benchmarks.metrics``).

Why blur_sigma_max = 20 at 32x32 (B2-B4): sigma_B is measured in pixels (B2's lambda uses pi k / N
per pixel), so at the same 32x32 grid as CIFAR-10 the paper's 20 damps every DCT index exactly as
it does there. At t = 1 it gives tau = 200, so the lowest non-constant frequency (k = 1,
lambda = (pi/32)^2) keeps d = exp(-1.93) = 0.145 and every k >= 2 is at d_min: the blur runs until
only the mean and the coarsest gradient of the image survive, i.e. the schedule ends at the
coarsest structure the 32x32 grid has. ``python -m benchmarks.study info`` prints the remaining
Gaussian-channel information per image along t for several values, from the data's DCT spectrum.

Every stage is resumable and skippable, so the study can span several sittings:

    python -m benchmarks.study run --hours 3          # train (resumes), export, sample, check, evaluate, report
    python -m benchmarks.study run --stages report    # only rebuild study.json / study.md / the plot
    python -m benchmarks.study run --stages ship      # the better model -> models/fmnist32 (make demo's)
    python -m benchmarks.study run --smoke            # a tiny end-to-end check of the wiring (minutes)

On 2 cores, ``make study`` trains the two models at once, one core each (``--models bdm --threads 1``
and ``--models ddpm --threads 1``): small networks use one core each better than two cores in turn.

Layout: ``RUNS/<model>/model.pt`` (bdm-train checkpoint), ``budget.json`` (training seconds summed
over sittings), ``model.onnx``, ``samples/step<S>/eta<e>_steps<k>/<first>.npz`` (chunks of uint8
images: a killed run loses at most one chunk; a longer-trained checkpoint gets a new folder),
``.../eval.json``. Results: ``benchmarks/results/study.json``, ``study.md``, grids of samples, and
``docs/quality_vs_steps.png``.
"""
import glob
import json
import os
import platform
import time

import click
import numpy as np

from runtime.errors import BdmError

HERE = os.path.dirname(os.path.abspath(__file__))
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
POINTS = ((0.0, 10), (0.0, 20), (0.0, 50), (1.0, 50), (1.0, 100))  # (eta, steps)
# Clipping the denoised estimate x_hat to [-1, 1] at every step (B10's option) is measured as a
# factor, not assumed: with blur, x_hat = V (u_t - sigma_t u_eps) / alpha_t divides the network's
# eps error at high frequencies by alpha_t ~ d_min a_t (1e-3 of the signal), so at large t x_hat is
# dominated by amplified error, and a pixel-space clip of it also corrupts the low frequencies
# the step should keep. Without the clip those errors are multiplied back by alpha_s ~ alpha_t.
CLIPS = (True, False)
SAMPLE_SEED = 1            # the same initial noise for both models: paired samples
# Network and optimiser, the same for both models. Sized so that the whole study fits one ~2.5 h
# sitting on 2 CPU cores: 0.27M parameters, no attention, no dropout (a few epochs underfit, they
# do not overfit), lr 1e-3. Measured on one core with PyTorch: 111 training images/s and 251
# images/s per network evaluation, against 35 and 79 for ch 32; bdm-train's default (ch 64,
# 2 blocks, attention at 16; 6.5M) costs ~20x more per step and per sample than this one.
# On a GPU use --ch 64 --num-res-blocks 2 --attn 16 --batch-size 128 --lr 2e-4 --steps 30000.
NET = dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn=(), dropout=0.0)
OPT = dict(batch_size=64, lr=1e-3, warmup=500, ema_decay=0.9995, grad_clip=1.0, seed=0)
STEPS = 6000
SMOKE = dict(net=dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn=(), dropout=0.0),
             steps=4, n=16, chunk=8, points=((0.0, 2), (1.0, 3)))


# -- the information argument for blur_sigma_max -------------------------------------------------
def information(blur_values=(0, 5, 10, 15, 20, 30), times=(0.1, 0.3, 0.5, 0.7, 0.9), n=20000):
    """Remaining information ``sum_f 0.5 log(1 + alpha_t^2 P_f / sigma_t^2)`` (nats/image) along ``t``.

    ``P_f`` is the per-frequency variance of the training images in the DCT basis (B1); the sum is
    the capacity of the per-frequency Gaussian channels of B5 for Gaussian data with that spectrum.
    """
    import torch

    from bdm_train.diffusion import BlurringDiffusion

    from . import fmnist

    x, _ = fmnist.load("train")
    x = torch.from_numpy(x[:n].astype(np.float64) / 127.5 - 1.0)
    u = BlurringDiffusion(32, 0.0).double().dct(x)[:, 0]
    power = u.var(0)
    t = torch.tensor(times, dtype=torch.float64)
    rows = {}
    for b in blur_values:
        alpha, sigma = BlurringDiffusion(32, float(b)).double().alpha_sigma(t)   # B3, B4
        snr = alpha[:, 0] ** 2 * power / sigma[:, 0] ** 2
        rows[b] = (0.5 * torch.log1p(snr).sum((1, 2))).tolist()
    return dict(times=list(times), nats=rows, dc_fraction=float(power[0, 0] / power.sum()))


# -- why few steps are hard with blur: the step's gain on the network's error -----------------------
def error_gain(blur_values=(0.0, 20.0), step_counts=(10, 20, 50, 100), eta=0.0, late=0.5):
    """Largest gain ``|d u_s / d u_eps|`` of one B10 step over frequencies and steps with ``t <= late``.

    B10 is ``u_s = alpha_s (u_t - sigma_t u_eps) / alpha_t + sqrt(sigma_s^2 - c^2) u_eps + c xi``, so an
    error in the network's ``u_eps`` reaches ``u_s`` times ``sqrt(sigma_s^2 - c^2) - alpha_s sigma_t / alpha_t``.
    Per frequency ``alpha_s / alpha_t`` is large exactly when that frequency is being un-blurred.
    """
    import torch

    from bdm_train.diffusion import BlurringDiffusion

    rows = {}
    for b in blur_values:
        process = BlurringDiffusion(32, float(b)).double()
        row = []
        for n in step_counts:
            grid = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
            t, s = grid[:-2], grid[1:-1]              # the last step returns x_hat: no u_s
            (alpha_t, sigma_t), (alpha_s, sigma_s) = process.alpha_sigma(t), process.alpha_sigma(s)
            a_ts = alpha_t / alpha_s                                                   # B6
            sigma_ts2 = sigma_t ** 2 - a_ts ** 2 * sigma_s ** 2                        # B6
            c = eta * torch.sqrt(1 / (1 / sigma_s ** 2 + a_ts ** 2 / sigma_ts2))       # B7, B10
            gain = (torch.sqrt(sigma_s ** 2 - c ** 2) - alpha_s * sigma_t / alpha_t).abs()
            row.append(float(gain[t <= late].max()))
        rows[b] = row
    return dict(step_counts=list(step_counts), eta=eta, late=late, gain=rows)


def denoising_error(ckpt, times=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), n=256, seed=0):
    """Mean squared error of the model's ``x_hat`` (B8) on test images along ``t``: ``{t: (raw, clipped)}``.

    ``raw`` is measured on the 4x4 lowest DCT frequencies (what the image's layout is made of),
    ``clipped`` in pixels after clipping ``x_hat`` to ``[-1, 1]``, as B10's option does.
    """
    import torch

    from bdm_train import checkpoint

    from . import fmnist

    model, process, _ = checkpoint.load(ckpt)
    x = torch.from_numpy(fmnist.load("test")[0][:n].astype(np.float32) / 127.5 - 1.0)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t0 in times:
        t = torch.full((n,), float(t0))
        eps = torch.randn(x.shape, generator=g)
        z = process.q_sample(x, t, eps)                                              # B5
        with torch.no_grad():
            u_eps = process.dct(model(z, t))
        alpha, sigma = process.alpha_sigma(t)
        u_x = (process.dct(z) - sigma * u_eps) / alpha                               # B8
        low = float(((u_x - process.dct(x))[..., :4, :4] ** 2).mean())
        clipped = float(((process.idct(u_x).clamp(-1, 1) - x) ** 2).mean())
        out[t0] = (low, clipped)
    return out


# -- diverged samples ---------------------------------------------------------------------------
def roughness(images):
    """Mean |difference| of neighbouring pixels per grey image, in [0, 1] (uint8 NHWC or NCHW, one channel)."""
    x = np.asarray(images, np.float32) / 255.0
    x = x.reshape(len(x), *[d for d in x.shape[1:] if d != 1])   # [N, H, W]
    return (np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))) / 2


def noisy_fraction(images, reference, quantile=0.999):
    """Share of ``images`` rougher than ``quantile`` of the ``reference`` images: samples that ended as noise."""
    return float(np.mean(roughness(images) > np.quantile(roughness(reference), quantile)))


# -- small helpers ------------------------------------------------------------------------------
def _write_json(path, obj):
    from runtime.io import atomic_path

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def _read_json(path, default=None):
    if not os.path.isfile(path):
        return default
    with open(path) as f:
        return json.load(f)


def _ckpt_step(path):
    from bdm_train import checkpoint

    return int(checkpoint.load_state(path)["step"]) if os.path.isfile(path) else 0


def _log(msg):
    click.echo(f"[study {time.strftime('%H:%M:%S')}] {msg}", err=True)


class Study:
    """Paths and settings of one study (``runs`` folder, models, points, budget)."""

    def __init__(self, runs=RUNS, results=RESULTS, models=None, points=POINTS, clips=CLIPS, steps=STEPS, n=1000,
                 chunk=250, net=None, opt=None, device="auto", backend="runtime", threads=1, plot=None):
        self.runs, self.results = runs, results
        self.models = dict(models or MODELS)
        self.points = tuple((float(e), int(k)) for e, k in points)
        self.clips = tuple(bool(c) for c in clips)
        self.steps, self.n, self.chunk = int(steps), int(n), int(chunk)
        self.net = dict(NET, **(net or {}))
        self.opt = dict(OPT, **(opt or {}))
        self.device, self.backend, self.threads = device, backend, int(threads)
        self.plot = plot if plot is not None else os.path.join(ROOT, "docs", "quality_vs_steps.png")

    def folder(self, model):
        return os.path.join(self.runs, model)

    def ckpt(self, model):
        return os.path.join(self.folder(model), "model.pt")

    def onnx(self, model, clip=True):
        return os.path.join(self.folder(model), "model.onnx" if clip else "model_noclip.onnx")

    def point_dir(self, model, step, eta, steps, clip=True):
        return os.path.join(self.folder(model), "samples", f"step{step}",
                            f"eta{eta:g}_steps{steps}" + ("" if clip else "_noclip"))

    def settings(self):
        """Every sampler setting of the study: ``(eta, steps, clip)``."""
        return [(eta, steps, clip) for clip in self.clips for eta, steps in self.points]

    # -- stage 1: training (resumable, time-bounded per sitting) --------------------------------
    def train(self, hours=None, chunk_steps=1000):
        """Train every model to ``steps`` in chunks of ``chunk_steps``; stop starting chunks after ``hours``.

        Models are trained round-robin chunk by chunk, so an interrupted budget leaves both at
        (nearly) the same step count, and the comparison stays fair at any point.
        """
        from bdm_train.train import train

        from . import fmnist

        if not fmnist.available("train"):
            raise BdmError(f"Fashion-MNIST not found in {fmnist.folder()}: {fmnist.INSTALL_HINT}")
        deadline = time.time() + 3600 * hours if hours else None
        while True:
            todo = {m: _ckpt_step(self.ckpt(m)) for m in self.models}
            todo = {m: s for m, s in todo.items() if s < self.steps}
            if not todo:
                return
            if deadline and time.time() >= deadline:
                _log(f"time budget of this sitting used up; at steps {todo}; run again to continue")
                return
            model = min(todo, key=todo.get)          # the one behind goes next
            target = min(self.steps, (todo[model] // chunk_steps + 1) * chunk_steps)
            spec = self.models[model]
            _log(f"training {model} (blur_sigma_max={spec['blur_sigma_max']:g}, {spec['param']}) "
                 f"steps {todo[model]} -> {target}")
            start = time.time()
            train(fmnist.folder(), self.folder(model), resume=os.path.isfile(self.ckpt(model)), progress=False,
                  image_size=32, fit="pad", blur_sigma_max=spec["blur_sigma_max"], param=spec["param"], steps=target,
                  ckpt_every=chunk_steps, sample_steps=50, sample_eta=0.0, device=self.device,
                  **self.net, **self.opt)
            budget_path = os.path.join(self.folder(model), "budget.json")
            budget = _read_json(budget_path, dict(seconds=0.0, chunks=[]))
            budget["seconds"] += time.time() - start
            budget["steps"] = target
            budget["chunks"].append(dict(steps=[todo[model], target], seconds=round(time.time() - start, 1),
                                           device=self._device_name(), host=platform.node()))
            _write_json(budget_path, budget)

    def _device_name(self):
        import torch

        if self.device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name()
        return f"cpu x{torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"

    def _trained(self, model, allow_partial):
        step = _ckpt_step(self.ckpt(model))
        if step == 0:
            raise BdmError(f"{self.ckpt(model)} does not exist: run the train stage first")
        if step < self.steps and not allow_partial:
            raise BdmError(f"{model} is at step {step} of {self.steps}: train more, or pass --allow-partial")
        return step

    # -- stage 2: export ------------------------------------------------------------------------
    def export(self, allow_partial=False):
        """The EMA weights of each model as ONNX step graphs, with and without the clip (skipped when up to date)."""
        from bdm_train import checkpoint
        from export import export_onnx

        for model in self.models:
            self._trained(model, allow_partial)
            for clip in self.clips:
                ck, onnx = self.ckpt(model), self.onnx(model, clip)
                if os.path.isfile(onnx) and os.path.getmtime(onnx) >= os.path.getmtime(ck):
                    continue
                _log(f"exporting {model} -> {onnx}")
                net, process, _ = checkpoint.load(ck, ema=True)
                export_onnx(net, process, onnx, channels=net.in_channels, num_classes=net.num_classes,
                            clip_denoised=clip, default_steps=50, default_eta=0.0)

    # -- stage 3: sampling (chunked, resumable) -------------------------------------------------
    def sample(self, allow_partial=False):
        """``n`` images per model and point, in chunks of ``chunk`` (seed protocol: any chunking, same images)."""
        for model in self.models:
            step = self._trained(model, allow_partial)
            samplers = {}
            for eta, steps, clip in self.settings():
                folder = self.point_dir(model, step, eta, steps, clip)
                for first in range(0, self.n, self.chunk):
                    path = os.path.join(folder, f"{first:06d}.npz")
                    if os.path.isfile(path):
                        continue
                    if clip not in samplers:
                        samplers[clip] = self._sampler(model, clip)
                    sampler = samplers[clip]
                    b = min(self.chunk, self.n - first)
                    start = time.perf_counter()
                    images = sampler(b, steps, eta, first)
                    seconds = time.perf_counter() - start
                    from runtime.images import save_npz

                    os.makedirs(folder, exist_ok=True)
                    save_npz(path, images=images, seconds=np.float64(seconds))
                    _log(f"{model} eta={eta:g} steps={steps} clip={clip}: images {first}..{first + b - 1} "
                         f"({b / seconds:.1f} images/s)")
            for sampler in samplers.values():
                if hasattr(sampler, "close"):
                    sampler.close()

    def _sampler(self, model, clip=True):
        """``f(n, steps, eta, first_index) -> uint8 [n, H, W, C]`` through the runtime or PyTorch."""
        from runtime.images import to_uint8

        if self.backend == "torch":
            from bdm_train.sample_cli import sample_checkpoint

            import torch

            torch.set_num_threads(self.threads)
            ck = self.ckpt(model)
            return lambda n, steps, eta, first: to_uint8(sample_checkpoint(
                ck, n=n, steps=steps, eta=eta, seed=SAMPLE_SEED, first_index=first, device=self.device,
                clip_denoised=clip)[0])
        import runtime

        s = runtime.load(self.onnx(model, clip), batch=self.chunk, threads=self.threads)
        f = lambda n, steps, eta, first: to_uint8(s.sample(n, seed=SAMPLE_SEED, steps=steps, eta=eta,  # noqa: E731
                                                           first_index=first))
        f.close = s.close
        return f

    def images(self, model, step, eta, steps, clip=True):
        """All sampled images of one point, uint8 ``[n, H, W, C]``, and the sampling seconds."""
        folder = self.point_dir(model, step, eta, steps, clip)
        files = sorted(glob.glob(os.path.join(folder, "[0-9]*.npz")))
        parts, seconds = [], 0.0
        for path in files:
            with np.load(path) as z:
                parts.append(z["images"])
                seconds += float(z["seconds"])
        images = np.concatenate(parts) if parts else np.zeros((0, 32, 32, 1), np.uint8)
        return images[:self.n], seconds

    # -- stage 4: evaluation --------------------------------------------------------------------
    def evaluate(self, allow_partial=False):
        """Metrics of every complete point (cached in the point's ``eval.json``)."""
        from . import metrics

        ref = test = None
        for model in self.models:
            step = self._trained(model, allow_partial)
            for eta, steps, clip in self.settings():
                folder = self.point_dir(model, step, eta, steps, clip)
                cache = os.path.join(folder, "eval.json")
                old = _read_json(cache)
                if old is not None and old.get("n") == self.n:
                    continue
                images, seconds = self.images(model, step, eta, steps, clip)
                if len(images) < self.n:
                    _log(f"{model} eta={eta:g} steps={steps} clip={clip}: only {len(images)} of {self.n} images; "
                         "skipped")
                    continue
                ref = ref if ref is not None else metrics.reference_stats()
                if test is None:
                    from . import fmnist

                    test = fmnist.load("test")[0]
                res = metrics.evaluate(images, ref)
                res.update(sample_seconds=round(seconds, 2), noisy=noisy_fraction(images, test))
                _write_json(cache, res)
                _log(f"{model} eta={eta:g} steps={steps} clip={clip}: FD {res['fd']:.3f} KID {res['kid']:.5f}")

    # -- spot check: the runtime on the ONNX equals the PyTorch reference ------------------------
    def parity(self, n=16, steps=10, eta=1.0, allow_partial=False):
        """Max |runtime - PyTorch| over ``n`` images per model (same seed protocol); writes ``parity.json``."""
        import runtime
        from bdm_train.sample_cli import sample_checkpoint

        out = {}
        for model in self.models:
            self._trained(model, allow_partial)
            with runtime.load(self.onnx(model)) as s:
                a = s.sample(n, seed=SAMPLE_SEED, steps=steps, eta=eta)
            b = sample_checkpoint(self.ckpt(model), n=n, steps=steps, eta=eta, seed=SAMPLE_SEED, device="cpu")[0]
            out[model] = dict(n=n, steps=steps, eta=eta, max_abs_diff=float(np.abs(a - b).max()))
            _log(f"{model}: runtime vs PyTorch, {n} images, {steps} steps, eta={eta:g}: "
                 f"max |diff| {out[model]['max_abs_diff']:.2e}")
        _write_json(os.path.join(self.runs, "parity.json"), out)
        return out

    # -- stage 5: the report --------------------------------------------------------------------
    def collect(self):
        """``study.json``'s content from what is on disk."""
        from . import metrics

        points, models = [], {}
        for model, blur in self.models.items():
            step = _ckpt_step(self.ckpt(model))
            budget = _read_json(os.path.join(self.folder(model), "budget.json"), {})
            models[model] = dict(blur_sigma_max=blur, trained_steps=step,
                                 train_seconds=round(budget.get("seconds", 0), 1),
                                 devices=sorted({s["device"] for s in budget.get("chunks", [])}))
            for eta, steps, clip in self.settings():
                res = _read_json(os.path.join(self.point_dir(model, step, eta, steps, clip), "eval.json"))
                if res is None:
                    continue
                points.append(dict(model=model, blur_sigma_max=blur, eta=eta, steps=steps, clip=clip, nfe=steps,
                                   **res))
        ref = {}
        try:
            r = metrics.reference_stats()
            ref = {k: float(r[k]) for k in r if k.startswith(("fd_train", "kid_train", "test_accuracy"))}
        except BdmError:
            pass
        return dict(dataset="Fashion-MNIST, 32x32 (28x28 centre-padded)", n_samples=self.n, sample_seed=SAMPLE_SEED,
                    network=self.net, optimizer=self.opt, target_steps=self.steps, backend=self.backend,
                    models=models, points=points, reference=ref, recommended=recommend(points),
                    parity=_read_json(os.path.join(self.runs, "parity.json")))

    def report(self):
        """``study.json``, ``study.md``, sample grids and the plot."""
        from . import figures

        study = self.collect()
        _write_json(os.path.join(self.results, "study.json"), study)
        from runtime.io import atomic_path

        with atomic_path(os.path.join(self.results, "study.md")) as tmp, open(tmp, "w") as f:
            f.write(markdown(study))
        self._grids(study)
        if study["points"]:
            figures.plot_study(study, self.plot)
        _log(f"wrote {self.results}/study.json, study.md" + (f" and {self.plot}" if study["points"] else ""))
        return study

    # -- stage 6: ship the better model -----------------------------------------------------------
    def ship(self, folder=SHIPPED):
        """The recommended model's EMA weights, config and model card into ``folder`` (what ``make demo`` uses).

        The sampler defaults stored with it (and so in every graph ``bdm-export`` makes of it) are the
        study's recommended point.
        """
        from bdm_train import checkpoint

        study = self.collect()
        rec = study["recommended"]
        if rec is None:
            raise BdmError("nothing evaluated yet: run the sample and eval stages before ship")
        model = rec["model"]
        dst = os.path.join(folder, "model.pt")
        checkpoint.release(self.ckpt(model), dst, sampler=dict(steps=int(rec["steps"]), eta=float(rec["eta"]),
                                                               clip_denoised=bool(rec["clip"])))
        state = checkpoint.load_state(dst)
        _write_json(os.path.join(folder, "config.json"), dict(state["config"], step=int(state["step"])))
        from runtime.io import atomic_path

        with atomic_path(os.path.join(folder, "MODEL_CARD.md")) as tmp, open(tmp, "w") as f:
            f.write(model_card(study, state, dst))
        _log(f"shipped {model} (step {state['step']}, eta={rec['eta']:g}, {rec['steps']} steps, clip={rec['clip']}) "
             f"to {folder}")
        return dst

    def _grids(self, study):
        """8x8 grids of the first 64 samples of each model at the recommended settings and at its own best."""
        from runtime.images import save_grid

        rec = study["recommended"]
        if not rec:
            return
        for model in self.models:
            step = study["models"][model]["trained_steps"]
            own = [p for p in study["points"] if p["model"] == model]
            picks = {(rec["eta"], rec["steps"], rec["clip"])}
            if own:
                best = min(own, key=lambda p: p["fd"])
                picks.add((best["eta"], best["steps"], best.get("clip", True)))
            for eta, steps, clip in sorted(picks):
                images, _ = self.images(model, step, eta, steps, clip)
                if len(images) >= 64:
                    name = f"samples_{model}_eta{eta:g}_steps{steps}" + ("" if clip else "_noclip")
                    save_grid(images[:64], os.path.join(self.results, name + ".png"), ncols=8, scale=2)


def recommend(points, tolerance=1.10):
    """The best quality-per-cost point: the better model's fewest steps within ``tolerance`` x its best FD."""
    if not points:
        return None
    best_model = min(points, key=lambda p: p["fd"])["model"]
    own = [p for p in points if p["model"] == best_model]
    best = min(p["fd"] for p in own)
    pick = min((p for p in own if p["fd"] <= tolerance * best), key=lambda p: (p["nfe"], p["fd"]))
    return dict(model=best_model, eta=pick["eta"], steps=pick["steps"], clip=pick.get("clip", True), fd=pick["fd"],
                kid=pick["kid"], rule=f"fewest steps with FD <= {tolerance:g} x the best FD of the better model")


def model_card(study, state, path):
    """The shipped model's card: data, network, budget, default sampler and its measured quality."""
    import hashlib

    rec = study["recommended"]
    name, info = rec["model"], study["models"][rec["model"]]
    cfg = state["config"]
    point = next(p for p in study["points"] if p["model"] == name and (p["eta"], p["steps"]) == (rec["eta"],
                 rec["steps"]) and p.get("clip", True) == rec["clip"])
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    params = sum(v.numel() for v in state["ema"].values())
    n = study["n_samples"]
    floor = study.get("reference", {}).get(f"fd_train_{n}")
    sampler = "deterministic (eta = 0, B10)" if rec["eta"] == 0 else f"eta = {rec['eta']:g} (B10; 1 = ancestral B9)"
    lines = [
        f"# Model card: `{os.path.basename(os.path.dirname(os.path.abspath(path)))}`",
        "",
        f"- **What**: an unconditional {'blurring diffusion' if info['blur_sigma_max'] else 'DDPM'} model "
        f"(`blur_sigma_max = {info['blur_sigma_max']:g}`) of Fashion-MNIST at 32x32x1 (28x28 centre-padded with "
        "black), the better of the two models of the quality study (`benchmarks/study.py`, "
        "`benchmarks/results/study.md`).",
        "- **Data**: the 60,000 Fashion-MNIST training images (Debian's `dataset-fashion-mnist`), no labels, "
        "no augmentation.",
        f"- **Network**: eps-prediction UNet, `ch {cfg['model']['ch']}`, multipliers "
        f"`{','.join(map(str, cfg['model']['ch_mult']))}`, {cfg['model']['num_res_blocks']} residual block(s) per "
        f"level, attention at {list(cfg['model']['attn_resolutions']) or 'none'}, {params / 1e6:.2f} M parameters; "
        f"EMA weights (decay {cfg['train']['ema_decay']:g}) only: no optimizer state, so it samples and exports "
        "but cannot be resumed.",
        f"- **Training**: {info['trained_steps']} steps of batch {cfg['train']['batch_size']} "
        f"({info['trained_steps'] * cfg['train']['batch_size'] / 60000:.1f} epochs), AdamW lr "
        f"{cfg['train']['lr']:g} (warm-up {cfg['train']['warmup']}), seed {cfg['train']['seed']}; "
        f"{info['train_seconds'] / 3600:.2f} h on {', '.join(info['devices'])}.",
        f"- **Default sampler** (stored here and in every graph `bdm-export` makes of it): {sampler}, "
        f"{rec['steps']} steps, x_hat {'clipped to [-1, 1] at every step' if rec['clip'] else 'not clipped'}; "
        f"{rec['rule']}.",
        f"- **Measured at the default** ({point['n']} samples through the runtime on the exported FP32 ONNX, "
        f"ONNX Runtime CPU): FD-FMNIST {point['fd']:.2f}, KID {point['kid']:.4f} +- {point['kid_std']:.4f}"
        + (f" (real training images: FD {floor:.2f} at the same count)" if floor is not None else "") + ". "
        "FD-FMNIST is the Frechet distance on the project's own Fashion-MNIST classifier "
        "(`benchmarks/feature_net.py`): comparable within this project, not with Inception FIDs.",
        f"- **Class histogram** of those samples (classifier's labels, T-shirt .. ankle boot): {point['hist']} "
        f"(total variation from the test set's {point['hist_tv']:.3f}).",
        f"- **File**: `model.pt`, sha256 `{sha}`; `config.json` is its config in readable form.",
        "- **Use**: `bdm-export --ckpt models/fmnist32/model.pt --out-dir out && "
        "bdm-run --engine out/bdm.onnx --n 64 --out grid.png` (what `make demo` does).",
        "- **Limits**: a small network trained for a CPU budget: samples are recognisable garments with "
        "artefacts, not state of the art. Regenerate with `python -m benchmarks.study run` then "
        "`python -m benchmarks.study run --stages ship`.",
        "",
    ]
    return "\n".join(lines)


def markdown(study):
    """The study table (one row per model, one column per sampler setting)."""
    points = study["points"]
    cols = sorted({(p["eta"], p["steps"]) for p in points})
    lines = [f"Fashion-MNIST 32x32, {study['n_samples']} samples per point, FD-FMNIST / KID "
             f"(own feature network: comparable within this table, not with Inception FIDs).", ""]
    head = "| model | blur_sigma_max | trained steps | x_hat clipped | " + " | ".join(
        f"{'ancestral' if e == 1 else 'deterministic' if e == 0 else f'eta={e:g}'} {k}" for e, k in cols) + " |"
    lines += [head, "|" + "---|" * (4 + len(cols))]
    clips = sorted({p.get("clip", True) for p in points}, reverse=True) or [True]
    for model, info in study["models"].items():
        for clip in clips:
            cells = []
            for e, k in cols:
                p = next((p for p in points if p["model"] == model and (p["eta"], p["steps"]) == (e, k)
                          and p.get("clip", True) == clip), None)
                cells.append("-" if p is None else f"{p['fd']:.2f} / {p['kid']:.3f}")
            lines.append(f"| {model} | {info['blur_sigma_max']:g} | {info['trained_steps']} | "
                         f"{'yes' if clip else 'no'} | " + " | ".join(cells) + " |")
    if any("noisy" in p for p in points):
        lines += ["", "Share of samples that ended as noise (rougher than 99.9% of the test images; "
                  "10,000 real training images: 0.07%):", "", "| model | x_hat clipped | " + " | ".join(
                      f"{'ancestral' if e == 1 else 'deterministic' if e == 0 else f'eta={e:g}'} {k}"
                      for e, k in cols) + " |", "|" + "---|" * (2 + len(cols))]
        for model in study["models"]:
            for clip in clips:
                cells = []
                for e, k in cols:
                    p = next((p for p in points if p["model"] == model and (p["eta"], p["steps"]) == (e, k)
                              and p.get("clip", True) == clip and "noisy" in p), None)
                    cells.append("-" if p is None else f"{100 * p['noisy']:.1f}%")
                lines.append(f"| {model} | {'yes' if clip else 'no'} | " + " | ".join(cells) + " |")
        lines.append("")
    ref = study.get("reference", {})
    n = study["n_samples"]
    if f"fd_train_{n}" in ref:
        lines += ["", f"Real training images (n={n}) against the test set: FD {ref[f'fd_train_{n}']:.2f}, "
                  f"KID {ref.get(f'kid_train_{n}', float('nan')):.3f} (the floor at this sample count)."]
    for model, info in study["models"].items():
        hours = info["train_seconds"] / 3600
        lines.append(f"- {model}: {info['trained_steps']} steps, {hours:.2f} h of training on "
                     f"{', '.join(info['devices']) or 'unknown'}.")
    if study.get("recommended"):
        r = study["recommended"]
        lines.append(f"- Recommended default: {r['model']}, eta={r['eta']:g}, {r['steps']} steps, x_hat "
                     f"{'clipped' if r.get('clip', True) else 'not clipped'} (FD {r['fd']:.2f}; {r['rule']}).")
    for model, p in (study.get("parity") or {}).items():
        lines.append(f"- Runtime (ONNX) vs PyTorch sampler, {model}: max |difference| {p['max_abs_diff']:.1e} "
                     f"over {p['n']} images ({p['steps']} steps, eta={p['eta']:g}).")
    lines += ["", "Regenerate: `python -m benchmarks.study run` (resumable; see benchmarks/study.py).", ""]
    return "\n".join(lines)


# -- CLI ----------------------------------------------------------------------------------------
STAGES = ("train", "export", "sample", "parity", "eval", "report", "ship")


@click.group()
def cli():
    """Blurring diffusion vs DDPM on Fashion-MNIST: quality vs sampler steps."""


@cli.command("run")
@click.option("--stages", default=",".join(STAGES[:-1]), show_default=True,
              help=f"Comma-separated subset of {', '.join(STAGES)} (ship replaces models/fmnist32: ask for it).")
@click.option("--hours", type=float, default=None, help="Stop starting training chunks after this long (per sitting).")
@click.option("--steps", type=click.IntRange(1), default=STEPS, show_default=True, help="Training steps per model.")
@click.option("--models", "only", default=",".join(MODELS), show_default=True,
              help="Comma-separated subset of the models, e.g. to train them in two processes at once.")
@click.option("--n", "n", type=click.IntRange(1), default=1000, show_default=True, help="Samples per point.")
@click.option("--chunk", type=click.IntRange(1), default=250, show_default=True, help="Images per sample file.")
@click.option("--ch", type=click.IntRange(1), default=NET["ch"], show_default=True, help="UNet base channels.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=NET["dropout"], show_default=True,
              help="UNet dropout.")
@click.option("--ch-mult", default=",".join(map(str, NET["ch_mult"])), show_default=True)
@click.option("--num-res-blocks", type=click.IntRange(1), default=NET["num_res_blocks"], show_default=True)
@click.option("--attn", default=",".join(map(str, NET["attn"])) or "none", show_default=True,
              help="Attention resolutions, or none.")
@click.option("--batch-size", type=click.IntRange(1), default=OPT["batch_size"], show_default=True)
@click.option("--lr", type=float, default=OPT["lr"], show_default=True)
@click.option("--runs", default=RUNS, show_default=True, type=click.Path(file_okay=False))
@click.option("--results", default=RESULTS, show_default=True, type=click.Path(file_okay=False))
@click.option("--device", default="auto", show_default=True, help="Training (and torch sampling) device.")
@click.option("--backend", type=click.Choice(["runtime", "torch"]), default="runtime", show_default=True,
              help="Sample through the runtime on the exported ONNX, or with the PyTorch reference sampler.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads of torch and ONNX Runtime [all].")
@click.option("--allow-partial", is_flag=True, help="Export/sample/evaluate checkpoints short of --steps.")
@click.option("--smoke", is_flag=True, help="Tiny network, 4 steps, 16 samples, under /tmp: checks the wiring.")
def run_cmd(stages, hours, steps, only, n, chunk, ch, dropout, ch_mult, num_res_blocks, attn,
            batch_size, lr, runs, results, device, backend, threads, allow_partial, smoke):
    """Run (or resume) the study's stages in order."""
    import torch

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    bad = [s for s in chosen if s not in STAGES]
    if bad:
        raise BdmError(f"unknown stage(s) {', '.join(bad)}; stages are {', '.join(STAGES)}")
    if threads:
        torch.set_num_threads(threads)
    models = MODELS
    names = [m.strip() for m in only.split(",") if m.strip()]
    if not names or any(m not in models for m in names):
        raise BdmError(f"--models {only!r}: choose from {', '.join(models)}")
    models = {m: models[m] for m in names}
    from bdm_train.train import int_list

    net = dict(ch=ch, ch_mult=tuple(int_list(ch_mult, "ch-mult")), num_res_blocks=num_res_blocks,
               attn=tuple(int_list(attn, "attn")), dropout=dropout)
    kw = dict(runs=runs, results=results, models=models, steps=steps, n=n, chunk=chunk, net=net,
              opt=dict(batch_size=batch_size, lr=lr), device=device, backend=backend,
              threads=threads or torch.get_num_threads())
    if smoke:
        tmp = os.path.join("/tmp", "bdm_study_smoke")
        kw.update(runs=os.path.join(tmp, "runs"), results=os.path.join(tmp, "results"), steps=SMOKE["steps"],
                  n=SMOKE["n"], chunk=SMOKE["chunk"], net=SMOKE["net"], points=SMOKE["points"],
                  plot=os.path.join(tmp, "quality_vs_steps.png"), opt=dict(batch_size=8, warmup=1))
    study = Study(**kw)
    if "train" in chosen:
        study.train(hours=hours, chunk_steps=2 if smoke else 1000)
    allow = allow_partial or smoke
    if "export" in chosen and backend == "runtime":
        study.export(allow)
    if "sample" in chosen:
        study.sample(allow)
    if "parity" in chosen and backend == "runtime":
        study.parity(n=4 if smoke else 16, steps=3 if smoke else 10, allow_partial=allow)
    if "eval" in chosen:
        study.evaluate(allow)
    if "report" in chosen:
        study.report()
    if "ship" in chosen and not smoke:
        study.ship()


@cli.command("info")
def info_cmd():
    """Information left along t for several blur_sigma_max, and how much a step amplifies the network's error."""
    res = information()
    click.echo(f"Gaussian-channel information left in z_t (nats per image; DC holds "
               f"{100 * res['dc_fraction']:.0f}% of the variance)")
    click.echo("blur_sigma_max " + " ".join(f"t={t:<8g}" for t in res["times"]))
    for b, row in res["nats"].items():
        click.echo(f"{b:>14g} " + " ".join(f"{v:<10.2f}" for v in row))
    for eta in (0.0, 1.0):
        g = error_gain(eta=eta)
        click.echo(f"\nlargest gain of a step on the network's eps error, eta={eta:g}, steps with t <= {g['late']:g}")
        click.echo("blur_sigma_max " + " ".join(f"{n:>5d} steps" for n in g["step_counts"]))
        for b, row in g["gain"].items():
            click.echo(f"{b:>14g} " + " ".join(f"{v:>11.2f}" for v in row))


@cli.command("diagnose")
@click.option("--runs", default=RUNS, show_default=True, type=click.Path(file_okay=False))
def diagnose_cmd(runs):
    """How well each trained model's x_hat recovers test images along t (low frequencies; pixels after clipping)."""
    study = Study(runs=runs)
    for model in study.models:
        if not os.path.isfile(study.ckpt(model)):
            raise BdmError(f"{study.ckpt(model)} does not exist: train the models first")
        click.echo(f"{model} (step {_ckpt_step(study.ckpt(model))}): t, MSE of x_hat on the 4x4 lowest DCT "
                   "frequencies, MSE of the clipped x_hat in pixels")
        for t, (low, clipped) in denoising_error(study.ckpt(model)).items():
            click.echo(f"  t={t:<5g} {low:10.4f} {clipped:10.4f}")


def main(args=None):
    from bdm_train.train import run_cli

    run_cli(cli, args)


if __name__ == "__main__":
    main()
