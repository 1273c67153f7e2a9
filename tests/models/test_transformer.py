import json

import pytest
import torch
import torch.nn.functional as F

from gentool.config import LMConfig, PRESETS, config_from_preset
from gentool.errors import GentoolError, UsageProblem
from gentool.models.checkpoint import load_lm, save_lm
from gentool.models.transformer import Transformer


def _model(**kw):
    cfg = config_from_preset("tiny", vocab_size=96, **kw)
    m = Transformer(cfg)
    m.init_weights(0)
    return m.eval(), cfg


@pytest.mark.oracle
@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True, "rope_theta": 5000.0},
                                {"num_key_value_heads": 1}, {"num_key_value_heads": 4, "attention_bias": True},
                                {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}])
def test_logits_equal_transformers_both_ways(tmp_path, kw):
    transformers = pytest.importorskip("transformers")
    model, cfg = _model(**kw)
    if cfg.attention_bias:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    save_lm(model, cfg, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 40))
    with torch.no_grad():
        assert torch.allclose(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    hf.save_pretrained(tmp_path / "hf")  # and the reverse: an HF-written directory loads in gentool
    back = load_lm(tmp_path / "hf")
    assert back.source == "hf"
    with torch.no_grad():
        assert torch.allclose(back.model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_full_forward():
    model, _ = _model()
    ids = torch.randint(0, 96, (3, 24))
    with torch.no_grad():
        full = model(ids)
        model.setup_cache(3, 32)
        steps = [model(ids[:, :7], input_pos=torch.arange(7))]
        for i in range(7, 24):
            steps.append(model(ids[:, i:i + 1], input_pos=torch.tensor([i])))
        model.reset_cache()
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


def test_left_padding_mask_matches_unpadded():
    model, _ = _model()
    ids = torch.randint(4, 96, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.tensor([[False] * 3 + [True] * 10])
    with torch.no_grad():
        ref = model(ids)
        # padded positions shift rotary positions, so pass the true positions of the real tokens
        model.setup_cache(1, 16)
        out = model(padded, input_pos=torch.arange(13), attention_mask=torch.cat([mask, torch.zeros(1, 3, dtype=bool)], 1))
        model.reset_cache()
    assert torch.isfinite(out).all()
    # rotary attention depends only on relative positions, so the real tokens' logits are unchanged
    assert torch.allclose(out[:, 3:], ref, atol=1e-4)


def test_sdpa_equals_naive_attention():
    model, cfg = _model()
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, cfg.hidden_size)
    pos = torch.arange(9).float()[:, None] * model.inv_freq[None]
    emb = torch.cat([pos, pos], -1)
    with torch.no_grad():
        y = attn(x, emb.cos(), emb.sin())
        q = attn.q_proj(x).view(2, 9, 4, 8).transpose(1, 2)
        k = attn.k_proj(x).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
        v = attn.v_proj(x).view(2, 9, 2, 8).transpose(1, 2).repeat_interleave(2, 1)
        from gentool.models.transformer import rotate_half

        q = q * emb.cos() + rotate_half(q) * emb.sin()
        k = k * emb.cos() + rotate_half(k) * emb.sin()
        scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
        scores = scores.masked_fill(~torch.ones(9, 9, dtype=bool).tril(), float("-inf"))
        ref = attn.o_proj((F.softmax(scores, -1) @ v).transpose(1, 2).reshape(2, 9, -1))
    assert torch.allclose(y, ref, atol=1e-5)


def test_bidirectional_variant_sees_the_future():
    cfg = config_from_preset("tiny", vocab_size=32)
    m = Transformer(cfg, causal=False)
    m.init_weights(0)
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 5]])
    with torch.no_grad():
        assert not torch.allclose(m(a)[:, 0], m(b)[:, 0])


def test_param_count_and_flops():
    model, cfg = _model()
    assert cfg.n_params() == sum(p.numel() for p in model.parameters())
    assert cfg.n_params(non_embedding=True) == cfg.n_params() - 2 * 96 * cfg.hidden_size
    assert cfg.train_flops_per_token(64) > 6 * cfg.n_params(non_embedding=True)
    big = config_from_preset("tinyllama-1.1b")
    assert 1.0e9 < big.n_params() < 1.2e9


def test_bad_configs_and_files(tmp_path):
    with pytest.raises(UsageProblem, match="unknown preset 'huge'"):
        config_from_preset("huge")
    with pytest.raises(UsageProblem, match="architecture MistralForCausalLM is not supported"):
        LMConfig.from_hf_dict({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    model, cfg = _model()
    save_lm(model, cfg, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(GentoolError, match="truncated or corrupt"):
        load_lm(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UsageProblem, match="never unpickles"):
        load_lm(tmp_path)
    save_lm(model, cfg, tmp_path)
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(GentoolError, match="missing tensors"):
        load_lm(tmp_path)
    assert set(PRESETS) >= {"tiny", "gpt2-small", "tinyllama-1.1b", "llama2-7b"}
