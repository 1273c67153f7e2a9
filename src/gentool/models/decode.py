"""The one-token decode forward, specialised for speed, over a `Transformer`'s own weights.

Batch-1 decoding of a small model is launch-bound: every kernel costs a few microseconds however little it reads.
So, per layer: q/k/v are one matrix-vector product (as gpt-fast's `wqkv`) and gate/up another; grouped-query
attention groups the query heads over their shared key/value head instead of expanding the cache (what SDPA's
GQA fallback does with a mask); everything else is left to the compiler to fuse. The fused matrices are made
once, and the original projection weights become views into them, so no memory is doubled and the state dict,
HF parameter names included, is unchanged.

It computes what `Transformer.forward(token, input_pos=pos, attention_mask=...)` does with a cache set up (the
tests compare the two); models with LoRA, quantized or biased projections keep the general forward.
Shape legend: B batch, S cache length, D hidden, H heads, K kv heads, G = H/K, E head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gentool.models.transformer import Transformer, rotate_half


def can_fuse(model: nn.Module) -> bool:
    if not isinstance(model, Transformer) or not model.causal:
        return False
    return all(type(lin) is nn.Linear and lin.bias is None for layer in model.model.layers
               for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj))


def fuse_projections(model: Transformer) -> None:
    """Give each layer `self_attn.wqkv` and `mlp.w13` (non-persistent buffers); the q/k/v and gate/up weights
    become views into them. Idempotent."""
    for layer in model.model.layers:
        for parent, names, fused in [(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "wqkv"),
                                     (layer.mlp, ("gate_proj", "up_proj"), "w13")]:
            if hasattr(parent, fused):
                continue
            lins = [getattr(parent, n) for n in names]
            w = torch.cat([lin.weight.detach() for lin in lins])
            start = 0
            for lin in lins:
                rows = lin.weight.shape[0]
                lin.weight = nn.Parameter(w[start:start + rows], requires_grad=False)
                start += rows
            parent.register_buffer(fused, w, persistent=False)


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
        qkv = F.linear(layer.input_layernorm(x), attn.wqkv)                 # (B, 1, (H + 2K) E)
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
        x = x + attn.o_proj(y.to(x.dtype))
        gate, up = F.linear(layer.post_attention_layernorm(x), mlp.w13).chunk(2, dim=-1)
        x = x + mlp.down_proj(F.silu(gate) * up)
    return model.lm_head(model.model.norm(x))[:, -1]                         # (B, V)
