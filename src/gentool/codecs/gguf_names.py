"""llama.cpp's GGUF tensor names against Hugging Face Llama's, and its q/k row permutation.

llama.cpp's rotary layout interleaves the two halves of each head of the q and k projections (convert_hf_to_gguf's
`permute`); `permute_qk` applies it, `unpermute_qk` undoes it. Both move whole rows, so they commute with any
row-wise quantization: quantize(permute(W)) == permute(quantize(W)) byte for byte.
"""

from __future__ import annotations

import re

import numpy as np

# llama.cpp name -> HF name; {i} is the block index
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_TO_HF = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in NAMES.items()]
_TO_GGUF = [(re.compile("^" + re.escape(v).replace(r"\{i\}", r"(\d+)") + "$"), k) for k, v in NAMES.items()]


def hf_name(gguf_name: str) -> str | None:
    for pattern, template in _TO_HF:
        if m := pattern.match(gguf_name):
            return template.replace("{i}", m.group(1)) if m.groups() else template
    return None


def gguf_name(name: str) -> str | None:
    for pattern, template in _TO_GGUF:
        if m := pattern.match(name):
            return template.replace("{i}", m.group(1)) if m.groups() else template
    return None


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp row order of a q/k projection (n_head = kv heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> HF row order, the inverse of permute_qk."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(name: str, n_head: int, n_kv: int) -> int | None:
    """Heads to permute an HF q/k tensor (weight or bias) by; None for every other tensor."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return n_head
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return n_kv
    return None
