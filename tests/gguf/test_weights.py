"""GGUF export and import of broken weights: the checked loader and the config/tensor-set check on the way out,
finite values (and finite block scales) on the way in, float16 overflow refused by name, and the metadata
llama.cpp's own writers add (general.quantization_version, quantize.imatrix.*)."""

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gentool.codecs import ggml  # noqa: E402
from gentool.errors import GentoolError  # noqa: E402
from gentool.gguf import export_gguf, read_gguf, write_gguf  # noqa: E402

QT = gguf.GGMLQuantizationType

_spec = importlib.util.spec_from_file_location("_broken", Path(__file__).parents[1] / "models" / "_broken.py")
_broken = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_broken)


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_tokenizer):
    return _broken.checkpoint(tmp_path_factory.mktemp("ck") / "good", tiny_tokenizer)


def _fields(path):
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}


@pytest.mark.parametrize("kind, words", [
    ("nan", "up_proj.weight has NaN or infinite values"), ("inf", "up_proj.weight has NaN or infinite values"),
    ("dupkey", "named twice"), ("truncated", "not a valid safetensors file"),
    ("missing", r"missing tensors \['model.norm.weight'\]"), ("extra", "unexpected tensors"),
    ("heads0", "num_attention_heads is 0"),
])
def test_export_refuses_broken_checkpoints(tmp_path, cli, good, kind, words):
    bad = _broken.broken(good, tmp_path / kind, kind)
    r = cli("export-gguf", bad, "-o", tmp_path / "m.gguf")
    assert r.exit_code == 1, r.output
    assert r.stderr.count("error: ") == 1 and "internal error" not in r.stderr
    assert re.search(words, r.stderr), r.stderr
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_export_refuses_float16_overflow_by_name(tmp_path, good):
    big = _broken.broken(good, tmp_path / "big", "fp16big")
    for qtype in ("f16", None, "q4_0"):
        with pytest.raises(GentoolError, match=r"up_proj.weight holds 1e\+06.*(--type f32|=f32)"):
            export_gguf(big, tmp_path / "m.gguf", qtype=qtype)
        assert not (tmp_path / "m.gguf").exists()
    export_gguf(big, tmp_path / "m.gguf", qtype="f32")
    assert read_gguf(tmp_path / "m.gguf").tensors[_broken.UP][1, 2] == 1e6


def test_quantization_version_and_imatrix_provenance(tmp_path, good):
    """convert_hf_to_gguf writes general.quantization_version = GGML_QNT_VERSION (2) into every file, and
    llama-quantize --imatrix adds quantize.imatrix.{file,dataset,entries_count,chunks_count}."""
    from gentool.codecs.imatrix import write_imatrix

    export_gguf(good, tmp_path / "f16.gguf")
    meta = _fields(tmp_path / "f16.gguf")
    assert meta["general.quantization_version"] == 2 and not any(k.startswith("quantize.") for k in meta)
    imx = tmp_path / "imatrix.gguf"
    names = ["blk.0.ffn_up.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"]
    cols = {"blk.0.ffn_up.weight": 32, "blk.1.attn_q.weight": 32, "blk.1.ffn_down.weight": 64}
    write_imatrix(imx, {n: np.ones(cols[n]) for n in names}, {n: 7 for n in names}, datasets=["wiki.train.raw"],
                  chunk_count=5, chunk_size=512)
    export_gguf(good, tmp_path / "q.gguf", qtype="q4_0", imatrix=imx)
    meta = _fields(tmp_path / "q.gguf")
    assert meta["general.quantization_version"] == 2
    assert meta["quantize.imatrix.file"] == str(imx) and meta["quantize.imatrix.dataset"] == "wiki.train.raw"
    assert meta["quantize.imatrix.entries_count"] == 3 and meta["quantize.imatrix.chunks_count"] == 5
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    assert r.fields["quantize.imatrix.entries_count"].types == [gguf.GGUFValueType.UINT32]  # as llama.cpp sets it


def _write(path, tensors, cfg, **kw):
    tok = {"model": "llama", "tokens": [f"<t{i}>" for i in range(400)], "scores": [0.0] * 400,
           "token_type": [1] * 400, "bos": 1, "eos": 2}
    write_gguf(path, cfg, tensors, tokenizer=tok, **kw)


@pytest.fixture(scope="module")
def weights(good):
    import json

    from safetensors.numpy import load_file

    return json.loads((good / "config.json").read_text()), load_file(str(good / "model.safetensors"))


@pytest.mark.parametrize("qtype", ["f32", "f16"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("keep", [False, True])
def test_import_refuses_non_finite_float_tensors(tmp_path, cli, weights, qtype, value, keep):
    cfg, t = weights
    t = {**t, _broken.UP: t[_broken.UP].copy()}
    t[_broken.UP][3, 5] = value
    _write(tmp_path / "m.gguf", t, cfg, qtype=qtype)
    r = cli("import-gguf", tmp_path / "m.gguf", "-o", tmp_path / "out", *(["--keep-quantized"] if keep else []))
    assert r.exit_code == 1 and "blk.0.ffn_up.weight has NaN or infinite values" in r.stderr, r.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("qtype, at", [("Q8_0", 0), ("Q4_1", 2), ("Q4_K", 2), ("Q6_K", 208)])
def test_import_refuses_non_finite_block_scales(tmp_path, weights, keep, qtype, at):
    """A block whose float16 d (or dmin / m) is NaN: every weight of the block is broken."""
    cfg, t = weights
    w = np.random.default_rng(0).standard_normal((32, 256)).astype(np.float32)  # K blocks need 256 columns
    cfg = {**cfg, "intermediate_size": 256}
    t = {k: v for k, v in t.items() if "mlp" not in k}
    for i in range(2):
        t[f"model.layers.{i}.mlp.gate_proj.weight"] = np.zeros((256, 32), np.float32)
        t[f"model.layers.{i}.mlp.up_proj.weight"] = np.zeros((256, 32), np.float32)
        t[f"model.layers.{i}.mlp.down_proj.weight"] = w
    raw = ggml.quantize(w, qtype)
    _write(tmp_path / "ok.gguf", t, cfg, qtype="f32", quantized={"model.layers.1.mlp.down_proj.weight": (qtype, raw)})
    read_gguf(tmp_path / "ok.gguf", keep_quantized=keep)
    raw = raw.copy()
    raw[3, at:at + 2] = np.array([np.nan], np.float16).view(np.uint8)
    _write(tmp_path / "bad.gguf", t, cfg, qtype="f32", quantized={"model.layers.1.mlp.down_proj.weight": (qtype, raw)})
    with pytest.raises(GentoolError, match="blk.1.ffn_down.weight has NaN or infinite"):
        read_gguf(tmp_path / "bad.gguf", keep_quantized=keep)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_scale_offsets_are_where_the_gguf_package_reads_them(qtype):
    """A NaN written at each offset of SCALE_OFFSETS makes the gguf package's own dequantize of that block NaN, and
    scales_finite notices it; the intact blocks stay finite."""
    t = QT[qtype]
    block, size = gguf.constants.GGML_QUANT_SIZES[t]
    raw = np.zeros((4, size), np.uint8)
    raw[:, 0:2] = raw[:, 2:4] = np.array([0.5], np.float16).view(np.uint8)  # ordinary scales elsewhere
    assert ggml.scales_finite(raw, qtype)
    for at in ggml.SCALE_OFFSETS[qtype]:
        bad = raw.copy()
        bad[2, at:at + 2] = np.array([np.inf], np.float16).view(np.uint8)
        assert not ggml.scales_finite(bad, qtype)
        with np.errstate(invalid="ignore"):
            w = gguf.quants.dequantize(bad.reshape(-1), t).reshape(4, block)
        assert not np.isfinite(w[2]).all() and np.isfinite(w[[0, 1, 3]]).all(), at
