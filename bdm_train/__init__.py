"""Blurring Diffusion Models in PyTorch: the maths (dct, diffusion, sampling), the UNet and training."""

__version__ = "0.1.0"
