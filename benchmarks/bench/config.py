"""What the benchmark measures: the networks, the sampler settings and the issue's targets."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = "bdm-bench/1"
DEFAULT_OUT = os.path.join("benchmarks", "results", "bench_cpu")
SEED = 0
ETA = 1.0  # the paper's ancestral sampler (B9): the loop then also draws noise every step
TARGET_RATIO, TARGET_OVERHEAD, TARGET_IMPORT_S = 1.5, 0.05, 0.5
TARGET_NET, TARGET_BATCH = "demo-8x8", 16
# INT8 (issue 20): the step graph's network convolutions in QDQ INT8 (bdm_export.int8), timed at every batch in
# the same interleaved run; calibrated on INT8_IMAGES trajectories (random weights: speed, not quality, here).
INT8_TARGET_NET, INT8_TARGET_RATIO, INT8_IMAGES = "cifar10-32x32", 1.5, 4

# The networks. ``batches``: timed batch sizes; ``fp16``: batches where the FP16 graph is timed too
# (ONNX Runtime's CPU provider has no FP16 convolutions: it inserts casts and computes in FP32, so
# the FP16 graph is recorded, not expected to be faster); ``steps`` x ``repeats`` per pair.
NETWORKS = (
    dict(name="demo-8x8", about="the `make demo-train` network (8x8 digits)", blur_sigma_max=5.0,
         unet=dict(in_channels=1, image_size=8, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0),
         steps=20, repeats=5, batches=(1, 16, 64), fp16=(1, 16, 64), rss_batch=64),
    dict(name="study-32x32", about="a 32x32 Fashion-MNIST network (ch 32; the study now uses ch 16)", blur_sigma_max=20.0,
         unet=dict(in_channels=1, image_size=32, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0),
         steps=5, repeats=3, batches=(1, 16, 64), fp16=(1, 16, 64), rss_batch=64),
    # DDPM's CIFAR-10 UNet (Ho et al. 2020, as its public configs give it: ch 128, multipliers
    # 1,2,2,2, two blocks per level, attention at 16x16, dropout 0.1), the network BDM's CIFAR-10
    # experiments build on; sigma_B,max = 20, the paper's value (see benchmarks/study.py).
    dict(name="cifar10-32x32", about="the paper's CIFAR-10 configuration (DDPM's UNet)", blur_sigma_max=20.0,
         unet=dict(in_channels=3, image_size=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                   attn_resolutions=(16,), dropout=0.1),
         steps=2, repeats=3, batches=(1, 16, 64), fp16=(1, 16), rss_batch=16, repeats_at={64: 2}),
)
QUICK_NETWORKS = (
    dict(name="tiny-8x8", about="a tiny network (--quick: checks the wiring, not a measurement)", blur_sigma_max=5.0,
         unet=dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                   dropout=0.0),
         steps=2, repeats=2, batches=(1, 16), fp16=(16,), rss_batch=16),
)


