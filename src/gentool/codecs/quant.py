"""Weight quantization as small pure functions: quantize, dequantize, pack, unpack. No modules, no I/O.

Every `quantize_*` returns the stored tensors (codes + companions) and computes the codes against the *stored*
(rounded) scales, so `dequantize_*` of its output is exactly what a kernel sees. Shapes: W is (N, K) = (out, in).

- int8:  symmetric per output row, scale = absmax/127 (float32), q in [-127, 127].      8 + 32/K bits/weight
- int4:  asymmetric groups of g along K, scale = (max-min)/15 and zero (bf16), q in [0, 15], two per byte;
         w = (q - 8)·scale + zero, the convention of torch's `_weight_int4pack_mm`.      4 + 32/g bits/weight
- nf4:   QLoRA's NormalFloat code book, blocks of 64 (row-major over W), absmax per block, the absmaxes double-
         quantized (mean subtracted, int8 symmetric in blocks of 256, float32 scales).   ~4.127 bits/weight
- fp8:   float8 e4m3 with a float32 scale per output row, scale = amax/448.             8 + 32/K bits/weight
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128)
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256
FP8_MAX = 448.0  # largest finite float8_e4m3fn
TINY = 1e-12     # scale used for an all-zero row/group (its codes are all zero-valued anyway)

# bitsandbytes' NF4 code book (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) normalised to [-1, 1], exact 0
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


# --- nibbles ----------------------------------------------------------------------------------------------------------
def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2n) values in [0, 15] -> (..., n) uint8; element 2i in the high nibble, 2i+1 in the low one
    (the input layout of torch's `_convert_weight_to_int4pack` and bitsandbytes' NF4)."""
    c = codes.to(torch.uint8)
    assert c.shape[-1] % 2 == 0, "pack_4bit needs an even last dimension"
    return (c[..., 0::2] << 4) | c[..., 1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_4bit: (..., n) uint8 -> (..., 2n) uint8 in [0, 15]."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).flatten(-2)


# --- int8 -------------------------------------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(TINY)                      # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)      # (N, K)
    return {"weight": q, "weight_scale": scale}


def dequantize_int8(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["weight"].float() * t["weight_scale"].float()[:, None]


# --- int4, groupwise asymmetric ---------------------------------------------------------------------------------------
def quantize_int4(w: torch.Tensor, group_size: int = 128) -> dict[str, torch.Tensor]:
    n, k = w.shape
    assert k % group_size == 0, f"group size {group_size} does not divide {k}"
    g = w.float().reshape(n, k // group_size, group_size)                   # (N, G, g)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(TINY).to(torch.bfloat16)             # (N, G)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)                      # value of code 8
    q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return {"weight": pack_4bit(q.reshape(n, k)), "weight_scale": scale, "weight_zero": zero}


def int4_codes(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return unpack_4bit(t["weight"])                                          # (N, K) uint8


def dequantize_int4(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q = int4_codes(t).float()
    n, k = q.shape
    groups = t["weight_scale"].shape[1]
    q = q.reshape(n, groups, k // groups)
    return ((q - 8) * t["weight_scale"].float()[..., None] + t["weight_zero"].float()[..., None]).reshape(n, k)


# --- NF4 with double quantization -------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    pad = -len(x) % size
    return torch.cat([x, x.new_zeros(pad)]).reshape(-1, size)


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    n, k = w.shape
    assert (n * k) % NF4_BLOCK == 0, f"NF4 needs a multiple of {NF4_BLOCK} weights"
    blocks = w.float().reshape(-1, NF4_BLOCK)                                # (nb, 64)
    absmax = blocks.abs().amax(-1)                                           # (nb,)
    mean = absmax.mean()                                                     # the second level's offset
    c = _blocks(absmax - mean, NF4_SCALE_BLOCK)                              # (nb2, 256)
    scale2 = (c.abs().amax(-1) / 127).clamp_min(TINY)                       # (nb2,)
    q2 = torch.round(c / scale2[:, None]).clamp(-127, 127).to(torch.int8).flatten()[: len(absmax)]
    stored = {"weight_absmax": q2, "weight_absmax_scale": scale2, "weight_absmax_mean": mean.reshape(1)}
    amax = nf4_absmax(stored)[:, None]                                       # what dequantization will use
    x = torch.where(amax > 0, blocks / amax.clamp_min(TINY), torch.zeros_like(blocks))
    codes = torch.bucketize(x, (NF4_CODE[1:] + NF4_CODE[:-1]) / 2)          # nearest code (nb, 64)
    return {"weight": pack_4bit(codes.reshape(n, k)), **stored}


def nf4_absmax(t: dict[str, torch.Tensor]) -> torch.Tensor:
    q2 = t["weight_absmax"]
    scale2 = t["weight_absmax_scale"].float().repeat_interleave(NF4_SCALE_BLOCK)[: len(q2)]
    return q2.float() * scale2 + t["weight_absmax_mean"].float()


def dequantize_nf4(t: dict[str, torch.Tensor], code: torch.Tensor | None = None) -> torch.Tensor:
    codes = unpack_4bit(t["weight"])                                         # (N, K)
    n, k = codes.shape
    code = NF4_CODE.to(codes.device) if code is None else code
    values = code[codes.long()].reshape(-1, NF4_BLOCK)
    return (values * nf4_absmax(t)[:, None]).reshape(n, k)


# --- FP8 e4m3, row-wise scales ----------------------------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp_min(TINY)                  # (N,)
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def dequantize_fp8(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["weight"].float() * t["weight_scale"].float()[:, None]


# --- by scheme ----------------------------------------------------------------------------------------------------------
SCHEMES = ("int8", "int4", "nf4", "fp8")


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 128) -> dict[str, torch.Tensor]:
    if scheme == "int8":
        return quantize_int8(w)
    if scheme == "int4":
        return quantize_int4(w, group_size)
    if scheme == "nf4":
        return quantize_nf4(w)
    if scheme == "fp8":
        return quantize_fp8(w)
    raise AssertionError(f"unknown scheme {scheme}")


def dequantize_weight(t: dict[str, torch.Tensor], scheme: str) -> torch.Tensor:
    return {"int8": dequantize_int8, "int4": dequantize_int4, "nf4": dequantize_nf4, "fp8": dequantize_fp8}[scheme](t)


def stored_bits(t: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() * 8 for v in t.values())
