import json

import pytest
import torch
import torch.nn.functional as F

from gentool.config import PRESETS, LMConfig, config_from_preset
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


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_kv_cache_decoding_equals_full_forward(kv_heads):
    model, _ = _model(num_key_value_heads=kv_heads)
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


def test_sharded_hf_directory_and_dtype(tmp_path):
    """A sharded HF directory (model.safetensors.index.json) loads; bf16 loading keeps bf16 (no float32 copy)."""
    from safetensors.torch import save_file

    model, cfg = _model(tie_word_embeddings=True)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in parts.items():
        save_file({k: state[k].contiguous() for k in ks}, str(tmp_path / name), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in parts.items() for k in ks}}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    lm = load_lm(tmp_path)
    assert lm.source == "hf" and lm.manifest is None and lm.tokenizer_path is None
    assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    ids = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), model(ids), atol=1e-6)
    bf = load_lm(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(GentoolError, match="missing weight shard"):
        load_lm(tmp_path)


def test_extra_tensor_wrong_shape_and_missing_dir(tmp_path):
    from safetensors.torch import load_file, save_file

    model, cfg = _model()
    save_lm(model, cfg, tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({**state, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(GentoolError, match="unexpected tensors"):
        load_lm(tmp_path)
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(GentoolError, match="model.norm.weight has shape"):
        load_lm(tmp_path)
    with pytest.raises(UsageProblem, match="no such checkpoint"):
        load_lm(tmp_path / "absent")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GentoolError, match="not valid JSON"):
        load_lm(tmp_path)


def test_saved_checkpoint_metadata_and_config_keys(tmp_path):
    from safetensors import safe_open

    model, cfg = _model(rope_theta=500000.0)
    save_lm(model, cfg, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["architectures"] == ["LlamaForCausalLM"] and d["model_type"] == "llama"
    assert d["rope_theta"] == d["rope_parameters"]["rope_theta"] == 500000.0
    assert d["torch_dtype"] == d["dtype"] == "bfloat16" and d["head_dim"] == cfg.head_dim
    assert LMConfig.from_hf_dict(d) == cfg


def test_rotary_frequencies_stay_float32_under_dtype_casts():
    model, cfg = _model(max_position_embeddings=2048)
    ref = model.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and torch.equal(model.inv_freq, ref)
    with torch.device("meta"):
        meta = Transformer(cfg)
    meta.to_empty(device="cpu")
    assert torch.equal(meta.inv_freq, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_cached_gqa_decoding_and_rope_dtype(dtype):
    """On CUDA the masked GQA path runs fused kernels (transposed outputs): cached decoding still equals the full
    forward, and a bf16 model keeps float32 rotary frequencies."""
    cfg = config_from_preset("mini", vocab_size=128, num_key_value_heads=1)
    model = Transformer(cfg).cuda()
    model.init_weights(0)
    model = model.to(dtype).eval()
    assert model.inv_freq.dtype == torch.float32
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    with torch.no_grad():
        full = model(ids).float()
        model.setup_cache(2, 64)
        steps = [model(ids[:, :9], input_pos=torch.arange(9, device="cuda"))]
        steps += [model(ids[:, i:i + 1], input_pos=torch.tensor([i], device="cuda")) for i in range(9, 40)]
        model.reset_cache()
    tol = 1e-4 if dtype == torch.float32 else 0.05 * full.abs().max().item()
    assert (torch.cat(steps, 1).float() - full).abs().max() < tol
