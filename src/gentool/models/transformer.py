"""A LLaMA-style decoder in one file: RMSNorm, rotary embeddings, grouped-query attention through
scaled_dot_product_attention, SwiGLU, pre-norm blocks, a static KV cache for decoding. Attention is causal (AR),
bidirectional (masked diffusion) or block-causal (block diffusion, BD3-LM: bidirectional inside blocks of
`block_size` positions, causal across them), the last also over a noised and a clean copy of a sequence at once.

Parameter names equal Hugging Face Llama's, so `state_dict()` *is* the HF checkpoint layout and the rotary
convention (rotate_half over the two halves of each head) matches `transformers`.
Shape legend: B batch, T query length, S cache length, D hidden size, H heads, K kv heads, E head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gentool.config import LMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalise in float32 as transformers does, then scale in the input dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LMConfig) -> torch.Tensor:
    e = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, e, 2, dtype=torch.int64).float() / e))
    s = config.rope_scaling
    if s:  # Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp between
        factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
        old = s.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache(nn.Module):
    """Static, preallocated keys and values (B, K, S, E): fixed shapes let a decode step be captured once as a
    CUDA graph (gpt-fast)."""

    def __init__(self, batch: int, kv_heads: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos_T: torch.Tensor, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor):
        self.k.index_copy_(2, pos_T, k_BKTE.to(self.k.dtype))
        self.v.index_copy_(2, pos_T, v_BKTE.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, config: LMConfig, causal: bool):
        super().__init__()
        d, e = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim, self.causal = config.num_attention_heads, \
            config.num_key_value_heads, e, causal
        bias = config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * e, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * e, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * e, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * e, d, bias=bias)  # transformers' Llama biases all four
        self.kv_cache: KVCache | None = None

    def forward(self, x_BTD, cos_TE, sin_TE, pos_T=None, mask=None):
        b, t, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, E)
        k = self.k_proj(x_BTD).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)     # (B, K, T, E)
        v = self.v_proj(x_BTD).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos_TE.to(q.dtype), sin_TE.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_cache is not None:
            k_cache, v_cache = self.kv_cache.update(pos_T, k, v)  # (B, K, S, E)
            # with a mask, attend over the cache; without one the tokens start at position 0 (hidden_states) and
            # their own keys are all there is: causal attention over them
            if mask is not None:
                k, v = k_cache, v_cache
                if q.dtype != k.dtype:
                    q = q.to(k.dtype)
        if mask is None:  # flash and cuDNN kernels take GQA directly
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and t > 1,
                                               enable_gqa=self.n_kv != self.n_heads)
        elif self.n_kv != self.n_heads:
            # Masked (cached decoding, padding): kernels that take a mask do not take GQA, and repeating K/V would
            # copy the whole cache every step. Fold each group's G query heads into the query length instead:
            # query head h = i·G + j reads kv head i (repeat_interleave order), and shares its mask row.
            g = self.n_heads // self.n_kv
            q = q.reshape(b, self.n_kv, g * t, self.head_dim)                           # (B, K, G·T, E)
            mask = mask[:, :, None].expand(-1, -1, g, -1, -1).flatten(2, 3)             # (B|1, 1, G·T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)               # (B, K, G·T, E)
            y = y.reshape(b, self.n_heads, t, self.head_dim)  # not view: fused kernels return a transposed layout
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1).to(x_BTD.dtype))


class MLP(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig, causal: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, causal)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, pos=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, config: LMConfig, causal: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, causal) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, config: LMConfig, *, causal: bool = True):
        super().__init__()
        self.config, self.causal = config, causal
        self.model = Decoder(config, causal)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.max_seq_len = 0
        self._masks: dict[tuple, torch.Tensor] = {}  # block-diffusion masks, built once per shape

    def init_buffers(self, device=None) -> None:
        """Recompute non-persistent buffers (after building on the meta device)."""
        self.inv_freq = rope_inv_freq(self.config).to(device or self.lm_head.weight.device)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the rotary frequencies to 8 bits, an angle error of radians by position
        # 2048; keep them float32 on whatever device the model moves to.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    def init_weights(self, seed: int | None = None, *, zero_out: bool = False) -> None:
        """Normal(0, 0.02); residual output projections scaled by 1/sqrt(2·layers) (GPT-2), or zero with
        `zero_out` (modded-nanogpt: each block starts as the identity)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias") or (zero_out and name.endswith(("o_proj.weight", "down_proj.weight"))):
                nn.init.zeros_(p)
            else:
                s = std / math.sqrt(2 * self.config.num_hidden_layers) if name.endswith(("o_proj.weight",
                                                                                        "down_proj.weight")) else std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=g) * s)

    # --- static KV cache for decoding ---------------------------------------------------------------------------
    def setup_cache(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        dtype = dtype or self.model.norm.weight.dtype  # the compute dtype (a quantized head stores codes)
        device = device or self.model.norm.weight.device
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(max_batch_size, c.num_key_value_heads, max_seq_len, c.head_dim,
                                               dtype, device)
        self.max_seq_len = max_seq_len

    def reset_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None
        self.max_seq_len = 0

    # --- forward --------------------------------------------------------------------------------------------------
    def block_mask(self, t: int, block_size: int, device, two_stream: bool = False) -> torch.Tensor:
        """Block-causal attention over t positions, (1, 1, T, T) bool: query i sees key j iff j // B <= i // B.

        two_stream: over xt ⊕ x0 (2T positions, BD3-LM's training pass): a noised block sees itself and the clean
        blocks before it, a clean block sees the clean blocks up to itself, so every block's denoising loss
        conditions on the clean earlier blocks in one forward pass. Cached per shape."""
        key = (t, block_size, str(device), two_stream)
        if key not in self._masks:
            blk = torch.arange(t, device=device) // block_size
            causal = blk[None, :] <= blk[:, None]                               # (T, T)
            if two_stream:
                noised = torch.cat([blk[None, :] == blk[:, None], blk[None, :] < blk[:, None]], dim=1)
                clean = torch.cat([torch.zeros_like(causal), causal], dim=1)
                causal = torch.cat([noised, clean], dim=0)                      # (2T, 2T)
            self._masks[key] = causal[None, None]
        return self._masks[key]

    def hidden_states(self, input_ids: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None, block_size: int | None = None,
                      clean_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Final normed hidden states (B, T, D). With a cache set up, `input_pos` (T,) says where the tokens go;
        `attention_mask` (B, S) bool marks valid keys (False for left padding). `block_size`: block-causal
        attention; with `clean_ids` (B, T) as well, the states of input_ids (noised) given the clean sequence.
        `document_ids` (B, T): packed examples, each a run of equal ids; positions restart at 0 in each and a
        token attends causally within its own example only (a block-diagonal causal mask)."""
        t = input_ids.shape[1]
        fresh = input_pos is None  # positions 0..T-1
        if fresh:
            input_pos = torch.arange(t, device=input_ids.device)
        mask = None
        if document_ids is not None:
            assert fresh and not self.max_seq_len and attention_mask is None and block_size is None
            same = document_ids[:, :, None] == document_ids[:, None, :]                  # (B, T, T)
            mask = (same & torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril())[:, None]
            start = torch.cat([torch.ones_like(document_ids[:, :1], dtype=torch.bool),
                               document_ids[:, 1:] != document_ids[:, :-1]], 1)
            idx = torch.arange(t, device=input_ids.device).expand_as(document_ids)
            first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 1).values
            input_pos = idx - first                                                    # (B, T)
        elif clean_ids is not None:  # BD3-LM: the noised and the clean copy share positions
            assert block_size and fresh and not self.max_seq_len and attention_mask is None
            input_ids, input_pos = torch.cat([input_ids, clean_ids], 1), torch.cat([input_pos, input_pos])
            mask = self.block_mask(t, block_size, input_ids.device, two_stream=True)
        elif self.max_seq_len and not (fresh and self.causal and not block_size and attention_mask is None):
            # cached decoding: query at position p sees keys 0..p (to its block's end if blocked). A causal prompt
            # from position 0 needs no mask: it attends over its own keys (Attention), and the cache is written.
            keys = torch.arange(self.max_seq_len, device=input_ids.device)
            if block_size:
                mask = keys[None, :] < (input_pos[:, None] // block_size + 1) * block_size
            else:
                mask = (keys[None, :] <= input_pos[:, None]) if self.causal else torch.ones(
                    t, self.max_seq_len, dtype=torch.bool, device=input_ids.device)
            mask = mask[None, None]                                      # (1, 1, T, S)
            if attention_mask is not None:  # a padding query still sees itself: no all-masked row, no NaN
                mask = (mask & attention_mask[:, None, None, :]) | (keys[None, :] == input_pos[:, None])
        elif block_size:
            assert attention_mask is None, "no padding with block-causal attention"
            mask = self.block_mask(t, block_size, input_ids.device) if fresh else \
                (input_pos[None, :] // block_size <= input_pos[:, None] // block_size)[None, None]
        elif attention_mask is not None:
            mask = attention_mask[:, None, None, :t]
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)
        freqs = input_pos.float()[..., None] * self.inv_freq             # (T, E/2), or (B, T, E/2) per example
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()                                  # (T, E)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]                        # (B, 1, T, E) against (B, H, T, E)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, input_pos, mask)
        return self.model.norm(x[:, :t] if clean_ids is not None else x)

    def forward(self, input_ids: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, block_size: int | None = None,
                clean_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V)."""
        return self.lm_head(self.hidden_states(input_ids, input_pos=input_pos, attention_mask=attention_mask,
                                               block_size=block_size, clean_ids=clean_ids,
                                               document_ids=document_ids))
