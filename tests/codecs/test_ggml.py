"""GGML codecs: byte parity with llama-quantize (committed fixtures, and live when llama.cpp is built), agreement
with gguf-py's dequantizers, error bounds and properties."""

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gentool.errors import GentoolError, UsageProblem
from gentool.codecs import ggml as gc
from gentool.codecs.imatrix import load_imatrix

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "ggml"
TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]


@cache
def fixtures():
    spec = importlib.util.spec_from_file_location("ggml_make_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@cache
def manifest():
    return json.loads((FIX / "manifest.json").read_text())


@cache
def model(tied=False):
    return fixtures().model_tensors(tied=tied)


def _first_bad_block(ours, theirs, qtype):
    bpb = gc.bytes_per_block(qtype)
    bad = np.nonzero((ours.reshape(-1, bpb) != theirs.reshape(-1, bpb)).any(axis=1))[0]
    return f"{len(bad)} blocks differ, first #{bad[0]}" if len(bad) else "bytes equal"


# --- (a) committed llama-quantize outputs ----------------------------------------------------------------------------

def test_fixture_inputs_regenerate_bit_for_bit():
    mf = fixtures()
    for tied in (False, True):
        for name, w in model(tied).items():
            assert mf.sha(w) == manifest()["inputs"][name], f"input generator drifted for {name}"


@pytest.mark.parametrize("run", sorted(manifest()["runs"]))
def test_fixture_bytes_equal_llama_quantize(run):
    spec = manifest()["runs"][run]
    tensors = model(spec["tied"])
    imatrix = load_imatrix(FIX / spec["imatrix"]) if spec["imatrix"] else {}
    kept = np.load(FIX / "bytes.npz")
    for name, qtype in spec["types"].items():
        got = gc.quantize(tensors[name], qtype, imatrix=imatrix.get(name), name=name)
        if f"{run}/{name}" in kept:
            theirs = kept[f"{run}/{name}"]
            assert np.array_equal(got, theirs), f"{run} {name} {qtype}: {_first_bad_block(got, theirs, qtype)}"
        assert fixtures().sha(got) == spec["sha256"][name], f"{run}: {name} as {qtype} differs from llama-quantize"


def test_fixtures_cover_every_codec_with_and_without_imatrix():
    seen = {(t, bool(r["imatrix"])) for r in manifest()["runs"].values() for t in r["types"].values()}
    for t in TYPES:
        assert (t, False) in seen
        if t != "Q8_0":
            assert (t, True) in seen, t


# --- (c) dequantize agrees with gguf-py ---------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_equals_gguf_py(qtype):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 512)) * rng.uniform(1e-3, 2, (6, 1))).astype(np.float32)
    w[1, :40] = 0
    q = gc.quantize(w, qtype)
    assert np.array_equal(gc.dequantize(q, qtype, 512), gguf_dequantize(q, gguf.GGMLQuantizationType[qtype]))


def test_dequantize_llama_bytes_equals_gguf_py():
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize as gguf_dequantize

    kept = np.load(FIX / "bytes.npz")
    for key in kept.files:
        run, name = key.split("/")
        qtype = manifest()["runs"][run]["types"][name]
        raw = kept[key]
        cols = model()[name].shape[1]
        ref = gguf_dequantize(raw, gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(gc.dequantize(raw, qtype, cols), ref.reshape(-1, cols)), key


# --- (d) error bounds and properties ---------------------------------------------------------------------------------

RMS_BOUND = {"Q8_0": 0.007, "Q6_K": 0.022, "Q5_K": 0.042, "Q5_1": 0.045, "Q5_0": 0.05, "Q4_K": 0.085,
             "Q4_1": 0.09, "Q4_0": 0.1, "Q2_K": 0.32, "Q3_K": 0.17, "IQ4_NL": 0.085, "IQ4_XS": 0.085}
# (2, 3 and 4 bits stay under Lloyd-Max's optimum for a Gaussian, 0.34, 0.19, 0.097, thanks to per-16/32 scales)
# largest error as a fraction of its block's range: under half a level step (a step is 1/3 of the range at 2 bits)
# plus what an imatrix-weighted fit may give up on unimportant weights
SPAN = {"Q2_K": 0.45}


@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_round_trip_error(qtype, with_imatrix):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    im = rng.gamma(1.0, 1.0, 1024).astype(np.float32) if with_imatrix else None
    back = gc.dequantize(gc.quantize(w, qtype, imatrix=im), qtype, 1024)
    rel = np.sqrt(((back - w) ** 2).mean() / (w ** 2).mean())
    assert rel < RMS_BOUND[qtype], rel
    # no weight moves by more than a level step of its block's range
    blk = gc.block_size(qtype)
    span = np.ptp(w.reshape(-1, blk), axis=1, keepdims=True)
    assert (np.abs(back - w).reshape(-1, blk) <= span * SPAN.get(qtype, 0.3)).all()


def test_imatrix_lowers_weighted_error():
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((128, 512)) * 0.02).astype(np.float32)
    im = np.where(rng.random(512) < 0.1, 100.0, 1.0).astype(np.float32)
    for qtype in ("Q4_K", "Q4_0", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"):
        errs = [(((gc.dequantize(gc.quantize(w, qtype, imatrix=m), qtype, 512) - w) ** 2) * im).sum()
                for m in (None, im)]
        assert errs[1] < errs[0], qtype


def test_zeros_constants_and_rows_independent():
    w = np.zeros((3, 256), np.float32)
    w[1] = 0.125
    w[2, ::2] = -3.0
    for qtype in TYPES:
        q = gc.quantize(w, qtype)
        back = gc.dequantize(q, qtype, 256)
        assert np.array_equal(back[0], np.zeros(256, np.float32)), qtype
        assert np.allclose(back[1], 0.125, rtol=2e-2), qtype
        for r in range(3):
            assert np.array_equal(gc.quantize(w[r:r + 1], qtype), q[r:r + 1]), qtype


def test_chunking_does_not_change_bytes(monkeypatch):
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((37, 768)) * 0.1).astype(np.float32)
    im = rng.random(768).astype(np.float32)
    whole = {t: gc.quantize(w, t, imatrix=im) for t in ("Q4_K", "Q6_K", "Q4_0")}
    monkeypatch.setattr(gc, "CHUNK_WEIGHTS", 768 * 5)
    for t, q in whole.items():
        assert np.array_equal(gc.quantize(w, t, imatrix=im), q)


def test_expert_tensors_take_one_imatrix_row_per_expert():
    rng = np.random.default_rng(10)
    w = (rng.standard_normal((3, 4, 256)) * 0.1).astype(np.float32)
    im = rng.random((3, 256)).astype(np.float32)
    q = gc.quantize(w, "Q4_K", imatrix=im)
    assert np.array_equal(q, np.concatenate([gc.quantize(w[e], "Q4_K", imatrix=im[e]) for e in range(3)]))
    assert np.array_equal(gc.quantize(w, "Q4_K", imatrix=im.reshape(-1)), q)
    assert np.array_equal(gc.quantize(w, "Q4_K", imatrix=im[0]), gc.quantize(w.reshape(12, 256), "Q4_K",
                                                                              imatrix=im[0]))


def test_nan_and_shape_errors_are_clear():
    w = np.ones((2, 256), np.float32)
    w[1, 3] = np.nan
    with pytest.raises(GentoolError, match="blk.0.attn_q.weight holds NaN"):
        gc.quantize(w, "Q4_K", name="blk.0.attn_q.weight")
    with pytest.raises(GentoolError, match="infinite"):
        gc.quantize(np.full((1, 32), np.inf, np.float32), "F16")
    with pytest.raises(UsageProblem, match="divisible by 256.*blk.1.ffn_down.weight.*96") as e:
        gc.quantize(np.ones((4, 96), np.float32), "Q4_K", name="blk.1.ffn_down.weight")
    assert "Q5_0" in e.value.hint
    with pytest.raises(UsageProblem, match="unknown GGML type"):
        gc.quantize(w, "IQ2_XXS")
    with pytest.raises(UsageProblem, match="importance matrix.*3 values"):
        gc.quantize(np.ones((2, 256), np.float32), "Q4_K", imatrix=np.ones(3))
    with pytest.raises(UsageProblem, match="whole rows"):
        gc.dequantize(np.zeros(100, np.uint8), "Q4_K", 256)


def test_tables_and_fallbacks():
    assert [(gc.block_size(t), gc.bytes_per_block(t)) for t in ("Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0")] == \
        [(256, 144), (256, 176), (256, 210), (32, 34), (32, 18)]
    assert gc.TYPES["Q4_K"].bits_per_weight == 4.5
    assert gc.row_bytes("Q6_K", 512) == 420
    assert [gc.fallback_type(t, (5, 96)) for t in ("Q4_K", "Q5_K", "Q6_K", "Q8_0")] == ["Q5_0", "Q5_1", "Q8_0", "Q8_0"]
    assert gc.fallback_type("Q4_K", (5, 100)) == "F16" and gc.fallback_type("Q4_K", (5, 512)) == "Q4_K"
    assert gc.ggml_type(np.int64(12)) is gc.TYPES["Q4_K"] and gc.ggml_type("q6_k").name == "Q6_K"


finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
magnitude = st.sampled_from([1e-30, 1e-7, 1.0, 1e3, 1e20, 3e38])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, 3), blocks=st.integers(1, 2), scale=magnitude,
       data=st.data())
def test_properties(qtype, rows, blocks, scale, data):
    cols = 256 * blocks
    base = data.draw(st.lists(finite, min_size=cols, max_size=cols))
    w = (np.array(base, np.float32)[None, :] * np.float32(scale / 1e4)).repeat(rows, axis=0)
    w[-1] = w[-1][::-1].copy()
    with np.errstate(all="raise"):  # quantize keeps C's IEEE semantics without warnings
        q = gc.quantize(w, qtype)
        assert q.shape == (rows, gc.row_bytes(qtype, cols)) and q.dtype == np.uint8
        for r in range(rows):
            assert np.array_equal(gc.quantize(w[r], qtype), q[r:r + 1])
        if 1e-3 <= scale <= 1e3:  # scales within fp16's normal range: bounded error
            back = gc.dequantize(q, qtype, cols)
            span = np.ptp(w.reshape(-1, gc.block_size(qtype)), axis=1, keepdims=True)
            bound = span * SPAN.get(qtype, 0.3) + 1e-6 * scale
            assert (np.abs(back - w).reshape(-1, gc.block_size(qtype)) <= bound).all()


# --- (e) live parity with the llama.cpp build ------------------------------------------------------------------------

def _bin():
    return fixtures().find_bin()


needs_llama = pytest.mark.skipif(_bin() is None, reason="llama.cpp tools not built (see shared/tools/build-llama-cpp)")


def _libggml_path():
    """libggml-base.so of the llama.cpp build (it is there before llama-quantize is linked)."""
    for d in (_bin(), os.environ.get("GENTOOL_LLAMA_CPP_BIN"),
              FIX.parents[2] / ".anchors" / "llama.cpp" / "build" / "bin"):
        if d and (Path(d) / "libggml-base.so").is_file():
            return Path(d) / "libggml-base.so"
    return None


needs_libggml = pytest.mark.skipif(_libggml_path() is None, reason="llama.cpp's libggml-base not built")


@cache
def _libggml():
    lib = ctypes.CDLL(str(_libggml_path()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(w, qtype, imatrix=None):
    """libggml-base's ggml_quantize_chunk: the function llama-quantize runs per chunk of rows."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    out = np.zeros((w.shape[0], gc.row_bytes(qtype, w.shape[1])), np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    _libggml().ggml_quantize_chunk(gc.TYPES[qtype].type_id, w.ctypes.data, out.ctypes.data, 0, w.shape[0],
                                   w.shape[1], None if im is None else im.ctypes.data)
    return out


@needs_llama
@pytest.mark.parametrize("imatrix", [False, True])
def test_live_llama_quantize_on_fresh_random_model(tmp_path, imatrix):
    mf = fixtures()
    seed = int.from_bytes(os.urandom(3), "little")
    tensors = mf.model_tensors(seed=seed)
    src = tmp_path / "model.gguf"
    mf.write_model(src, tensors)
    sums, counts = mf.imatrix_sums(tensors, seed=seed)
    im_path = tmp_path / "imatrix.gguf"
    from gentool.codecs.imatrix import write_imatrix

    write_imatrix(im_path, sums, counts, datasets=["t"], chunk_count=1, chunk_size=1)
    imx = load_imatrix(im_path) if imatrix else {}
    for qtype in ("Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K"):
        dst = tmp_path / f"{qtype}.gguf"
        mf.quantize_with_llama(_bin(), src, dst, qtype, pure=True, imatrix=im_path if imatrix else None)
        for name, (t, theirs) in mf.read_quantized(dst).items():
            ours = gc.quantize(tensors[name], t, imatrix=imx.get(name))
            assert np.array_equal(ours, theirs), f"seed {seed} {name} {t}: {_first_bad_block(ours, theirs, t)}"


@needs_libggml
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qtype=st.sampled_from(TYPES), rows=st.integers(1, 3), blocks=st.integers(1, 2),
       kind=st.sampled_from(["gauss", "sparse", "const", "ties", "outlier", "positive"]),
       scale=st.sampled_from([1e-30, 1e-9, 1e-3, 1.0, 1e4, 1e18, 1e30]),
       imatrix=st.sampled_from([None, "gamma", "sparse", "wide"]), seed=st.integers(0, 2**32 - 1))
def test_live_ggml_parity_property(qtype, rows, blocks, kind, scale, imatrix, seed):
    rng = np.random.default_rng(seed)
    cols = 256 * blocks
    w = rng.standard_normal((rows, cols))
    if kind == "sparse":
        w[rng.random(w.shape) < 0.85] = 0
    elif kind == "const":
        w[:] = rng.standard_normal((rows, 1))
    elif kind == "ties":
        w = np.round(w * 4) / 4
    elif kind == "outlier":
        w[0, rng.integers(cols)] = 500.0
    elif kind == "positive":
        w = np.abs(w)
    with np.errstate(over="ignore"):
        w = (w * scale).astype(np.float32)
    im = {None: None, "gamma": rng.gamma(0.5, 1.0, cols), "sparse": rng.random(cols) * (rng.random(cols) < 0.3),
          "wide": 10.0 ** rng.uniform(-20, 20, cols)}[imatrix]
    with np.errstate(all="raise"):
        ours = gc.quantize(w, qtype, imatrix=im)
    assert np.array_equal(ours, ggml_quantize(w, qtype, im)), _first_bad_block(ours, ggml_quantize(w, qtype, im), qtype)


@needs_libggml
def test_live_speed_is_within_a_few_times_of_ggml():
    import time

    w = (np.random.default_rng(1).standard_normal((256, 4096)) * 0.02).astype(np.float32)
    for qtype in ("Q4_K", "Q6_K"):
        t0 = time.perf_counter()
        ours = gc.quantize(w, qtype)
        t1 = time.perf_counter()
        theirs = ggml_quantize(w, qtype)
        t2 = time.perf_counter()
        assert np.array_equal(ours, theirs)
        assert t1 - t0 < 20 * (t2 - t1) + 0.5, (qtype, t1 - t0, t2 - t1)


def test_fixture_script_reports_missing_tools(tmp_path):
    res = subprocess.run([sys.executable, str(FIX / "make_fixtures.py"), "--bin", str(tmp_path)],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 2 and "not found" in res.stderr


def test_iq4_best_index_equals_the_c_binary_search():
    """best_index_int8 transliterated (scalar float32 arithmetic) against the vectorised table lookup, on random
    values, every half-integer, the grid's midpoints and the IEEE special values."""
    from gentool.codecs.ggml_lowbit import KVALUES, best_index

    k = KVALUES.astype(np.float32)

    def c_best_index(x):
        if x <= k[0]:
            return 0
        if x >= k[15]:
            return 15
        lo, hi = 0, 15
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if x < k[mid] else (mid, hi)
        return hi - 1 if np.float32(x - k[hi - 1]) < np.float32(k[hi] - x) else hi

    rng = np.random.default_rng(11)
    xs = np.concatenate([rng.uniform(-140, 130, 4000), np.arange(-130, 120, 0.5), (k[:-1] + k[1:]) / 2,
                         np.nextafter((k[:-1] + k[1:]) / 2, np.float32(200)), [np.inf, -np.inf, np.nan, 1e30, -0.0]])
    xs = xs.astype(np.float32)
    assert best_index(xs).tolist() == [c_best_index(x) for x in xs]


def _overflowing_rows():
    """Rows whose importance-weighted sums overflow float32 (x ~ 1e18 with imatrix values up to 1e20): Q3_K's
    sub-block scales come out inf/NaN, and ggml's second-level search must treat them as C does."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 512))
    w[0, rng.random(512) < 0.85] = 0
    w[1] = rng.standard_normal()
    w[2, ::2] *= 1e-12
    return (w * 1e18).astype(np.float32), (10.0 ** rng.uniform(-20, 20, 512)).astype(np.float32)


def test_q3_k_super_scale_stays_finite_when_sub_scales_overflow():
    w, im = _overflowing_rows()
    d = gc.quantize(w, "Q3_K", imatrix=im).reshape(-1, 110)[:, 108:110].copy().view("<f2")
    assert not np.isnan(d).any()  # C's make_qx_quants: NaN never wins `ax > amax`, nearest_int(NaN) is 0


@needs_libggml
def test_live_overflowing_imatrix_rows_match_ggml():
    w, im = _overflowing_rows()
    for qtype in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "Q4_K", "Q6_K"):
        assert np.array_equal(gc.quantize(w, qtype, imatrix=im), ggml_quantize(w, qtype, im)), qtype
