"""Sample quality without a downloaded network: sliced Wasserstein-2 distance and kernel MMD between samples and
held-out data, on raw values (2-D points, pixels) and, for 8x8 digits, on the hidden features of a small classifier
that gentool trains on the bundled digits and ships (`python -m gentool.diffusion.metrics --train-classifier`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

CLASSIFIER = Path(__file__).resolve().parent.parent / "data" / "bundled" / "digits" / "classifier.safetensors"


def _quantiles(v: torch.Tensor, n: int) -> torch.Tensor:
    """(K, N) values -> (K, n) empirical quantiles at the midpoints (k + 0.5) / n, by linear interpolation."""
    v = v.sort(dim=1).values
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n * v.shape[1] - 0.5
    lo = pos.floor().clamp(0, v.shape[1] - 1).long()
    hi = (lo + 1).clamp(max=v.shape[1] - 1)
    w = (pos - lo.double()).clamp(0, 1).to(v.dtype)
    return v[:, lo] * (1 - w) + v[:, hi] * w


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, projections: int = 256, seed: int = 0) -> float:
    """SW_2 between two point sets (N, ...) and (M, ...): sqrt of the mean over random unit directions of the
    squared 1-D Wasserstein-2 distance (sorted-sample quantile matching; sizes may differ)."""
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    n = max(a.shape[0], b.shape[0])
    qa, qb = _quantiles((a @ dirs).T, n), _quantiles((b @ dirs).T, n)
    return float(((qa - qb) ** 2).mean().sqrt())


def mmd(a: torch.Tensor, b: torch.Tensor, *, max_points: int = 2000, seed: int = 0) -> float:
    """Unbiased MMD^2 with a sum of Gaussian kernels at 0.5, 1 and 2 times the median pairwise distance."""
    g = torch.Generator().manual_seed(seed)
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    a = a[torch.randperm(a.shape[0], generator=g)[:max_points]]
    b = b[torch.randperm(b.shape[0], generator=g)[:max_points]]
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    med = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=torch.float64)
    k = sum(torch.exp(-d2 / (2 * s * s * med)) for s in (0.5, 1.0, 2.0))
    n, m = a.shape[0], b.shape[0]
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kaa.sum() - kaa.trace()) / (n * (n - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1))
                 - 2 * kab.mean())


class DigitsClassifier(nn.Module):
    """64 pixels in [-1, 1] -> 64 hidden features -> 10 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: Path = CLASSIFIER) -> DigitsClassifier:
    from safetensors.torch import load_file

    clf = DigitsClassifier()
    clf.load_state_dict(load_file(str(path)))
    return clf.eval()


def train_classifier(epochs: int = 300, seed: int = 0) -> tuple[DigitsClassifier, float]:
    """Full-batch Adam on the digits' training split; returns the model and its held-out accuracy."""
    from gentool.data.arrays import train_val

    torch.manual_seed(seed)
    train, val = train_val("builtin:digits", val_fraction=0.2)
    clf = DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        # light augmentation (pixel noise) so features of slightly-off samples stay meaningful
        x = train.x + 0.1 * torch.randn_like(train.x)
        loss = nn.functional.cross_entropy(clf(x), train.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(val.x).argmax(1) == val.y).float().mean())
    return clf, acc


@torch.no_grad()
def score_samples(samples: torch.Tensor, reference: torch.Tensor, *, seed: int = 0) -> dict[str, float]:
    """Scores of samples against held-out data (both in data units: images in [-1, 1])."""
    out = {"sw": sliced_wasserstein(samples, reference, seed=seed), "mmd": mmd(samples, reference, seed=seed)}
    if list(samples.shape[1:]) == [1, 8, 8] and CLASSIFIER.is_file():
        clf = load_classifier()
        fa, fb = clf.features(samples.float().cpu().clamp(-1, 1)), clf.features(reference.float().cpu())
        out["sw_features"] = sliced_wasserstein(fa, fb, seed=seed)
        out["mmd_features"] = mmd(fa, fb, seed=seed)
        probs = clf.head(fa).softmax(-1)
        out["classifier_confidence"] = float(probs.max(-1).values.mean())
        marginal = probs.mean(0)
        out["class_entropy_bits"] = float(-(marginal * marginal.clamp_min(1e-12).log2()).sum())
    return out


if __name__ == "__main__":
    import sys

    if "--train-classifier" not in sys.argv:
        sys.exit("usage: python -m gentool.diffusion.metrics --train-classifier")
    from safetensors.torch import save_file

    model, accuracy = train_classifier()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(CLASSIFIER),
              metadata={"val_accuracy": f"{accuracy:.4f}"})
    print(f"wrote {CLASSIFIER} (held-out accuracy {accuracy:.3f}, log2(10) = {math.log2(10):.3f} bits max entropy)")
