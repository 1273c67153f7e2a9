import math

import numpy as np
import pytest
import torch

from gentool.data.arrays import BUILTINS, load_array_file, load_data, train_val
from gentool.diffusion.metrics import load_classifier, mmd, sliced_wasserstein


def test_sliced_wasserstein_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6000, 2, generator=g)
    assert sliced_wasserstein(a, a) == pytest.approx(0.0, abs=1e-12)
    # a shift m: W2 along direction u is |m.u|; mean over uniform u in 2-D of (m.u)^2 = |m|^2 / 2
    m = torch.tensor([3.0, 4.0])
    assert sliced_wasserstein(a, a + m, projections=1000) == pytest.approx(5 / math.sqrt(2), rel=0.05)
    # a scale change s: every projection is N(0, s^2), W2 = |s - 1|
    assert sliced_wasserstein(a, 3 * torch.randn(6000, 2, generator=g)) == pytest.approx(2.0, rel=0.05)


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(0)
    same = mmd(torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g))
    diff = mmd(torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g) + 0.5)
    assert abs(same) < 0.01 < diff


def test_shipped_digits_classifier_is_accurate():
    _, val = train_val("builtin:digits", val_fraction=0.2)
    acc = (load_classifier()(val.x).argmax(1) == val.y).float().mean().item()
    assert acc > 0.9


def test_builtins():
    for name in BUILTINS:
        ds = load_data(f"builtin:{name}", n=500)
        assert len(ds) == (1797 if name == "digits" else 500)
        assert ds.shape == ([1, 8, 8] if name == "digits" else [2])
    digits = load_data("digits")
    assert digits.levels == 256 and digits.x.min() == -1 and digits.x.max() == 1 and digits.y.max() == 9
    tr, val = train_val("moons", n=1000)
    assert len(tr) == 1000 and not torch.equal(tr.x[:5], val.x[:5])
    tr2, _ = train_val("builtin:moons", n=1000)
    assert torch.equal(tr.x, tr2.x)


def test_array_files_with_labels(tmp_path):
    from safetensors.numpy import save_file

    imgs = np.random.default_rng(0).integers(0, 256, (6, 5, 5, 3), dtype=np.uint8)  # NHWC
    save_file({"images": imgs, "labels": np.array([0, 1, 2, 0, 1, 2])}, str(tmp_path / "a.safetensors"))
    ds = load_array_file(tmp_path / "a.safetensors")
    assert ds.shape == [3, 5, 5] and ds.classes == ["0", "1", "2"] and ds.levels == 256
    np.savez(tmp_path / "b.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 1, 0, 1]))
    assert load_array_file(tmp_path / "b.npz").y.tolist() == [0, 1, 0, 1]
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 2), np.float32), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="one per example"):
        load_array_file(tmp_path / "c.npz")
