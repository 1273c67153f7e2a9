"""GGML block codecs for llama.cpp's Q2_K, Q3_K, IQ4_NL and IQ4_XS, bit-for-bit equal to ggml's `quantize_q2_K`,
`quantize_q3_K`, `quantize_iq4_nl` and `quantize_iq4_xs` (what ggml_quantize_chunk, and so llama-quantize, runs),
with or without an importance matrix. codecs/ggml.py dispatches here; the parity rules are ggml_search's.

Legend (GGUF byte layouts, little-endian; d, dmin fp16)
    Q2_K   256 w, 84 B   scales[16] | qs[64] | d | dmin       w = d*(sc&15)*q - dmin*(sc>>4), q in 0..3
    Q3_K   256 w, 110 B  hmask[32] | qs[64] | scales[12] | d  w = d*(s-32)*(q-4), q in 0..7, s 6-bit
    IQ4_NL  32 w, 18 B   d | qs[16]                           w = d*K[q], q a nibble
    IQ4_XS 256 w, 136 B  d | scales_h u16 | scales_l[4] | qs[128]   w = d*(s-32)*K[q], s 6-bit per 32 weights
K = kvalues_iq4nl, a non-linear 16-level grid. Q2_K/Q3_K have 16 sub-blocks of 16; their 2-bit quants are packed
as Q6_K's low bits: weight 32k+l of each 128-weight half h sits in qs[32h+l] at bits 2k. Q3_K's third bit of
weight j is bit j//32 of hmask[j%32]; its scale s_j keeps its low nibble in scales[j%8] (j<8 low, j>=8 high half)
and its top 2 bits at bits 2*(j//4) of scales[8 + j%4]. IQ4 nibbles pair weight j (low) with j+16 (high) in each
block of 32; IQ4_XS's s_j keeps its low nibble in scales_l[j//2] (odd j high) and its top 2 bits at bits 2j of
scales_h.
"""

from __future__ import annotations

import numpy as np

from gentool.codecs.ggml_search import (
    GROUP_MAX_EPS,
    blocks,
    f32,
    fp16_bytes,
    fp16_read,
    make_q3,
    make_qkx,
    make_qp,
    make_qx,
    nearest_int_exact,
    running_max,
    seqsum,
    tile,
)

QK_K = 256
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_KF = KVALUES.astype(f32)


def _pack2(L: np.ndarray) -> np.ndarray:
    """(S, 256) 2-bit levels -> (S, 64) bytes, weight 32k+l of half h at bits 2k of byte 32h+l."""
    L = L.astype(np.uint8).reshape(len(L), 2, 4, 32)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(len(L), 64)


def _unpack2(qs: np.ndarray) -> np.ndarray:
    q = qs.reshape(len(qs), 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]
    return (q & 3).reshape(len(qs), QK_K)


def _sumx2(Xb: np.ndarray) -> np.ndarray:
    XT = np.ascontiguousarray(Xb.T)
    return seqsum(XT * XT)


# --- Q2_K ------------------------------------------------------------------------------------------------------------

def q2_k(X: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_q2_K_ref (no imatrix) / quantize_row_q2_K_impl -> (S, 84) bytes."""
    Xb = X.reshape(-1, QK_K)
    S = len(Xb)
    Xs = blocks(Xb, 16)
    if qw is None:
        scales, mins, L = make_qkx(Xs, np.abs(Xs), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.reshape(S, 16).T, mins.reshape(S, 16).T
        max_scale, max_min = running_max(scales), running_max(mins)
        with np.errstate(divide="ignore"):
            inv_s = np.where(max_scale > 0, f32(15.0) / max_scale, f32(0.0)).astype(f32)
            inv_m = np.where(max_min > 0, f32(15.0) / max_min, f32(0.0)).astype(f32)
        ls = nearest_int_exact(inv_s * scales) & 0xFF
        lm = nearest_int_exact(inv_m * mins)
        d = np.where(max_scale > 0, max_scale / f32(15.0), f32(0.0))
        dmin = np.where(max_min > 0, max_min / f32(15.0), f32(0.0))
    else:
        sigma2 = _sumx2(Xb) / f32(QK_K)
        W = tile(qw, X.shape[0], 16) * np.sqrt(np.repeat(sigma2, 16) + Xs * Xs)
        sw = seqsum(W).reshape(S, 16).T
        scales, mins, L = make_qkx(Xs, W, 3, -0.9, 0.05, 36)
        d, ls = make_qp(scales.reshape(S, 16).T, 15, sw)
        dmin, lm = make_qp(mins.reshape(S, 16).T, 15, sw)
    sc = ((ls | (lm << 4)) & 0xFF).astype(np.uint8).T  # (S, 16)
    d16, dmin16 = fp16_bytes(d), fp16_bytes(dmin)
    dd = (fp16_read(d16)[:, None] * (sc & 0xF).astype(f32))[..., None]
    dm = (fp16_read(dmin16)[:, None] * (sc >> 4).astype(f32))[..., None]
    Lnew = np.clip(nearest_int_exact((Xb.reshape(S, 16, 16) + dm) / dd), 0, 3)
    L = np.where(dd != 0, Lnew, L.T.reshape(S, 16, 16)).reshape(S, QK_K)
    return np.concatenate([sc, _pack2(L), d16, dmin16], axis=1)


def dq_q2_k(raw: np.ndarray) -> np.ndarray:
    sc = raw[:, :16]
    d, dmin = fp16_read(raw[:, 80:82])[:, None], fp16_read(raw[:, 82:84])[:, None]
    dl, ml = d * (sc & 0xF).astype(f32), dmin * (sc >> 4).astype(f32)
    q = _unpack2(raw[:, 16:80]).astype(f32).reshape(len(raw), 16, 16)
    return (dl[..., None] * q - ml[..., None]).reshape(len(raw), QK_K)


# --- Q3_K ------------------------------------------------------------------------------------------------------------

def _pack_scales_q3(ls: np.ndarray) -> np.ndarray:
    """(S, 16) 6-bit scales -> (S, 12) bytes."""
    ls = ls.astype(np.uint8)
    out = np.zeros((len(ls), 12), np.uint8)
    out[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    hi = (ls >> 4).reshape(len(ls), 4, 4) << (2 * np.arange(4, dtype=np.uint8))[:, None]
    out[:, 8:] = np.bitwise_or.reduce(hi, axis=1)
    return out


def _unpack_scales_q3(b: np.ndarray) -> np.ndarray:
    lo = np.concatenate([b[:, :8] & 0xF, b[:, :8] >> 4], axis=1)
    hi = (b[:, None, 8:12] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (S, 4 groups, 4)
    return (lo | (hi.reshape(len(b), 16) << 4)).astype(np.int32)


def q3_k(X: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """quantize_row_q3_K_ref (no imatrix) / quantize_row_q3_K_impl -> (S, 110) bytes."""
    Xb = X.reshape(-1, QK_K)
    S = len(Xb)
    Xs = blocks(Xb, 16)
    if qw is None:
        scales, L = make_q3(Xs, 4)
        scales = scales.reshape(S, 16).T
        A = np.abs(scales)
        max_abs, max_scale = np.zeros(S, f32), np.zeros(S, f32)
        for j in range(16):
            upd = A[j] > max_abs
            np.copyto(max_abs, A[j], where=upd)
            np.copyto(max_scale, scales[j], where=upd)
        nz = max_scale != 0
        with np.errstate(all="ignore"):
            iscale = np.where(nz, f32(-32.0) / max_scale, f32(1.0)).astype(f32)
            ls = np.where(nz, np.clip(nearest_int_exact(iscale * scales), -32, 31) + 32, 0).T
            d = np.where(nz, f32(1.0) / iscale, f32(0.0))
    else:
        sigma2 = f32(2.0) * _sumx2(Xb) / f32(QK_K)
        W = tile(qw, X.shape[0], 16) * np.sqrt(np.repeat(sigma2, 16) + Xs * Xs)
        scales, L = make_qx(Xs, 4, W)
        d, ls = make_qx(scales.reshape(S, 16).T, 32, seqsum(W).reshape(S, 16).T)
        ls = ls.T.astype(np.int32)
    sc_bytes = _pack_scales_q3(ls)
    d16 = fp16_bytes(d)
    dd = (fp16_read(d16)[:, None] * (ls - 32).astype(f32))[..., None]
    with np.errstate(all="ignore"):
        Lnew = np.clip(nearest_int_exact(Xb.reshape(S, 16, 16) / dd), -4, 3) + 4
    L = np.where(dd != 0, Lnew, L.T.reshape(S, 16, 16)).astype(np.uint8).reshape(S, QK_K)
    high = L > 3
    hmask = np.bitwise_or.reduce(high.reshape(S, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[:, None],
                                 axis=1)
    return np.concatenate([hmask, _pack2(L - 4 * high), sc_bytes, d16], axis=1)


def dq_q3_k(raw: np.ndarray) -> np.ndarray:
    S = len(raw)
    hbit = (raw[:, None, :32] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (S, 8, 32): weight 32b + m
    q = _unpack2(raw[:, 32:96]).astype(np.int32) - 4 * (1 - hbit.reshape(S, QK_K).astype(np.int32))
    dl = fp16_read(raw[:, 108:110])[:, None] * (_unpack_scales_q3(raw[:, 96:108]) - 32).astype(f32)
    return (dl[..., None] * q.astype(f32).reshape(S, 16, 16)).reshape(S, QK_K)


# --- IQ4_NL / IQ4_XS -------------------------------------------------------------------------------------------------

_MU = np.clip(np.searchsorted(_KF, np.arange(-128, 114, dtype=f32), side="right"), 1, 15)  # of floor(x)


def best_index(x: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, x): the nearest grid level, the lower one on ties (NaN -> 15).
    C's binary search ends at mu with K[mu-1] <= x < K[mu], which for an integer grid depends on floor(x) only (a
    table); its end cases x <= K[0] and x >= K[15] (and +-inf, NaN) come out of the same comparison."""
    fl = np.minimum(np.maximum(np.floor(x), f32(-128)), f32(113))
    np.nan_to_num(fl, copy=False, nan=113.0)
    mu = _MU[(fl + f32(128)).astype(np.intp)]
    lower = (x - _KF[mu - 1]) < (_KF[mu] - x)
    return (mu - lower).astype(np.uint8)


def _iq4_fit(Xs: np.ndarray, W: np.ndarray, amax: np.ndarray, mx: np.ndarray) -> np.ndarray:
    """The per-32 scale of quantize_row_iq4_nl_impl (ntry = 7): a least-squares fit at d = max/127, then the best
    of the fits at 15 grid scales around it. Returns d (B,), 0 for all-zero blocks."""
    def fit(iscale):
        q = _KF[best_index(iscale * Xs)]
        Wq = W * q
        return seqsum(Wq * Xs), seqsum(Wq * q)

    with np.errstate(all="ignore"):
        sumqx, sumq2 = fit(f32(1.0) / ((-mx) / f32(-127.0)))
        d = np.where(sumq2 > 0, sumqx / sumq2, f32(0.0)).astype(f32)
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = fit(f32(itry - 127) / mx)
            upd = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            np.copyto(d, sumqx / sumq2, where=upd)
            np.copyto(best, d * sumqx, where=upd)
    d[amax < GROUP_MAX_EPS] = 0
    return d


def _nibbles32(L: np.ndarray) -> np.ndarray:
    """(32, B) levels -> (B, 16) bytes: weight j in the low nibble, j+16 in the high one."""
    return (L[:16] | (L[16:] << 4)).T


def iq4(X: np.ndarray, qw: np.ndarray | None, xs: bool) -> np.ndarray:
    """quantize_iq4_nl / quantize_iq4_xs (quantize_row_iq4_nl_impl, ntry 7) -> (S, 18 | 136) bytes."""
    sbs = QK_K if xs else 32
    Xb = X.reshape(-1, sbs)
    S, nb = len(Xb), sbs // 32
    Xs = blocks(Xb, 32)
    sigma2 = np.repeat(_sumx2(Xb) * f32(2.0 / sbs), nb)
    W = Xs * Xs if qw is None else tile(qw, X.shape[0], 32) * np.sqrt(sigma2 + Xs * Xs)
    A = np.abs(Xs)
    idx = A.argmax(axis=0)
    cols = np.arange(Xs.shape[1])
    amax, mx = A[idx, cols], Xs[idx, cols]
    scales = _iq4_fit(Xs, W, amax, mx)
    if not xs:
        with np.errstate(all="ignore"):
            inv = np.where(scales != 0, f32(1.0) / scales, f32(0.0)).astype(f32)
        return np.concatenate([fp16_bytes(scales), _nibbles32(best_index(inv * Xs))], axis=1)
    sc = scales.reshape(S, nb).T
    A = np.abs(sc)
    max_abs, max_scale = np.zeros(S, f32), np.zeros(S, f32)
    for j in range(nb):
        upd = A[j] > max_abs
        np.copyto(max_abs, A[j], where=upd)
        np.copyto(max_scale, sc[j], where=upd)
    d = (-max_scale) / f32(32.0)
    with np.errstate(all="ignore"):
        inv = np.where(d != 0, f32(1.0) / d, f32(0.0)).astype(f32)
        ls = np.clip(nearest_int_exact(inv * sc), -32, 31)  # (nb, S)
        dl = d * ls.astype(f32)
        idl = np.where(dl != 0, f32(1.0) / dl, f32(0.0)).astype(f32).T.reshape(-1)
    qs = _nibbles32(best_index(idl * Xs)).reshape(S, 128)
    ls = (ls + 32).astype(np.uint16)
    scales_l = ((ls[0::2] & 0xF) | ((ls[1::2] & 0xF) << 4)).astype(np.uint8).T
    scales_h = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(nb, dtype=np.uint16))[:, None], axis=0)
    return np.concatenate([fp16_bytes(d), scales_h.astype("<u2").view(np.uint8).reshape(S, 2), scales_l, qs], axis=1)


def dq_iq4(raw: np.ndarray, xs: bool) -> np.ndarray:
    S = len(raw)
    d = fp16_read(raw[:, 0:2])[:, None]
    qs = raw[:, 8:] if xs else raw[:, 2:]
    qs = qs.reshape(S, -1, 1, 16)
    q = _KF[np.concatenate([qs & 0xF, qs >> 4], axis=2)].reshape(S, -1, 32)
    if xs:
        h = np.ascontiguousarray(raw[:, 2:4]).view("<u2").astype(np.int32)  # (S, 1)
        lo = np.stack([raw[:, 4:8] & 0xF, raw[:, 4:8] >> 4], axis=2).reshape(S, 8).astype(np.int32)
        ls = lo | (((h >> (2 * np.arange(8))) & 3) << 4)
        d = d * (ls - 32).astype(f32)
    return (d[..., None] * q).reshape(S, -1)


QUANT = {"Q2_K": q2_k, "Q3_K": q3_k, "IQ4_NL": lambda X, qw: iq4(X, qw, False),
         "IQ4_XS": lambda X, qw: iq4(X, qw, True)}
DEQUANT = {"Q2_K": dq_q2_k, "Q3_K": dq_q3_k, "IQ4_NL": lambda r: dq_iq4(r, False),
           "IQ4_XS": lambda r: dq_iq4(r, True)}
