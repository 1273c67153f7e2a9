"""Quantized linear layers (int8, int4, NF4, FP8) and the functions that swap them into a model from outside.

A `QuantLinear` keeps exactly the tensors a quantized checkpoint stores (`weight` codes plus `weight_scale`,
`weight_zero`, `weight_absmax*`; see codecs/quant.py), so `state_dict()` *is* the file layout. Kernel layouts are
derived from them on the device the layer lives on (`_prepare`, rerun after every `.to()`):
- int8: decoding under torch.compile, a dequantize-fused GEMV (x·(q·s) as a multiply-and-sum inductor fuses,
  reading int8; on a CPU for float32 activations); otherwise torch's `_weight_int8pack_mm` on CPU for 16-bit
  activations (its float32 path is slow) and dequantize + matmul elsewhere.
- int4: torch's `_weight_int4pack_mm_for_cpu` (16-bit activations; float32 ones dequantize) / `_weight_int4pack_mm`
  (tinygemm) layouts, converted at load time.
- fp8:  `torch._scaled_mm` with row-wise scales (activations quantized per row) on GPUs with FP8, else dequantize.
- nf4:  dequantize + matmul (the QLoRA base layer).
On a CPU all of these but fp8 first try gentool's kernel (models/qkernel.py: packed codes read once per decode
step, no dense weight; layout from `_layout()`); the paths above are the fallback where it is unavailable.
Whenever gradients must flow to the input (LoRA on a quantized base) the dequantize + matmul path is used, and
the dense weight is dequantized again in backward rather than kept (QLoRA's memory saving).
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from gentool.errors import GentoolError, UsageProblem
from gentool.codecs import quant as qp
from gentool.models import qkernel

DEFAULT_SKIP = ("embed_tokens",)  # kept 16-bit (one row read per token); the output head is quantized, as llama.cpp's
HEAD, HEAD_SCHEME = "lm_head", {"int8": "int8", "int4": "int8", "nf4": "int8", "fp8": None}  # None: 16-bit head
_QK = ("_qk_codes", "_qk_scale", "_qk_offset", "_qk_lut")  # gentool's CPU kernel layout (qkernel.Layout)
COMPANIONS = {"int8": ("weight", "weight_scale"), "int4": ("weight", "weight_scale", "weight_zero"),
              "nf4": ("weight", "weight_absmax", "weight_absmax_scale", "weight_absmax_mean"),
              "fp8": ("weight", "weight_scale"), "ggml": ("weight",)}  # ggml: GGUF blocks, models/quant_ggml.py
INT8_CUDA_KERNEL = "compile"  # "compile" (fused GEMV when compiled, else dequantize) or "aten" (_weight_int8pack_mm)


class QuantLinear(nn.Module):
    """y = x·dequant(W)ᵀ + b for a frozen, quantized W of shape (out_features, in_features)."""

    scheme = ""

    def __init__(self, in_features: int, out_features: int, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, *, group_size: int | None = None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        assert set(tensors) == set(COMPANIONS[self.scheme]), f"{self.scheme} needs {COMPANIONS[self.scheme]}"
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self.register_buffer("_probe", torch.zeros((), dtype=dtype, device=self.weight.device), persistent=False)
        for name in ("_packed", "_sz", "_scale_row", "_code", "_pairs") + _QK:  # kernel layouts, rebuilt by _refresh
            self.register_buffer(name, None, persistent=False)
        self._refresh()

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> QuantLinear:
        w = linear.weight.detach()
        t = qp.quantize_weight(w, cls.scheme, group_size)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls(linear.in_features, linear.out_features, t, bias,
                   group_size=group_size if cls.scheme == "int4" else None, dtype=w.dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._probe.dtype

    def stored(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in COMPANIONS[self.scheme]}

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight the layer computes with."""
        return qp.dequantize_weight(self.stored(), self.scheme).to(dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # Move codes and scales to the new device but never cast them: `.to(bfloat16)` or `.half()` changes the
        # compute dtype (the probe and the bias follow the cast) and leaves the stored tensors exact.
        probe = fn(self._probe)
        for name in COMPANIONS[self.scheme]:
            self._buffers[name] = self._buffers[name].to(probe.device)
        self._buffers["_probe"] = probe
        if self.bias is not None:
            self._buffers["bias"] = fn(self.bias)
        self._refresh()
        return self

    def _refresh(self) -> None:
        """Kernel layouts for the current device: gentool's CPU kernel where it runs, then `_prepare`'s."""
        lay = None
        if self.weight.device.type == "cpu" and qkernel.ENABLED and qkernel.available():
            lay = self._layout()
        for name, field in zip(_QK, ("codes", "scale", "offset", "lut")):
            self._buffers[name] = getattr(lay, field) if lay is not None else None
        self._qk_group, self._qk_bits, self._qk_zero = (lay.group, lay.bits, lay.zero) if lay is not None else (0, 0, 0)
        self._prepare()

    def _layout(self) -> qkernel.Layout | None:
        """The stored weight as gentool's CPU kernel layout (None: the format or shape has none)."""
        return None

    def _prepare(self) -> None:
        """Build kernel-specific layouts for the current device (none by default)."""

    def _qk_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    _qk_act = property(lambda self: qkernel.act_bits())  # the kernel's activation bits for decoding rows

    def _qk(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.gentool_qk.qmm(self._qk_input(x).float(), self._qk_codes, self._qk_scale, self._qk_offset,
                                     self._qk_group, self._qk_bits, self._qk_lut, self._qk_zero, self._qk_act)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize(x.dtype)
        if torch.compiler.is_compiling() and x.shape[0] <= 4:  # decoding: inductor fuses dequantize into a GEMV
            return (x[:, None, :] * w[None]).sum(-1)
        return F.linear(x, w)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:  # x (M, K) -> (M, N)
        return self._dense(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.requires_grad and torch.is_grad_enabled():
            y = _DequantLinear.apply(x2, self)
        elif self._qk_codes is not None and x2.device.type == "cpu":
            y = self._qk(x2)
        else:
            y = self._mm(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{g}"


class _DequantLinear(torch.autograd.Function):
    """x·dequant(W)ᵀ for a frozen W whose dense copy is rebuilt in backward instead of kept: between the passes
    only the codes stay in memory, which is QLoRA's saving (bitsandbytes' MatMul4Bit does the same)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer._dense(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class Int8Linear(QuantLinear):
    scheme = "int8"

    def _layout(self):  # w = q·scale[n]: one group per row
        return qkernel.layout(self.weight, self.weight_scale.float()[:, None], None, 8)

    def _mm(self, x):
        s = self.weight_scale.to(x.dtype)
        cpu = x.device.type == "cpu"
        # decoding under torch.compile: one fused int8 GEMV (on a CPU only for float32 activations: inductor's
        # bfloat16 version is slower than the aten kernel, which is fast for bfloat16 and slow for float32)
        fused = torch.compiler.is_compiling() and x.shape[0] <= 4 and (x.dtype == torch.float32 if cpu else
                                                                       INT8_CUDA_KERNEL != "aten")
        if fused:
            return (x[:, None, :] * self.weight.to(x.dtype)[None]).sum(-1) * s
        if cpu and x.dtype == torch.float32:  # aten's float32 path is a slow reference loop: dequantize instead
            return F.linear(x, self.weight.to(x.dtype)) * s
        if cpu or INT8_CUDA_KERNEL == "aten":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, s)
        return F.linear(x, self.weight.to(x.dtype)) * s


class Int4Linear(QuantLinear):
    scheme = "int4"

    def _layout(self):  # w = (q - 8)·s + z
        return qkernel.layout(qp.int4_codes(self.stored()), self.weight_scale.float(), self.weight_zero.float(), 4,
                              zero=8)

    def _prepare(self):
        self._packed = self._sz = None
        dev = self.weight.device
        if dev.type not in ("cpu", "cuda") or self._qk_codes is not None:
            return
        sz = torch.stack([self.weight_scale.t(), self.weight_zero.t()], -1).contiguous()  # (K/g, N, 2)
        try:
            if dev.type == "cpu":
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qp.int4_codes(self.stored()).int(), 2)
                self._sz = sz.to(self.compute_dtype)
            else:
                tiles = 8 if self.in_features % 128 == 0 else 4 if self.in_features % 64 == 0 else 2
                self._packed = torch.ops.aten._convert_weight_to_int4pack(self.weight.contiguous(), tiles)
                self._sz = sz.to(torch.bfloat16)
        except RuntimeError:  # a shape the kernel does not take (e.g. N not a multiple of 16): dense fallback
            self._packed = self._sz = None

    def _mm(self, x):
        if self._packed is None or (x.device.type == "cpu" and x.dtype == torch.float32):
            return self._dense(x)  # aten's CPU kernel is fast for 16-bit activations, a slow loop for float32
        if x.device.type == "cpu":
            sz = self._sz if self._sz.dtype == x.dtype else self._sz.to(x.dtype)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self._packed, self.group_size, sz)
        y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), self._packed, self.group_size, self._sz)
        return y.to(x.dtype)


_NF4_CHUNK = 1 << 19  # bytes of NF4 codes dequantized at a time (a multiple of a block's 32 bytes)


class NF4Linear(QuantLinear):
    scheme = "nf4"

    def _layout(self):  # w = NF4[q]·absmax of the row's block of 64 (when blocks do not straddle rows)
        if self.in_features % qp.NF4_BLOCK:
            return None
        absmax = qp.nf4_absmax(self.stored()).reshape(self.out_features, -1)
        return qkernel.layout(qp.unpack_4bit(self.weight), absmax, None, 4, qp.NF4_CODE)

    def _prepare(self):
        self._code = qp.NF4_CODE.to(self.weight.device)  # on the device: no host tensor in a captured graph
        byte = torch.arange(256, device=self.weight.device)
        # both NF4 values of every byte (high nibble first): one lookup per byte instead of unpacking nibbles,
        # bit-identical to dequantize_nf4 and 2-3x faster (QLoRA dequantizes every layer twice per step)
        self._pairs = torch.stack((self._code[byte >> 4], self._code[byte & 15]), dim=-1)  # (256, 2)

    def dequantize(self, dtype=None):
        # in chunks of whole blocks written straight into the output: the float32 intermediates stay ~4 MB however
        # large the layer (QLoRA's peak memory), and the values equal dequantize_nf4's bit for bit
        codes = self.weight.view(-1)                                           # bytes, two codes each
        absmax = qp.nf4_absmax(self.stored())                                  # (n_blocks,)
        out = torch.empty(2 * codes.numel(), dtype=dtype or self.compute_dtype, device=codes.device)
        for i in range(0, codes.numel(), _NF4_CHUNK):
            values = F.embedding(codes[i:i + _NF4_CHUNK].int(), self._pairs).view(-1, qp.NF4_BLOCK)
            values.mul_(absmax[2 * i // qp.NF4_BLOCK:2 * i // qp.NF4_BLOCK + values.shape[0], None])
            out[2 * i:2 * i + values.numel()] = values.view(-1)
        return out.view(self.out_features, self.in_features)


class FP8Linear(QuantLinear):
    scheme = "fp8"

    def _prepare(self):
        dev = self.weight.device
        self._scaled = (dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)
                        and self.in_features % 16 == 0 and self.out_features % 16 == 0)
        self._scale_row = self.weight_scale.float()[None, :] if self._scaled else None  # (1, N)

    def _mm(self, x):
        if not self._scaled:
            return F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        m = x.shape[0]
        xs = (x.abs().amax(-1, keepdim=True).float() / qp.FP8_MAX).clamp_min(qp.TINY)   # (M, 1) row scales
        xq = (x.float() / xs).clamp(-qp.FP8_MAX, qp.FP8_MAX).to(torch.float8_e4m3fn)
        pad = -m % 16
        if pad:
            xq, xs = F.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn), F.pad(xs, (0, 0, 0, pad),
                                                                                              value=1.0)
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self._scale_row, out_dtype=torch.bfloat16)
        return y[:m].to(x.dtype)


LAYERS: dict[str, type[QuantLinear]] = {c.scheme: c for c in (Int8Linear, Int4Linear, NF4Linear, FP8Linear)}


# --- swapping layers in and out -----------------------------------------------------------------------------------------
def matches(name: str, patterns) -> bool:
    """A module name matches `embed_tokens`, `layers.0`, `mlp.down_proj` (dotted segments) or a glob."""
    from fnmatch import fnmatchcase

    return any(f".{p}." in f".{name}." or fnmatchcase(name, p) for p in patterns)


def keep_16bit_patterns(values, n_layers: int) -> list[str]:
    """`first`, `last` or layer numbers -> module-name patterns of whole transformer blocks."""
    out = []
    for v in values:
        i = 0 if v == "first" else n_layers - 1 if v == "last" else int(v) if re.fullmatch(r"-?\d+", v) else None
        if i is None or not -n_layers <= i < n_layers:
            raise UsageProblem(f"--keep-16bit {v!r} is not first, last or a layer number below {n_layers}")
        out.append(f"model.layers.{i % n_layers}")
    return out


def int4_group(k: int, group_size: int) -> int | None:
    """The int4 group size for an input dimension k: `group_size` if it divides k, else the largest supported
    size below it that does (llama-quantize likewise falls back per tensor); None when none does."""
    return next((g for g in sorted(qp.INT4_GROUP_SIZES, reverse=True) if g <= group_size and k % g == 0), None)


def check_quantizable(name: str, linear: nn.Linear, scheme: str, group_size: int) -> None:
    k = linear.in_features
    if scheme == "int4" and int4_group(k, group_size) is None:
        raise UsageProblem(f"group size {group_size} does not divide {name}'s input dimension {k}, nor does any "
                           f"smaller supported one", hint=f"--skip {name.split('.')[-1]}")
    if scheme == "nf4" and (k * linear.out_features) % qp.NF4_BLOCK:
        raise UsageProblem(f"{name} has {k * linear.out_features} weights, not a multiple of NF4's block of "
                           f"{qp.NF4_BLOCK}", hint=f"--skip {name.split('.')[-1]}")


def layer_schemes(model: nn.Module, scheme: str, patterns, group_size: int = 128, head: str = "auto") -> dict:
    """Module name -> scheme of every nn.Linear not matched by `patterns`: `scheme`, except the output head's
    `head` ("auto": HEAD_SCHEME[scheme], as llama-quantize keeps output.weight at higher precision; "float": kept)."""
    head = HEAD_SCHEME[scheme] if head == "auto" else None if head == "float" else head
    out = {n: head if n == HEAD else scheme for n, m in model.named_modules()
           if isinstance(m, nn.Linear) and not matches(n, patterns) and (n != HEAD or head)}
    for name, s in out.items():
        check_quantizable(name, model.get_submodule(name), s, group_size)
    return out


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 128, skip=DEFAULT_SKIP,
                   keep_16bit=(), head: str = "auto") -> dict[str, list[str]]:
    """Replace every nn.Linear not matched by `skip` / `keep_16bit` by its quantized layer (`layer_schemes`), in place.
    Returns the modules quantized, weights left 16-bit, int4 group fallbacks and layers not in `scheme`."""
    if scheme not in LAYERS:
        raise UsageProblem(f"unknown scheme {scheme!r}", hint="use one of " + ", ".join(qp.SCHEMES))
    if scheme == "int4" and group_size not in qp.INT4_GROUP_SIZES:
        raise UsageProblem(f"group size {group_size} is not supported",
                           hint="use --group-size " + ", ".join(map(str, qp.INT4_GROUP_SIZES)))
    plan, groups = layer_schemes(model, scheme, list(skip) + list(keep_16bit), group_size, head), {}
    for name, s in plan.items():
        m = model.get_submodule(name)
        if (g := int4_group(m.in_features, group_size) if s == "int4" else group_size) != group_size:
            groups[name] = g
        model.set_submodule(name, LAYERS[s].from_linear(m, g))
    skipped = [k for k, v in model.state_dict().items() if v.dim() == 2 and k.rsplit(".", 1)[0] not in plan]
    return {"quantized": list(plan), "skipped": skipped, "group_sizes": groups,
            "module_schemes": {n: s for n, s in plan.items() if s != scheme}}


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantLinear by an nn.Linear with its dequantized weight, in place."""
    for name, m in quantized_modules(model).items():
        w = m.dequantize(dtype)
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=w.device, dtype=w.dtype)
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
        model.set_submodule(name, lin)
    return model


def stored_schemes(qconfig: dict, names, where=None) -> dict[str, str]:
    """Quantized layer -> scheme, from a checkpoint's tensor `names` (`<layer>.weight_scale` / `.weight_absmax`
    companions) and config.json's `scheme`, or the layer's entry in `module_schemes` (the int8 output head)."""
    overrides = qconfig.get("module_schemes") or {}
    schemes = [qconfig.get("scheme"), *(overrides.values() if isinstance(overrides, dict) else [overrides])]
    if bad := [s for s in schemes if str(s) not in LAYERS]:
        raise GentoolError(f"unknown quantization scheme {bad[0]!r} in config.json", path=where,
                           hint="the checkpoint was written by a newer gentool or is corrupt")
    markers = tuple("." + COMPANIONS[s][1] for s in set(schemes))
    return {n: overrides.get(n, schemes[0])
            for n in sorted({k.rsplit(".", 1)[0] for k in names if k.endswith(markers)} | set(overrides))}


def install_from_state(model: nn.Module, state: dict[str, torch.Tensor], qconfig: dict, *, dtype: torch.dtype,
                       where=None) -> list[str]:
    """Swap in the quantized layers a checkpoint's state holds (`stored_schemes`), pop their tensors from `state`."""
    names = stored_schemes(qconfig, state, where)
    for name, scheme in names.items():
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise GentoolError(f"quantized tensor {name} is not a layer of the model", path=where,
                               hint="the checkpoint is corrupt") from None
        tensors = {}
        for c in COMPANIONS[scheme]:
            if f"{name}.{c}" not in state:
                raise GentoolError(f"missing tensor {name}.{c}", path=where, hint="the checkpoint is corrupt")
            tensors[c] = state.pop(f"{name}.{c}")
        bias = state.pop(f"{name}.bias", None)
        n, k = lin.out_features, lin.in_features
        group = None
        if scheme == "int4":  # per tensor where the default did not divide it (`int4_group`)
            group = (qconfig.get("group_sizes") or {}).get(name) or qconfig.get("group_size")
            scale_cols = tensors["weight_scale"].shape[-1] if tensors["weight_scale"].dim() == 2 else 0
            if scale_cols and k % scale_cols == 0 and k // scale_cols in qp.INT4_GROUP_SIZES:
                group = k // scale_cols
        layer = LAYERS[scheme](lin.in_features, lin.out_features, tensors,
                               bias.to(dtype) if bias is not None else None, group_size=group, dtype=dtype)
        shapes = {"weight": (n, k) if scheme in ("int8", "fp8") else (n, k // 2)}
        if scheme == "int4":
            shapes["weight_scale"] = shapes["weight_zero"] = (n, k // (layer.group_size or k))
        for c, want in shapes.items():
            if tuple(tensors[c].shape) != want:
                raise GentoolError(f"{name}.{c} has shape {tuple(tensors[c].shape)}, config.json implies {want}",
                                   path=where, hint="the checkpoint is corrupt")
        model.set_submodule(name, layer)
    return list(names)
