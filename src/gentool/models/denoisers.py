"""Denoisers for diffusion and flow matching: an MLP with a time embedding (vectors, or flattened small images) and
a small U-Net (Ho et al. 2020 / Nichol & Dhariwal 2021 style: residual blocks, GroupNorm, sinusoidal time embedding,
self-attention at low resolution). Both take (x, t, y): t in [0, 1] (B,), y class ids (B,) or None; with classes,
id `num_classes` is the learned null class for classifier-free guidance.

Legend: B batch, C channels, H/W height/width, D vector size, E embedding width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DenoiserConfig:
    kind: str                                   # mlp | unet
    data_shape: list[int]                       # [D] or [C, H, W]
    width: int = 128                            # MLP hidden width / U-Net base channels
    depth: int = 3                              # MLP residual blocks / U-Net res blocks per level
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])
    attn_max_res: int = 8                       # self-attention at resolutions <= this (U-Net)
    heads: int = 4
    groups: int = 8
    dropout: float = 0.0
    num_classes: int = 0

    def to_dict(self) -> dict:
        return {"architecture": "gentool-denoiser", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DenoiserConfig:
        return cls(**{k: v for k, v in d.items() if k != "architecture"})


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t * 1000 (the DDPM timestep scale): (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Conditioning(nn.Module):
    """Time (and class) embedding: sinusoid -> MLP, plus a class embedding with a null id."""

    def __init__(self, base: int, dim: int, num_classes: int):
        super().__init__()
        self.base = base
        self.time_mlp = nn.Sequential(nn.Linear(base, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_classes = num_classes
        self.class_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None

    def forward(self, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.base).to(self.time_mlp[0].weight.dtype))   # (B, E)
        if self.class_emb is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            emb = emb + self.class_emb(y)
        return emb


class MLPDenoiser(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        d, w = math.prod(cfg.data_shape), cfg.width
        self.cond = Conditioning(w, w, cfg.num_classes)
        self.inp = nn.Linear(d, w)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 2 * w), nn.SiLU(), nn.Linear(2 * w, w))
                                    for _ in range(cfg.depth))
        self.emb_proj = nn.ModuleList(nn.Linear(w, w) for _ in range(cfg.depth))
        self.out = nn.Linear(w, d)   # no norm before it: the output must scale with |x| (eps ~ x at high noise)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = F.silu(self.cond(t, y))                       # (B, E)
        h = self.inp(x.flatten(1))                          # (B, W)
        for block, proj in zip(self.blocks, self.emb_proj):
            h = h + block(h + proj(emb))
        return self.out(h).view_as(x)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.norm2, self.conv2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                           # (B, Cout, H, W)
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))      # (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)                    # (B, heads, HW, C/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, cfg: DenoiserConfig):
        super().__init__()
        self.cfg = cfg
        cin, size = cfg.data_shape[0], cfg.data_shape[1]
        ch, emb, g, p = cfg.width, 4 * cfg.width, cfg.groups, cfg.dropout
        self.cond = Conditioning(ch, emb, cfg.num_classes)
        self.conv_in = nn.Conv2d(cin, ch, 3, padding=1)
        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.depth):
                self.down.append(nn.ModuleList([ResBlock(cur, ch * mult, emb, g, p)]))
                cur = ch * mult
                if res <= cfg.attn_max_res:
                    self.down[-1].append(SelfAttention(cur, cfg.heads, g))
                skips.append(cur)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(cur, cur, 3, stride=2, padding=1)]))
                skips.append(cur)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb, g, p), SelfAttention(cur, cfg.heads, g),
                                  ResBlock(cur, cur, emb, g, p)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for k in range(cfg.depth + 1):
                self.up.append(nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb, g, p)]))
                cur = ch * mult
                if res <= cfg.attn_max_res:
                    self.up[-1].append(SelfAttention(cur, cfg.heads, g))
                if level > 0 and k == cfg.depth:
                    self.up[-1].append(nn.Upsample(scale_factor=2, mode="nearest"))
                    self.up[-1].append(nn.Conv2d(cur, cur, 3, padding=1))
                    res *= 2
        self.out = nn.Sequential(_norm(cur, g), nn.SiLU(), nn.Conv2d(cur, cin, 3, padding=1))
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    @staticmethod
    def _run(layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.cond(t, y)                                            # (B, E)
        h = self.conv_in(x)                                              # (B, ch, H, W)
        hs = [h]
        for layers in self.down:
            h = self._run(layers, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for layers in self.up:
            h = self._run(layers, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


def build_denoiser(cfg: DenoiserConfig) -> nn.Module:
    if cfg.kind == "mlp":
        return MLPDenoiser(cfg)
    if cfg.kind == "unet":
        if len(cfg.data_shape) != 3:
            raise ValueError("the U-Net needs image data (C, H, W)")
        h, w = cfg.data_shape[1:]
        f = 2 ** (len(cfg.channel_mult) - 1)
        if h != w or h % f:
            raise ValueError(f"the U-Net needs square images with a side divisible by {f}, not {h}x{w}")
        return UNet(cfg)
    raise ValueError(f"unknown denoiser kind {cfg.kind!r} (mlp or unet)")
