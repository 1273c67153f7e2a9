"""Scale searches of llama.cpp's quantizers (ggml-quants.c), vectorised across blocks, bit-for-bit.

Legend
    X       (n, B) float32: n values of each of B blocks, value index first so that `X[i]` is contiguous
    W       (n, B) float32 importance weights of the same values
    L       (n, B) quantized levels (float32 holding integers, or int32 where C wraps them to uint8)
    nmax    largest level (e.g. 15 for 4-bit with a min, 32 for Q6_K's signed 6-bit)

Parity rules (why the code looks the way it does):
    * every float operation is float32 and in C's evaluation order: `w*x*l` is `(w*x)*l`, sums run
      sequentially from element 0 (`seqsum`), never pairwise as numpy's `sum` would;
    * `nearest_int` is the 1.5*2**23 trick (round half to even); `np.rint` equals it on |v| < 2**22, which holds
      inside every search here; `nearest_int_exact` reproduces it bit for bit where arguments are unbounded;
    * C's early `return`/`break` become masks: a block that stopped improving keeps its state.
llama.cpp's ggml-base is built without FMA contraction on x86-64 (no -march), which is what makes the
sequential float32 emulation exact; a build that contracts `a*b+c` into FMA may differ in the last bit.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)
_MAGIC = f32(12582912.0)


def seqsum(p: np.ndarray) -> np.ndarray:
    """sum over axis 0 in C order: ((0 + p0) + p1) + ..."""
    acc = p[0] + f32(0.0)
    for k in range(1, p.shape[0]):
        acc += p[k]
    return acc


def nearest_int_exact(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int for any float32, including the out-of-range and NaN cases (int32)."""
    t = (np.asarray(v, dtype=f32) + _MAGIC).view(np.int32)
    return (t & 0x007FFFFF) - 0x00400000


def _clip_rint(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """clamp(nearest_int(v)) in place, for arguments known to lie within |v| < 2**22."""
    np.rint(v, out=v)
    np.maximum(v, f32(lo), out=v)
    np.minimum(v, f32(hi), out=v)
    return v


def _clip_nearest(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """clamp(nearest_int(v)) in place for any float32 argument: C's wrapped result of a huge argument is
    (bits(v + 1.5*2**23) & 0x7fffff) - 2**22, rebuilt here as a float in the [2**23, 2**24) binade."""
    v += _MAGIC
    bits = v.view(np.int32)
    bits &= 0x007FFFFF
    bits |= 0x4B000000
    v -= _MAGIC
    np.maximum(v, f32(lo), out=v)
    np.minimum(v, f32(hi), out=v)
    return v


def fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 -> fp16 little-endian bytes (..., 2), rounded to nearest even as GGML_FP32_TO_FP16."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=f32).astype("<f2").view(np.uint8).reshape(*np.shape(v), 2)


def fp16_read(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(f32)


def blocks(X: np.ndarray, n: int) -> np.ndarray:
    """(rows, cols) -> (n, blocks): value index first, the layout of the searches here."""
    return np.ascontiguousarray(X.reshape(-1, n).T)


def tile(qw: np.ndarray | None, rows: int, n: int) -> np.ndarray | None:
    """An importance row (cols,) repeated for every row, in the layout of `blocks(X, n)`."""
    return None if qw is None else np.ascontiguousarray(np.tile(qw.reshape(-1, n), (rows, 1)).T)


def running_max(a: np.ndarray, start: float = 0.0) -> np.ndarray:
    """`m = start; for v in a: if (v > m) m = v;` over axis 0 (NaN never wins, as in C)."""
    m = np.full(a.shape[1:], f32(start), dtype=f32)
    for k in range(a.shape[0]):
        np.copyto(m, a[k], where=a[k] > m)
    return m


def make_qx(X: np.ndarray, nmax: int, W: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=W): symmetric levels 0..2*nmax-1 with a signed scale.
    Weights are x*x without W. Returns (scale (B,), L (n, B))."""
    B = X.shape[1]
    A = np.abs(X)
    A[np.isnan(A)] = 0  # NaN never wins C's `ax > amax` (Q3_K's sub-block scales may be NaN)
    idx = A.argmax(axis=0)
    cols = np.arange(B)
    mx, amax = X[idx, cols], A[idx, cols]
    Wt = X * X if W is None else W
    WX = Wt * X
    nm = f32(nmax)

    clip = _clip_rint if np.isfinite(X).all() else _clip_nearest  # inf * -0 is NaN: C's nearest_int makes it 0

    def levels(iscale):
        return clip(iscale * X, -nmax, nmax - 1)

    def sums(lv):
        return seqsum(WX * lv), seqsum((Wt * lv) * lv)

    with np.errstate(all="ignore"):
        lv = levels(-nm / mx)
        sumlx, suml2 = sums(lv)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0.0)).astype(f32)
        best = scale * sumlx
        L = lv + nm
        for step in range(-9, 10):
            if step == 0:
                continue
            lv = levels(-(nm + f32(0.1) * f32(step)) / mx)
            sumlx, suml2 = sums(lv)
            upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            np.copyto(L, lv + nm, where=upd)
            np.copyto(scale, sumlx / suml2, where=upd)
            np.copyto(best, scale * sumlx, where=upd)
    zero = amax < GROUP_MAX_EPS
    scale[zero] = 0
    L[:, zero] = 0
    return scale, L


def make_qkx(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants (with weights): levels 0..nmax, x ~ scale*L + min, min <= 0, trying
    nstep+1 grid scales each refined by weighted least squares; the error is w*diff^2, or w*|diff| with `mad`
    (use_mad, Q2_K without an imatrix). Returns (scale, the_min = -min, L)."""
    n = X.shape[0]
    mn0 = np.minimum(X.min(axis=0), f32(0.0))
    mn = mn0.copy()
    mx = X.max(axis=0)
    sum_w = W[0].copy()
    sum_x = sum_w * X[0]
    for i in range(1, n):
        sum_w += W[i]
        sum_x += W[i] * X[i]
    flat = mx == mn
    nm = f32(nmax)

    def err(scale, minv, lv):
        diff = (scale * lv + minv) - X
        return seqsum(W * (np.abs(diff) if mad else diff * diff))

    with np.errstate(all="ignore"):
        iscale = nm / (mx - mn)
        scale = f32(1.0) / iscale
        L = _clip_rint(iscale * (X - mn), 0, nmax)  # bounded: mn is still min(x)
        best = err(scale, mn, L)
        for step in range(nstep + 1):
            iscale = ((f32(rmin) + f32(rdelta) * f32(step)) + nm) / (mx - mn)
            La = _clip_nearest(iscale * (X - mn), 0, nmax)  # unbounded once mn moved towards 0
            WL = W * La
            sum_l, sum_l2, sum_xl = seqsum(WL), seqsum(WL * La), seqsum(WL * X)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min[pos] = 0
            np.copyto(this_scale, sum_xl / sum_l2, where=pos)
            cur = err(this_scale, this_min, La)
            upd = (D > 0) & (cur < best)
            np.copyto(L, La, where=upd)
            np.copyto(best, cur, where=upd)
            np.copyto(scale, this_scale, where=upd)
            np.copyto(mn, this_min, where=upd)
    scale[flat] = 0
    L[:, flat] = 0
    return scale, -np.where(flat, mn0, mn), L


def make_qp(X: np.ndarray, nmax: int, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: levels 0..nmax (no min) of positive values, as used for K-quant sub-block scales/mins with an
    importance matrix. Returns (scale (B,), L (n, B) int32 already wrapped to uint8 as C stores it)."""
    n, B = X.shape
    mx = np.zeros(B, dtype=f32)
    for i in range(n):
        mx = np.where(mx > X[i], mx, X[i])  # MAX(max, x[i])
    nm = f32(nmax)
    with np.errstate(all="ignore"):
        iscale = nm / mx
        L = nearest_int_exact(iscale * X) & 0xFF
        scale = f32(1.0) / iscale
        diff = X - scale * L.astype(f32)
        best = seqsum((W * diff) * diff)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (f32(0.1) * f32(step) + nm) / mx
            scale_is = f32(1.0) / iscale_is
            lv = np.minimum(nearest_int_exact(iscale_is * X), nmax).astype(f32)
            diff = X - scale_is * lv
            mse = seqsum((W * diff) * diff)
            upd = mse < best
            np.copyto(best, mse, where=upd)
            np.copyto(iscale, iscale_is, where=upd)
        li = np.minimum(nearest_int_exact(iscale * X), nmax)
        L = li & 0xFF
        WX = W * X
        sumlx = seqsum(WX * li.astype(f32))
        suml2 = seqsum((W * li.astype(f32)) * li.astype(f32))
        for _ in range(5):  # a block whose pass changed nothing would change nothing again: no break needed
            for i in range(n):
                w, x, li_old = W[i], X[i], L[i].astype(f32)
                slx = sumlx - WX[i] * li_old
                sl2 = suml2 - (w * li_old) * li_old
                new_l = np.minimum(nearest_int_exact((x * sl2) / slx), nmax)
                nl = new_l.astype(f32)
                slx2 = slx + WX[i] * nl
                sl22 = sl2 + (w * nl) * nl
                acc = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                np.copyto(L[i], new_l & 0xFF, where=acc)
                np.copyto(sumlx, slx2, where=acc)
                np.copyto(suml2, sl22, where=acc)
        out = np.where(suml2 > 0, sumlx / suml2, f32(0.0)).astype(f32)
    zero = mx < GROUP_MAX_EPS
    out[zero] = 0
    L[:, zero] = 0
    return out, L


def make_q3(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): signed levels -nmax..nmax-1 with weights x*x, refined one value
    at a time (up to 5 passes) while the weighted fit improves. Returns (scale (B,), L + nmax (n, B))."""
    A = np.abs(X)
    idx = A.argmax(axis=0)
    cols = np.arange(X.shape[1])
    mx, amax = X[idx, cols], A[idx, cols]
    W = X * X
    WX = W * X
    with np.errstate(all="ignore"):
        L = _clip_rint((-f32(nmax) / mx) * X, -nmax, nmax - 1)
        sumlx, suml2 = seqsum(WX * L), seqsum((W * L) * L)
        for _ in range(5):  # a pass that changed nothing would change nothing again: no break needed
            for i in range(X.shape[0]):
                w, li = W[i], L[i]
                slx = sumlx - WX[i] * li
                sl2 = suml2 - (w * li) * li
                new_l = np.clip(nearest_int_exact((X[i] * sl2) / slx), -nmax, nmax - 1).astype(f32)
                slx2 = slx + WX[i] * new_l
                sl22 = sl2 + (w * new_l) * new_l
                acc = (slx > 0) & (new_l != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                np.copyto(L[i], new_l, where=acc)
                np.copyto(sumlx, slx2, where=acc)
                np.copyto(suml2, sl22, where=acc)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0.0)).astype(f32)
    L += f32(nmax)
    zero = amax < GROUP_MAX_EPS
    scale[zero] = 0
    L[:, zero] = 0
    return scale, L
