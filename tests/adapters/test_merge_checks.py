"""lora-merge and lora-extract read their bases with the one config and tensor-set check every LM reader makes,
and refuse a float16 output that a finite weight would overflow."""

import importlib.util
from pathlib import Path

import pytest
import torch

from gentool.adapters.peft import write_adapter
from gentool.models.lora import LoRAConfig

_spec = importlib.util.spec_from_file_location("_broken", Path(__file__).parents[1] / "models" / "_broken.py")
_broken = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_broken)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_tokenizer):
    w = tmp_path_factory.mktemp("merge")
    good = _broken.checkpoint(w / "good", tiny_tokenizer)
    ad = w / "ad"
    ad.mkdir()
    torch.manual_seed(1)
    write_adapter(ad, {f"model.layers.{i}.self_attn.q_proj.lora_{p}.weight": torch.randn(*s) * 0.1
                       for i in range(2) for p, s in (("A", (2, 32)), ("B", (32, 2)))},
                  LoRAConfig(r=2, alpha=2.0, target_modules=["q_proj"]), base_name="good")
    return w, good, ad


def _refused(r, words, out):
    assert r.exit_code == 1, r.output
    assert r.stderr.count("error: ") == 1 and "internal error" not in r.stderr and words in r.stderr, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind, words", [
    ("missing", "missing tensors ['model.norm.weight']"), ("extra", "unexpected tensors"),
    ("heads0", "num_attention_heads is 0"),
])
def test_broken_base_is_refused(cli, tmp_path, world, kind, words):
    w, good, ad = world
    bad = _broken.broken(good, tmp_path / kind, kind)
    _refused(cli("lora-merge", bad, ad, "-o", tmp_path / "out"), words, tmp_path / "out")
    _refused(cli("lora-extract", bad, good, "-o", tmp_path / "out", "--rank", "1"), words, tmp_path / "out")
    _refused(cli("lora-extract", good, bad, "-o", tmp_path / "out", "--rank", "1"), words, tmp_path / "out")


def test_float16_output_overflow_is_refused_by_name(cli, tmp_path, world):
    w, good, ad = world
    big = _broken.broken(good, tmp_path / "big", "fp16big")
    _refused(cli("lora-merge", big, ad, "-o", tmp_path / "out", "--dtype", "float16"),
             "model.layers.0.mlp.up_proj.weight holds 1e+06, beyond float16", tmp_path / "out")
    r = cli("lora-merge", big, ad, "-o", tmp_path / "out", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.output
    r = cli("lora-merge", good, ad, "-o", tmp_path / "out16", "--dtype", "float16")
    assert r.exit_code == 0, r.output
