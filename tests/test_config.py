import pytest

from gentool.config import PRESETS, LMConfig, config_from_preset
from gentool.errors import UsageProblem


def test_preset_overrides_and_defaults():
    cfg = config_from_preset("small", vocab_size=1000, hidden_size=96, num_attention_heads=6)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads) == (96, 6, 16, 2)
    assert cfg.num_hidden_layers == PRESETS["small"]["num_hidden_layers"] and cfg.vocab_size == 1000


def test_shape_without_a_preset_fills_what_hf_would():
    cfg = config_from_preset(None, hidden_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=50,
                             min_context=300)
    assert cfg.num_key_value_heads == 4 and cfg.intermediate_size == 256  # 8/3 of 96, a multiple of 32
    assert cfg.max_position_embeddings == 300  # the training context when nothing else says
    assert config_from_preset("tiny", min_context=64).max_position_embeddings == 128  # the preset's is larger
    assert config_from_preset("tiny", min_context=512).max_position_embeddings == 512


@pytest.mark.parametrize("kwargs, words", [
    ({"name": "huge"}, "unknown preset"),
    ({"name": None, "hidden_size": 64}, "num_hidden_layers, num_attention_heads missing"),
    ({"name": "tiny", "num_key_value_heads": 3}, "not a multiple"),
    ({"name": "tiny", "hidden_size": 30}, "not divisible"),
])
def test_bad_shapes_are_usage_problems(kwargs, words):
    with pytest.raises(UsageProblem, match=words):
        config_from_preset(kwargs.pop("name"), **kwargs)


def test_hf_round_trip_keeps_an_explicit_head_dim():
    cfg = config_from_preset("tiny", vocab_size=64, head_dim=16)  # 4 heads x 16 != hidden 32, as Qwen3/Gemma do
    d = cfg.to_hf_dict("bfloat16")
    assert d["head_dim"] == 16 and d["torch_dtype"] == d["dtype"] == "bfloat16"
    assert d["rope_parameters"]["rope_theta"] == d["rope_theta"]
    assert LMConfig.from_hf_dict(d) == cfg
    assert LMConfig.from_hf_dict({**d, "head_dim": None}).head_dim == 8


def test_foreign_architectures_are_refused_by_name():
    d = config_from_preset("tiny", vocab_size=64).to_hf_dict()
    with pytest.raises(UsageProblem, match="MistralForCausalLM"):
        LMConfig.from_hf_dict({**d, "architectures": ["MistralForCausalLM"]})
