"""The eps-prediction network: a DDPM++-style UNet (Song et al. 2021, as used by Hoogeboom & Salimans).

Residual blocks (GroupNorm, SiLU, dropout, time-embedding projection, skip rescaled by 1/sqrt(2)),
self-attention at chosen resolutions, a sinusoidal embedding of ``t * 1000`` and optional class
conditioning with an extra null label for classifier-free guidance (B12).

Everything exports to ONNX opset 17 with standard ops: no data-dependent control flow, attention
written as matmul + softmax, upsampling as nearest ``Resize``.

FP16 contract: after :meth:`UNet.convert_to_fp16` the conv/linear/embedding weights are float16,
but ``forward`` still takes float32 ``z, t`` and returns float32 eps; the sinusoids, GroupNorm
statistics and attention softmax are computed in float32 via explicit casts.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from bdm_runtime.format import PARAMS

SKIP_SCALE = 1.0 / math.sqrt(2.0)  # DDPM++ "skip_rescale": keeps the residual sum at unit variance


def _groups(channels):
    """GroupNorm groups: ``min(32, C // 4)`` (DDPM++), lowered until it divides ``C``."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


def _zero(module):
    """Zero-initialise the last layer of a residual branch (DDPM++ ``init_scale=0``)."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32, whatever the input dtype."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal embedding ``[sin(1000 t f_k), cos(1000 t f_k)]`` of float32 ``t`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """``x + conv(drop(SiLU(GN(conv(SiLU(GN(x))) + W temb))))``, rescaled by 1/sqrt(2)."""

    def __init__(self, in_ch, out_ch, temb_ch, dropout):
        super().__init__()
        self.norm1 = GroupNorm32(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_ch, out_ch)
        self.norm2 = GroupNorm32(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) * SKIP_SCALE


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, written with matmul + softmax (exports plainly)."""

    def __init__(self, ch):
        super().__init__()
        self.norm = GroupNorm32(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        # Scale q and k by c^(-1/4) each (not the product by c^(-1/2)) so fp16 logits do not overflow.
        scale = c ** -0.25
        logits = torch.matmul((q * scale).transpose(1, 2), k * scale)          # [B, HW, HW]
        weights = torch.softmax(logits.float(), dim=-1).to(x.dtype)            # softmax in float32
        out = torch.matmul(v, weights.transpose(1, 2)).reshape(b, c, h, w)     # [B, C, HW]
        return (x + self.proj(out)) * SKIP_SCALE


class Downsample(nn.Module):
    """Strided 3x3 convolution (halves H and W)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """UNet ``model(z, t, labels=None) -> out`` with ``z`` [B,C,H,W], ``t`` [B] in [0, 1].

    ``num_classes > 0`` adds a label embedding with ``num_classes + 1`` rows; row ``num_classes`` is
    the null label (classifier-free guidance, B12) and ``labels=None`` means all-null.
    ``param`` says how ``out`` is read (``bdm_train.diffusion.read_output``): ``"eps"`` (B8) or
    ``"spectral"`` (B14), which needs the data's per-frequency ``data_mean`` and ``data_std``
    (``[C, H, W]``, DCT space; kept as buffers, so they travel with the weights and into the graph).
    """

    def __init__(self, in_channels=1, image_size=32, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, num_classes=0, param="eps", data_mean=None, data_std=None):
        super().__init__()
        self._set_param(param, (int(in_channels), int(image_size), int(image_size)), data_mean, data_std)
        image_size = int(image_size)
        ch_mult = tuple(int(m) for m in ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        if in_channels < 1 or ch < 1 or num_res_blocks < 0 or num_classes < 0 or not ch_mult:
            raise ValueError("need in_channels >= 1, ch >= 1, num_res_blocks >= 0, num_classes >= 0, ch_mult")
        if image_size % (2 ** (len(ch_mult) - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2^(len(ch_mult)-1) = "
                             f"{2 ** (len(ch_mult) - 1)}")
        self.in_channels = int(in_channels)
        self.image_size = image_size
        self.ch = int(ch)
        self.ch_mult = ch_mult
        self.num_res_blocks = int(num_res_blocks)
        self.attn_resolutions = attn_resolutions
        self.dropout = float(dropout)
        self.num_classes = int(num_classes)

        temb_ch = 4 * ch
        self.temb = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.label_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes > 0 else None

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        # Encoder: remember each block's output width for the skip connections.
        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(cur, ch * mult, temb_ch, dropout))
                cur = ch * mult
                if res in attn_resolutions:
                    self.down.append(AttnBlock(cur))
                skips.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                res //= 2
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, temb_ch, dropout), AttnBlock(cur),
                                  ResBlock(cur, cur, temb_ch, dropout)])
        # Decoder: one more block per level than the encoder, each eating one skip.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, temb_ch, dropout))
                cur = ch * mult
                if res in attn_resolutions:
                    self.up.append(AttnBlock(cur))
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        assert not skips
        self.norm_out = GroupNorm32(_groups(cur), cur)
        self.conv_out = _zero(nn.Conv2d(cur, in_channels, 3, padding=1))

    def _set_param(self, param, shape, data_mean, data_std):
        """How the output is read; for ``"spectral"`` the B14 statistics become buffers (checked here)."""
        self.param = str(param)
        if self.param not in PARAMS:
            raise ValueError(f"param must be one of {', '.join(PARAMS)}, got {param!r}")
        if self.param == "spectral":
            stats = [torch.as_tensor(v, dtype=torch.float32) if v is not None else None for v in (data_mean, data_std)]
            if any(v is None or tuple(v.shape) != shape for v in stats):
                raise ValueError(f"param='spectral' needs data_mean and data_std of shape {list(shape)} (B14)")
            if not bool((stats[1] > 0).all()):
                raise ValueError("data_std must be positive (B14 floors it)")
            self.register_buffer("data_mean", stats[0].clone())
            self.register_buffer("data_std", stats[1].clone())
        elif data_mean is not None or data_std is not None:
            raise ValueError("data_mean/data_std belong to param='spectral'")

    def config(self):
        """The constructor arguments as plain JSON types."""
        return dict(in_channels=self.in_channels, image_size=self.image_size, ch=self.ch,
                    ch_mult=list(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=list(self.attn_resolutions), dropout=self.dropout,
                    num_classes=self.num_classes, **self.param_config())

    def param_config(self):
        """The parameterisation as plain types: ``{"param": "eps"}`` or with the B14 statistics."""
        if self.param == "eps":
            return {"param": "eps"}
        return {"param": self.param, "data_mean": self.data_mean.tolist(), "data_std": self.data_std.tolist()}

    @property
    def dtype(self):
        """The dtype the network body runs in (float16 after :meth:`convert_to_fp16`)."""
        return self.conv_in.weight.dtype

    def convert_to_fp16(self):
        """Turn conv/linear/embedding weights into float16 in place (GroupNorm stays float32)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding)):
                m.half()
        return self

    def forward(self, z, t, labels=None):
        """The network output (read per ``param``), float32 ``[B, C, H, W]``."""
        dtype = self.dtype
        temb = self.temb(timestep_embedding(t, self.ch).to(dtype))   # sinusoids from float32 t
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
            temb = temb + self.label_emb(labels.long())
        elif labels is not None:
            raise ValueError("labels given to an unconditional UNet (num_classes = 0)")

        h = self.conv_in(z.to(dtype))
        hs = [h]
        for m in self.down:
            if isinstance(m, ResBlock):
                h = m(h, temb)
            else:
                h = m(h)
            if not isinstance(m, AttnBlock):
                hs.append(h)
            else:
                hs[-1] = h
        for m in self.mid:
            h = m(h, temb) if isinstance(m, ResBlock) else m(h)
        for m in self.up:
            if isinstance(m, ResBlock):
                h = m(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = m(h)
        return self.conv_out(F.silu(self.norm_out(h))).float()
