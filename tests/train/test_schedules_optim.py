import itertools

import pytest
import torch

from gentool.train import lr_at
from gentool.train.optim import build_optimizer


def _curve(**kw):
    return [lr_at(s, total=100, lr=1.0, **kw) for s in range(100)]


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    c = _curve(warmup=10, min_ratio=0.1)
    assert c[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert c[10] == pytest.approx(1.0) and c[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(c[10:]))                 # monotone decay after warmup
    assert c[55] == pytest.approx(0.55, abs=0.01)                         # halfway: midpoint of lr and floor


def test_constant_and_warmup_stable_decay():
    assert _curve(warmup=0, schedule="constant") == [1.0] * 100
    w = _curve(warmup=5, schedule="wsd", min_ratio=0.0)
    assert w[5:80] == [1.0] * 75                                          # stable until the last 20%
    assert w[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(w[80:]))   # linear decay to the floor
    assert w[90] - w[91] == pytest.approx(w[80] - w[81])
    with pytest.raises(ValueError):
        lr_at(0, total=10, lr=1.0, warmup=0, schedule="step")


def test_weight_decay_groups_frozen_and_tied_parameters():
    emb = torch.nn.Embedding(10, 4)
    m = torch.nn.ModuleDict({"emb": emb, "lin": torch.nn.Linear(4, 4), "norm": torch.nn.LayerNorm(4),
                             "head": torch.nn.Linear(4, 10, bias=False), "frozen": torch.nn.Linear(4, 4)})
    m["head"].weight = emb.weight                                         # tied: one parameter
    m["frozen"].requires_grad_(False)                                     # LoRA's base: no optimizer state
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(p.shape for p in decay["params"]) == [torch.Size([4, 4]), torch.Size([10, 4])]
    assert len(no_decay["params"]) == 3                                   # linear bias, norm weight and bias
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not ids & {id(p) for p in m["frozen"].parameters()}
    assert not opt.defaults.get("fused")                                  # fused kernels only on CUDA
