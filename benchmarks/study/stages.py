"""The study's stages on disk: train, export, sample, parity, evaluate. Each is resumable."""
import glob
import os
import platform
import time

import numpy as np

from bdm_runtime.errors import BdmError

from .analysis import noisy_fraction
from .common import (ANCESTRAL_NFES, CLIPS, GRIDS, LEGACY_POINTS, MODELS, NET, NFES, OPT, RESULTS, ROOT, RUNS,
                     SAMPLE_SEED, SDE_NFES, SOLVERS, STEPS, ckpt_step, legacy_settings, log, point_name, read_json,
                     sweep_settings, write_json)


class Study:
    """Paths and settings of one study (``runs`` folder, models, settings, budget)."""

    def __init__(self, runs=RUNS, results=RESULTS, models=None, points=LEGACY_POINTS, clips=CLIPS, steps=STEPS,
                 n=1000, chunk=250, net=None, opt=None, device="auto", backend="runtime", threads=1, plot=None,
                 solvers=SOLVERS, grids=GRIDS, nfes=NFES, ancestral_nfes=ANCESTRAL_NFES, sde_nfes=SDE_NFES):
        self.runs, self.results = runs, results
        self.models = {m: dict(v) for m, v in (models or MODELS).items()}
        self.points = tuple((float(e), int(k)) for e, k in points)
        self.clips = tuple(bool(c) for c in clips)
        self.solvers, self.grids, self.nfes = tuple(solvers), tuple(grids), tuple(int(k) for k in nfes)
        self.ancestral_nfes = tuple(int(k) for k in ancestral_nfes)
        self.sde_nfes = tuple(int(k) for k in sde_nfes)
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

    def point_dir(self, model, step, setting):
        return os.path.join(self.folder(model), "samples", f"step{step}", point_name(setting))

    # -- which settings each model is sampled at ----------------------------------------------
    def settings(self, model):
        """The legacy settings, then the solver x grid sweep (deterministic, then stochastic) once the
        clip choice is measured."""
        out = legacy_settings(self.points, self.clips)
        clip = self.sweep_clip(model)
        if clip is not None:
            out += [s for s in sweep_settings(clip, self.solvers, self.grids, self.nfes, self.ancestral_nfes,
                                                  self.sde_nfes)
                    if s not in out]
        return out

    def sweep_clip(self, model):
        """The clip setting of the model's better best FD on the legacy points (``None``: not yet measured)."""
        if len(self.clips) == 1:
            return self.clips[0]
        step = ckpt_step(self.ckpt(model))
        best = {}
        for s in legacy_settings(self.points, self.clips):
            res = read_json(os.path.join(self.point_dir(model, step, s), "eval.json"))
            if res is None or res.get("n") != self.n:
                return None
            best[s.clip] = min(best.get(s.clip, float("inf")), res["fd"])
        return min(best, key=best.get)

    # -- stage 1: training (resumable, time-bounded per sitting) --------------------------------
    def train(self, hours=None, chunk_steps=1000, keep=()):
        """Train every model to ``steps`` in chunks of ``chunk_steps``; stop starting chunks after ``hours``.

        Models are trained round-robin chunk by chunk, so an interrupted budget leaves them at
        (nearly) the same step count, and the comparison stays fair at any point. The checkpoint at each
        step in ``keep`` is also kept as ``model_stepN.pt`` (a budget the study measures on the way).
        """
        from bdm_train.train import train

        from .. import fmnist

        if not fmnist.available("train"):
            raise BdmError(f"Fashion-MNIST not found in {fmnist.folder()}: {fmnist.INSTALL_HINT}")
        deadline = time.time() + 3600 * hours if hours else None
        while True:
            todo = {m: ckpt_step(self.ckpt(m)) for m in self.models}
            todo = {m: s for m, s in todo.items() if s < self.steps}
            if not todo:
                return
            if deadline and time.time() >= deadline:
                log(f"time budget of this sitting used up; at steps {todo}; run again to continue")
                return
            model = min(todo, key=todo.get)          # the one behind goes next
            target = min(self.steps, (todo[model] // chunk_steps + 1) * chunk_steps)
            spec = self.models[model]
            log(f"training {model} (blur_sigma_max={spec['blur_sigma_max']:g}, {spec['param']}) "
                f"steps {todo[model]} -> {target}")
            start = time.time()
            train(fmnist.folder(), self.folder(model), resume=os.path.isfile(self.ckpt(model)), progress=False,
                  image_size=32, fit="pad", blur_sigma_max=spec["blur_sigma_max"], param=spec["param"],
                  steps=target, ckpt_every=chunk_steps, sample_steps=50, sample_eta=0.0, device=self.device,
                  threads=self.threads,
                  **self.net, **self.opt)
            self._add_budget(model, todo[model], target, time.time() - start)
            if target in keep:
                self.snapshot(model, target)

    def snapshot(self, model, step):
        """A copy of the model's checkpoint at ``step`` (``model_stepN.pt``), written atomically."""
        import shutil

        from bdm_runtime.io import atomic_path

        path = os.path.join(self.folder(model), f"model_step{step}.pt")
        if ckpt_step(self.ckpt(model)) == step and not os.path.isfile(path):
            with atomic_path(path) as tmp:
                shutil.copyfile(self.ckpt(model), tmp)

    def _add_budget(self, model, first, last, seconds):
        path = os.path.join(self.folder(model), "budget.json")
        budget = read_json(path, dict(seconds=0.0, chunks=[]))
        budget["seconds"] += seconds
        budget["steps"] = last
        budget["chunks"].append(dict(steps=[first, last], seconds=round(seconds, 1), device=self._device_name(),
                                     host=platform.node()))
        write_json(path, budget)

    def _device_name(self):
        import torch

        if self.device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name()
        return f"cpu x{torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"

    def trained(self, model, allow_partial):
        """The model's trained step; refuses a missing or (unless allowed) unfinished training."""
        step = ckpt_step(self.ckpt(model))
        if step == 0:
            raise BdmError(f"{self.ckpt(model)} does not exist: run the train stage first")
        if step < self.steps and not allow_partial:
            raise BdmError(f"{model} is at step {step} of {self.steps}: train more, or pass --allow-partial")
        return step

    # -- stage 2: export ------------------------------------------------------------------------
    def export(self, allow_partial=False):
        """The EMA weights of each model as ONNX step graphs, with and without the clip (skipped when up to date)."""
        from bdm_train import checkpoint
        from bdm_export import export_onnx

        for model in self.models:
            self.trained(model, allow_partial)
            for clip in self.clips:
                ck, onnx = self.ckpt(model), self.onnx(model, clip)
                if os.path.isfile(onnx) and os.path.getmtime(onnx) >= os.path.getmtime(ck):
                    continue
                log(f"exporting {model} -> {onnx}")
                net, process, _ = checkpoint.load(ck, ema=True)
                export_onnx(net, process, onnx, channels=net.in_channels, num_classes=net.num_classes,
                            clip_denoised=clip, default_steps=50, default_eta=0.0)

    # -- stage 3: sampling (chunked, resumable) -------------------------------------------------
    def sample(self, allow_partial=False, settings=None):
        """``n`` images per model and setting, in chunks of ``chunk`` (seed protocol: any chunking, same images)."""
        from bdm_runtime.images import save_npz

        for model in self.models:
            step = self.trained(model, allow_partial)
            samplers = {}
            for setting in settings or self.settings(model):
                folder = self.point_dir(model, step, setting)
                if self.evaluated(folder):   # committed results: a fresh machine has no images, and needs none
                    continue
                for first in range(0, self.n, self.chunk):
                    path = os.path.join(folder, f"{first:06d}.npz")
                    if os.path.isfile(path):
                        continue
                    if setting.clip not in samplers:
                        samplers[setting.clip] = self._sampler(model, setting.clip)
                    b = min(self.chunk, self.n - first)
                    start = time.perf_counter()
                    images = samplers[setting.clip](b, setting, first)
                    seconds = time.perf_counter() - start
                    os.makedirs(folder, exist_ok=True)
                    save_npz(path, images=images, seconds=np.float64(seconds))
                    log(f"{model} {point_name(setting)}: images {first}..{first + b - 1} ({b / seconds:.1f} images/s)")
            for sampler in samplers.values():
                if hasattr(sampler, "close"):
                    sampler.close()

    def _sampler(self, model, clip=True):
        """``f(n, setting, first_index) -> uint8 [n, H, W, C]`` through the runtime or PyTorch."""
        from bdm_runtime.images import to_uint8

        def extra(setting):   # legacy points need nothing a format-1 graph lacks
            legacy = (setting.solver, setting.grid) == ("ddim", "uniform")
            return {} if legacy else dict(solver=setting.solver, grid=setting.grid)

        if self.backend == "torch":
            import torch

            from bdm_train.sample_cli import sample_checkpoint

            torch.set_num_threads(self.threads)
            ck = self.ckpt(model)
            return lambda n, st, first: to_uint8(sample_checkpoint(
                ck, n=n, steps=st.steps, eta=st.eta, seed=SAMPLE_SEED, first_index=first, device=self.device,
                clip_denoised=clip, **extra(st))[0])
        import bdm_runtime

        s = bdm_runtime.load(self.onnx(model, clip), batch=self.chunk, threads=self.threads)
        f = lambda n, st, first: to_uint8(s.sample(n, seed=SAMPLE_SEED, steps=st.steps, eta=st.eta,  # noqa: E731
                                                   first_index=first, **extra(st)))
        f.close = s.close
        return f

    def evaluated(self, folder):
        """Whether the point in ``folder`` has its metrics for ``n`` samples (``eval.json``)."""
        res = read_json(os.path.join(folder, "eval.json"))
        return res is not None and res.get("n") == self.n

    def images(self, model, step, setting):
        """All sampled images of one point, uint8 ``[n, H, W, C]``, and the sampling seconds."""
        files = sorted(glob.glob(os.path.join(self.point_dir(model, step, setting), "[0-9]*.npz")))
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
        from .. import metrics

        ref = test = None
        for model in self.models:
            step = self.trained(model, allow_partial)
            for setting in self.settings(model):
                cache = os.path.join(self.point_dir(model, step, setting), "eval.json")
                if self.evaluated(os.path.dirname(cache)):
                    continue
                images, seconds = self.images(model, step, setting)
                if len(images) < self.n:
                    log(f"{model} {point_name(setting)}: only {len(images)} of {self.n} images; skipped")
                    continue
                ref = ref if ref is not None else metrics.reference_stats()
                if test is None:
                    from .. import fmnist

                    test = fmnist.load("test")[0]
                res = metrics.evaluate(images, ref)
                res.update(sample_seconds=round(seconds, 2), noisy=noisy_fraction(images, test))
                write_json(cache, res)
                log(f"{model} {point_name(setting)}: FD {res['fd']:.3f} KID {res['kid']:.5f} "
                    f"noise {100 * res['noisy']:.1f}%")

    # -- spot check: the runtime on the ONNX equals the PyTorch reference ------------------------
    def parity(self, n=16, steps=10, eta=1.0, allow_partial=False):
        """Max |runtime - PyTorch| over ``n`` images per model (same seed protocol); writes ``parity.json``."""
        import bdm_runtime
        from bdm_train.sample_cli import sample_checkpoint

        path = os.path.join(self.runs, "parity.json")
        out = read_json(path, {})
        for model in self.models:
            self.trained(model, allow_partial)
            with bdm_runtime.load(self.onnx(model)) as s:
                a = s.sample(n, seed=SAMPLE_SEED, steps=steps, eta=eta)
            b = sample_checkpoint(self.ckpt(model), n=n, steps=steps, eta=eta, seed=SAMPLE_SEED, device="cpu")[0]
            out[model] = dict(n=n, steps=steps, eta=eta, max_abs_diff=float(np.abs(a - b).max()))
            log(f"{model}: runtime vs PyTorch, {n} images, {steps} steps, eta={eta:g}: "
                f"max |diff| {out[model]['max_abs_diff']:.2e}")
        write_json(path, out)
        return out
