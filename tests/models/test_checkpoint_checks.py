"""One config and tensor-set check for every reader of an LM checkpoint (models/checkpoint.py:check_tensors,
read_lm_state), and the float16 narrowing check of save_lm and load_lm."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gentool.config import LMConfig, config_from_preset
from gentool.errors import GentoolError, UsageProblem
from gentool.models.checkpoint import check_tensors, lm_shapes, load_lm, read_lm_state, save_lm

_spec = importlib.util.spec_from_file_location("_broken", Path(__file__).with_name("_broken.py"))
_broken = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_broken)


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer):
    return _broken.checkpoint(tmp_path_factory.mktemp("ck") / "good", tiny_tokenizer)


def test_check_tensors_names_what_is_missing_extra_or_misshapen():
    cfg = config_from_preset("tiny", vocab_size=64)
    shapes = lm_shapes(cfg)
    check_tensors(cfg, shapes, None)
    with pytest.raises(GentoolError, match=r"missing tensors \['model.norm.weight'\]"):
        check_tensors(cfg, {k: v for k, v in shapes.items() if k != "model.norm.weight"}, None)
    with pytest.raises(GentoolError, match=r"unexpected tensors \['model.junk'\]"):
        check_tensors(cfg, {**shapes, "model.junk": (3,)}, None)
    with pytest.raises(GentoolError, match=r"tensor model.norm.weight has shape \(31,\), config.json implies \(32,\)"):
        check_tensors(cfg, {**shapes, "model.norm.weight": (31,)}, None)
    # GGML blocks: present, their stored shape is not the dense one
    check_tensors(cfg, {**shapes, "lm_head.weight": (64, 34)}, None, packed={"lm_head.weight"})
    tied = config_from_preset("tiny", vocab_size=64, tie_word_embeddings=True)  # the head may be stored or not
    check_tensors(tied, {k: v for k, v in shapes.items() if k != "lm_head.weight"}, None)
    check_tensors(tied, shapes, None)


@pytest.mark.parametrize("kind, words", [
    ("missing", "missing tensors"), ("extra", "unexpected tensors"),
    ("heads0", "num_attention_heads is 0"), ("nan", "NaN or infinite"), ("inf", "NaN or infinite"),
])
def test_read_lm_state_and_load_lm_refuse_broken_checkpoints(tmp_path, good, kind, words):
    bad = _broken.broken(good, tmp_path / kind, kind)
    with pytest.raises(GentoolError, match=words):
        read_lm_state(bad)
    with pytest.raises(GentoolError, match=words):
        load_lm(bad)


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("num_key_value_heads", -2), ("hidden_size", 0), ("num_hidden_layers", 0),
    ("vocab_size", 0), ("intermediate_size", 0), ("head_dim", 7), ("rope_theta", 0.0),
])
def test_config_sanity_is_one_error_naming_the_field(field, value):
    d = config_from_preset("tiny", vocab_size=64).to_hf_dict()
    with pytest.raises(GentoolError, match=field):
        LMConfig.from_hf_dict({**d, field: value}, path="config.json")
    with pytest.raises(UsageProblem, match=field):
        config_from_preset("tiny", **{"vocab_size": 64, field: value})


def test_float16_narrowing_is_refused_by_name(tmp_path, good):
    """A finite weight beyond 65504 would become inf in float16: load_lm and save_lm refuse it, naming the
    tensor and its largest |value|; float32 and bfloat16 hold it."""
    big = _broken.broken(good, tmp_path / "big", "fp16big")
    with pytest.raises(GentoolError, match=r"model.layers.0.mlp.up_proj.weight holds 1e\+06, beyond float16"):
        load_lm(big, dtype=torch.float16)
    lm = load_lm(big, dtype=torch.bfloat16)
    assert lm.model.get_parameter(_broken.UP)[1, 2].item() == pytest.approx(1e6, rel=1e-2)
    (tmp_path / "out").mkdir()
    with pytest.raises(GentoolError, match="holds 1e\\+06"):
        save_lm(load_lm(big).model, lm.config, tmp_path / "out", dtype=torch.float16)
    load_lm(good, dtype=torch.float16)  # ordinary weights narrow without complaint
