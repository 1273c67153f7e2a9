"""gentool's LoRA merge and unmerged forward against PEFT on a small random transformers Llama."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gentool.adapters import apply_adapter, check_adapter, merge_tensors, read_adapter, write_adapter
from gentool.models.lora import LoRAConfig, adapter_state_dict, inject_lora

pytestmark = pytest.mark.oracle

CASES = {
    "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "rslora-patterns": {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"],
                            "rank_pattern": {"layers.1.self_attn.q_proj": 2, "up_proj": 3}, "alpha_pattern": {"o_proj": 3}},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "v_proj", "gate_proj"]},
    "all-linear-save-head": {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
}


def tiny_llama(seed=0):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_adapter(tmp_path, case):
    base = tiny_llama()
    lc = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **CASES[case])  # random B: a real delta
    torch.manual_seed(1)
    model = peft.get_peft_model(base, lc).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n or "lora_magnitude_vector" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(tmp_path, case):
    pmodel, path = peft_adapter(tmp_path, case)
    ids = torch.randint(0, 64, (2, 10))
    want_logits = logits(pmodel, ids)
    base_sd = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    ad = read_adapter(path)
    check_adapter(ad, {k: tuple(v.shape) for k, v in base_sd.items()})
    merged = merge_tensors(base_sd, [(ad, 1.0)])
    want = pmodel.merge_and_unload().state_dict()
    assert set(merged) == set(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=0, atol=2e-6, msg=k)
    # unmerged: gentool's LoRA layers on the same transformers model give PEFT's logits
    ours = tiny_llama()
    apply_adapter(ours, ad)
    torch.testing.assert_close(logits(ours, ids), want_logits, rtol=1e-5, atol=1e-5)
    # merged weights give the same logits as base + adapter
    m = tiny_llama()
    m.load_state_dict(merged)
    torch.testing.assert_close(logits(m, ids), want_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["lora", "rslora-patterns", "dora", "all-linear-save-head"])
def test_peft_loads_our_adapter(tmp_path, case):
    c = CASES[case]
    cfg = LoRAConfig(r=c["r"], alpha=c["lora_alpha"], target_modules=c["target_modules"],
                     use_rslora=c.get("use_rslora", False), use_dora=c.get("use_dora", False),
                     rank_pattern=c.get("rank_pattern", {}), alpha_pattern=c.get("alpha_pattern", {}),
                     modules_to_save=c.get("modules_to_save", []))
    ours = tiny_llama()
    inject_lora(ours, cfg)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    out = tmp_path / "ours"
    out.mkdir()
    write_adapter(out, adapter_state_dict(ours, cfg), cfg, base_name="tiny")
    ids = torch.randint(0, 64, (2, 10))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    torch.testing.assert_close(logits(loaded, ids), logits(ours.eval(), ids), rtol=1e-5, atol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
