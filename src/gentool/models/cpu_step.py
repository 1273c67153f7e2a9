"""Batch-1 decoding on a CPU in one C++ call per token: `cpu_decoder(model)` wraps a Transformer whose projections
the kernel takes (dense float32 `nn.Linear`s, quantized layers with a kernel layout) in the `Decoder` of
models/decode_src.py, over the model's own tensors and its static KV cache; its `step` returns the logits of one
token, and `advance` runs a whole token: the input row, the step, the draw (greedy or sampled, as lm/sample.py
draws) and the decode state's bookkeeping, with no Python between tokens.

Batch-1 decoding of a small model is bound by per-operation overhead in eager PyTorch (SmolLM2-135M: ~700
operations per token, more time than reading its weights); the decoder runs a token in one call. It applies to a
causal Transformer in float32 on a CPU with gentool's kernel, no LoRA or other wrapped projections, and a float32
cache; `cpu_decoder` returns None otherwise and decoding keeps models/decode.py's path. The quantized layers use the
kernel's activation arithmetic (`qkernel.act_bits`: 8-bit activations with VNNI, as llama.cpp, or float32).
"""

from __future__ import annotations

import torch
from torch import nn

from gentool.models import qkernel
from gentool.models.quant import QuantLinear
from gentool.models.quant_ggml import GGMLEmbedding, ggml_layout
from gentool.models.transformer import Transformer

_NONE = torch.empty(0)
# An untied GGUF embedding table of at most this many bytes is read by the decoder from a copy in the kernel's layout
# (1.1-1.5x its GGUF bytes). A larger table belongs to a model whose token takes far longer than the ~0.1 ms a lookup
# in PyTorch costs, and is looked up there, without the copy.
EMBED_COPY_MAX = 32 << 20
PROJECTIONS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
               ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def _dense(lin: nn.Module) -> bool:
    return isinstance(lin, nn.Linear) and type(lin).forward in (nn.Linear.forward, _onednn_forward()) and \
        lin.weight.dtype == torch.float32 and lin.weight.device.type == "cpu" and \
        (lin.bias is None or lin.bias.dtype == torch.float32)


def _onednn_forward():
    from gentool.models.decode import OneDNNLinear

    return OneDNNLinear.forward


def _or_none(t: torch.Tensor | None) -> torch.Tensor:
    return _NONE if t is None else t


def _layer_args(lin: nn.Module) -> tuple | None:
    """(codes, scale, offset, lut, bias, group, bits, zero) of one projection, or None where the decoder cannot
    run it."""
    if lin._forward_hooks or lin._forward_pre_hooks or not isinstance(lin, (QuantLinear, nn.Linear)):
        return None
    bias = lin.bias if lin.bias is not None else _NONE
    if isinstance(lin, QuantLinear):
        if lin._qk_codes is None or getattr(lin, "cpu_arithmetic", False) or bias.dtype != torch.float32:
            return None  # no layout, or arithmetic of its own (GGMLLinear.cpu_arithmetic rounds x first)
        return (lin._qk_codes, lin._qk_scale, _or_none(lin._qk_offset), _or_none(lin._qk_lut), bias,
                lin._qk_group, lin._qk_bits, lin._qk_zero)
    if _dense(lin):
        return lin.weight.detach().contiguous(), _NONE, _NONE, _NONE, bias.detach(), 0, 32, 0
    return None


def _table(emb: GGMLEmbedding) -> qkernel.Layout | None:
    """The embedding's GGUF rows in the kernel's layout, made once per weight (a Generator renews its decoder
    whenever the cache changes shape)."""
    key = (emb.weight.data_ptr(), emb.weight._version)
    made = emb.__dict__.get("_qk_table")
    if made is None or made[0] != key:
        made = emb.__dict__["_qk_table"] = (key, ggml_layout(emb.weight, emb.qtype, emb.embedding_dim))
    return made[1]


class CPUDecoder:
    """The C++ `Decoder` of one model and cache: `step(token, pos)` -> logits (1, V); `advance(state, params)`."""

    def __init__(self, model: Transformer, decoder):
        self.model, self.decoder = model, decoder
        emb, head = model.model.embed_tokens, model.lm_head
        # a quantized embedding's rows in the kernel's layout, read in C++ instead of decoding GGUF blocks with ~30
        # PyTorch operations per token: a tied head's own layout (SmolLM2's GGUFs), or a copy of a small untied table
        self.table = None
        if isinstance(emb, GGMLEmbedding) and emb.weight.device.type == "cpu":
            if isinstance(head, QuantLinear) and head._qk_codes is not None and \
                    emb.weight.data_ptr() == head.weight.data_ptr():
                self.table = qkernel.Layout(head._qk_codes, head._qk_scale, head._qk_offset, head._qk_group,
                                            head._qk_bits, head._qk_lut, head._qk_zero)
            elif emb.weight.numel() <= EMBED_COPY_MAX:
                self.table = _table(emb)
        t = self.table
        if t is not None:
            decoder.set_rows(t.codes, t.scale, _or_none(t.offset), _or_none(t.lut), t.group, t.bits, t.zero)
        # whole tokens in C++ (`advance`), the input row too where it is a plain table's or a kernel layout's
        plain = type(emb) is nn.Embedding and emb.max_norm is None and not (emb._forward_hooks or
                                                                           emb._forward_pre_hooks) and \
            emb.weight.dtype.is_floating_point and emb.weight.device.type == "cpu"
        self.own_rows = plain or t is not None
        self.advances = True  # cpu_decode_step's switch: False draws with DecodeState.advance (tests compare them)
        decoder.set_input(emb.weight.detach().contiguous() if plain else _NONE, model.inv_freq, self.own_rows)

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        t = self.table
        if t is None:
            return self.model.model.embed_tokens(token).reshape(-1).float()
        return torch.ops.gentool_qk.qrows(t.codes, t.scale, t.offset, t.group, t.bits, t.lut, t.zero,
                                          token.reshape(-1))[0]

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (1, V) of `token` (1, 1) at position `pos` (1,), extending the cache."""
        freqs = pos.float()[:, None] * self.model.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[0]
        return self.decoder.step(self.embed(token), emb.cos(), emb.sin(), int(pos[0]), qkernel.act_bits())

    def advance(self, state, params) -> None:
        """state.advance(self.step(state.token, state.pos), params) for batch 1 in one C++ call, the draw included
        (no repetition penalty: the caller checks; the tests compare the two)."""
        top_p = 1.0 if params.top_p is None else params.top_p
        x = _NONE if self.own_rows else self.embed(state.token)
        self.decoder.advance(x, state.token, state.pos, state.count, state.out, state.logprobs, state.done, state.eos,
                             state.fill, state.keys, not params.ignore_eos, qkernel.act_bits(),
                             float(params.temperature), int(params.top_k or 0), float(top_p),
                             float(params.min_p or 0.0))


def cpu_decoder(model: nn.Module) -> CPUDecoder | None:
    """The whole-step decoder over the model's weights and current cache (set up, batch 1), or None where it does
    not apply."""
    if not (isinstance(model, Transformer) and model.causal and qkernel.ENABLED and qkernel.available()):
        return None
    layers = model.model.layers
    caches = [layer.self_attn.kv_cache for layer in layers]
    if any(c is None or c.k.dtype != torch.float32 or c.k.shape[0] != 1 or c.k.device.type != "cpu" for c in caches):
        return None
    norms = [n.weight for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm.weight)
    if any(n.dtype != torch.float32 or n.device.type != "cpu" for n in norms):
        return None
    args = [_layer_args(getattr(getattr(layer, part), name)) for layer in layers for part, name in PROJECTIONS]
    args.append(_layer_args(model.lm_head))
    if any(a is None for a in args):
        return None
    lists = [list(col) for col in zip(*args)]
    meta = [int(v) for a in args for v in a[5:]]
    c = model.config
    try:
        decoder = torch.classes.gentool_qk.Decoder(
            [n.detach() for n in norms], [cc.k for cc in caches], [cc.v for cc in caches],
            *[[t.detach() for t in col] for col in lists[:5]], meta, c.num_attention_heads, c.num_key_value_heads,
            float(c.rms_norm_eps))
    except RuntimeError:  # a shape the decoder does not take (its checks): the model's own decode path
        return None
    return CPUDecoder(model, decoder)
