"""Cold start and peak memory of the PyTorch reference: ``import torch`` + bdm_train, the UNet from a
state dict, first image, then a batch.

Arguments: ``pt`` (``{"unet", "blur_sigma_max", "state"}`` saved by the benchmark), ``steps``, ``eta``,
``batch``, ``threads``.
"""
import time

from .common import arguments, peak_rss_mib, report

a = arguments()
t0 = time.perf_counter()
import torch  # noqa: E402  (timed)

torch.set_num_threads(a["threads"])
from bdm_train.diffusion import BlurringDiffusion  # noqa: E402
from bdm_train.sampling import sample  # noqa: E402
from bdm_train.unet import UNet  # noqa: E402

t1 = time.perf_counter()
ck = torch.load(a["pt"], weights_only=True)
model = UNet(**ck["unet"]).eval()
model.load_state_dict(ck["state"])
process = BlurringDiffusion(ck["unet"]["image_size"], blur_sigma_max=ck["blur_sigma_max"])
sample(model, process, 1, 0, a["steps"], eta=a["eta"])
t2 = time.perf_counter()
sample(model, process, a["batch"], 0, 1, eta=a["eta"])
report(import_torch_s=t1 - t0, first_image_s=t2 - t1, peak_rss_mib=peak_rss_mib())
