"""llama-quantize's per-tensor type choice ("mixes" such as Q4_K_M), as a pure function of names and shapes.

Legend
    mix        a llama-quantize file type by name: q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m
               q5_k_s q5_k_m q6_k iq4_nl iq4_xs (q3_k, q4_k and q5_k are its aliases for the _m mixes)
    name       GGUF tensor name, e.g. "blk.3.attn_v.weight"; shape is numpy's (rows, cols), cols = GGML ne[0]
    result     GGML type name ("Q4_K", "Q6_K", "F32", ...) as in codecs.ggml.TYPES

What it reproduces (src/llama-quant.cpp, `llama_tensor_get_type`):
    * only 2-D+ tensors whose name ends in "weight" and is not a norm (and a few named exceptions) are quantized;
    * output.weight — and token_embd.weight when there is no output.weight (tied embeddings) — get Q6_K unless the
      mix is Q8_0, or Q8_0 when its rows do not split into the mix's blocks;
    * _m mixes give Q6_K to attn_v / ffn_down in the layers where use_more_bits(i, n) holds (the first and last
      eighth and every third layer in between); q4_k_s gives Q5_K to the first 4 attn_v and the first eighth of
      ffn_down; q4_0/q5_0 with an importance matrix give Q4_1/Q5_1 to the first eighth of ffn_down;
    * q2_k: attn_v Q3_K (Q4_K when n_head/n_head_kv >= 4), ffn_down and attn_output Q3_K; q3_k_m: the first 2
      attn_v Q5_K, the rest Q4_K, ffn_down Q5_K in the first sixteenth and Q4_K after, attn_output Q4_K; q3_k_l:
      attn_v, ffn_down, attn_output Q5_K; iq4_nl/iq4_xs: attn_v Q5_K at n_gqa >= 4, ffn_down Q5_K in the first
      eighth without an importance matrix; 8-expert models get Q5_K attn_output in the 2-4 bit mixes;
    * llama.cpp counts attn_v tensors in its tensor order (layer, then name) rather than parsing the layer; the
      whole-model `tensor_types` does the same, `tensor_type` assumes one attn_v per layer;
    * `--tensor-type PATTERN=TYPE` overrides (first regex that matches anywhere in the name wins) replace the
      recipe; then shapes that do not fit fall back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, else F16).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gentool.errors import UsageProblem
from gentool.codecs.ggml import TYPES, block_size, fallback_type

# mix -> (default GGML type, llama_ftype written to general.file_type)
MIXES: dict[str, tuple[str, int]] = {
    "q4_0": ("Q4_0", 2), "q4_1": ("Q4_1", 3), "q8_0": ("Q8_0", 7), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9),
    "q4_k_s": ("Q4_K", 14), "q4_k_m": ("Q4_K", 15), "q5_k_s": ("Q5_K", 16), "q5_k_m": ("Q5_K", 17),
    "q6_k": ("Q6_K", 18), "q2_k": ("Q2_K", 10), "q3_k_s": ("Q3_K", 11), "q3_k_m": ("Q3_K", 12),
    "q3_k_l": ("Q3_K", 13), "iq4_nl": ("IQ4_NL", 25), "iq4_xs": ("IQ4_XS", 30),
}
_ALIASES = {"q4_k": "q4_k_m", "q5_k": "q5_k_m", "q3_k": "q3_k_m"}

_NOT_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                  "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
                  "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
                  "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd")
_TIME_MIX = tuple(f"time_mix_{k}.weight" for k in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2",
                                                    "g1", "g2", "decay_w1", "decay_w2", "lerp_fused"))
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
               ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))


def mix_info(mix: str) -> tuple[str, str, int]:
    """Canonical mix name, its default type and its llama_ftype number."""
    key = _ALIASES.get(mix.lower(), mix.lower())
    if key not in MIXES:
        raise UsageProblem(f"unknown quantization mix {mix!r}", hint="use one of " + ", ".join(MIXES))
    return (key, *MIXES[key])


def parse_tensor_type(spec: str) -> tuple[re.Pattern, str]:
    """`PATTERN=TYPE` as llama-quantize's --tensor-type: the pattern is lower-cased and searched anywhere in the
    GGUF name; the type is a GGML type name in any case."""
    pattern, sep, qtype = spec.partition("=")
    if not sep or not pattern or not qtype:
        raise UsageProblem(f"malformed --tensor-type {spec!r}", hint="write PATTERN=TYPE, e.g. attn_v=q8_0")
    if qtype.upper() not in TYPES:
        raise UsageProblem(f"--tensor-type {spec!r}: gentool has no codec for type {qtype!r}",
                           hint="use one of " + ", ".join(TYPES))
    try:
        return re.compile(pattern.lower()), qtype.upper()
    except re.error as e:
        raise UsageProblem(f"--tensor-type {spec!r}: bad regular expression ({e})") from None


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, cat in _CATEGORIES:
        if needle in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: Sequence[int], *, quantize_output: bool = True) -> bool:
    """llama.cpp's tensor_allows_quantization for these architectures."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims ignores trailing ne == 1, i.e. leading numpy 1s
        dims.pop(0)
    if len(dims) < 2 or not name.endswith("weight"):
        return False
    if name == "output.weight" and not quantize_output:
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NOT_QUANTIZED + _TIME_MIX)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class _State:
    n_layer: int
    n_attention_wv: int
    tied: bool
    arch: str = "llama"
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0
    has_imatrix: bool = False
    output_type: str | None = None
    i_attention_wv: int = 0
    i_ffn_down: int = 0
    overrides: list = field(default_factory=list)


def _recipe(st: _State, name: str, cols: int, mix: str, default: str) -> str:
    """llama_tensor_get_type_impl restricted to the mixes above."""
    cat, new = _category(name), default
    falcon = st.arch == "falcon"
    if cat == "output" or (st.tied and cat == "token_embd"):
        if st.output_type:
            return st.output_type
        if falcon or cols % block_size(default):
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    gqa4 = st.n_head_kv > 0 and st.n_head // st.n_head_kv >= 4  # hparams.n_gqa() >= 4
    if cat == "attn_v":
        if mix == "q2_k":
            new = "Q4_K" if gqa4 else "Q3_K"
        elif mix == "q3_k_m":
            new = "Q5_K" if st.i_attention_wv < 2 else "Q4_K"
        elif mix == "q3_k_l" or (mix in ("iq4_nl", "iq4_xs") and gqa4):
            new = "Q5_K"
        elif mix in ("q4_k_m", "q5_k_m") and _use_more_bits(st.i_attention_wv, st.n_attention_wv):
            new = "Q6_K"
        elif mix == "q4_k_s" and st.i_attention_wv < 4:
            new = "Q5_K"
        if st.arch == "llama" and st.n_layer == 80 and st.n_head != st.n_head_kv and new in ("Q3_K", "Q4_K"):
            new = "Q5_K"  # LLM_TYPE_70B: 8 heads share each attn_v row block
        if st.n_expert == 8:
            new = "Q8_0"
        st.i_attention_wv += 1
    elif cat == "attn_k" and st.n_expert == 8:
        new = "Q8_0"
    elif cat == "ffn_down":
        i, n = (_layer(name) if st.n_expert > 1 else st.i_ffn_down), st.n_layer
        if mix == "q2_k":
            new = "Q3_K"
        elif mix == "q3_k_m":
            new = "Q5_K" if i < n // 16 else "Q4_K" if not falcon or _use_more_bits(i, n) else "Q3_K"
        elif mix == "q3_k_l":
            new = "Q4_K" if falcon else "Q5_K"
        elif mix in ("iq4_nl", "iq4_xs") and i < n // 8 and not st.has_imatrix:
            new = "Q5_K"
        elif mix == "q4_k_m":
            if falcon:
                new = "Q6_K" if i < n // 16 else "Q5_K" if _use_more_bits(i, n) else "Q4_K"
            elif _use_more_bits(i, n):
                new = "Q6_K"
        elif mix == "q5_k_m" and _use_more_bits(i, n):
            new = "Q6_K"
        elif mix == "q4_k_s" and not falcon and i < n // 8:
            new = "Q5_K"
        elif mix in ("q4_0", "q5_0") and st.has_imatrix and i < n // 8:
            new = "Q4_1" if mix == "q4_0" else "Q5_1"
        st.i_ffn_down += 1
    elif cat == "attn_output":
        if falcon:
            new = "Q4_K" if mix == "q3_k_l" else new
        elif st.n_expert == 8:
            new = "Q5_K" if mix in ("q2_k", "q3_k_s", "q3_k_m", "iq4_nl", "q4_k_s", "q4_k_m", "iq4_xs") else new
        else:
            new = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(mix, new)
    return new


def _choose(st: _State, name: str, shape: Sequence[int], mix: str, current: str, *, pure: bool,
            output_type: str | None, token_embd_type: str | None, quantize_output: bool) -> str:
    if not allows_quantization(name, shape, quantize_output=quantize_output):
        return current
    cat = _category(name)
    if token_embd_type and cat == "token_embd":
        return token_embd_type
    if output_type and cat == "output":
        return output_type
    mix, default, _ = mix_info(mix)
    cols = shape[-1]
    new = next((t for pattern, t in st.overrides if pattern.search(name)), None)
    if new is None:
        new = default if pure else _recipe(st, name, cols, mix, default)
    return fallback_type(new, cols)


def _overrides(specs: Iterable[str | tuple]) -> list:
    return [parse_tensor_type(o) if isinstance(o, str) else (re.compile(o[0]) if isinstance(o[0], str) else o[0],
                                                             o[1].upper()) for o in specs]


def _order(name: str) -> tuple[int, str]:
    return _layer(name), name  # llama_model_loader's weight_name_comparer


def tensor_types(tensors: Mapping[str, Sequence[int]], mix: str, *, n_layer: int, n_head: int = 1,
                 n_head_kv: int | None = None, n_expert: int = 0, arch: str = "llama",
                 overrides: Iterable[str | tuple] = (), pure: bool = False, has_imatrix: bool = False,
                 output_type: str | None = None, token_embd_type: str | None = None, quantize_output: bool = True,
                 current_types: Mapping[str, str] | None = None) -> dict[str, str]:
    """GGML type of every tensor (name -> numpy shape) under `mix`, as llama-quantize chooses it.

    `overrides` are --tensor-type overrides ("PATTERN=TYPE" strings); `pure` is --pure (one type for all, still
    with shape fallbacks); `has_imatrix` matters for q4_0/q5_0; `output_type`/`token_embd_type` are
    --output-tensor-type/--token-embedding-type; tensors left alone keep `current_types[name]` (default F32)."""
    names = sorted(tensors, key=_order)
    st = _State(n_layer=n_layer, n_attention_wv=sum(_category(n) == "attn_v" for n in names),
                tied="output.weight" not in tensors, arch=arch, n_head=n_head,
                n_head_kv=n_head if n_head_kv is None else n_head_kv, n_expert=n_expert, has_imatrix=has_imatrix,
                output_type=output_type and output_type.upper(), overrides=_overrides(overrides))
    token_embd_type = token_embd_type and token_embd_type.upper()
    current_types = current_types or {}
    return {n: _choose(st, n, tuple(tensors[n]), mix, current_types.get(n, "F32"), pure=pure,
                       output_type=st.output_type, token_embd_type=token_embd_type, quantize_output=quantize_output)
            for n in names}


def tensor_type(name: str, shape: Sequence[int], mix: str, *, n_layer: int, tied_embeddings: bool = False,
                n_head: int = 1, n_head_kv: int | None = None, n_expert: int = 0, arch: str = "llama",
                overrides: Iterable[str | tuple] = (), pure: bool = False, has_imatrix: bool = False,
                current: str = "F32") -> str:
    """One tensor's type under `mix`, taking its layer index from the name (a standard one-attn_v-per-layer model;
    `tensor_types` over the whole model reproduces llama.cpp's counting exactly)."""
    layer = max(_layer(name), 0)
    st = _State(n_layer=n_layer, n_attention_wv=n_layer, tied=tied_embeddings, arch=arch, n_head=n_head,
                n_head_kv=n_head if n_head_kv is None else n_head_kv, n_expert=n_expert, has_imatrix=has_imatrix,
                i_attention_wv=layer, i_ffn_down=layer, overrides=_overrides(overrides))
    return _choose(st, name, tuple(shape), mix, current, pure=pure, output_type=None, token_embd_type=None,
                   quantize_output=True)
