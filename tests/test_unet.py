"""The UNet: shapes, conditioning, config round trip, and the FP16 contract."""
import json
import math

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from bdm_train.unet import AttnBlock, GroupNorm32, UNet, timestep_embedding

TINY = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


def randomized(model, seed=0):
    """Give every weight a random value: the DDPM++ zero-init of residual branches makes a fresh
    UNet output exactly 0, which would let most assertions pass vacuously."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model.eval()


@pytest.mark.parametrize("size,kw", [(8, dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))),
                                     (16, TINY), (32, dict(ch=8))])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes(size, kw, channels):
    model = randomized(UNet(in_channels=channels, image_size=size, **kw))
    z = torch.randn(3, channels, size, size)
    eps = model(z, torch.rand(3))
    assert eps.shape == z.shape and eps.dtype == torch.float32
    assert torch.isfinite(eps).all() and eps.std() > 1e-3


def test_attention_at_requested_resolution():
    # 16x16 with ch_mult (1, 2, 2): levels are 16, 8, 4. Attention at 8 only: 1 down + 2 up + 1 mid.
    model = UNet(image_size=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 1 + 2 + 1
    none = UNet(image_size=16, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=())
    assert sum(isinstance(m, AttnBlock) for m in none.modules()) == 1  # the middle block always has one


def test_fresh_model_outputs_zero():
    # DDPM++ init: the output conv starts at zero, so training begins at eps_hat = 0 (loss = 1).
    model = UNet(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    assert torch.count_nonzero(model(torch.randn(2, 1, 8, 8), torch.rand(2))) == 0


def test_config_round_trip():
    model = UNet(in_channels=3, image_size=16, num_classes=5, dropout=0.0, **TINY)
    cfg = json.loads(json.dumps(model.config()))
    clone = UNet(**cfg)
    assert clone.config() == cfg
    clone.load_state_dict(model.state_dict())  # same architecture, same parameter names
    assert (model.in_channels, model.num_classes, model.image_size) == (3, 5, 16)


def test_batch_independence():
    # Each image's eps depends only on itself (per-sample norms, per-image attention), so the
    # runtime may batch and chunk freely.
    model = randomized(UNet(image_size=16, num_classes=3, **TINY))
    z, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 3])
    whole = model(z, t, y)
    parts = torch.cat([model(z[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, parts, rtol=1e-4, atol=1e-5)


def test_conditioning_and_null_label():
    model = randomized(UNet(image_size=16, num_classes=3, **TINY))
    z, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    null = model(z, t, torch.full((2,), 3))
    assert torch.equal(model(z, t), null)  # labels=None is the null label (index num_classes)
    a, b = model(z, t, torch.tensor([0, 0])), model(z, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-2 and (a - null).abs().max() > 1e-2
    assert model.label_emb.num_embeddings == 4


def test_unconditional_refuses_labels():
    model = UNet(image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([0]))


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 16).numpy()
    freqs = np.exp(-np.log(10000.0) * np.arange(8) / 8)
    args = (1000.0 * t.numpy().astype(np.float64))[:, None] * freqs
    ref = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    # float32 arguments up to 1000: rounding of t*1000*f is ~1000 * 6e-8 = 6e-5 rad.
    np.testing.assert_allclose(emb, ref, atol=2e-4)


def test_groupnorm32_against_float64():
    # Values near 300: squares ~9e4 exceed the fp16 maximum (65504); float32 statistics are needed.
    g = torch.Generator().manual_seed(0)
    x = (300 + torch.randn(2, 8, 4, 4, generator=g)).half()
    norm = GroupNorm32(2, 8)
    y = norm(x)
    assert y.dtype == torch.float16
    xd = x.double().numpy().reshape(2, 2, -1)
    ref = (xd - xd.mean(-1, keepdims=True)) / np.sqrt(xd.var(-1, keepdims=True) + norm.eps)
    # Output rounded to fp16 (relative 2^-11); the inputs themselves are fp16, as in the network.
    np.testing.assert_allclose(y.detach().float().numpy().reshape(2, 2, -1), ref, atol=4e-3)


class _Spy(TorchFunctionMode):
    """Records the dtype of the first tensor argument of the functions we care about."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("group_norm", "softmax", "conv2d", "linear"):
            self.seen.setdefault(name, set()).add(args[0].dtype)
            if name in ("conv2d", "linear"):
                self.seen.setdefault(name + ".weight", set()).add(args[1].dtype)
        return func(*args, **(kwargs or {}))


def test_fp16_contract():
    torch.manual_seed(0)
    ref = randomized(UNet(image_size=16, num_classes=3, dropout=0.0, **TINY))
    half = UNet(**ref.config())
    half.load_state_dict(ref.state_dict())
    half.eval().convert_to_fp16()
    assert half.dtype == torch.float16
    for m in half.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding)):
            assert m.weight.dtype == torch.float16
        if isinstance(m, GroupNorm32):
            assert m.weight.dtype == torch.float32

    z, t, y = torch.randn(4, 1, 16, 16), torch.rand(4), torch.tensor([0, 1, 2, 3])
    spy = _Spy()
    with spy:
        eps16 = half(z, t, y)
    assert spy.seen["group_norm"] == {torch.float32}      # statistics in float32
    assert spy.seen["softmax"] == {torch.float32}         # attention softmax in float32
    assert spy.seen["conv2d"] == {torch.float16} and spy.seen["conv2d.weight"] == {torch.float16}
    assert spy.seen["linear"] == {torch.float16}          # time MLP gets the cast sinusoids
    assert eps16.dtype == torch.float32

    eps32 = ref(z, t, y)
    # fp16 rounds each op by <= 2^-11 ~ 5e-4 relative; through ~30 layers the errors add up to
    # well under 1% of the output's size when they accumulate randomly (sqrt(30) * 5e-4 ~ 3e-3).
    rel = ((eps16 - eps32).norm() / eps32.norm()).item()
    assert rel < 1e-2, rel
