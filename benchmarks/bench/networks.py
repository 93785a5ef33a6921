"""The benchmarked networks: random weights, exported step graphs, FLOPs by torch's own counter."""
import os
import time

from .config import ETA, INT8_IMAGES, SEED


def build(net, seed=SEED):
    """``(model, process)``: the UNet of ``net`` with every parameter drawn at random, and its process."""
    import torch

    from bdm_train.diffusion import BlurringDiffusion
    from bdm_train.unet import UNet

    torch.manual_seed(seed)
    model = UNet(**net["unet"]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() > 1:       # conv/linear/embedding weights: fan-in scaling keeps activations O(1)
                p.copy_(noise * p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # GroupNorm gains around 1
                p.copy_(1.0 + 0.1 * noise)
            else:                  # biases
                p.copy_(0.1 * noise)
    process = BlurringDiffusion(net["unet"]["image_size"], blur_sigma_max=net["blur_sigma_max"])
    return model, process



def eps_std(model, net):
    """Standard deviation of eps on a random latent at t = 0.5 (0 would mean an untrained-zero network)."""
    import torch

    c, s = net["unet"]["in_channels"], net["unet"]["image_size"]
    z = torch.randn(4, c, s, s, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(model(z, torch.full((4,), 0.5)).std())



def export_graphs(model, process, net, folder, int8_images=INT8_IMAGES):
    """Write ``<name>.onnx`` (FP32), ``<name>_fp16.onnx`` and ``<name>_int8.onnx`` (calibrated on ``int8_images``
    trajectories of the FP32 graph: ``bdm_export.int8``); returns their paths and export times."""
    from bdm_export.int8 import export_int8
    from bdm_export.onnx_export import export_onnx

    paths, times = {}, {}
    for precision, fp16 in (("fp32", False), ("fp16", True)):
        path = os.path.join(folder, f"{net['name']}{'_fp16' if fp16 else ''}.onnx")
        t = time.perf_counter()
        export_onnx(model, process, path, channels=net["unet"]["in_channels"], fp16=fp16,
                    default_steps=net["steps"], default_eta=ETA)
        times[precision] = round(time.perf_counter() - t, 2)
        paths[precision] = path
    t = time.perf_counter()
    paths["int8"] = os.path.join(folder, f"{net['name']}_int8.onnx")
    # random weights: no method is better, and the scales do not change the graph's speed; percentile (the default
    # before --calib-method auto) keeps this export, and its time here, what they were
    export_int8(paths["fp32"], paths["int8"], images=int8_images, method="percentile")
    times["int8"] = round(time.perf_counter() - t, 2)
    return paths, times



def flops_check(model, process, net):
    """FLOPs of one step (network + DCT update) at batch 1 by torch's own FLOP counter: an independent check."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bdm_train.sampling import conditioned, ddim_step

    c, s = net["unet"]["in_channels"], net["unet"]["image_size"]
    z = torch.randn(1, c, s, s)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ddim_step(conditioned(model, None), process, z, torch.full((1,), 0.5), torch.full((1,), 0.45), ETA,
                  torch.randn_like(z))
    return int(counter.get_total_flops())
