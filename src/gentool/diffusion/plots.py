"""Pictures of samples with Pillow only: an image grid, or a 2-D scatter plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch


def save_grid(images_u8: torch.Tensor, path: Path, *, nrow: int | None = None, pad: int = 2) -> None:
    """(N, C, H, W) uint8 -> one PNG; small images are upscaled (nearest) to at least 32 px."""
    from PIL import Image

    n, c, h, w = images_u8.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    canvas = torch.full((c, ncol * (h + pad) + pad, nrow * (w + pad) + pad), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, nrow)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images_u8[k]
    arr = canvas.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[..., 0] if c == 1 else arr[..., :3])
    scale = max(1, math.ceil(32 / h))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    im.save(path)


def save_scatter(points: torch.Tensor, path: Path, *, reference: torch.Tensor | None = None, size: int = 512) -> None:
    """(N, 2) points (blue) over optional reference points (light grey) on a square canvas."""
    from PIL import Image, ImageDraw

    pts = points[:, :2].float()
    both = pts if reference is None else torch.cat([pts, reference[:, :2].float()])
    lo, hi = both.quantile(0.001, dim=0), both.quantile(0.999, dim=0)
    span = float((hi - lo).max()) * 1.1 or 1.0
    center = (lo + hi) / 2
    im = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(im)

    def plot(p: torch.Tensor, color: tuple[int, int, int]) -> None:
        xy = ((p - center) / span + 0.5) * size
        for x, y in xy.tolist():
            draw.ellipse((x - 1.5, size - y - 1.5, x + 1.5, size - y + 1.5), fill=color)

    if reference is not None:
        plot(reference[:, :2].float(), (200, 200, 200))
    plot(pts, (31, 119, 180))
    im.save(path)
