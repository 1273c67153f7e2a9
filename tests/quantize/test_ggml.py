"""`gentool quantize --scheme q4_k_m` (and the other GGML mixes): llama-quantize's per-tensor types, its bytes,
the checkpoint loading in sample/perplexity, export-gguf copying the blocks, import-gguf --keep-quantized, and the
refusals. Live checks against the llama.cpp build ($GENTOOL_LLAMA_CPP_BIN or .anchors/) skip without it."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gentool.codecs import ggml
from gentool.codecs.ggml_mixes import tensor_types
from gentool.codecs.gguf_names import gguf_name, permute_qk
from gentool.models.checkpoint import load_lm
from gentool.models.transformer import Transformer

gguf = pytest.importorskip("gguf")
import importlib.util

_spec = importlib.util.spec_from_file_location("_qhelpers", Path(__file__).with_name("_helpers.py"))
_h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_h)
gguf_tensors, make_lm = _h.gguf_tensors, _h.make_lm
_spec = importlib.util.spec_from_file_location("ggml_make_fixtures", Path(__file__).resolve().parents[1] / "fixtures"
                                               / "ggml" / "make_fixtures.py")
_mf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mf)
# llama-quantize, or before it is linked the libllama it fronts (llama_model_quantize with its parameters)
needs_llama_quantize = pytest.mark.skipif(_mf.find_bin() is None,
                                          reason="llama.cpp's llama-quantize/libllama not built")


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("ggml")
    make_lm(d / "lm", tiny_tokenizer)
    make_lm(d / "tied", tiny_tokenizer, tie=True, seed=1)
    (d / "text.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 6)
    return d


def test_q4_k_m_types_bytes_and_loading(cli, base, tmp_path):
    out = tmp_path / "q"
    r = cli("quantize", base / "lm", "--scheme", "q4_k_m", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    lm = load_lm(base / "lm")
    shapes = {gguf_name(k): tuple(v.shape) for k, v in lm.model.state_dict().items()}
    want = tensor_types(shapes, "q4_k_m", n_layer=2, n_head=4, n_head_kv=2)  # llama-quantize's recipe
    assert {gguf_name(k): t for k, t in qc["tensor_types"].items()} == want
    assert qc["scheme"] == "ggml" and qc["mix"] == "q4_k_m" and qc["file_type"] == 15
    assert res["type_counts"] == {"F32": 5, "Q4_K": 13, "Q6_K": 3}  # the last layer's attn_v, ffn_down; the head
    from safetensors.torch import load_file

    stored = load_file(out / "model.safetensors")
    sd = lm.model.state_dict()
    for k, t in qc["tensor_types"].items():
        if t == "F32":
            assert torch.equal(stored[k], sd[k])
        else:
            assert np.array_equal(stored[k].numpy(), ggml.quantize(sd[k].numpy(), t)), k
    assert 4.5 < res["bits_per_weight"] < 5.2 and res["bits_per_param"] >= res["bits_per_weight"] * 0.99
    # the loaded model computes with exactly the dequantized weights
    q = load_lm(out)
    assert q.manifest.kind == "quantized-checkpoint"
    ref = Transformer(lm.config)
    ref.load_state_dict({k: torch.from_numpy(ggml.dequantize(stored[k].numpy(), t, sd[k].shape[-1]))
                         .reshape(sd[k].shape) if t != "F32" else stored[k] for k, t in qc["tensor_types"].items()},
                        strict=False)
    ids = torch.randint(0, 400, (2, 16))
    with torch.no_grad():
        assert torch.allclose(q.model(ids), ref(ids), atol=1e-4)


def test_chains_into_sample_perplexity_and_dequantize(cli, base, tmp_path):
    q = tmp_path / "q6"
    assert cli("quantize", base / "tied", "--scheme", "q6_k", "-o", q).exit_code == 0
    qc = json.loads((q / "config.json").read_text())["quantization_config"]
    assert qc["tensor_types"]["model.embed_tokens.weight"] == "Q6_K" and "lm_head.weight" not in qc["tensor_types"]
    r = cli("sample", q, "--prompt", "Now is", "--max-new-tokens", "4", "--temperature", "0", "--json")
    assert r.exit_code == 0, r.output
    r = cli("perplexity", q, base / "text.txt", "--reference", base / "tied", "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert 0 < rep["kl_mean"] < 0.01 and rep["top1_agreement"] > 0.8
    assert cli("quantize", q, "--dequantize", "-o", tmp_path / "deq").exit_code == 0
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert torch.allclose(load_lm(tmp_path / "deq").model(ids), load_lm(q).model(ids), atol=1e-4)


def test_export_copies_blocks_and_import_keeps_them(cli, base, tmp_path):
    q = tmp_path / "q"
    assert cli("quantize", base / "lm", "--scheme", "q4_k_m", "-o", q).exit_code == 0
    r = cli("export-gguf", q, "-o", tmp_path / "q.gguf", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["copied_blocks"] == 16
    assert cli("export-gguf", base / "lm", "-o", tmp_path / "b.gguf", "--type", "q4_k_m").exit_code == 0
    copied, direct = gguf_tensors(tmp_path / "q.gguf"), gguf_tensors(tmp_path / "b.gguf")
    assert copied.keys() == direct.keys()
    for name, (t, data) in copied.items():
        assert direct[name][0] == t and np.array_equal(direct[name][1], data), name
    stored = json.loads((q / "config.json").read_text())["quantization_config"]["tensor_types"]
    from safetensors.torch import load_file

    raw = load_file(q / "model.safetensors")
    for hf in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        heads = 4 if "q_proj" in hf else 2
        assert np.array_equal(copied[gguf_name(hf)][1], permute_qk(raw[hf].numpy(), heads))  # llama.cpp's rows
        assert copied[gguf_name(hf)][0] == stored[hf]
    r = cli("import-gguf", tmp_path / "q.gguf", "--keep-quantized", "-o", tmp_path / "back", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["format"] == "gentool.quantized-checkpoint"
    again = load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(again[k], raw[k]) for k in raw)
    assert cli("export-gguf", tmp_path / "back", "-o", tmp_path / "again.gguf").exit_code == 0
    assert all(np.array_equal(gguf_tensors(tmp_path / "again.gguf")[n][1], d) for n, (_, d) in copied.items())


def test_tensor_type_overrides_and_refusals(cli, base, tmp_path, tiny_tokenizer):
    r = cli("quantize", base / "lm", "--scheme", "q4_k_m", "--tensor-type", "attn_v=q8_0", "--tensor-type",
            "ffn_down=f16", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    types = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]["tensor_types"]
    assert types["model.layers.1.self_attn.v_proj.weight"] == "Q8_0"
    assert types["model.layers.0.mlp.down_proj.weight"] == "F16"
    odd = make_lm(tmp_path / "odd", tiny_tokenizer, hidden=96, inter=192)
    r = cli("quantize", odd, "--scheme", "q4_k_m", "--tensor-type", "attn_q=q4_k", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "blk.0.attn_q.weight has rows of 96" in r.output and "use Q5_0" in r.output
    r = cli("quantize", odd, "--scheme", "q4_k_m", "-o", tmp_path / "x", "--json")  # the mix falls back itself
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["type_counts"]) <= {"F32", "Q5_0", "Q8_0", "Q6_K"}
    for args, message in [(["--skip", "lm_head"], "--skip and --keep-16bit apply to gentool's schemes"),
                          (["--method", "optimized"], "--method optimized applies to int4"),
                          (["--tensor-type", "attn_v"], "malformed --tensor-type"),
                          (["--tensor-type", "attn_v=iq2_xxs"], "no codec for type"),
                          (["--group-size", "64"], "--group-size applies to int4 only")]:
        r = cli("quantize", base / "lm", "--scheme", "q4_k_m", *args, "-o", tmp_path / "bad")
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert not (tmp_path / "bad").exists()
    r = cli("quantize", tmp_path / "o", "--scheme", "q4_0", "-o", tmp_path / "qq")
    assert r.exit_code == 2 and "already quantized (q4_k_m)" in r.output
    r = cli("export-gguf", tmp_path / "o", "-o", tmp_path / "x.gguf", "--type", "q8_0")
    assert r.exit_code == 2 and "never re-quantizes" in r.output


@pytest.mark.parametrize("mix,flags", [
    ("q2_k", []), ("iq4_nl", []),
    ("q3_k_s", ["--pure", "--output-tensor-type", "iq4_xs", "--token-embedding-type", "q2_k"])])
def test_low_bit_types_and_llama_quantize_flags(cli, base, tmp_path, mix, flags):
    """q2_k … iq4_xs mixes and --pure / --output-tensor-type / --token-embedding-type: llama-quantize's recipe,
    the codec's bytes, a checkpoint that loads and computes with exactly the dequantized weights, and GGUF export
    and import that copy the blocks."""
    from safetensors.torch import load_file

    lm = load_lm(base / "lm")
    sd = lm.model.state_dict()
    shapes = {gguf_name(k): tuple(v.shape) for k, v in sd.items()}
    out = tmp_path / mix
    r = cli("quantize", base / "lm", "--scheme", mix, *flags, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    types = json.loads((out / "config.json").read_text())["quantization_config"]["tensor_types"]
    want = tensor_types(shapes, mix, n_layer=2, n_head=4, n_head_kv=2, pure="--pure" in flags,
                        output_type=flags[2] if flags else None, token_embd_type=flags[4] if flags else None)
    assert {gguf_name(k): t for k, t in types.items()} == want
    stored = load_file(out / "model.safetensors")
    for k, t in types.items():
        if t != "F32":
            assert np.array_equal(stored[k].numpy(), ggml.quantize(sd[k].numpy(), t)), k
    q = load_lm(out)
    ref = Transformer(lm.config)
    ref.load_state_dict({k: torch.from_numpy(ggml.dequantize(stored[k].numpy(), t, sd[k].shape[-1]))
                         .reshape(sd[k].shape) if t != "F32" else stored[k] for k, t in types.items()}, strict=False)
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert torch.allclose(q.model(ids), ref(ids), atol=1e-4)
    if mix == "q2_k":
        assert {t for t in types.values()} == {"F32", "Q2_K", "Q3_K", "Q6_K"}
        r = cli("sample", out, "--prompt", "Now is", "--max-new-tokens", "4", "--temperature", "0")
        assert r.exit_code == 0, r.output
    if flags:
        assert set(types.values()) == {"F32", "Q3_K", "IQ4_XS", "Q2_K"}
        assert types["lm_head.weight"] == "IQ4_XS" and types["model.embed_tokens.weight"] == "Q2_K"
        # export-gguf copies the new block types, import-gguf --keep-quantized reads them back unchanged
        assert cli("export-gguf", out, "-o", tmp_path / "q.gguf").exit_code == 0
        assert {n: t for n, (t, _) in gguf_tensors(tmp_path / "q.gguf").items()} == want
        r = cli("import-gguf", tmp_path / "q.gguf", "--keep-quantized", "-o", tmp_path / "back")
        assert r.exit_code == 0, r.output
        again = load_file(tmp_path / "back" / "model.safetensors")
        assert all(torch.equal(again[k], stored[k]) for k in stored)


def test_dequantize_bytes_equals_codec_for_low_bit_types():
    from gentool.models.quant_ggml import dequantize_bytes

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((5, 512)) * rng.uniform(1e-3, 2, (5, 1))).astype(np.float32)
    w[1, :40] = 0
    for qtype in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"):
        q = ggml.quantize(w, qtype, imatrix=rng.random(512))
        got = dequantize_bytes(torch.from_numpy(q), qtype, 512).numpy()
        assert np.array_equal(got.view(np.int32), ggml.dequantize(q, qtype, 512).view(np.int32)), qtype


def test_llama_quantize_flag_refusals(cli, base, tmp_path, tiny_tokenizer):
    odd = make_lm(tmp_path / "odd", tiny_tokenizer, hidden=96, inter=192)
    for src, args, message in [
            (base / "lm", ["--scheme", "int8", "--pure"], "--pure applies to GGML schemes"),
            (base / "lm", ["--scheme", "int4", "--output-tensor-type", "q8_0"], "the output head is float"),
            (base / "lm", ["--scheme", "q2_k", "--token-embedding-type", "iq2_xxs"], "no codec for this type"),
            (base / "lm", ["--target-kl", "0.1", "--calibrate", base / "text.txt", "--pure"], "both choose"),
            (odd, ["--scheme", "q2_k", "--output-tensor-type", "q4_k"], "output.weight has rows of 96")]:
        r = cli("quantize", src, *args, "-o", tmp_path / "bad")
        assert r.exit_code == 2 and message in r.output, (args, r.output)
    assert not (tmp_path / "bad").exists()
    r = cli("quantize", odd, "--scheme", "q3_k_m", "-o", tmp_path / "o", "--json")  # the mix falls back itself
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["type_counts"]) <= {"F32", "Q4_0", "Q5_0", "Q5_1", "Q8_0"}


def _llama_same_file(cli, base, tmp_path, mix, ftype, flags=()):
    for name in ("lm", "tied"):
        assert cli("export-gguf", base / name, "-o", tmp_path / f"{name}.gguf", "--type", "f32").exit_code == 0
        _mf.quantize_with_llama(_mf.find_bin(), tmp_path / f"{name}.gguf", tmp_path / f"{name}-ref.gguf", ftype,
                                pure="--pure" in flags, extra=[f for f in flags if f != "--pure"])
        r = cli("quantize", base / name, "--scheme", mix, *flags, "-o", tmp_path / f"{name}-q")
        assert r.exit_code == 0, r.output
        assert cli("export-gguf", tmp_path / f"{name}-q", "-o", tmp_path / f"{name}-q.gguf").exit_code == 0
        ours, ref = gguf_tensors(tmp_path / f"{name}-q.gguf"), gguf_tensors(tmp_path / f"{name}-ref.gguf")
        assert ours.keys() == ref.keys()
        for n, (t, data) in ref.items():
            assert ours[n][0] == t and np.array_equal(ours[n][1], data), (name, n)
        assert gguf.GGUFReader(tmp_path / f"{name}-q.gguf").fields["general.file_type"].contents() == \
            gguf.GGUFReader(tmp_path / f"{name}-ref.gguf").fields["general.file_type"].contents()


@needs_llama_quantize
@pytest.mark.parametrize("mix,ftype", [("q4_k_m", "Q4_K_M"), ("q5_k_m", "Q5_K_M"), ("q6_k", "Q6_K"),
                                       ("q4_0", "Q4_0"), ("q2_k", "Q2_K"), ("q3_k_s", "Q3_K_S"),
                                       ("q3_k_m", "Q3_K_M"), ("q3_k_l", "Q3_K_L"), ("iq4_nl", "IQ4_NL"),
                                       ("iq4_xs", "IQ4_XS")])
def test_live_llama_quantize_same_file(cli, base, tmp_path, mix, ftype):
    """gentool's export of its quantized checkpoint holds llama-quantize's tensors: same types, same bytes."""
    _llama_same_file(cli, base, tmp_path, mix, ftype)


@needs_llama_quantize
@pytest.mark.parametrize("mix,ftype,flags", [
    ("q4_k_m", "Q4_K_M", ["--pure"]), ("q3_k_m", "Q3_K_M", ["--output-tensor-type", "q8_0"]),
    ("q2_k", "Q2_K", ["--token-embedding-type", "iq4_nl", "--output-tensor-type", "q3_k"]),
    ("iq4_xs", "IQ4_XS", ["--pure", "--token-embedding-type", "f16"])])
def test_live_llama_quantize_flags_same_file(cli, base, tmp_path, mix, ftype, flags):
    """--pure, --output-tensor-type and --token-embedding-type give llama-quantize's file, tied and untied."""
    _llama_same_file(cli, base, tmp_path, mix, ftype, flags)
