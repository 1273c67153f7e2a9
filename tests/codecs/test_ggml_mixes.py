"""llama-quantize's per-tensor type choice: committed fixture runs, and live on deeper models when llama.cpp is built."""

import importlib.util
import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from gentool.errors import UsageProblem
from gentool.codecs.ggml_mixes import MIXES, allows_quantization, mix_info, parse_tensor_type, tensor_type, tensor_types

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "ggml"


@cache
def fixtures():
    spec = importlib.util.spec_from_file_location("ggml_make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@cache
def manifest():
    return json.loads((FIX / "manifest.json").read_text())


def _shapes(tied=False, cfg=None):
    mf = fixtures()
    return {k: v.shape for k, v in mf.model_tensors(cfg or mf.CONFIG, tied=tied).items()}


@pytest.mark.parametrize("run", sorted(manifest()["runs"]))
def test_types_equal_llama_quantize(run):
    spec, cfg = manifest()["runs"][run], manifest()["config"]
    got = tensor_types(_shapes(spec["tied"]), spec["mix"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                       n_head_kv=cfg["n_head_kv"], pure=spec["pure"], has_imatrix=bool(spec["imatrix"]),
                       overrides=spec["overrides"], output_type=spec.get("output_type"),
                       token_embd_type=spec.get("token_embd_type"))
    assert got == spec["types"]


def test_per_tensor_function_agrees_with_whole_model():
    cfg = manifest()["config"]
    for tied in (False, True):
        shapes = _shapes(tied)
        for mix in MIXES:
            whole = tensor_types(shapes, mix, n_layer=cfg["n_layer"])
            for name, shape in shapes.items():
                assert tensor_type(name, shape, mix, n_layer=cfg["n_layer"], tied_embeddings=tied) == whole[name]


def test_recipes_by_hand():
    shapes = {"output.weight": (32000, 4096), "token_embd.weight": (32000, 4096)}
    for i in range(32):
        shapes.update({f"blk.{i}.attn_v.weight": (1024, 4096), f"blk.{i}.ffn_down.weight": (4096, 14336),
                       f"blk.{i}.attn_q.weight": (4096, 4096), f"blk.{i}.attn_norm.weight": (4096,)})
    t = tensor_types(shapes, "q4_k_m", n_layer=32)
    more = [i for i in range(32) if t[f"blk.{i}.attn_v.weight"] == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if t[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K" and t["blk.0.attn_norm.weight"] == "F32"
    s = tensor_types(shapes, "q4_k_s", n_layer=32)
    assert [i for i in range(32) if s[f"blk.{i}.attn_v.weight"] == "Q5_K"] == [0, 1, 2, 3]
    assert [i for i in range(32) if s[f"blk.{i}.ffn_down.weight"] == "Q5_K"] == [0, 1, 2, 3]
    assert set(tensor_types(shapes, "q6_k", n_layer=32).values()) == {"Q6_K", "F32"}
    assert tensor_types(shapes, "q8_0", n_layer=32)["output.weight"] == "Q8_0"
    assert tensor_types(shapes, "q4_0", n_layer=32)["output.weight"] == "Q6_K"
    q40i = tensor_types(shapes, "q4_0", n_layer=32, has_imatrix=True)
    assert [i for i in range(32) if q40i[f"blk.{i}.ffn_down.weight"] == "Q4_1"] == [0, 1, 2, 3]
    # a 70B-like GQA model at 80 layers bumps the remaining attn_v to Q5_K; 8 experts to Q8_0
    big = {f"blk.{i}.attn_v.weight": (1024, 8192) for i in range(80)}
    assert set(tensor_types(big, "q4_k_m", n_layer=80, n_head=64, n_head_kv=8).values()) == {"Q5_K", "Q6_K"}
    assert set(tensor_types(big, "q4_k_m", n_layer=80, n_expert=8).values()) == {"Q8_0"}


def test_low_bit_recipes_by_hand():
    shapes = {"output.weight": (32000, 4096), "token_embd.weight": (32000, 4096)}
    for i in range(32):
        shapes.update({f"blk.{i}.attn_v.weight": (1024, 4096), f"blk.{i}.ffn_down.weight": (4096, 14336),
                       f"blk.{i}.attn_output.weight": (4096, 4096), f"blk.{i}.attn_q.weight": (4096, 4096)})

    def by_layer(t, what):
        return [t[f"blk.{i}.{what}.weight"] for i in range(32)]

    q2 = tensor_types(shapes, "q2_k", n_layer=32, n_head=32, n_head_kv=8)  # n_gqa 4
    assert set(by_layer(q2, "attn_v")) == {"Q4_K"} and set(by_layer(q2, "ffn_down")) == {"Q3_K"}
    assert set(by_layer(q2, "attn_output")) == {"Q3_K"} and set(by_layer(q2, "attn_q")) == {"Q2_K"}
    assert q2["output.weight"] == "Q6_K" and q2["token_embd.weight"] == "Q2_K"
    assert set(by_layer(tensor_types(shapes, "q2_k", n_layer=32, n_head=32, n_head_kv=16), "attn_v")) == {"Q3_K"}
    m = tensor_types(shapes, "q3_k_m", n_layer=32)
    assert by_layer(m, "attn_v") == ["Q5_K"] * 2 + ["Q4_K"] * 30
    assert by_layer(m, "ffn_down") == ["Q5_K"] * 2 + ["Q4_K"] * 30 and set(by_layer(m, "attn_output")) == {"Q4_K"}
    falcon = tensor_types(shapes, "q3_k_m", n_layer=32, arch="falcon")
    assert [i for i, t in enumerate(by_layer(falcon, "ffn_down")) if t == "Q3_K"] == \
        [i for i in range(2, 32) if not (i < 4 or i >= 28 or (i - 4) % 3 == 2)]
    lg = tensor_types(shapes, "q3_k_l", n_layer=32)
    assert {*by_layer(lg, "attn_v"), *by_layer(lg, "ffn_down"), *by_layer(lg, "attn_output")} == {"Q5_K"}
    s = tensor_types(shapes, "q3_k_s", n_layer=32)
    assert set(s.values()) == {"Q3_K", "Q6_K"} and s["output.weight"] == "Q6_K"
    for mix, base in (("iq4_nl", "IQ4_NL"), ("iq4_xs", "IQ4_XS")):
        t = tensor_types(shapes, mix, n_layer=32, n_head=32, n_head_kv=8)
        assert set(by_layer(t, "attn_v")) == {"Q5_K"} and by_layer(t, "ffn_down") == ["Q5_K"] * 4 + [base] * 28
        t = tensor_types(shapes, mix, n_layer=32, has_imatrix=True)
        assert set(by_layer(t, "attn_v")) == set(by_layer(t, "ffn_down")) == {base}
    assert mix_info("Q3_K") == ("q3_k_m", "Q3_K", 12) and mix_info("iq4_xs")[2] == 30 and mix_info("q2_k")[2] == 10
    # 70B-like: Q3_K attn_v is bumped to Q5_K too; shapes that 256 does not divide fall back to Q4_0 / IQ4_NL
    big = {f"blk.{i}.attn_v.weight": (1024, 8192) for i in range(80)}
    assert set(tensor_types(big, "q3_k_s", n_layer=80, n_head=64, n_head_kv=8).values()) == {"Q5_K"}
    odd = {"blk.0.attn_q.weight": (96, 96), "blk.0.attn_k.weight": (96, 100)}
    assert tensor_types(odd, "q2_k", n_layer=1) == {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "F16"}
    assert tensor_types(odd, "iq4_xs", n_layer=1)["blk.0.attn_q.weight"] == "IQ4_NL"


def test_overrides_output_and_embedding_options():
    shapes = {"output.weight": (320, 256), "blk.0.attn_k.weight": (64, 256), "blk.0.ffn_down.weight": (256, 96)}
    t = tensor_types(shapes, "q4_k_m", n_layer=1, overrides=["ATTN_K=Q8_0", "ffn_down=q6_k"])
    assert t["blk.0.attn_k.weight"] == "Q8_0" and t["blk.0.ffn_down.weight"] == "Q8_0"  # Q6_K falls back
    t = tensor_types(shapes, "q4_k_m", n_layer=1, output_type="q8_0", overrides=[("^blk", "Q5_K")])
    assert t == {"output.weight": "Q8_0", "blk.0.attn_k.weight": "Q5_K", "blk.0.ffn_down.weight": "Q5_1"}
    assert tensor_types(shapes, "q4_k_m", n_layer=1, quantize_output=False,
                        current_types={"output.weight": "F16"})["output.weight"] == "F16"


def test_parsing_and_errors():
    pattern, qtype = parse_tensor_type(r"BLK\.[0-3]\.ffn_up=q8_0")
    assert qtype == "Q8_0" and pattern.search("blk.2.ffn_up.weight") and not pattern.search("blk.4.ffn_up.weight")
    for bad in ("attn_k", "=q8_0", "attn_k=", "attn_k=iq2_xxs", "(=q8_0"):
        with pytest.raises(UsageProblem):
            parse_tensor_type(bad)
    assert mix_info("Q4_K") == ("q4_k_m", "Q4_K", 15) and mix_info("q6_k")[2] == 18
    with pytest.raises(UsageProblem, match="unknown quantization mix"):
        mix_info("q2_k_s")
    assert not allows_quantization("blk.0.attn_norm.weight", (256,))
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (8, 256))
    assert not allows_quantization("blk.0.attn_q.bias", (256, 2))
    assert not allows_quantization("x.weight", (1, 256))
    assert allows_quantization("blk.0.attn_q.weight", (256, 256))


def _bin():
    return fixtures().find_bin()


@pytest.mark.skipif(_bin() is None, reason="llama.cpp tools not built (see shared/tools/build-llama-cpp)")
@pytest.mark.parametrize("n_layer,n_head_kv", [(32, 2), (80, 2), (80, 4), (13, 4), (24, 1)])
@pytest.mark.parametrize("mix", ["q4_k_m", "q4_k_s", "q5_k_m", "q4_0", "q2_k", "q3_k_m", "q3_k_l", "iq4_xs"])
def test_live_types_on_deeper_models(tmp_path, n_layer, n_head_kv, mix):
    mf = fixtures()
    cfg = dict(mf.CONFIG, n_layer=n_layer, n_embd=64, n_head=4, n_head_kv=n_head_kv, n_ff=64)
    tensors = mf.model_tensors(cfg)
    src, dst = tmp_path / "m.gguf", tmp_path / "q.gguf"
    mf.write_model(src, tensors, cfg)
    mf.quantize_with_llama(_bin(), src, dst, mix)
    theirs = {k: v[0] for k, v in mf.read_quantized(dst).items()}
    ours = tensor_types({k: np.shape(v) for k, v in tensors.items()}, mix, n_layer=n_layer, n_head=4,
                        n_head_kv=n_head_kv)
    assert ours == theirs
