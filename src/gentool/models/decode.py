"""The one-token decode forward, specialised for speed, over a `Transformer`'s own weights.

Batch-1 decoding of a small model is launch-bound: every kernel costs a few microseconds however little it reads.
So, per layer: q/k/v are one matrix-vector product (as gpt-fast's `wqkv`) and gate/up another; grouped-query
attention groups the query heads over their shared key/value head instead of expanding the cache (what SDPA's
GQA fallback does with a mask); everything else is left to the compiler to fuse. The fused matrices are made
once, and the original projection weights become views into them, so no memory is doubled and the state dict,
HF parameter names included, is unchanged. Projections that are not plain bias-free `nn.Linear`s (quantized,
LoRA, biased) are not fused: the forward calls the layers themselves.

Under torch.compile on a CPU, each dense matrix-vector product is written as a multiply-and-sum over the weight's
rows (`gemv`), which inductor turns into one vectorised loop that streams the weight once; MKL's sgemm at M=1
reaches about half the memory bandwidth (bench/cpu.py). Eagerly, float32 products on a CPU go through oneDNN
(`use_onednn_linears`, also for prefill and scoring: MKL's float32 GEMM is 2-3x slower on AMD CPUs); on CUDA it
is `F.linear`.

It computes what `Transformer.forward(token, input_pos=pos, attention_mask=...)` does with a cache set up (the
tests compare the two).
Shape legend: B batch, S cache length, D hidden, H heads, K kv heads, G = H/K, E head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gentool.models.transformer import Transformer, rotate_half

GEMV_MAX_ROWS = 4  # up to this many rows (B·T), the compiled CPU matrix-vector product is used


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear through oneDNN (inference only: no autograd), F.linear where oneDNN does not take it. torch's
    float32 matmul on a CPU is MKL's sgemm, which runs 2-3x slower than oneDNN on AMD CPUs (bench/cpu.py)."""
    try:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")
    except (RuntimeError, AttributeError, NotImplementedError):
        return F.linear(x, w, b)


def _onednn_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available())


class OneDNNLinear(nn.Linear):
    """An nn.Linear whose float32 inference on a CPU goes through oneDNN; with gradients, under torch.compile and
    elsewhere it is F.linear. Same parameters, same state dict. After `pack_weights`, products of at least
    PACKED_MIN_ROWS rows read a copy of the weight in oneDNN's own blocked layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_ok(x, self.weight):
            packed = self.__dict__.get("packed")
            if packed is not None and x.numel() >= PACKED_MIN_ROWS * x.shape[-1]:
                if packed[0] == (self.weight.data_ptr(), self.weight._version):
                    return torch.ops.mkldnn._linear_pointwise(x, packed[1], self.bias, "none", [None], "")
                del self.__dict__["packed"]  # the weight changed since: the copy is stale
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


PACKED_MIN_ROWS = 16  # products with at least this many rows (a prompt) read the packed copy


def pack_weights(module: nn.Module, rows: int = 128) -> bool:
    """Give every float32 OneDNNLinear in `module` a copy of its weight in oneDNN's blocked layout for products of
    about `rows` rows. oneDNN otherwise reorders the weight on every call: a 128-token prefill of SmolLM2 runs ~12%
    faster packed (bench/cpu.py). One-row products (decoding) keep the plain weight, so the copy doubles the float32
    weights' memory: packs only where they take at most a quarter of the available memory. Returns whether it
    packed; results equal the plain product up to float32 summation order."""
    lins = [m for m in module.modules() if type(m) is OneDNNLinear and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu"]
    if not lins or not torch.backends.mkldnn.is_available() or \
            4 * sum(m.weight.numel() * 4 for m in lins) > _available_memory():
        return False
    try:
        for m in lins:
            w = m.weight.detach()
            key = (w.data_ptr(), w._version)
            if m.__dict__.get("packed", (None,))[0] != key:  # already packed from this weight: kept
                m.__dict__["packed"] = (key, torch.ops.mkldnn._reorder_linear_weight(w, rows))
    except (RuntimeError, AttributeError, NotImplementedError):  # a torch built without this oneDNN operation
        for m in lins:
            m.__dict__.pop("packed", None)
        return False
    return True


def _available_memory() -> int:
    """Bytes of memory available (Linux's MemAvailable); 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of `model` a OneDNNLinear, in place (the class only: parameters, hooks and
    state dict are untouched). Idempotent."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.__class__ = OneDNNLinear
    return model


def can_fuse(model: nn.Module) -> bool:
    """Whether `decode_forward` applies: a causal Transformer (its projections may be any layers)."""
    return isinstance(model, Transformer) and model.causal


def _plain(lin: nn.Module) -> bool:
    return type(lin) in (nn.Linear, OneDNNLinear) and lin.bias is None


def fuse_projections(model: Transformer) -> None:
    """Give each layer whose q/k/v (gate/up) are plain bias-free linears `self_attn.wqkv` (`mlp.w13`), as
    non-persistent buffers; the q/k/v and gate/up weights become views into them. Idempotent."""
    for layer in model.model.layers:
        for parent, names, fused in [(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "wqkv"),
                                     (layer.mlp, ("gate_proj", "up_proj"), "w13")]:
            lins = [getattr(parent, n) for n in names]
            if hasattr(parent, fused) or not all(_plain(lin) for lin in lins):
                continue
            w = torch.cat([lin.weight.detach() for lin in lins])
            start = 0
            for lin in lins:
                rows = lin.weight.shape[0]
                lin.weight = nn.Parameter(w[start:start + rows], requires_grad=False)
                start += rows
            parent.register_buffer(fused, w, persistent=False)


def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (N, K)ᵀ. Compiled for a CPU with few rows: a float32 multiply-and-sum over w's rows (one
    fused loop reading w once, in its own dtype); otherwise F.linear."""
    if torch.compiler.is_compiling() and x.device.type == "cpu" and x[..., 0].numel() <= GEMV_MAX_ROWS:
        return (x.float()[..., None, :] * w.float()).sum(-1).to(x.dtype)
    return onednn_linear(x, w) if _onednn_ok(x, w) else F.linear(x, w)


def _linear(lin: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return gemv(x, lin.weight) if _plain(lin) else lin(x)


def _project(parent: nn.Module, fused: str, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    w = getattr(parent, fused, None)
    if w is not None:
        return gemv(x, w)
    return torch.cat([_linear(getattr(parent, n), x) for n in names], dim=-1)


def decode_forward(model: Transformer, token_B1: torch.Tensor, pos_1: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) of one token per row at position pos (1,), reading and extending the static cache.
    attention_mask (B, S) bool marks valid keys (False for left padding)."""
    c = model.config
    h, k_heads, e = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    g = h // k_heads
    x = model.model.embed_tokens(token_B1)                                  # (B, 1, D)
    b = x.shape[0]
    freqs = pos_1.float()[:, None] * model.inv_freq[None, :]                # (1, E/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)                 # (1, E)
    keys = torch.arange(model.max_seq_len, device=x.device)
    valid = keys[None, :] <= pos_1[:, None]                                 # (1, S)
    if attention_mask is not None:
        valid = (valid & attention_mask) | (keys[None, :] == pos_1[:, None])
    valid = valid[:, None, None, :]                                         # (B or 1, 1, 1, S)
    scale = 1.0 / math.sqrt(e)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _project(attn, "wqkv", ("q_proj", "k_proj", "v_proj"), layer.input_layernorm(x))  # (B, 1, (H+2K) E)
        q, k, v = qkv.split([h * e, k_heads * e, k_heads * e], dim=-1)
        q = q.view(b, k_heads, g, e)                                        # heads j*G .. j*G+G-1 share kv head j
        k = k.view(b, k_heads, 1, e)
        v = v.view(b, k_heads, 1, e)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache, v_cache = attn.kv_cache.update(pos_1, k, v)                # (B, K, S, E)
        scores = (q.to(k_cache.dtype) @ k_cache.transpose(-1, -2)).float() * scale  # (B, K, G, S)
        p = scores.masked_fill(~valid, float("-inf")).softmax(-1)
        y = (p.to(v_cache.dtype) @ v_cache).reshape(b, 1, h * e)            # (B, 1, H E)
        x = x + _linear(attn.o_proj, y.to(x.dtype))
        gate, up = _project(mlp, "w13", ("gate_proj", "up_proj"), layer.post_attention_layernorm(x)).chunk(2, -1)
        x = x + _linear(mlp.down_proj, F.silu(gate) * up)
    return _linear(model.lm_head, model.model.norm(x))[:, -1]               # (B, V)
