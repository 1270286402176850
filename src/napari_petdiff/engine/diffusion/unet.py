"""Time-conditioned 2-D UNet (a small member of the guided-diffusion family, methods.md 2.2).

Any H, W divisible by 2**(levels-1) works, so the same weights run on 128x128 axial and
64x128 coronal/sagittal slices. ``attention_resolutions`` are feature-map sizes for an input of
``image_size`` (e.g. (16,) -> self-attention at the 16x16 level of a 128x128 model); the layers
are fixed at construction, so other input sizes get attention at the same level.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if ch % g == 0:
            return g
    return 1


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(temb, 2 * cout)  # scale-shift norm (guided-diffusion)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity: stable early training
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, ch: int, head_channels: int = 32):
        super().__init__()
        self.heads = max(1, ch // head_channels)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, cond_channels: int = 0, out_channels: int = 1,
                 base_channels: int = 32, channel_mult=(1, 2, 2, 4), num_res_blocks: int = 1,
                 attention_resolutions=(16,), dropout: float = 0.0, image_size: int = 128):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1 or base_channels < 1 or num_res_blocks < 1:
            raise ValueError("UNet needs base_channels >= 1, num_res_blocks >= 1 and positive channel_mult entries")
        self.config = dict(in_channels=int(in_channels), cond_channels=int(cond_channels),
                           out_channels=int(out_channels), base_channels=int(base_channels),
                           channel_mult=list(channel_mult), num_res_blocks=int(num_res_blocks),
                           attention_resolutions=[int(a) for a in attention_resolutions],
                           dropout=float(dropout), image_size=int(image_size))
        self.in_channels, self.cond_channels = int(in_channels), int(cond_channels)
        self.levels = len(channel_mult)
        base = int(base_channels)
        temb = 4 * base
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.inp = nn.Conv2d(self.in_channels + self.cond_channels, base, 3, padding=1)
        attn_levels = {lvl for lvl in range(self.levels) if image_size // (2 ** lvl) in set(attention_resolutions)}
        self.attn_levels = sorted(attn_levels)

        # Classic UNet layout (one skip per level, nearest upsampling): about half the parameters
        # and full-resolution convolutions of the guided-diffusion layout, which matters on CPU.
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_ch = []
        ch = base
        for lvl, m in enumerate(channel_mult):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, base * m, temb, dropout))
                ch = base * m
                if lvl in attn_levels:
                    blocks.append(AttnBlock(ch))
            self.down.append(blocks)
            skip_ch.append(ch)
            if lvl != self.levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, dropout), AttnBlock(ch)])

        self.up = nn.ModuleList()
        for lvl, m in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            cin = ch + skip_ch[lvl]
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, base * m, temb, dropout))
                ch = cin = base * m
                if lvl in attn_levels:
                    blocks.append(AttnBlock(ch))
            self.up.append(blocks)

        self.out_norm = nn.GroupNorm(_groups(ch), ch)
        self.out = nn.Conv2d(ch, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def multiple(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, x: torch.Tensor, t, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects (B, {self.in_channels}, H, W) input; got shape {tuple(x.shape)}")
        h_, w_ = x.shape[-2:]
        if h_ % self.multiple or w_ % self.multiple:
            raise ValueError(
                f"UNet with {self.levels} levels needs H and W divisible by {self.multiple}; got {h_}x{w_}. "
                "Pad the image (zero background) to a multiple first."
            )
        if self.cond_channels:
            if cond is None:
                cond = torch.zeros((x.shape[0], self.cond_channels, h_, w_), device=x.device, dtype=x.dtype)
            if cond.shape[1] != self.cond_channels or cond.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"cond must have shape (B, {self.cond_channels}, {h_}, {w_}); got {tuple(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        elif cond is not None:
            raise ValueError("this UNet was built with cond_channels=0; it takes no conditioning image")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.base))
        h = self.inp(x)
        skips = []
        for lvl, blocks in enumerate(self.down):
            h = _run(blocks, h, emb)
            skips.append(h)
            if lvl != self.levels - 1:
                h = self.downsample[lvl](h)
        h = _run(self.mid, h, emb)
        for i, blocks in enumerate(self.up):
            if i:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = _run(blocks, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(F.silu(self.out_norm(h)))


def _run(blocks, h, emb):
    for layer in blocks:
        h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
