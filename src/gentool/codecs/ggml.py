"""GGML block codecs: numpy quantize/dequantize for llama.cpp's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K
(here) and Q2_K, Q3_K, IQ4_NL, IQ4_XS (ggml_lowbit.py), bit-for-bit equal to ggml's `quantize_*` (what
llama-quantize runs), with or without an importance matrix.

Legend (GGUF byte layouts, little-endian; `d`/`m`/`dmin` are fp16; a row of `cols` weights is cols/block blocks)
    Q8_0  32 w, 34 B   d | qs[32] int8                                   w = d*q
    Q4_0  32 w, 18 B   d | qs[16]: w[j] low nibble, w[j+16] high         w = d*(q-8)
    Q4_1  32 w, 20 B   d | m | qs[16] as Q4_0                            w = d*q + m
    Q5_0  32 w, 22 B   d | qh u32: bit j = 5th bit of w[j] | qs[16]      w = d*(q-16)
    Q5_1  32 w, 24 B   d | m | qh u32 | qs[16]                           w = d*q + m
    Q4_K 256 w, 144 B  d | dmin | scales[12] | qs[128]                   w = d*sc[j]*q - dmin*m[j]
    Q5_K 256 w, 176 B  d | dmin | scales[12] | qh[32] | qs[128]          as Q4_K with a 5th bit
    Q6_K 256 w, 210 B  ql[128] | qh[64] | scales[16] int8 | d            w = d*sc[j]*(q-32)
K-quant super-blocks of 256: Q4_K/Q5_K have 8 sub-blocks of 32 with 6-bit scale sc[j] and min m[j] packed in 12
bytes (j<4: sc in scales[j] & 63, m in scales[j+4] & 63; j>=4: low 4 bits in scales[j+4] (sc low, m high nibble),
top 2 bits in bits 6..7 of scales[j-4] (sc) and scales[j] (m)). Quants of each 64-weight chunk c share 32 bytes:
sub-block 2c in the low nibbles, 2c+1 in the high ones; Q5_K's qh[l] holds bit 2c (and 2c+1) for weight l of each.
Q6_K has 16 sub-blocks of 16 with int8 scales; each 128-weight half h has ql[64h..], qh[32h..]: weight 32k+l of
the half keeps its low 4 bits in ql[l] (k=0 low, k=2 high nibble) or ql[l+32] (k=1, 3), its top 2 bits in
qh[l] >> 2k.

Types that need a row length divisible by their block fall back as llama.cpp's `tensor_type_fallback` does
(Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, IQ4_XS -> IQ4_NL, then F16 when even 32 does not
divide). The scale searches live in
ggml_search.py; all arithmetic is float32 in C's order, see there why that makes the bytes identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gentool.codecs import ggml_lowbit as lowbit
from gentool.errors import GentoolError, UsageProblem
from gentool.codecs.ggml_search import (
    GROUP_MAX_EPS,
    blocks,
    f32,
    fp16_bytes,
    fp16_read,
    make_qkx,
    make_qp,
    make_qx,
    nearest_int_exact,
    running_max,
    seqsum,
    tile,
)

QK_K = 256
CHUNK_WEIGHTS = 1 << 18  # weights per vectorised pass: keeps the search temporaries in cache


@dataclass(frozen=True)
class GGMLType:
    name: str
    type_id: int  # ggml_type enum value, as stored in GGUF tensor infos
    block_size: int
    bytes_per_block: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes_per_block / self.block_size


TYPES: dict[str, GGMLType] = {t.name: t for t in (
    GGMLType("F32", 0, 1, 4), GGMLType("F16", 1, 1, 2),
    GGMLType("Q4_0", 2, 32, 18), GGMLType("Q4_1", 3, 32, 20), GGMLType("Q5_0", 6, 32, 22),
    GGMLType("Q5_1", 7, 32, 24), GGMLType("Q8_0", 8, 32, 34),
    GGMLType("Q4_K", 12, QK_K, 144), GGMLType("Q5_K", 13, QK_K, 176), GGMLType("Q6_K", 14, QK_K, 210),
    GGMLType("Q2_K", 10, QK_K, 84), GGMLType("Q3_K", 11, QK_K, 110), GGMLType("IQ4_NL", 20, 32, 18),
    GGMLType("IQ4_XS", 23, QK_K, 136),
)}
TYPES_BY_ID = {t.type_id: t for t in TYPES.values()}
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL"}


def ggml_type(qtype: str | int | GGMLType) -> GGMLType:
    """Look a type up by name (any case), ggml enum value, or pass one through."""
    if isinstance(qtype, GGMLType):
        return qtype
    t = TYPES_BY_ID.get(int(qtype)) if isinstance(qtype, (int, np.integer)) else TYPES.get(str(qtype).upper())
    if t is None:
        raise UsageProblem(f"unknown GGML type {qtype!r}", hint="use one of " + ", ".join(TYPES))
    return t


def block_size(qtype) -> int:
    return ggml_type(qtype).block_size


def bytes_per_block(qtype) -> int:
    return ggml_type(qtype).bytes_per_block


def row_bytes(qtype, cols: int) -> int:
    t = ggml_type(qtype)
    return cols // t.block_size * t.bytes_per_block


def fits(qtype, shape) -> bool:
    """Whether rows of this tensor (its last axis, GGML's ne[0]) split into whole blocks of the type."""
    cols = shape if isinstance(shape, int) else shape[-1]
    return cols % ggml_type(qtype).block_size == 0


def fallback_type(qtype, shape) -> str:
    """The type llama-quantize writes instead when `qtype` does not fit (its `tensor_type_fallback`); the type itself
    when it fits."""
    t = ggml_type(qtype)
    if fits(t, shape):
        return t.name
    alt = _FALLBACK.get(t.name, t.name)
    return alt if fits(alt, shape) else "F16"


def check_fits(qtype, shape, name: str | None = None) -> None:
    t = ggml_type(qtype)
    if not fits(t, shape):
        cols = shape if isinstance(shape, int) else shape[-1]
        what = f"tensor {name}" if name else "tensor"
        raise UsageProblem(f"{t.name} needs rows divisible by {t.block_size}, but {what} has rows of {cols}",
                           hint=f"use {fallback_type(t, shape)} for it, as llama.cpp falls back to")


# --- helpers ---------------------------------------------------------------------------------------------------------

_fp16_bytes, _fp16_read, _blocks, _tile = fp16_bytes, fp16_read, blocks, tile


def _row_sigma2(X: np.ndarray) -> np.ndarray:
    """sum(x*x)/n_per_row of each row, summed in C order (used by the 32-block types with an imatrix)."""
    XT = np.ascontiguousarray(X.T)
    return seqsum(XT * XT) / f32(X.shape[1])


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0xF) | ((hi.astype(np.uint8) & 0xF) << 4)


def _qh32(L: np.ndarray) -> np.ndarray:
    """5th bits of 32 levels (blocks, 32) -> uint32 bitfield as 4 little-endian bytes."""
    bits = ((L.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero); float64 makes |v| + 0.5 exact."""
    v64 = v.astype(np.float64)
    return np.copysign(np.floor(np.abs(v64) + 0.5), v64)


def _absmax_signed(X: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each row, the first one on ties; +0 for an all-zero row (C starts at 0)."""
    A = np.abs(X)
    idx = A.argmax(axis=1)
    mx = X[np.arange(len(X)), idx]
    return np.where(A[np.arange(len(X)), idx] > 0, mx, f32(0.0))


# --- 32-weight block types ------------------------------------------------------------------------------------------

def _q8_0(X, qw):
    B = X.reshape(-1, 32)
    d = np.abs(B).max(axis=1) / f32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, f32(1.0) / d, f32(0.0)).astype(f32)
    q = _roundf(B * inv[:, None]).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


def _q_sym_ref(B, nbits):
    """quantize_row_q4_0_ref / q5_0_ref: d = max/-2^(b-1), levels trunc(x/d + 2^(b-1) + 0.5) capped."""
    half = 1 << (nbits - 1)
    d = _absmax_signed(B) / f32(-half)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, f32(1.0) / d, f32(0.0)).astype(f32)
    L = np.minimum(np.trunc(B * inv[:, None] + f32(half + 0.5)), 2 * half - 1)
    return d, L


def _q_asym_ref(B, nbits):
    """quantize_row_q4_1_ref / q5_1_ref: d = (max-min)/(2^b-1), m = min, levels trunc((x-min)/d + 0.5)."""
    mn, mx = B.min(axis=1), B.max(axis=1)
    d = (mx - mn) / f32((1 << nbits) - 1)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, f32(1.0) / d, f32(0.0)).astype(f32)
    L = np.minimum(np.trunc((B - mn[:, None]) * inv[:, None] + f32(0.5)), (1 << nbits) - 1)
    return d, mn, L


def _imatrix_weights(X, qw):
    """qw[j] * sqrt(sigma2 + x[j]^2) per weight, blocks of 32 in ggml_search layout."""
    sig = np.repeat(_row_sigma2(X), X.shape[1] // 32)
    Xs = _blocks(X, 32)
    return Xs, _tile(qw, X.shape[0], 32) * np.sqrt(sig + Xs * Xs)


def _q_sym(X, qw, nbits):
    if qw is None:
        d, L = _q_sym_ref(X.reshape(-1, 32), nbits)
    else:
        Xs, W = _imatrix_weights(X, qw)
        d, L = make_qx(Xs, 1 << (nbits - 1), W)
        L = L.T
    parts = [_fp16_bytes(d)]
    if nbits == 5:
        parts.append(_qh32(L))
    return np.concatenate(parts + [_nibbles(L[:, :16], L[:, 16:])], axis=1)


def _q_asym(X, qw, nbits):
    if qw is None:
        d, m, L = _q_asym_ref(X.reshape(-1, 32), nbits)
    else:
        Xs, W = _imatrix_weights(X, qw)
        d, neg_min, L = make_qkx(Xs, W, (1 << nbits) - 1, -0.9, 0.05, 36)
        m, L = -neg_min, L.T
    parts = [_fp16_bytes(d), _fp16_bytes(m)]
    if nbits == 5:
        parts.append(_qh32(L))
    return np.concatenate(parts + [_nibbles(L[:, :16], L[:, 16:])], axis=1)


# --- K-quants --------------------------------------------------------------------------------------------------------

def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """(S, 8) 6-bit scales and mins -> (S, 12) bytes (uint8 arithmetic wraps as C's stores do)."""
    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    q = np.zeros((len(ls), 12), np.uint8)
    q[:, 0:4], q[:, 4:8] = ls[:, :4], lm[:, :4]
    q[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    q[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    q[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return q


def _unpack_scales_k4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for all 8 sub-blocks: (S, 12) -> sc, m (S, 8) uint8."""
    sc = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _q45_k(X, qw, nmax):
    """quantize_row_q4_K/q5_K (_ref without, _impl with an imatrix) -> packed (S, 144 | 176) bytes."""
    Xb = X.reshape(-1, QK_K)
    S = len(Xb)
    Xs = _blocks(Xb, 32)
    if qw is None:
        W = np.sqrt(seqsum(Xs * Xs) / f32(32)) + np.abs(Xs)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        scales, mins, L = make_qkx(Xs, W, nmax, rmin, 0.1, nstep)
        scales, mins = scales.reshape(S, 8).T, mins.reshape(S, 8).T
        max_scale, max_min = running_max(scales), running_max(mins)
        with np.errstate(divide="ignore"):
            inv_s = np.where(max_scale > 0, f32(63.0) / max_scale, f32(0.0)).astype(f32)
            inv_m = np.where(max_min > 0, f32(63.0) / max_min, f32(0.0)).astype(f32)
        ls = np.minimum(nearest_int_exact(inv_s * scales) & 0xFF, 63)
        lm = np.minimum(nearest_int_exact(inv_m * mins) & 0xFF, 63)
        d, dmin = max_scale / f32(63.0), max_min / f32(63.0)
    else:
        XT = np.ascontiguousarray(Xb.T)
        sigma2 = f32(2.0) * seqsum(XT * XT) / f32(QK_K)
        W = _tile(qw, X.shape[0], 32) * np.sqrt(np.repeat(sigma2, 8) + Xs * Xs)
        sw = seqsum(W).reshape(S, 8).T
        scales, mins, L = make_qkx(Xs, W, nmax, -0.9, 0.05, 36)
        d, ls = make_qp(scales.reshape(S, 8).T, 63, sw)
        dmin, lm = make_qp(mins.reshape(S, 8).T, 63, sw)
        if nmax == 31:
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    sc_bytes = _pack_scales_k4(ls.T, lm.T)
    d16, dmin16 = _fp16_bytes(d), _fp16_bytes(dmin)
    sc, m = _unpack_scales_k4(sc_bytes)
    dd = (_fp16_read(d16)[:, None] * sc.astype(f32))[..., None]
    dm = (_fp16_read(dmin16)[:, None] * m.astype(f32))[..., None]
    L = L.T.reshape(S, 8, 32)
    with np.errstate(all="ignore"):
        Lnew = np.clip(nearest_int_exact((Xb.reshape(S, 8, 32) + dm) / dd), 0, nmax)
    L = np.where(dd != 0, Lnew, L).astype(np.uint8).reshape(S, 4, 2, 32)
    parts = [d16, dmin16, sc_bytes]
    if nmax == 31:
        hbit = (L >> 4) << (np.arange(4, dtype=np.uint8)[:, None, None] * 2 + np.arange(2, dtype=np.uint8)[:, None])
        parts.append(np.bitwise_or.reduce(hbit.reshape(S, 8, 32), axis=1))
    parts.append(_nibbles(L[:, :, 0], L[:, :, 1]).reshape(S, 128))
    return np.concatenate(parts, axis=1)


def _q6_k(X, qw):
    """quantize_row_q6_K (_ref / _impl) -> packed (S, 210) bytes."""
    Xb = X.reshape(-1, QK_K)
    S = len(Xb)
    scales, L = make_qx(_blocks(Xb, 16), 32, _tile(qw, X.shape[0], 16))
    scales = scales.reshape(S, 16).T
    A = np.abs(scales)
    max_abs = np.zeros(S, f32)
    max_scale = np.zeros(S, f32)
    for j in range(16):
        upd = A[j] > max_abs
        np.copyto(max_abs, A[j], where=upd)
        np.copyto(max_scale, scales[j], where=upd)
    zero = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = f32(-128.0) / max_scale
        d16 = _fp16_bytes(f32(1.0) / iscale)
        qsc = np.minimum(nearest_int_exact(iscale * scales), 127).astype(np.int8).T  # (S, 16)
        dd = (_fp16_read(d16)[:, None] * qsc.astype(f32))[..., None]
        Lnew = np.clip(nearest_int_exact(Xb.reshape(S, 16, 16) / dd), -32, 31) + 32
    L = np.where(dd != 0, Lnew, L.T.reshape(S, 16, 16)).astype(np.uint8).reshape(S, 2, 4, 32)
    ql = np.stack([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], axis=2)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = np.concatenate([ql.reshape(S, 128), qh.reshape(S, 64), qsc.view(np.uint8), d16], axis=1)
    out[zero] = 0
    return out


_QUANT = {
    "Q8_0": _q8_0,
    "Q4_0": lambda X, qw: _q_sym(X, qw, 4), "Q5_0": lambda X, qw: _q_sym(X, qw, 5),
    "Q4_1": lambda X, qw: _q_asym(X, qw, 4), "Q5_1": lambda X, qw: _q_asym(X, qw, 5),
    "Q4_K": lambda X, qw: _q45_k(X, qw, 15), "Q5_K": lambda X, qw: _q45_k(X, qw, 31), "Q6_K": _q6_k,
    **lowbit.QUANT,
}


def quantize(w, qtype, *, imatrix=None, name: str | None = None) -> np.ndarray:
    """Quantize a weight matrix (rows, cols) — cols is the input dimension, GGML's ne[0] — to GGUF bytes
    (rows, row_bytes) uint8, equal to llama-quantize's. `imatrix` (cols,) is the mean squared activation of each
    input column; Q8_0 and the float types ignore it, as llama.cpp does. N-d input quantizes its last axis; a 3-d
    (experts, rows, cols) tensor may take one imatrix row per expert ((experts, cols) or flat, as llama.cpp's)."""
    t = ggml_type(qtype)
    a = np.asarray(w)
    label = f"tensor {name}" if name else "tensor"
    if a.ndim == 0:
        raise UsageProblem(f"cannot quantize a scalar ({label})")
    rows, cols = int(np.prod(a.shape[:-1])), a.shape[-1]
    check_fits(t, cols, name)
    qw = None
    if imatrix is not None and t.name not in ("F32", "F16", "Q8_0"):
        qw = np.ascontiguousarray(imatrix, dtype=f32).reshape(-1)
        per_expert = a.ndim == 3 and qw.shape[0] == a.shape[0] * cols != cols
        if qw.shape[0] != cols and not per_expert:
            raise UsageProblem(f"importance matrix for {label} has {qw.shape[0]} values, the tensor has {cols} input "
                               "columns", hint="the importance matrix was computed for another model")
        if not np.isfinite(qw).all():
            raise UsageProblem(f"importance matrix for {label} holds non-finite values")
        if per_expert:
            return np.concatenate([quantize(a[e], t, imatrix=qw[e * cols:(e + 1) * cols], name=name)
                                   for e in range(a.shape[0])])
    X = a.reshape(rows, cols)
    out = np.empty((rows, row_bytes(t, cols)), np.uint8)
    step = max(1, CHUNK_WEIGHTS // cols)
    for r0 in range(0, rows, step):
        part = np.ascontiguousarray(X[r0:r0 + step], dtype=f32)
        if not np.isfinite(part).all():
            raise GentoolError(f"{label} holds NaN or infinite values",
                               hint="quantize finite weights only (llama-quantize refuses them too)")
        if t.name == "F32":
            out[r0:r0 + step] = part.view(np.uint8)
        elif t.name == "F16":
            out[r0:r0 + step] = _fp16_bytes(part).reshape(len(part), -1)
        else:
            with np.errstate(all="ignore"):  # C's IEEE float32 semantics (overflow to inf, 0/0) are the spec
                out[r0:r0 + step] = _QUANT[t.name](part, qw).reshape(len(part), -1)
    return out


# --- block scales ---------------------------------------------------------------------------------------------------

# byte offsets of the float16 scales (d, and dmin / m) inside one block: every weight of a block is code x scale,
# so a NaN/inf scale breaks the whole block, and a scale past 65504 is what a too large weight quantizes to
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2),
                 "Q5_K": (0, 2), "Q6_K": (208,)}


def scales_finite(raw: np.ndarray, qtype) -> bool:
    """Whether every float16 block scale of GGUF bytes `raw` (rows, row_bytes) is finite: two bytes read per scale
    and block, not the codes. F32/F16 have no blocks."""
    t = ggml_type(qtype)
    offsets = SCALE_OFFSETS.get(t.name, ())
    if not offsets:
        return True
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, t.bytes_per_block)
    return all(np.isfinite(np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16)).all() for at in offsets)


# --- dequantize ------------------------------------------------------------------------------------------------------

def _dq_32(raw: np.ndarray, name: str) -> np.ndarray:
    d = _fp16_read(raw[:, 0:2])[:, None]
    has_m = name in ("Q4_1", "Q5_1")
    pos = 4 if has_m else 2
    if name == "Q8_0":
        return raw[:, 2:].view(np.int8).astype(f32) * d
    if name in ("Q5_0", "Q5_1"):
        qh = np.ascontiguousarray(raw[:, pos:pos + 4]).view("<u4")
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32) << 4
        pos += 4
    else:
        hi = 0
    qs = raw[:, pos:pos + 16]
    q = np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32) | hi
    if has_m:
        return q.astype(f32) * d + _fp16_read(raw[:, 2:4])[:, None]
    return (q - (16 if name == "Q5_0" else 8)).astype(f32) * d


def _dq_k(raw: np.ndarray, name: str) -> np.ndarray:
    S = len(raw)
    if name == "Q6_K":
        ql, qh = raw[:, :128].reshape(S, 2, 2, 32), raw[:, 128:192].reshape(S, 2, 1, 32)
        lo = np.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
        q = (lo | (((qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3) << 4)).astype(np.int32) - 32
        sc = raw[:, 192:208].view(np.int8).astype(f32)
        dsc = _fp16_read(raw[:, 208:210])[:, None] * sc
        return (dsc[:, :, None] * q.reshape(S, 16, 16).astype(f32)).reshape(S, QK_K)
    d, dmin = _fp16_read(raw[:, 0:2])[:, None], _fp16_read(raw[:, 2:4])[:, None]
    sc, m = _unpack_scales_k4(raw[:, 4:16])
    qs = raw[:, -128:].reshape(S, 4, 1, 32)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).astype(np.int32)  # (S, 4, 2, 32)
    if name == "Q5_K":
        shift = (np.arange(4, dtype=np.uint8)[:, None] * 2 + np.arange(2, dtype=np.uint8)[None, :])[..., None]
        q += (((raw[:, 16:48].reshape(S, 1, 1, 32) >> shift) & 1).astype(np.int32) << 4)
    d1, m1 = d * sc.astype(f32), dmin * m.astype(f32)
    return (d1[:, :, None] * q.reshape(S, 8, 32).astype(f32) - m1[:, :, None]).reshape(S, QK_K)


def dequantize(data, qtype, cols: int) -> np.ndarray:
    """GGUF bytes (rows, row_bytes) or flat -> float32 (rows, cols), computed as ggml's dequantize_row_* does."""
    t = ggml_type(qtype)
    raw = np.ascontiguousarray(np.asarray(data, dtype=np.uint8)).reshape(-1)
    check_fits(t, cols)
    per_row = row_bytes(t, cols)
    if per_row == 0 or raw.size % per_row:
        raise UsageProblem(f"{raw.size} bytes are not whole rows of {cols} {t.name} weights ({per_row} bytes each)")
    rows = raw.size // per_row
    if t.name == "F32":
        return raw.view("<f4").reshape(rows, cols).astype(f32)
    if t.name == "F16":
        return raw.view("<f2").reshape(rows, cols).astype(f32)
    blocks = raw.reshape(-1, t.bytes_per_block)
    with np.errstate(all="ignore"):
        if t.name in lowbit.DEQUANT:
            out = lowbit.DEQUANT[t.name](blocks)
        else:
            out = _dq_k(blocks, t.name) if t.block_size == QK_K else _dq_32(blocks, t.name)
    return out.reshape(rows, cols)
