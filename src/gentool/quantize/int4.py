"""Better int4 g128 than round-to-nearest, in gentool's int4 format (codecs/quant.py: w = (q - 8)·scale + zero,
bf16 scale and zero per group of g input columns), so the result loads and runs like any int4 checkpoint.

- `--method optimized` (data-free): per group, a search over the quantization range in the style of llama.cpp's
  make_qkx2 (20 candidate step sizes from the min/max range, each followed by a least-squares refit of scale and
  zero to the codes it gives, then two refit passes from the best), scored by the squared error after rounding the
  scale and zero to bf16 — what the kernel will see. Round-to-nearest is one of the candidates, so no group ever
  gets a larger error than RTN's. This targets the error HQQ minimises, with exact least squares for the offset and
  the scale instead of HQQ's half-quadratic iterations on the zero alone.
- calibrated (`--calibrate`): GPTQ (Frantar et al. 2022): columns quantized in order, each one's rounding error
  spread onto the columns not yet quantized through the inverse of the calibration Gram matrix H = Σ x xᵀ of the
  layer's input, the group's scale and zero found at the group's first column by the search above weighted by
  diag(H) — the importance matrix. With only an importance matrix (`--imatrix FILE`: diagonal statistics), the
  weighted search alone (activation-aware rounding, no error feedback).
"""

from __future__ import annotations

import torch

from gentool.codecs import quant as qp

_NSTEP, _RMIN, _RDELTA = 20, -1.0, 0.1


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def _codes(g: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest code in [0, 15] of each weight (..., gs) for per-group (...) scale and zero (code-8 value)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round((g - zero[..., None]) / safe[..., None] + 8).clamp_(0, 15)


def _error(g, a, scale, zero):
    q = _codes(g, scale, zero)
    err = ((g - ((q - 8) * scale[..., None] + zero[..., None])) ** 2 * a).sum(-1)
    return torch.where((scale > 0) & torch.isfinite(err), err, torch.full_like(err, float("inf")))


def _refit(g, a, q):
    """Weighted least squares of g ≈ q·S + Z per group; -> bf16 (scale, zero of code 8)."""
    sw, sq, sx = a.sum(-1).expand(q.shape[:-1]), (a * q).sum(-1), (a * g).sum(-1)
    sqq, sqx = (a * q * q).sum(-1), (a * q * g).sum(-1)
    det = sw * sqq - sq * sq
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    s = (sw * sqx - sq * sx) / det
    z = (sqq * sx - sq * sqx) / det
    s = torch.where(ok, s, torch.zeros_like(s))
    return _bf16(s), _bf16(z + 8 * s)


def search_int4(g: torch.Tensor, a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group bf16 scale and zero (the value of code 8) minimising Σ a·(w - ŵ)² for groups g (..., gs);
    `a` (broadcastable to g) weighs each column, uniform when None."""
    g = g.float()
    a = torch.ones_like(g) if a is None else a.float().expand_as(g)
    lo, hi = g.amin(-1), g.amax(-1)
    rng = hi - lo
    # round-to-nearest (codecs.quant.quantize_int4) first: the baseline every group can fall back to
    best_s = _bf16((rng / 15).clamp_min(qp.TINY))
    best_z = _bf16(lo + 8 * best_s)
    best = _error(g, a, best_s, best_z)
    inv_rng = torch.where(rng > 0, 1 / rng.clamp_min(qp.TINY), torch.zeros_like(rng))
    for step in range(_NSTEP + 1):
        iscale = (15 + _RMIN + _RDELTA * step) * inv_rng
        q = torch.round((g - lo[..., None]) * iscale[..., None]).clamp_(0, 15)
        s, z = _refit(g, a, q)
        err = _error(g, a, s, z)
        better = err < best
        best, best_s, best_z = torch.where(better, err, best), torch.where(better, s, best_s), \
            torch.where(better, z, best_z)
    for _ in range(2):
        s, z = _refit(g, a, _codes(g, best_s, best_z))
        err = _error(g, a, s, z)
        better = err < best
        best, best_s, best_z = torch.where(better, err, best), torch.where(better, s, best_s), \
            torch.where(better, z, best_z)
    return best_s, best_z


def _stored(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"weight": qp.pack_4bit(q.to(torch.uint8)), "weight_scale": scale.to(torch.bfloat16),
            "weight_zero": zero.to(torch.bfloat16)}


@torch.no_grad()
def quantize_int4_optimized(w: torch.Tensor, group_size: int = 128, importance: torch.Tensor | None = None
                            ) -> dict[str, torch.Tensor]:
    """The searched int4 of W (N, K); `importance` (K,) weighs the columns (activation-aware), uniform if None."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    a = None if importance is None else importance.float().reshape(1, k // group_size, group_size)
    rows = max(1, (1 << 22) // k)  # bounded temporaries
    scales, zeros, codes = [], [], []
    for r in range(0, n, rows):
        s, z = search_int4(g[r:r + rows], a)
        scales.append(s)
        zeros.append(z)
        codes.append(_codes(g[r:r + rows], s, z).reshape(-1, k))
    return _stored(torch.cat(codes), torch.cat(scales), torch.cat(zeros))


@torch.no_grad()
def quantize_int4_gptq(w: torch.Tensor, gram: torch.Tensor, group_size: int = 128, *, damp: float = 0.01
                       ) -> dict[str, torch.Tensor]:
    """GPTQ int4 of W (N, K) given the input Gram matrix H (K, K) = Σ x xᵀ over the calibration tokens."""
    n, k = w.shape
    W = w.float().clone()
    H = gram.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(k, dtype=H.dtype)
    L = torch.linalg.cholesky(H)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()  # upper factor of H⁻¹
    imp = torch.diagonal(H).float()
    q_all = torch.empty(n, k)
    scales, zeros = torch.empty(n, k // group_size), torch.empty(n, k // group_size)
    for i1 in range(0, k, group_size):
        i2 = i1 + group_size
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        s, z = search_int4(W1[:, None, :], imp[None, None, i1:i2])
        s, z = s[:, 0], z[:, 0]
        scales[:, i1 // group_size], zeros[:, i1 // group_size] = s, z
        for i in range(group_size):
            col = W1[:, i]
            q = _codes(col[:, None], s, z)[:, 0]
            deq = (q - 8) * s + z
            q_all[:, i1 + i] = q
            e = (col - deq) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
    return _stored(q_all, scales, zeros)
