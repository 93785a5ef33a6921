"""Shared test helpers (plain functions; fixtures live in conftest.py)."""
import numpy as np


def export_mixture(folder, default_steps, default_eta=1.0):
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
    path = str(folder / "mix.onnx")
    export_onnx(model, process, path, channels=1, default_steps=default_steps, default_eta=default_eta)
    return path, model, process
