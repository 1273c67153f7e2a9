"""Muon against independent references: torch.optim.Muon and torch.optim.AdamW on identical parameters and
gradients, the SVD polar factor, and the loop's bit-exact resume with Muon state."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gentool.errors import GentoolError, UsageProblem
from gentool.train import TrainConfig, train
from gentool.train.checkpoint import latest_state
from gentool.train.metrics import read_metrics
from gentool.train.muon import MuonAdamW, normuon, orthogonalize
from gentool.train.optim import build_optimizer, muon_split

_spec = importlib.util.spec_from_file_location("_toy", Path(__file__).with_name("_toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ((24, 16), (16, 40), (10, 16), (16,))]


@pytest.mark.parametrize("nesterov", [True, False])
def test_matches_torch_muon_and_adamw(nesterov):
    ours, ref = _params(), _params()
    opt = MuonAdamW([{"params": ours[:2], "muon": True, "weight_decay": 0.05},
                     {"params": ours[2:], "weight_decay": 0.1}], lr=1e-2, momentum=0.9, nesterov=nesterov)
    # torch orthogonalises in bfloat16; ours in float32 on CPU: the same iteration, different rounding
    ref_muon = torch.optim.Muon(ref[:2], lr=1e-2, momentum=0.9, nesterov=nesterov, weight_decay=0.05)
    ref_adam = torch.optim.AdamW(ref[2:], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_muon.step()
        ref_adam.step()
    for p, q in zip(ours[2:], ref[2:]):
        assert torch.equal(p, q)                           # AdamW groups: torch's own arithmetic
    for p, q, p0 in zip(ours[:2], ref[:2], _params()[:2]):
        moved = (q - p0).abs().max()
        assert (p - q).abs().max() < 0.03 * moved, (p - q).abs().max() / moved


@pytest.mark.parametrize("method", ["newton-schulz", "polar-express"])
@pytest.mark.parametrize("shape", [(32, 48), (48, 32)])
def test_orthogonalize_approximates_the_polar_factor(method, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    o = orthogonalize(g, method=method, dtype=torch.float64)
    core = u.mT @ o @ vh.mT                                  # diagonal: same singular vectors as g
    assert (core - torch.diag(torch.diagonal(core))).abs().max() < 1e-8
    sv = torch.diagonal(core)
    lo = 0.65 if method == "newton-schulz" else 0.8          # Keller's quintic oscillates more widely
    assert sv.min() > lo and sv.max() < 1.2, (sv.min(), sv.max())
    more = orthogonalize(g, method="polar-express", steps=12, dtype=torch.float64)
    torch.testing.assert_close(more, u @ vh, atol=2e-2, rtol=0)   # iterating on converges to U·Vᵀ
    with pytest.raises(ValueError):
        orthogonalize(torch.randn(2, 3, 4))


def test_normuon_equalises_rows_and_keeps_the_norm():
    o = torch.randn(8, 4) * torch.arange(1, 9).float()[:, None]   # rows of very different scale
    second = torch.zeros(8, 1)
    out = normuon(o, second, beta2=0.0)                           # beta2 = 0: the current mean squares
    rms = out.square().mean(dim=1)
    assert torch.allclose(rms, rms.mean().expand(8), rtol=1e-4)
    assert torch.allclose(out.norm(), o.norm(), rtol=1e-5)
    assert torch.allclose(second[:, 0], o.square().mean(dim=1))


def test_split_puts_embeddings_heads_norms_biases_on_adamw():
    model = toy.toy_model(0)                                      # embed tied to head, norm, mix (Linear + bias)
    muon, rest = muon_split(model)
    assert [tuple(p.shape) for p in muon] == [(8, 8)]             # only mix.weight
    assert {id(p) for p in rest} == {id(model.embed.weight), id(model.norm.weight), id(model.norm.bias),
                                     id(model.mix.bias)}
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon", muon_lr=0.02)
    g = opt.param_groups[0]
    assert g["muon"] and g["lr_scale"] == pytest.approx(20) and g["weight_decay"] == pytest.approx(0.1 / 20)
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(4, 4))
    with pytest.raises(UsageProblem, match=r"0\.weight of shape \(2, 1, 3, 3\)"):
        muon_split(conv)
    with pytest.raises(UsageProblem, match="no hidden matrix"):
        muon_split(torch.nn.Embedding(4, 4))


def test_lora_adapters_are_muon_matrices():
    from gentool.config import config_from_preset
    from gentool.models.lora import LoRAConfig, inject_lora
    from gentool.models.transformer import Transformer

    model = Transformer(config_from_preset("tiny", vocab_size=64))
    model.requires_grad_(False)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    muon, rest = muon_split(model)
    assert len(muon) == 2 * 2 * 2 and not rest                    # 2 layers x 2 targets x (A, B)
    assert {tuple(p.shape) for p in muon} == {(2, 32), (32, 2), (16, 2)}


def _run(workdir, *, resume=False, task_kw=None, **cfg):
    model = toy.toy_model(0, dropout=0.2)
    cfg = {"steps": 16, "grad_accum": 2, "lr": 1e-2, "warmup": 2, "log_every": 1, "eval_every": 4, "save_every": 4,
           "optimizer": "normuon", "muon_lr": 0.05, **cfg}
    train(model, toy.ToyTask(**(task_kw or {})), TrainConfig(**cfg), workdir, resume=resume)
    return model


@pytest.mark.parametrize("optimizer", ["muon", "normuon"])
def test_muon_run_learns_and_resumes_bit_identically(tmp_path, optimizer):
    a = _run(tmp_path / "a", optimizer=optimizer)
    with pytest.raises(GentoolError):
        _run(tmp_path / "b", optimizer=optimizer, task_kw={"interrupt_at": 6})
    assert latest_state(tmp_path / "b" / "state").name == "step-00000007"
    b = _run(tmp_path / "b", resume=True, optimizer=optimizer)
    la, lb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["loss"] for m in la] == [m["loss"] for m in lb] and la[-1]["loss"] < la[0]["loss"]
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    from safetensors.torch import load_file

    state = load_file(str(latest_state(tmp_path / "b" / "state") / "optimizer.safetensors"))
    assert "0.momentum_buffer" in state and ("0.second_moment" in state) == (optimizer == "normuon")
    assert "1.exp_avg" in state
    assert la[0]["lr"] == pytest.approx(1e-2 / 2)                 # the logged lr is AdamW's


def test_muon_recipe_must_match_on_resume(tmp_path):
    with pytest.raises(GentoolError):
        _run(tmp_path, task_kw={"interrupt_at": 3})
    with pytest.raises(UsageProblem, match="different configuration"):
        _run(tmp_path, resume=True, muon_lr=0.01)
    with pytest.raises(UsageProblem, match="different configuration"):
        _run(tmp_path, resume=True, optimizer="adamw")


def _tiny_lm(tie: bool):
    from gentool.config import config_from_preset
    from gentool.models.transformer import Transformer

    model = Transformer(config_from_preset("tiny", vocab_size=64, tie_word_embeddings=tie))
    model.init_weights(0)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_muon_groups_take_the_embedding_and_head_rates(tie):
    """The embeddings and the head train at their own AdamW rates under Muon (at --lr, 1e-3, they held Muon runs
    back); norms at --lr; every matrix still shrinks by lr x weight_decay per step."""
    from gentool.train.optim import EMBED_LR, HEAD_LR

    model = _tiny_lm(tie)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon")
    muon, embed, head, other = opt.param_groups
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, EMBED_LR, HEAD_LR, 1e-3])
    assert EMBED_LR > 1e-3 and HEAD_LR > 1e-3
    assert [p is model.model.embed_tokens.weight for p in embed["params"]] == [True]
    assert [p is model.lm_head.weight for p in head["params"]] == ([] if tie else [True])
    assert all(p.ndim == 1 for p in other["params"]) and other["weight_decay"] == 0
    assert len(muon["params"]) == 2 * 7                                     # q k v o gate up down per layer
    for g in (muon, embed, head):
        assert g["lr_scale"] == pytest.approx(g["lr"] / 1e-3)              # the loop: schedule x lr_scale
        assert g["lr"] * g["weight_decay"] == pytest.approx(1e-3 * 0.1)
    n = sum(len(g["params"]) for g in opt.param_groups)
    assert n == len({id(p) for p in model.parameters()})                   # every parameter in one group
    opt = build_optimizer(model, lr=2e-3, weight_decay=0.1, optimizer="normuon", embed_lr=0.05, head_lr=4e-3)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.05, 4e-3, 2e-3])
    for flag, kw in (("--embed-lr", {"embed_lr": 0.0}), ("--head-lr", {"head_lr": -1.0})):
        with pytest.raises(UsageProblem, match=flag):
            build_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon", **kw)


def test_muon_defaults_are_in_the_recipe_and_validated():
    from gentool.train.optim import EMBED_LR, HEAD_LR

    r = TrainConfig(steps=2, optimizer="muon").recipe()
    assert r["embed_lr"] == EMBED_LR and r["head_lr"] == HEAD_LR           # resolved: a resume checks them
    assert TrainConfig(steps=2, optimizer="muon", head_lr=0.01).recipe()["head_lr"] == 0.01
    assert "embed_lr" not in TrainConfig(steps=2).recipe()                  # adamw: unchanged recipe
    with pytest.raises(UsageProblem, match="--embed-lr"):
        TrainConfig(steps=2, optimizer="muon", embed_lr=0.0)


def test_tiny_lm_learns_with_the_muon_defaults():
    import torch.nn.functional as F

    model = _tiny_lm(False)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, optimizer="muon")
    x = torch.arange(33).remainder(7).repeat(4, 1)                          # a period-7 sequence
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
