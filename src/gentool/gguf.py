"""GGUF (llama.cpp) import and export for Llama-architecture models.

Import: read a GGUF with the `gguf` package, dequantize every tensor to float32, rename llama.cpp tensors to the
Hugging Face Llama names, undo llama.cpp's row permutation of the q/k projections (its rotary layout interleaves
the two halves of each head), and rebuild the tokenizer from the metadata: a SentencePiece `tokenizer.model`
for `tokenizer.ggml.model == "llama"`, a byte-level BPE `tokenizer.json` for `"gpt2"`.
Export: the reverse, with tensors as F32, F16, Q8_0 or Q4_0 in llama.cpp's block layouts (packed here).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gentool.errors import GentoolError, UsageProblem

# llama.cpp name -> HF name; {i} is the block index
_NAMES = {
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
_TO_HF = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in _NAMES.items()]
_TO_GGUF = [(re.compile("^" + re.escape(v).replace(r"\{i\}", r"(\d+)") + "$"), k) for k, v in _NAMES.items()]
QK = 32  # llama.cpp's block size for Q8_0 / Q4_0


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


# --- llama.cpp block formats (byte layouts of ggml-common.h) -------------------------------------------------------

def pack_q8_0(w: np.ndarray) -> np.ndarray:
    """Q8_0: blocks of 32 along a row, each an fp16 scale d = absmax/127 then 32 int8 values. -> (rows, bytes)."""
    rows, cols = w.shape
    assert cols % QK == 0, "Q8_0 needs rows divisible by 32"
    blocks = w.astype(np.float32).reshape(-1, QK)
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
    q = np.round(np.divide(blocks, d, out=np.zeros_like(blocks), where=d > 0)).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)
    return out.reshape(rows, -1)


def unpack_q8_0(packed: np.ndarray, cols: int) -> np.ndarray:
    blocks = packed.reshape(-1, 2 + QK)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(-1, cols)


def pack_q4_0(w: np.ndarray) -> np.ndarray:
    """Q4_0: blocks of 32, fp16 d = (signed absmax)/-8, q = clamp(round(x/d) + 8, 0, 15); the first 16 values in
    the low nibbles, the last 16 in the high nibbles."""
    rows, cols = w.shape
    assert cols % QK == 0, "Q4_0 needs rows divisible by 32"
    blocks = w.astype(np.float32).reshape(-1, QK)
    imax = np.abs(blocks).argmax(axis=1)
    d = (blocks[np.arange(len(blocks)), imax] / -8.0)[:, None]
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.trunc(blocks * inv + 8.5), 0, 15).astype(np.uint8)
    nibbles = q[:, :QK // 2] | (q[:, QK // 2:] << 4)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), nibbles], axis=1)
    return out.reshape(rows, -1)


def unpack_q4_0(packed: np.ndarray, cols: int) -> np.ndarray:
    blocks = packed.reshape(-1, 2 + QK // 2)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8
    return (d * q.astype(np.float32)).reshape(-1, cols)


# --- import --------------------------------------------------------------------------------------------------------

@dataclass
class GGUFModel:
    config: dict[str, Any]                        # HF config.json fields
    tensors: dict[str, np.ndarray]                # HF names -> float32 arrays (out, in)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_gguf(path: str | Path) -> GGUFModel:
    """Read a llama-architecture GGUF into HF-named float32 tensors, an HF config and the tokenizer metadata."""
    try:
        import gguf
    except ImportError:
        raise UsageProblem("reading GGUF needs the `gguf` package", hint="pip install 'gentool[gguf]'") from None
    path = Path(path)
    if not path.is_file():
        raise UsageProblem("no such file", path=path, hint="pass a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on truncated or foreign files
        raise GentoolError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=path,
                           hint="the file is truncated or not GGUF; download it again") from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UsageProblem(f"architecture {arch!r} is not supported", path=path,
                           hint="gentool imports llama-architecture GGUF files")
    p = f"{arch}."
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    hidden = int(_field(reader, p + "embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens", [])
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "vocab_size": int(_field(reader, p + "vocab_size", len(tokens))),
        "head_dim": int(_field(reader, p + "rope.dimension_count", hidden // n_head)),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    tensors, types = {}, {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):  # llama 3 rope scaling factors: recomputed from the config
                continue
            raise UsageProblem(f"tensor {t.name!r} is not part of a Llama model", path=path)
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UsageProblem(f"block type {t.tensor_type.name} of {t.name} is not supported by the gguf package",
                               path=path) from None
        w = np.asarray(w, dtype=np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, n_kv)
        tensors[name], types[name] = w, t.tensor_type.name
    config["tie_word_embeddings"] = "lm_head.weight" not in tensors
    config["attention_bias"] = any(k.endswith("q_proj.bias") for k in tensors)
    tok = {"model": _field(reader, "tokenizer.ggml.model"), "pre": _field(reader, "tokenizer.ggml.pre"),
           "tokens": tokens, "scores": _field(reader, "tokenizer.ggml.scores"),
           "token_type": _field(reader, "tokenizer.ggml.token_type"), "merges": _field(reader, "tokenizer.ggml.merges"),
           "add_bos": _field(reader, "tokenizer.ggml.add_bos_token"),
           "add_space_prefix": _field(reader, "tokenizer.ggml.add_space_prefix"),
           "chat_template": _field(reader, "tokenizer.chat_template"),
           **{k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}}
    return GGUFModel(config, tensors, tok, types)


def write_tokenizer(tok: dict[str, Any], directory: Path) -> list[str]:
    """Rebuild the tokenizer files from GGUF metadata; returns the file names written."""
    model = tok.get("model")
    written = []
    if model == "llama":
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        scores = tok.get("scores") or [0.0] * len(tok["tokens"])
        types = tok.get("token_type") or [1] * len(tok["tokens"])
        for piece, score, typ in zip(tok["tokens"], scores, types):  # GGUF token types are SentencePiece's enum
            p = proto.pieces.add()
            p.piece, p.score, p.type = piece, float(score), int(typ)
        spec = proto.trainer_spec
        spec.model_type = pb.TrainerSpec.BPE
        spec.byte_fallback = 6 in types
        spec.unk_id = tok.get("unknown") if tok.get("unknown") is not None else 0
        spec.bos_id = tok.get("bos") if tok.get("bos") is not None else -1
        spec.eos_id = tok.get("eos") if tok.get("eos") is not None else -1
        spec.pad_id = tok.get("padding") if tok.get("padding") not in (None, spec.eos_id, spec.bos_id) else -1
        norm = proto.normalizer_spec
        norm.name, norm.add_dummy_prefix = "identity", bool(tok.get("add_space_prefix", True) is not False)
        norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
        (directory / "tokenizer.model").write_bytes(proto.SerializeToString())
        written.append("tokenizer.model")
    elif model == "gpt2":
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise UsageProblem("a byte-level BPE tokenizer needs the `tokenizers` package",
                               hint="pip install 'gentool[hf]'") from None
        vocab = {t: i for i, t in enumerate(tok["tokens"])}
        merges = [tuple(m.split(" ", 1)) for m in tok.get("merges") or []]
        t = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        t.decoder = decoders.ByteLevel()
        special = [AddedToken(tok["tokens"][i], special=True, normalized=False)
                   for i, typ in enumerate(tok.get("token_type") or []) if typ == 3]
        t.add_special_tokens(special)
        t.save(str(directory / "tokenizer.json"))
        written.append("tokenizer.json")
    else:
        raise UsageProblem(f"GGUF tokenizer model {model!r} is not supported", hint="llama and gpt2 are")
    names = tok["tokens"]
    cfg = {"add_bos_token": bool(tok.get("add_bos")) if tok.get("add_bos") is not None else model == "llama",
           "add_eos_token": False,
           **{f"{k}_token": names[tok[g]] for k, g in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"),
                                                       ("pad", "padding")) if tok.get(g) is not None}}
    if tok.get("chat_template"):
        cfg["chat_template"] = tok["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return written + ["tokenizer_config.json"]


# --- export --------------------------------------------------------------------------------------------------------

def write_gguf(path: str | Path, config: dict[str, Any], tensors: dict[str, np.ndarray], *, qtype: str = "f16",
               tokenizer: dict[str, Any] | None = None, name: str = "gentool") -> dict[str, str]:
    """Write a llama-architecture GGUF. 2-D weights (not norms) get `qtype` (f32|f16|q8_0|q4_0) where the row
    length allows, else f16; 1-D tensors stay f32 as llama.cpp expects. Returns the type of each tensor."""
    import gguf

    if qtype not in ("f32", "f16", "q8_0", "q4_0"):
        raise UsageProblem(f"unknown GGUF type {qtype!r}", hint="use f16, q8_0 or q4_0")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // n_head)
    rope_theta = config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(config["vocab_size"])
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[qtype])
    if tokenizer:
        w.add_tokenizer_model(tokenizer["model"])
        if tokenizer.get("pre"):
            w.add_tokenizer_pre(tokenizer["pre"])
        w.add_token_list(tokenizer["tokens"])
        if tokenizer.get("scores") is not None:
            w.add_token_scores(tokenizer["scores"])
        if tokenizer.get("token_type") is not None:
            w.add_token_types(tokenizer["token_type"])
        if tokenizer.get("merges"):
            w.add_token_merges(tokenizer["merges"])
        for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unknown", w.add_unk_token_id),
                        ("padding", w.add_pad_token_id)):
            if tokenizer.get(key) is not None:
                fn(int(tokenizer[key]))
        if tokenizer.get("add_bos") is not None:
            w.add_add_bos_token(bool(tokenizer["add_bos"]))
        if tokenizer.get("chat_template"):
            w.add_chat_template(tokenizer["chat_template"])
    types: dict[str, str] = {}
    GT = gguf.GGMLQuantizationType
    for hf, arr in tensors.items():
        target = gguf_name(hf)
        if target is None:
            raise UsageProblem(f"tensor {hf} has no GGUF name", hint="only Llama-architecture tensors are exported")
        arr = np.asarray(arr, dtype=np.float32)
        if hf.endswith(("q_proj.weight", "q_proj.bias")):
            arr = permute_qk(arr, n_head)
        elif hf.endswith(("k_proj.weight", "k_proj.bias")):
            arr = permute_qk(arr, n_kv)
        if arr.ndim == 1 or qtype == "f32":
            w.add_tensor(target, np.ascontiguousarray(arr))
            types[target] = "F32"
        elif qtype == "f16" or arr.shape[1] % QK:
            w.add_tensor(target, arr.astype(np.float16))
            types[target] = "F16"
        else:
            packed = pack_q8_0(arr) if qtype == "q8_0" else pack_q4_0(arr)
            w.add_tensor(target, packed, raw_dtype=GT.Q8_0 if qtype == "q8_0" else GT.Q4_0)
            types[target] = qtype.upper()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def tokenizer_metadata_from_sentencepiece(model_file: str | Path) -> dict[str, Any]:
    """GGUF tokenizer metadata ("llama" model) from a SentencePiece tokenizer.model."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return {"model": "llama", "tokens": [p.piece for p in proto.pieces], "scores": [p.score for p in proto.pieces],
            "token_type": [int(p.type) for p in proto.pieces], "bos": sp.bos_id() if sp.bos_id() >= 0 else None,
            "eos": sp.eos_id() if sp.eos_id() >= 0 else None, "unknown": sp.unk_id(),
            "padding": sp.pad_id() if sp.pad_id() >= 0 else None, "add_bos": True,
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}


def tokenizer_metadata_from_json(directory: Path) -> dict[str, Any]:
    """GGUF tokenizer metadata ("gpt2" model) from a byte-level BPE tokenizer.json."""
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise UsageProblem(f"tokenizer.json model {model.get('type')!r} cannot be exported to GGUF",
                           path=directory, hint="byte-level BPE and SentencePiece tokenizers can")
    vocab = dict(model.get("vocab", {}))
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    special = {a["id"] for a in data.get("added_tokens", []) if a.get("special")}
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    cfg = json.loads((directory / "tokenizer_config.json").read_text()) \
        if (directory / "tokenizer_config.json").is_file() else {}

    def tid(name: str) -> int | None:
        value = cfg.get(f"{name}_token")
        value = value.get("content") if isinstance(value, dict) else value
        return vocab.get(value) if value is not None else None

    return {"model": "gpt2", "tokens": tokens, "token_type": [3 if i in special else 1 for i in range(len(tokens))],
            "merges": merges, "bos": tid("bos"), "eos": tid("eos"), "unknown": tid("unk"), "padding": tid("pad"),
            "add_bos": bool(cfg.get("add_bos_token", False)), "chat_template": cfg.get("chat_template")}


def _hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Both transformers v4 and v5 spellings, so either version loads the checkpoint."""
    out = dict(config)
    out.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": out.get("rope_theta", 10000.0)})
    out.setdefault("torch_dtype", "float32")
    out.setdefault("dtype", out["torch_dtype"])
    return out


def import_gguf(src: str | Path, out: str | Path, *, force: bool = False):
    """GGUF file -> lm-checkpoint artifact (float32 weights, tokenizer rebuilt from the metadata)."""
    from safetensors.numpy import save_file

    from gentool.artifacts import check_output, create_artifact, input_ref, sha256_file

    check_output(out, force=force)
    model = read_gguf(src)
    with create_artifact(out, "lm-checkpoint", force=force, config={"init": "import-gguf"},
                         inputs=[input_ref("import", src)]) as art:
        (art.dir / "config.json").write_text(json.dumps(_hf_config(model.config), indent=2) + "\n")
        save_file({k: np.ascontiguousarray(v) for k, v in model.tensors.items()}, str(art.dir / "model.safetensors"),
                  metadata={"format": "pt"})
        written = write_tokenizer(model.tokenizer, art.dir)
        cfg = model.config
        n_params = int(sum(v.size for v in model.tensors.values()))
        embed = int(model.tensors["model.embed_tokens.weight"].size)
        art.contents.update(
            architecture="llama", n_params=n_params,
            n_params_non_embedding=n_params - embed * (1 if cfg["tie_word_embeddings"] else 2),
            vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"], dtype="float32",
            tokenizer_id="sha256:" + sha256_file(art.dir / written[0]), tokenizer_file=written[0],
            gguf_tensor_types=sorted(set(model.tensor_types.values())))
    return art.manifest


def export_gguf(ckpt: str | Path, out: str | Path, *, qtype: str = "f16", force: bool = False,
                verify: bool = True) -> dict[str, Any]:
    """lm-checkpoint (or HF Llama directory) -> GGUF file, written to a temporary sibling and renamed."""
    import os
    import uuid

    from safetensors import safe_open

    from gentool.artifacts import MANIFEST, read_artifact

    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not force:
        raise UsageProblem("output exists", path=out, hint="use --force to replace it")
    if (ckpt / MANIFEST).is_file():
        manifest = read_artifact(ckpt, "lm-checkpoint", verify=verify)
        if manifest.contents.get("quantized"):
            raise UsageProblem("cannot export a quantized checkpoint", path=ckpt, hint="dequantize it first")
    if not (ckpt / "config.json").is_file():
        raise UsageProblem("no config.json: not an LM checkpoint", path=ckpt, hint="pass an lm-checkpoint directory")
    config = json.loads((ckpt / "config.json").read_text())
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] != "LlamaForCausalLM":
        raise UsageProblem(f"architecture {archs[0]} is not supported", path=ckpt, hint="Llama checkpoints export")
    if (ckpt / "model.safetensors.index.json").is_file():
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        with safe_open(str(ckpt / name), framework="pt") as f:  # "pt" reads bf16, which numpy cannot
            for key in f.keys():
                tensors[key] = f.get_tensor(key).float().numpy()
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    if (ckpt / "tokenizer.model").is_file():
        tok = tokenizer_metadata_from_sentencepiece(ckpt / "tokenizer.model")
    elif (ckpt / "tokenizer.json").is_file():
        tok = tokenizer_metadata_from_json(ckpt)
    else:
        raise UsageProblem("no tokenizer.model or tokenizer.json", path=ckpt, hint="llama.cpp needs the tokenizer")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        types = write_gguf(tmp, config, tensors, qtype=qtype, tokenizer=tok, name=ckpt.name)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"output": str(out), "type": qtype, "tensors": len(types), "tensor_types": counts,
            "bytes": out.stat().st_size}
