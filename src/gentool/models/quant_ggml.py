"""Layers whose weight is llama.cpp's GGML blocks (Q4_0 … Q8_0, Q4_K, Q5_K, Q6_K), decoded on the device.

`GGMLLinear` and `GGMLEmbedding` keep one tensor, `weight` = the GGUF bytes (rows, row_bytes) uint8 of one GGML type
in Hugging Face row order (q/k not permuted), so `state_dict()` is the file layout and `export-gguf` copies bytes.

Decoding: `affine(raw, qtype, cols)` splits any type into integer codes q (R, cols) and a scale and offset per group
(32 weights; 16 for Q6_K), w = q·scale + offset, with signed codes where ggml's `dequantize_row_*` subtracts first,
so `dequantize` equals codecs.ggml.dequantize bit for bit. Kernel layouts (`_refresh`, rerun after every `.to()`):
- CPU, the default: gentool's kernel (models/qkernel.py) on the same affine split, repacked once at load: Q4_0,
  Q4_1, Q4_K as 4-bit codes c = q - lo with offset z + lo·s; Q5_0, Q5_1, Q5_K, Q6_K (groups of 16), Q8_0 as int8
  codes. w = c·s + z is the dequantized weight up to float32 rounding; activations stay float32.
- CPU with GGML_CPU_KERNEL = "int4" where that kernel is unavailable, group-32 types: the codes as nibble planes in
  `Int4Linear`'s layout (w = (c - 8)·s + z), run by torch's int4 kernel: Q4_0, Q4_1, Q4_K one plane (Q4_K: s = d·sc,
  z = 8s - dmin·m), Q5_0, Q5_1, Q5_K, Q8_0 two (the low nibble, and the high bits with scale 16s).
- otherwise (no CPU kernel, CUDA): the weight dequantized once into the compute dtype, then F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gentool.codecs import quant as qp
from gentool.codecs.ggml import QK_K, fits, ggml_type, row_bytes
from gentool.codecs.ggml_lowbit import KVALUES as KVALUES_IQ4
from gentool.errors import GentoolError
from gentool.models import qkernel
from gentool.models.quant import Int4Linear, QuantLinear

GGML_CPU_KERNEL = "dense"  # "dense" (dequantize once, F.linear) or "int4" (Int4Linear's kernel on nibble planes)
FLOAT_TYPES = ("F32", "F16")
# type -> (smallest code, number of codes, group size) of `affine`'s codes
_CODES = {"Q4_0": (-8, 16, 32), "Q4_1": (0, 16, 32), "Q5_0": (-16, 32, 32), "Q5_1": (0, 32, 32),
          "Q8_0": (-128, 256, 32), "Q4_K": (0, 16, 32), "Q5_K": (0, 32, 32), "Q6_K": (-32, 64, 16),
          "Q2_K": (0, 4, 16), "Q3_K": (-4, 8, 16), "IQ4_NL": (-127, 241, 32), "IQ4_XS": (-127, 241, 32)}
SUPPORTED = tuple(_CODES)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """(S, 2) little-endian fp16 bytes -> (S, 1) float32."""
    return raw.contiguous().view(torch.float16).float()


def _scales_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 for the 8 sub-blocks: (S, 12) bytes -> 6-bit scales and mins (S, 8)."""
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def _bits32(raw4: torch.Tensor) -> torch.Tensor:
    """(S, 4) bytes of a little-endian uint32 -> (S, 32) of its bits, bit j in column j."""
    shift = torch.arange(8, device=raw4.device, dtype=torch.uint8)
    return ((raw4[:, :, None] >> shift) & 1).reshape(-1, 32)


def affine(raw: torch.Tensor, qtype: str, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """GGUF bytes (R, row_bytes) -> codes (R, cols) int16, scale and offset (R, cols/g) float32, group size g."""
    t = ggml_type(qtype)
    lo, _, g = _CODES[t.name]
    rows = raw.shape[0]
    b = raw.reshape(-1, t.bytes_per_block)
    S = b.shape[0]
    zero = None
    if t.block_size == 32 and t.name != "IQ4_NL":
        d = _f16(b[:, 0:2])
        pos = 4 if t.name in ("Q4_1", "Q5_1") else 2
        if t.name == "Q8_0":
            q = b[:, 2:].contiguous().view(torch.int8).to(torch.int16)
        else:
            qh = _bits32(b[:, pos:pos + 4]).to(torch.int16) << 4 if t.name in ("Q5_0", "Q5_1") else 0
            pos += 4 if t.name in ("Q5_0", "Q5_1") else 0
            qs = b[:, pos:pos + 16]
            q = torch.cat([qs & 0xF, qs >> 4], 1).to(torch.int16) + qh
            if t.name in ("Q4_1", "Q5_1"):
                zero = _f16(b[:, 2:4])
            else:
                q = q + lo  # Q4_0: q - 8, Q5_0: q - 16
        scale = d
    elif t.name == "Q6_K":
        ql, qh = b[:, :128].reshape(S, 2, 2, 32), b[:, 128:192].reshape(S, 2, 1, 32)
        low = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)
        shift = (2 * torch.arange(4, device=raw.device, dtype=torch.uint8))[:, None]
        q = (low | (((qh >> shift) & 3) << 4)).to(torch.int16).reshape(S, QK_K) - 32
        scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()     # (S, 16)
    elif t.name in ("Q2_K", "Q3_K"):  # 2-bit codes laid out as Q6_K's low bits; Q3_K's third bit in hmask
        pos = 16 if t.name == "Q2_K" else 32
        shift = (2 * torch.arange(4, device=raw.device, dtype=torch.uint8))[:, None]
        q = ((b[:, pos:pos + 64].reshape(S, 2, 1, 32) >> shift) & 3).to(torch.int16).reshape(S, QK_K)
        if t.name == "Q2_K":
            sc, d = b[:, :16], _f16(b[:, 80:82])
            scale, zero = d * (sc & 0xF).float(), -(_f16(b[:, 82:84]) * (sc >> 4).float())            # (S, 16)
        else:
            bit = torch.arange(8, device=raw.device, dtype=torch.uint8)[:, None]
            q = q - 4 * (1 - ((b[:, None, :32] >> bit) & 1).to(torch.int16).reshape(S, QK_K))
            sc = b[:, 96:108]
            hi = ((sc[:, None, 8:12] >> shift) & 3).reshape(S, 16)
            ls = torch.cat([sc[:, :8] & 0xF, sc[:, :8] >> 4], 1) | (hi << 4)
            scale = _f16(b[:, 108:110]) * (ls.to(torch.int16) - 32).float()                    # (S, 16)
    elif t.name in ("IQ4_NL", "IQ4_XS"):
        qs = b[:, 8:] if t.name == "IQ4_XS" else b[:, 2:]
        qs = qs.reshape(S, -1, 1, 16)
        kv = torch.tensor(KVALUES_IQ4.tolist(), dtype=torch.int16, device=raw.device)  # IQ4 codes: K[nibble]
        q = kv[torch.cat([qs & 0xF, qs >> 4], 2).long()].reshape(S, -1)
        scale = _f16(b[:, 0:2])
        if t.name == "IQ4_XS":
            h = b[:, 2:4].contiguous().view(torch.int16).int() & 0xFFFF                           # (S, 1)
            lo4 = torch.stack([b[:, 4:8] & 0xF, b[:, 4:8] >> 4], 2).reshape(S, 8).int()
            ls = lo4 | (((h >> (2 * torch.arange(8, device=raw.device))) & 3) << 4)
            scale = scale * (ls - 32).float()                                                  # (S, 8)
    else:  # Q4_K, Q5_K
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = _scales_k4(b[:, 4:16])
        qs = b[:, -128:].reshape(S, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], 2).to(torch.int16)                                # (S, 4, 2, 32)
        if t.name == "Q5_K":
            shift = (torch.arange(4, device=raw.device, dtype=torch.uint8)[:, None] * 2
                     + torch.arange(2, device=raw.device, dtype=torch.uint8)[None, :])[..., None]
            q = q + (((b[:, 16:48].reshape(S, 1, 1, 32) >> shift) & 1).to(torch.int16) << 4)
        q = q.reshape(S, QK_K)
        scale, zero = d * sc.float(), -(dmin * m.float())                                   # (S, 8)
    scale = scale.reshape(rows, cols // g)
    zero = torch.zeros_like(scale) if zero is None else zero.reshape(rows, cols // g)
    return q.reshape(rows, cols), scale, zero, g


def dequantize_bytes(raw: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """GGUF bytes (R, row_bytes) -> float32 (R, cols), as ggml's dequantize_row_* computes it."""
    name = ggml_type(qtype).name
    if name == "F32":
        return raw.contiguous().view(torch.float32).reshape(raw.shape[0], cols)
    if name == "F16":
        return raw.contiguous().view(torch.float16).float().reshape(raw.shape[0], cols)
    q, scale, zero, g = affine(raw, name, cols)
    r = q.shape[0]
    w = q.float().reshape(r, -1, g) * scale[..., None]
    if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K", "Q2_K"):
        w = w + zero[..., None]
    return w.reshape(r, cols)


def int4_planes(raw: torch.Tensor, qtype: str, cols: int) -> list[dict[str, torch.Tensor]]:
    """A group-32 type as 1 or 2 `Int4Linear` weights (codes, scale, zero) whose outputs sum to the layer's."""
    lo, n, g = _CODES[qtype]
    assert g == 32 and n <= 256
    q, s, o, _ = affine(raw, qtype, cols)
    u = (q - lo).to(torch.uint8)                                   # codes from 0
    rows = q.shape[0]
    planes = [{"weight": qp.pack_4bit(u & 0xF), "weight_scale": s, "weight_zero": o + (lo + 8) * s}]
    if n > 16:
        planes.append({"weight": qp.pack_4bit(u >> 4), "weight_scale": 16 * s, "weight_zero": 128 * s})
    for p in planes:
        assert p["weight"].shape == (rows, cols // 2)
    return planes


def ggml_activations(x: torch.Tensor, qtype: str) -> torch.Tensor:
    """x (M, K) as ggml's CPU backend rounds it before a dot product with `qtype` weights (its vec_dot_type):
    Q8_0/Q8_1 blocks of 32 (x86 quantize_row_q8_0: id = 127/amax, round half to even, d = fp16(amax/127)) for the
    32-weight types, Q8_K blocks of 256 (quantize_row_q8_K_ref: iscale = -127/max, d = 1/iscale) for K-quants."""
    m, k = x.shape
    xf = x.float()
    if _CODES[qtype][2] == 16 or qtype in ("Q4_K", "Q5_K", "IQ4_XS"):
        b = xf.reshape(m, k // QK_K, QK_K)
        idx = b.abs().argmax(-1, keepdim=True)
        mx = b.gather(-1, idx)                                           # the signed value of largest magnitude
        iscale = torch.where(mx != 0, -127.0 / mx, torch.zeros_like(mx))
        q = torch.round(iscale * b).clamp_(max=127)
        d = torch.where(mx != 0, 1 / iscale, torch.zeros_like(mx))
    else:
        b = xf.reshape(m, k // 32, 32)
        amax = b.abs().amax(-1, keepdim=True)
        idv = torch.where(amax != 0, 127.0 / amax, torch.zeros_like(amax))
        q = torch.round(b * idv)
        d = (amax / 127.0).half().float()
    return (q * d).reshape(m, k).to(x.dtype)


def ggml_layout(weight: torch.Tensor, qtype: str, cols: int) -> qkernel.Layout | None:
    """GGUF blocks (rows, bytes per row) as gentool's CPU kernel layout (None where it has none)."""
    lo, n, _ = _CODES[qtype]
    q, scale, zero, _ = affine(weight, qtype, cols)
    if n <= 16 and (lay := qkernel.layout(q - lo, scale, zero, 4, zero=-lo)) is not None:
        return lay  # 4-bit codes from 0 (the kernel pairs nibbles 32 apart: groups of 32 or more)
    return qkernel.layout(q, scale, zero, 8)  # Q2_K/Q3_K's groups of 16, 5-8 bit codes, IQ4's table values


class GGMLLinear(QuantLinear):
    """y = x·dequant(W)ᵀ + b with W stored as GGUF blocks of one GGML type. With `cpu_arithmetic`, the input is
    first rounded as llama.cpp's CPU backend rounds it (`ggml_activations`), to reproduce its figures."""

    scheme = "ggml"
    cpu_arithmetic = False

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, qtype: str,
                 bias: torch.Tensor | None = None, *, dtype=torch.float32):
        self.qtype = ggml_type(qtype).name
        assert self.qtype in SUPPORTED, self.qtype
        self.__dict__["_kernels"] = []  # Int4Linear helpers: not submodules, so not in state_dict
        super().__init__(in_features, out_features, {"weight": weight}, bias, dtype=dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_bytes(self.weight, self.qtype, self.in_features).to(dtype or self.compute_dtype)

    def _layout(self):
        return ggml_layout(self.weight, self.qtype, self.in_features)

    def _qk_input(self, x):
        return ggml_activations(x, self.qtype) if self.cpu_arithmetic else x

    @property
    def _qk_act(self) -> int:  # llama.cpp's own rounding of x (cpu_arithmetic) is applied before, in float32
        return 32 if self.cpu_arithmetic else qkernel.act_bits()

    def _prepare(self) -> None:
        self.__dict__["_kernels"] = []
        self._packed = None  # the dense weight, when that is the kernel
        dev = self.weight.device
        if dev.type == "meta" or self._qk_codes is not None:
            return
        if dev.type == "cpu" and GGML_CPU_KERNEL == "int4" and _CODES[self.qtype][2] == 32:
            self.__dict__["_kernels"] = [
                Int4Linear(self.in_features, self.out_features, p, group_size=32, dtype=self.compute_dtype)
                for p in int4_planes(self.weight, self.qtype, self.in_features)]
            if all(k._packed is not None for k in self._kernels):
                return
            self.__dict__["_kernels"] = []
        self._packed = self.dequantize()

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_arithmetic:
            x = ggml_activations(x, self.qtype)
        if self._kernels:
            y = self._kernels[0]._mm(x)
            for k in self._kernels[1:]:
                y = y + k._mm(x)
            return y
        if self._packed is not None and self._packed.dtype != x.dtype:  # e.g. float32 activations, bfloat16 model
            self._packed = self.dequantize(x.dtype)  # once, not at every call (decoding calls it per token)
        return F.linear(x, self._packed if self._packed is not None else self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.qtype}"


class GGMLEmbedding(nn.Module):
    """Token embeddings stored as GGUF blocks: each looked-up row is decoded on the fly."""

    def __init__(self, num_embeddings: int, embedding_dim: int, weight: torch.Tensor, qtype: str, *,
                 dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.qtype = num_embeddings, embedding_dim, ggml_type(qtype).name
        self.register_buffer("weight", weight)
        self.register_buffer("_probe", torch.zeros((), dtype=dtype, device=weight.device), persistent=False)

    def _apply(self, fn, recurse=True):  # as QuantLinear: move the bytes, never cast them
        self._probe = fn(self._probe)
        self._buffers["weight"] = self._buffers["weight"].to(self._probe.device)
        return self

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids.reshape(-1)]
        out = dequantize_bytes(rows, self.qtype, self.embedding_dim).to(self._probe.dtype)
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.qtype}"


def check_bytes(name: str, weight: torch.Tensor, qtype: str, shape: tuple[int, int], where=None) -> None:
    rows, cols = shape
    if not fits(qtype, cols):
        raise GentoolError(f"{name} is {qtype}, whose blocks do not divide its rows of {cols}", path=where,
                           hint="the checkpoint is corrupt")
    want = (rows, row_bytes(qtype, cols))
    if weight.dtype != torch.uint8 or tuple(weight.shape) != want:
        raise GentoolError(f"{name} has shape {tuple(weight.shape)} {weight.dtype}, a {qtype} weight of {shape} "
                           f"needs {want} uint8", path=where, hint="the checkpoint is corrupt")


def install_ggml(model: nn.Module, state: dict[str, torch.Tensor], qconfig: dict, *, dtype: torch.dtype,
                 where=None) -> list[str]:
    """Swap in GGMLLinear / GGMLEmbedding for every tensor `qconfig["tensor_types"]` gives a block type, popping
    their bytes from `state`; a tied output head shares the embedding's bytes. Returns the module names."""
    types = qconfig.get("tensor_types")
    if not isinstance(types, dict):
        raise GentoolError("quantization_config has no tensor_types", path=where, hint="the checkpoint is corrupt")
    names = []
    for key, qtype in sorted(types.items()):
        if str(qtype).upper() in FLOAT_TYPES:
            continue
        if str(qtype).upper() not in SUPPORTED:
            raise GentoolError(f"{key} has GGML type {qtype!r}, which gentool cannot decode", path=where,
                               hint="the checkpoint was written by a newer gentool")
        if key not in state:
            raise GentoolError(f"missing tensor {key}", path=where, hint="the checkpoint is corrupt")
        name = key.removesuffix(".weight")
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise GentoolError(f"quantized tensor {key} is not a layer of the model", path=where,
                               hint="the checkpoint is corrupt") from None
        raw = state.pop(key)
        if isinstance(mod, nn.Embedding):
            check_bytes(key, raw, qtype, (mod.num_embeddings, mod.embedding_dim), where)
            layer = GGMLEmbedding(mod.num_embeddings, mod.embedding_dim, raw, qtype, dtype=dtype)
        elif isinstance(mod, nn.Linear):
            check_bytes(key, raw, qtype, (mod.out_features, mod.in_features), where)
            bias = state.pop(f"{name}.bias", None)
            layer = GGMLLinear(mod.in_features, mod.out_features, raw, qtype,
                               bias.to(dtype) if bias is not None else None, dtype=dtype)
        else:
            raise GentoolError(f"{key} belongs to a {type(mod).__name__}, not a linear layer or embedding",
                               path=where, hint="the checkpoint is corrupt")
        model.set_submodule(name, layer)
        names.append(name)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings and \
            isinstance(embed, GGMLEmbedding) and "lm_head.weight" not in types:
        model.lm_head = GGMLLinear(embed.embedding_dim, embed.num_embeddings, embed.weight, embed.qtype, dtype=dtype)
        names.append("lm_head")
    return names


def ggml_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (GGMLLinear, GGMLEmbedding))}


@torch.no_grad()
def dequantize_embeddings(model: nn.Module) -> nn.Module:
    """Replace every GGMLEmbedding by an nn.Embedding holding its dequantized rows, in place."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, GGMLEmbedding)]:
        w = dequantize_bytes(m.weight, m.qtype, m.embedding_dim).to(m._probe.dtype)
        emb = nn.Embedding(m.num_embeddings, m.embedding_dim, device=w.device, dtype=w.dtype)
        emb.weight.copy_(w)
        model.set_submodule(name, emb)
    return model


class llama_cpp_arithmetic:
    """Within the block, the GGML layers of `models` compute as llama.cpp's CPU backend does (activations rounded
    to Q8_0/Q8_K before each quantized dot product)."""

    def __init__(self, *models: nn.Module):
        self.layers = [m for model in models for m in model.modules() if isinstance(m, GGMLLinear)]

    def __enter__(self):
        for m in self.layers:
            m.cpu_arithmetic = True
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.__dict__.pop("cpu_arithmetic", None)
