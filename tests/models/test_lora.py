"""LoRALinear and inject/merge on a tiny module tree with Hugging Face Llama names (no transformers needed)."""

import math

import pytest
import torch
from torch import nn

from gentool.models.lora import (
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    base_state_dict,
    count_trainable,
    inject_lora,
    merge_lora,
    pattern_key,
    rank_alpha,
)


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        return self.o_proj(torch.tanh(self.q_proj(x)) * self.k_proj(x) + self.v_proj(x))


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = Attn(d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + self.self_attn(self.norm(x))


class Inner(nn.Module):
    def __init__(self, v, d, n):
        super().__init__()
        self.embed_tokens = nn.Embedding(v, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(n))


class Tiny(nn.Module):
    def __init__(self, v=32, d=16, n=2):
        super().__init__()
        self.model = Inner(v, d, n)
        self.lm_head = nn.Linear(d, v, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


def randomize_adapters(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))


def test_step_zero_is_the_base_and_only_adapters_train():
    model = Tiny()
    ids = torch.randint(0, 32, (2, 5))
    want = model(ids)
    names = inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert torch.equal(model(ids), want)  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    model(ids).sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert count_trainable(model)[0] == 4 * (2 * 16 + 16 * 2)


def test_forward_formula_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(8, 6, bias=True)
    layer = LoRALinear(base, r=3, alpha=5, rslora=True)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 8)
    s = 5 / math.sqrt(3)
    want = x @ base.weight.T + base.bias + s * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), want)
    model = nn.Sequential(layer)
    got = merge_lora(model)[0]
    assert isinstance(got, nn.Linear) and not isinstance(got, LoRALinear)
    torch.testing.assert_close(got(x), want)


def test_dora_forward_equals_its_merged_weight():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6, bias=False), r=2, alpha=4, dora=True)
    x = torch.randn(3, 8)
    base_out = layer.base_layer(x)
    torch.testing.assert_close(layer(x), base_out)  # m = ‖W‖ and B = 0: the base
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.rand(6) + 0.5)
    w = layer.base_layer.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    w = layer.lora_magnitude_vector[:, None] * w / w.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.merged_weight(), w, rtol=1e-5, atol=1e-6)


def test_patterns_follow_peft():
    cfg = LoRAConfig(r=8, alpha=16, rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 4},
                     alpha_pattern={r"layers\.[01]\.self_attn\.k_proj": 3})
    assert rank_alpha(cfg, "model.layers.1.self_attn.q_proj") == (2, 16)
    assert rank_alpha(cfg, "model.layers.11.self_attn.q_proj") == (8, 16)  # suffix match at a dot only
    assert rank_alpha(cfg, "model.layers.0.self_attn.v_proj") == (4, 16)
    assert rank_alpha(cfg, "model.layers.0.self_attn.k_proj") == (8, 3)
    assert pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None


def test_all_linear_skips_head_and_modules_to_save_untie():
    model = Tiny()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied
    head_before = model.lm_head.weight.detach().clone()
    cfg = LoRAConfig(r=2, alpha=2, target_modules="all-linear", modules_to_save=["lm_head"], dropout=0.1)
    names = inject_lora(model, cfg)
    assert len(names) == 8 and not any("lm_head" in n for n in names)
    assert model.lm_head.weight is not model.model.embed_tokens.weight and model.lm_head.weight.requires_grad
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert torch.equal(model.model.embed_tokens.weight, head_before)  # the base stays intact
    sd = adapter_state_dict(model, cfg)
    assert "lm_head.weight" in sd and "model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    base = base_state_dict(model)
    assert "model.layers.0.self_attn.q_proj.weight" in base and not any("lora" in k for k in base)


def test_merge_lora_restores_plain_names_and_outputs():
    model = Tiny()
    cfg = LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"], rank_pattern={"o_proj": 1})
    inject_lora(model, cfg)
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 32, (2, 5))
    want = model(ids)
    merge_lora(model)
    assert set(model.state_dict()) == set(Tiny().state_dict())
    torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-6)


def test_bad_targets_are_named():
    with pytest.raises(ValueError, match="match no linear layer"):
        inject_lora(Tiny(), LoRAConfig(target_modules=["qkv"]))
    with pytest.raises(ValueError, match="not a linear layer"):
        inject_lora(Tiny(), LoRAConfig(target_modules=["q_proj", "norm"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        inject_lora(Tiny(), LoRAConfig(target_modules=["q_proj"], modules_to_save=["score"]))
