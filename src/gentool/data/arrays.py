"""Array datasets for diffusion: image folders (Pillow), .npy/.npz/safetensors arrays with optional labels, and
built-ins that need no download (2-D toys generated from a seed; the 8x8 digits shipped as package data).

Images become float32 in [-1, 1] (C, H, W); 8-bit sources keep `levels = 256` so the ELBO can use the discretised
decoder. Vectors stay in data units here (the trainer standardises them and records the statistics).
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gentool.errors import UsageProblem

BUNDLED = Path(__file__).parent / "bundled"
TOYS = ("moons", "8gaussians", "checkerboard", "swissroll")
BUILTINS = (*TOYS, "digits")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
X_KEYS, Y_KEYS = ("x", "images", "data", "samples"), ("y", "labels")


@dataclass
class ArrayDataset:
    x: torch.Tensor                          # (N, D) vectors or (N, C, H, W) images in [-1, 1]
    y: torch.Tensor | None = None            # (N,) int64 class ids
    classes: list[str] | None = None
    kind: str = "vector"                     # vector | image
    levels: int | None = None                # 256 for 8-bit images (discrete likelihood); None: continuous
    name: str = ""
    source: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> list[int]:
        return list(self.x.shape[1:])

    def subset(self, idx: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.x[idx], None if self.y is None else self.y[idx], self.classes, self.kind,
                            self.levels, self.name, self.source)


def toy_2d(name: str, n: int, seed: int) -> np.ndarray:
    """The usual 2-D benchmarks (FFJORD / scikit-learn definitions), (n, 2) float32."""
    rng = np.random.default_rng(seed)
    if name == "moons":
        k = n // 2
        a, b = rng.uniform(0, math.pi, k), rng.uniform(0, math.pi, n - k)
        x = np.concatenate([np.stack([np.cos(a), np.sin(a)], 1), np.stack([1 - np.cos(b), 0.5 - np.sin(b)], 1)])
        x = x + rng.normal(0, 0.05, x.shape)
    elif name == "8gaussians":
        ang = rng.integers(0, 8, n) * math.pi / 4
        x = (4 * np.stack([np.cos(ang), np.sin(ang)], 1) + rng.normal(0, 0.5, (n, 2))) / 1.414
    elif name == "checkerboard":
        x1 = rng.uniform(0, 1, n) * 4 - 2
        x2 = rng.uniform(0, 1, n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
        x = np.stack([x1, x2], 1) * 2
    elif name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
        x = np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5 + rng.normal(0, 0.1, (n, 2))
    else:
        raise ValueError(name)
    return rng.permutation(x).astype(np.float32)


def load_digits() -> ArrayDataset:
    with gzip.open(BUNDLED / "digits" / "digits.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pix = np.rint(table[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    return ArrayDataset(_from_uint8(pix), torch.from_numpy(table[:, 64]), [str(i) for i in range(10)], "image", 256,
                        "digits", {"role": "data", "path": "builtin:digits"})


def _from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 0..255."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _images_from_array(a: np.ndarray, path: Path) -> tuple[torch.Tensor, int | None]:
    if a.ndim == 3:
        a = a[:, None]
    if a.shape[-1] in (1, 3, 4) and a.shape[1] not in (1, 3, 4):  # NHWC -> NCHW
        a = a.transpose(0, 3, 1, 2)
    if a.dtype == np.uint8:
        return _from_uint8(np.ascontiguousarray(a)), 256
    a = a.astype(np.float32)
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise UsageProblem("float image arrays must hold values in [0, 1]", path=path,
                           hint="store uint8 0..255 or scale the floats to [0, 1]")
    return torch.from_numpy(a * 2 - 1), None


def load_array_file(path: Path) -> ArrayDataset:
    try:
        if path.suffix == ".npy":
            arrays = {"x": np.load(path, allow_pickle=False)}
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            from safetensors.numpy import load_file

            arrays = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - numpy/safetensors raise many kinds on corrupt files
        raise UsageProblem(f"cannot read the array file ({type(e).__name__}: {e})", path=path,
                           hint="pass a .npy, .npz or .safetensors file") from None
    xk = next((k for k in X_KEYS if k in arrays), None if len(arrays) != 1 else next(iter(arrays)))
    if xk is None:
        raise UsageProblem(f"no data array (keys {sorted(arrays)})", path=path, hint=f"name it one of {X_KEYS}")
    a = arrays[xk]
    yk = next((k for k in Y_KEYS if k in arrays), None)
    y = None
    if yk is not None:
        y = arrays[yk]
        if y.ndim != 1 or len(y) != len(a) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
            raise UsageProblem(f"labels '{yk}' must be non-negative integers, one per example", path=path)
        y = torch.from_numpy(y.astype(np.int64))
    classes = [str(i) for i in range(int(y.max()) + 1)] if y is not None else None
    if a.ndim == 2:
        x = torch.from_numpy(a.astype(np.float32))
        if not torch.isfinite(x).all():
            raise UsageProblem("the array holds NaN or Inf", path=path)
        return ArrayDataset(x, y, classes, "vector", None, path.stem)
    if a.ndim in (3, 4):
        x, levels = _images_from_array(a, path)
        return ArrayDataset(x, y, classes, "image", levels, path.stem)
    raise UsageProblem(f"expected N x D vectors or N x C x H x W images, got shape {list(a.shape)}", path=path)


def load_image_folder(root: Path, image_size: int | None) -> ArrayDataset:
    from PIL import Image

    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UsageProblem("no images (png, jpg, bmp, gif, webp) in this folder", path=root)
    dirs = {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) == 2}
    labelled = len(dirs) >= 2 and all(len(p.relative_to(root).parts) == 2 for p in files)
    classes = sorted(dirs) if labelled else None
    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except Exception as e:  # noqa: BLE001 - Pillow raises many kinds on corrupt files
            raise UsageProblem(f"cannot read image ({e})", path=p, hint="remove or fix the file") from None
    gray = all(im.mode in ("1", "L", "LA", "I", "I;16") for im in images)
    out = []
    for p, im in zip(files, images):
        im = im.convert("L" if gray else "RGB")
        if image_size is not None:
            w, h = im.size
            s = image_size / min(w, h)
            im = im.resize((max(image_size, round(w * s)), max(image_size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            left, top = (w - image_size) // 2, (h - image_size) // 2
            im = im.crop((left, top, left + image_size, top + image_size))
        elif im.size != images[0].size:
            raise UsageProblem(f"images differ in size ({im.size} vs {images[0].size})", path=p,
                               hint="pass --image-size to resize and crop them")
        a = np.asarray(im, dtype=np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    y = torch.tensor([classes.index(p.relative_to(root).parts[0]) for p in files]) if classes else None
    return ArrayDataset(_from_uint8(np.stack(out)), y, classes, "image", 256, root.name)


def load_data(spec: str | Path, *, image_size: int | None = None, n: int = 8192, seed: int = 0) -> ArrayDataset:
    """A folder, an array file, or a built-in name (`moons` or `builtin:moons`)."""
    path = Path(spec)
    if path.exists():
        ds = load_image_folder(path, image_size) if path.is_dir() else load_array_file(path)
        if len(ds) < 2:
            raise UsageProblem("need at least 2 examples", path=path)
        from gentool.artifacts import input_ref

        ds.source = input_ref("data", path)
        return ds
    name = str(spec).removeprefix("builtin:")
    if name == "digits":
        return load_digits()
    if name in TOYS:
        return ArrayDataset(torch.from_numpy(toy_2d(name, n, seed)), name=name,
                            source={"role": "data", "path": f"builtin:{name}", "n": n, "seed": seed})
    raise UsageProblem("no such file, folder or built-in dataset", path=spec,
                       hint=f"built-ins: {', '.join('builtin:' + b for b in BUILTINS)}")


def train_val(spec: str | Path, *, image_size: int | None = None, n: int = 8192, seed: int = 0,
              val_fraction: float = 0.1) -> tuple[ArrayDataset, ArrayDataset]:
    """The training set and a held-out set: a fresh draw for generated toys, else a fixed-seed random split."""
    name = str(spec).removeprefix("builtin:")
    if not Path(spec).exists() and name in TOYS:
        train = load_data(spec, n=n, seed=seed)
        val = load_data(spec, n=max(1024, n // 8), seed=seed + 1_000_003)
        return train, val
    ds = load_data(spec, image_size=image_size)
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))  # fixed: same split every run
    k = max(1, round(len(ds) * val_fraction))
    return ds.subset(perm[k:]), ds.subset(perm[:k])
