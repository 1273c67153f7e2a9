"""LMConfig: the LLaMA-style model's shape, with Hugging Face LlamaConfig field names, and the presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from gentool.errors import GentoolError, UsageProblem

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class LMConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: dict | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 3
    head_dim: int | None = None      # as in HF: None means hidden_size // num_attention_heads

    def __post_init__(self):
        """The one sanity check of a model shape, whoever builds it (presets, flags, config.json, GGUF headers)."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageProblem(f"{name} is {value!r}; it must be a positive integer")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise UsageProblem(f"rope_theta is {self.rope_theta!r}; it must be a positive number")
        if not (self.rms_norm_eps >= 0 and math.isfinite(self.rms_norm_eps)):
            raise UsageProblem(f"rms_norm_eps is {self.rms_norm_eps!r}; it must be a finite number >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageProblem(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                               f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise UsageProblem(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                                   f"{self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim < 2 or self.head_dim % 2:
            raise UsageProblem(f"head_dim is {self.head_dim}; rotary embeddings need an even head_dim of at least 2")

    def n_params(self, non_embedding: bool = False) -> int:
        """Parameters. non_embedding excludes the input embedding and the output head (Kaplan et al. 2020)."""
        d, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv + d if self.attention_bias else 0)
        block = attn + 3 * d * self.intermediate_size + 2 * d
        body = self.num_hidden_layers * block + d
        if non_embedding:
            return body
        return body + self.vocab_size * d * (1 if self.tie_word_embeddings else 2)

    def train_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, "6N+6LTd": 6 x non-embedding parameters (forward + backward matmuls, Kaplan
        et al. 2020), plus the output head's 6·V·d, plus attention scores and values 6·L·T·(heads·head_dim)
        at context T (causal masking halves the 12·L·T·d of full attention)."""
        q = self.num_attention_heads * self.head_dim
        return (6 * self.n_params(non_embedding=True) + 6 * self.vocab_size * self.hidden_size
                + 6 * self.num_hidden_layers * seq_len * q)

    def to_hf_dict(self, dtype: str = "float32") -> dict[str, Any]:
        """config.json for transformers: both the v4 and v5 spellings (rope_theta/rope_parameters, torch_dtype/dtype)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
        d.update(architectures=list(SUPPORTED_ARCHITECTURES), model_type="llama",
                 hidden_act="silu", attention_dropout=0.0, mlp_bias=False, initializer_range=0.02,
                 rope_parameters=rope, torch_dtype=dtype, dtype=dtype, use_cache=True)
        if d["rope_scaling"] is None:
            d.pop("rope_scaling")
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, path: Any = None) -> "LMConfig":
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        if archs[0] not in SUPPORTED_ARCHITECTURES or d.get("model_type", "llama") != "llama":
            name = archs[0] if archs[0] not in SUPPORTED_ARCHITECTURES else d.get("model_type")
            raise UsageProblem(f"architecture {name} is not supported", path=path,
                               hint="gentool runs Llama-family checkpoints (LlamaForCausalLM)")
        if d.get("hidden_act", "silu") != "silu" or d.get("mlp_bias"):
            raise UsageProblem("only SiLU MLPs without bias are supported", path=path)
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("llama3", "default", None):
                raise UsageProblem(f"rope scaling {kind!r} is not supported", path=path, hint="llama3 scaling is")
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"} if kind == "llama3" else None
        try:
            n_heads = int(d["num_attention_heads"])
            hidden = int(d["hidden_size"])
            return cls(
                vocab_size=int(d["vocab_size"]), hidden_size=hidden, num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=n_heads, num_key_value_heads=int(d.get("num_key_value_heads") or n_heads),
                intermediate_size=int(d["intermediate_size"]),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)), rope_theta=float(theta),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                attention_bias=bool(d.get("attention_bias", False)), rope_scaling=scaling,
                bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                head_dim=int(d.get("head_dim") or hidden // n_heads))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise GentoolError(f"config.json is missing or has a bad field ({e})", path=path,
                               hint="the checkpoint is corrupt") from None


# Shapes in the gpt-fast style: a small dict. vocab_size comes from the tokenizer unless given.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, max_position_embeddings=128),
    "mini": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=176, max_position_embeddings=256),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=352, max_position_embeddings=256),
    "base": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=704, max_position_embeddings=512),
    "gpt2-small": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                       intermediate_size=2048, max_position_embeddings=1024, vocab_size=50304),
    "medium": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                   intermediate_size=2816, max_position_embeddings=2048),
    "tinyllama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, max_position_embeddings=2048, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, max_position_embeddings=4096, vocab_size=32000),
}


def config_from_preset(name: str | None, *, min_context: int | None = None, **dims: Any) -> LMConfig:
    """The one place a model shape is decided: preset `name` (or none), overridden by the HF-named `dims` that are
    not None. Without a preset, the width, depth and heads must be given; key/value heads default to the heads,
    the SwiGLU width to about 8/3 of the width (a multiple of 32), the vocabulary to 32000. `min_context` (the
    training sequence length) raises max_position_embeddings to at least it, and is the context when neither the
    preset nor `dims` give one."""
    if name is not None and name not in PRESETS:
        raise UsageProblem(f"unknown preset {name!r}", hint="choose one of " + ", ".join(PRESETS))
    values = {**(PRESETS[name] if name else {}), **{k: v for k, v in dims.items() if v is not None}}
    values.setdefault("vocab_size", 32000)
    if min_context is not None:
        values["max_position_embeddings"] = max(values.get("max_position_embeddings", 0), min_context)
    values.setdefault("num_key_value_heads", values.get("num_attention_heads"))
    values.setdefault("intermediate_size", 4 * values.get("hidden_size", 0) * 2 // 3 // 32 * 32 or 32)
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if values.get(k) is None]
    if missing:
        raise UsageProblem("incomplete model dimensions: " + ", ".join(missing) + " missing",
                           hint="give --preset, or all of --hidden-size, --num-layers and --num-heads")
    try:
        return LMConfig(**values)
    except TypeError as e:
        raise UsageProblem(f"bad model dimensions ({e})", hint="see `gentool train-lm --help`") from None
