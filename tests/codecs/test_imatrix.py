"""Importance-matrix files: GGUF round trip, byte-identical rewrite of llama-imatrix's output, legacy .dat."""

import importlib.util
import struct
import subprocess
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from gentool.errors import GentoolError, UsageProblem
from gentool.codecs.imatrix import check_imatrix, load_imatrix, read_imatrix, write_imatrix

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "ggml"


@cache
def fixtures():
    spec = importlib.util.spec_from_file_location("ggml_make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    sums = {"blk.0.attn_q.weight": rng.random(256).astype(np.float32) * 50,
            "blk.0.ffn_down.weight": rng.random(96).astype(np.float32),
            "blk.1.ffn_up_exps.weight": rng.random((3, 64)).astype(np.float32)}
    counts = {"blk.0.attn_q.weight": 512, "blk.0.ffn_down.weight": 512, "blk.1.ffn_up_exps.weight": [100, 0, 7]}
    path = tmp_path / "im.gguf"
    write_imatrix(path, sums, counts, datasets=["wiki.txt", "code.txt"], chunk_count=4, chunk_size=128)
    im = read_imatrix(path)
    assert im.datasets == ["wiki.txt", "code.txt"] and im.chunk_count == 4 and im.chunk_size == 128
    assert not im.legacy
    assert np.array_equal(im.counts["blk.1.ffn_up_exps.weight"], [100, 0, 7])
    v = load_imatrix(path)
    assert np.array_equal(v["blk.0.attn_q.weight"], sums["blk.0.attn_q.weight"] / np.float32(512))
    moe = v["blk.1.ffn_up_exps.weight"].reshape(3, 64)
    assert np.array_equal(moe[0], sums["blk.1.ffn_up_exps.weight"][0] / np.float32(100))
    assert (moe[1] == 1).all()  # an expert that saw no token reads as ones, as in llama-quantize
    assert v["blk.0.attn_q.weight"].dtype == np.float32


def test_rewrite_of_llama_imatrix_file_is_byte_identical(tmp_path):
    src = FIX / "imatrix_llama.gguf"
    im = read_imatrix(src)
    assert len(im.sums) == 8 * 7 and im.chunk_size == 128 and im.chunk_count > 0
    assert all(c[0] > 0 for c in im.counts.values())
    out = tmp_path / "again.gguf"
    write_imatrix(out, im.sums, im.counts, datasets=im.datasets, chunk_count=im.chunk_count,
                  chunk_size=im.chunk_size)
    assert out.read_bytes() == src.read_bytes()


def test_legacy_dat(tmp_path):
    def entry(name, ncall, vals):
        return struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals)) + \
            np.asarray(vals, "<f4").tobytes()

    path = tmp_path / "im.dat"
    data = struct.pack("<i", 2) + entry("blk.0.attn_k.weight", 4, [8.0, 2.0, 4.0]) + entry("output.weight", 0, [3.0])
    path.write_bytes(data + struct.pack("<ii", 10, 8) + b"calib.tx")
    im = read_imatrix(path)
    assert im.legacy and im.chunk_count == 10 and im.datasets == ["calib.tx"]
    v = im.values()
    assert np.array_equal(v["blk.0.attn_k.weight"], [2.0, 0.5, 1.0]) and np.array_equal(v["output.weight"], [3.0])
    path.write_bytes(data)  # the trailer is optional
    assert read_imatrix(path).chunk_count == 0


def test_errors(tmp_path):
    with pytest.raises(UsageProblem, match="not found"):
        read_imatrix(tmp_path / "missing.gguf")
    (tmp_path / "junk").write_bytes(b"\x05\x00\x00\x00\xff\xff\xff\x7fjunk")
    with pytest.raises(GentoolError, match="not an imatrix"):
        read_imatrix(tmp_path / "junk")
    (tmp_path / "short.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    with pytest.raises(GentoolError, match="truncated"):
        read_imatrix(tmp_path / "short.gguf")
    with pytest.raises(UsageProblem, match="non-negative"):
        write_imatrix(tmp_path / "x.gguf", {"a": np.array([np.nan])}, {"a": 1})
    values = {"blk.0.attn_q.weight": np.ones(256, np.float32)}
    check_imatrix(values, {"blk.0.attn_q.weight": (256, 256)})
    with pytest.raises(UsageProblem, match="another model"):
        check_imatrix(values, {"blk.0.attn_q.weight": (512, 512)})
    with pytest.raises(UsageProblem, match="another model"):
        check_imatrix(values, {"blk.0.attn_k.weight": (256, 256)})


def _bin():
    return fixtures().find_bin()


@pytest.mark.skipif(_bin() is None or not (_bin() or Path()).joinpath("llama-imatrix").is_file(),
                    reason="llama.cpp tools not built (see shared/tools/build-llama-cpp)")
def test_live_llama_imatrix_both_formats(tmp_path):
    mf = fixtures()
    model = tmp_path / "m.gguf"
    mf.write_model(model, mf.model_tensors())
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog " * 200)
    out = {}
    for fmt in ("gguf", "dat"):
        out[fmt] = tmp_path / f"im.{fmt}"
        subprocess.run([str(_bin() / "llama-imatrix"), "-m", str(model), "-f", str(tmp_path / "calib.txt"), "-o",
                        str(out[fmt]), "--output-format", fmt, "-c", "64", "--chunks", "3", "-t", "1", "--no-ppl"],
                       check=True, capture_output=True)
    g, d = read_imatrix(out["gguf"]), read_imatrix(out["dat"])
    assert d.legacy and not g.legacy and set(g.sums) == set(d.sums)
    assert g.chunk_count == d.chunk_count == 3
    gv, dv = g.values(), d.values()
    for name in gv:
        np.testing.assert_allclose(gv[name], dv[name], rtol=1e-5)
