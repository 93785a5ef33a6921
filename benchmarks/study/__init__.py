"""The quality study: blurring diffusion vs DDPM on Fashion-MNIST 32x32, with the parameterisation
(eps, B8; spectral, B14) as a factor, and quality per cost over samplers and time grids (B10, B11, B15, B16).

Five models with the same network, data, seed and training budget (``common.MODELS``): BDM
(``blur_sigma_max`` 20, the paper's value for 32x32) and the DDPM baseline (0), each in eps and
spectral form, and BDM spectral at 10 (gDDIM's value). Each is sampled through the runtime
(``--n`` samples per point) at the first study's settings (B10 on the uniform grid: eta 0 at
10/20/50 steps, eta 1 at 50/100; with and without clipping x_hat), then at solver x grid x
{5, 10, 20, 50} network evaluations (deterministic ddim and dpmpp2m; SDE-DPM-Solver++(2M), B16, at
the same counts; ancestral DDIM x grid at 20 and 50) with the clip setting that measured better for
that model,
and scored with FD-FMNIST, KID, the class histogram and the share of samples that ended as noise.

Why blur_sigma_max = 20 at 32x32 (B2-B4): sigma_B is measured in pixels, so at the same 32x32 grid
as CIFAR-10 the paper's 20 damps every DCT index exactly as it does there: at t = 1 only the mean
and the coarsest gradient survive. ``python -m benchmarks.study info`` prints the remaining
Gaussian-channel information per image along t for several values.

Every stage is resumable and skippable, so the study can span several sittings:

    python -m benchmarks.study run --hours 3          # train (resumes), export, sample, check, evaluate, report
    python -m benchmarks.study run --stages report    # only rebuild study.json / study.md / the plot
    python -m benchmarks.study run --stages ship      # the recommended model -> models/fmnist32 (refused
                                                      # once the third study shipped: scale --stages ship)
    python -m benchmarks.study run --smoke            # a tiny end-to-end check of the wiring (minutes)

On 2 cores run two processes with ``--models A --threads 1`` and ``--models B --threads 1``: small
networks use one core each better than two cores in turn.

Layout: ``RUNS/<model>/model.pt`` (bdm-train checkpoint), ``budget.json`` (training seconds summed
over sittings), ``model.onnx`` / ``model_noclip.onnx``,
``samples/step<S>/<solver>-<grid>_eta<e>_steps<k>[_noclip]/<first>.npz`` (chunks of uint8 images:
a killed run loses at most one chunk; a longer-trained checkpoint gets a new folder),
``.../eval.json``. Results: ``benchmarks/results/study.json``, ``study.md``, grids of samples, and
``docs/quality_vs_steps.png``.

Modules: ``common`` (models, settings, paths), ``analysis`` (the measurements behind the
explanation: information, error gain, denoising error, noise share), ``stages`` (train, export,
sample, parity, evaluate), ``report`` (collect, recommend, tables, model card, ship), ``cli``.
"""
from .analysis import denoising_error, error_gain, information, noisy_fraction, roughness
from .cli import main
from .common import LEGACY_POINTS, MODELS, NET, OPT, STEPS, Setting
from .report import recommend
from .tables import markdown, model_card
from .stages import Study

__all__ = ["LEGACY_POINTS", "MODELS", "NET", "OPT", "STEPS", "Setting", "Study", "denoising_error", "error_gain",
           "information", "main", "markdown", "model_card", "noisy_fraction", "recommend", "roughness"]
