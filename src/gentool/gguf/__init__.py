"""GGUF (llama.cpp) import and export for Llama-architecture models.

Import: read a GGUF with the `gguf` package, dequantize every tensor to float32, rename llama.cpp tensors to the
Hugging Face Llama names, undo llama.cpp's row permutation of the q/k projections (its rotary layout interleaves
the two halves of each head), and rebuild the tokenizer from the metadata: a SentencePiece `tokenizer.model`
for `tokenizer.ggml.model == "llama"`, a byte-level BPE `tokenizer.json` for `"gpt2"`.
With --keep-quantized the blocks of the types gentool decodes stay as they are, in a quantized-checkpoint.
Export: the reverse; F32/F16, or a llama-quantize mix (q4_0 … q8_0, q4_k_m, q5_k_m, q6_k) with llama-quantize's
per-tensor types and blocks (gentool.quantize.ggml, codecs.ggml); a GGML quantized-checkpoint's blocks are copied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from gentool.codecs.ggml import scales_finite
from gentool.codecs.gguf_names import gguf_name, hf_name, permute_qk, qk_heads, unpermute_qk
from gentool.artifacts.tensorfiles import cast_weight, check_finite
from gentool.devices import torch_dtype
from gentool.errors import GentoolError, UsageProblem
from gentool.gguf.tokenizer import (
    _add_tokenizer,
    tokenizer_metadata_from_json,
    tokenizer_metadata_from_sentencepiece,
    write_tokenizer,
)
from gentool.models.quant_ggml import FLOAT_TYPES, SUPPORTED

__all__ = [
    "GGUFModel",
    "export_gguf",
    "gguf_name",
    "hf_name",
    "import_gguf",
    "permute_qk",
    "read_field",
    "read_gguf",
    "tokenizer_metadata_from_json",
    "tokenizer_metadata_from_sentencepiece",
    "unpermute_qk",
    "write_gguf",
    "write_tokenizer",
]
FLOAT_EXPORTS = ("f32", "f16")
GGML_QUANT_VERSION = 2  # GGML_QNT_VERSION (ggml.h): general.quantization_version, as convert_hf_to_gguf and
#                         llama-quantize write it into every file


# --- import --------------------------------------------------------------------------------------------------------

@dataclass
class GGUFModel:
    config: dict[str, Any]                        # HF config.json fields
    tensors: dict[str, np.ndarray]                # HF names -> float32 arrays (out, in)
    tokenizer: dict[str, Any] = field(default_factory=dict)
    tensor_types: dict[str, str] = field(default_factory=dict)   # HF names -> GGML type names
    raw: dict[str, np.ndarray] = field(default_factory=dict)      # HF names -> GGUF bytes (rows, row_bytes), HF rows
    file_type: int | None = None                                  # general.file_type (llama_ftype)


def read_field(reader, key: str, default: Any = None, *, path: Path | None = None) -> Any:
    """A metadata value of a GGUFReader (`default` when absent); a damaged one is one GentoolError."""
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except (ValueError, IndexError) as e:  # undecodable text, a short array
        raise GentoolError(f"damaged GGUF metadata {key} ({type(e).__name__})", path=path,
                           hint="the file is corrupt: write it again") from None


def read_gguf(path: str | Path, *, keep_quantized: bool = False) -> GGUFModel:
    """Read a llama-architecture GGUF into HF-named float32 tensors, an HF config and the tokenizer metadata.
    With `keep_quantized`, tensors of the block types gentool decodes stay as their bytes in `raw` instead."""
    try:
        import gguf
    except ImportError:
        raise UsageProblem("reading GGUF needs the `gguf` package", hint="pip install 'gentool[gguf]'") from None
    path = Path(path)
    if not path.is_file():
        raise UsageProblem("no such file", path=path, hint="pass a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 -- the reader raises ValueError/IndexError/struct errors on truncated or foreign files
        raise GentoolError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=path,
                           hint="the file is truncated or not GGUF; download it again") from None
    meta = partial(read_field, reader, path=path)
    arch = meta("general.architecture")
    if arch != "llama":
        raise UsageProblem(f"architecture {arch!r} is not supported", path=path,
                           hint="gentool imports llama-architecture GGUF files")
    p = f"{arch}."
    n_head = int(meta(p + "attention.head_count"))
    n_kv = int(meta(p + "attention.head_count_kv", n_head))
    hidden = int(meta(p + "embedding_length"))
    tokens = meta("tokenizer.ggml.tokens", [])
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "num_hidden_layers": int(meta(p + "block_count")),
        "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "intermediate_size": int(meta(p + "feed_forward_length")),
        "max_position_embeddings": int(meta(p + "context_length", 2048)),
        "rms_norm_eps": float(meta(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta(p + "rope.freq_base", 10000.0)),
        "vocab_size": int(meta(p + "vocab_size", len(tokens))),
        "head_dim": int(meta(p + "rope.dimension_count", hidden // n_head if n_head > 0 else 0)),
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta("tokenizer.ggml.padding_token_id"),
    }
    if keep_quantized:
        other = sorted({t.tensor_type.name for t in reader.tensors} - set(SUPPORTED + FLOAT_TYPES))
        if other:
            raise UsageProblem(f"--keep-quantized: gentool cannot decode block type {', '.join(other)}", path=path,
                               hint="import without --keep-quantized to dequantize every tensor to float32")
    tensors, types, raw = {}, {}, {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name.startswith("rope_freqs"):  # llama 3 rope scaling factors: recomputed from the config
                continue
            raise UsageProblem(f"tensor {t.name!r} is not part of a Llama model", path=path)
        heads = qk_heads(name, n_head, n_kv)
        types[name] = t.tensor_type.name
        keep = keep_quantized and t.tensor_type.name in SUPPORTED
        if keep:
            w = np.asarray(t.data, dtype=np.uint8)
            w = w.reshape(-1, w.shape[-1])
            check_block_scales(t.name, w, t.tensor_type.name, path)
        else:
            try:
                w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            except NotImplementedError:
                raise UsageProblem(f"block type {t.tensor_type.name} of {t.name} is not supported by the gguf "
                                   "package", path=path) from None
            check_finite(t.name, w, path)
        if heads:
            try:
                w = unpermute_qk(w, heads)
            except ValueError:
                raise GentoolError(f"{t.name} {w.shape} does not fit the header's {heads} heads", path=path,
                                   hint="the file is corrupt: write it again") from None
        (raw if keep else tensors)[name] = w
    config["tie_word_embeddings"] = "lm_head.weight" not in types
    config["attention_bias"] = any(k.endswith("q_proj.bias") for k in types)
    tok = {"model": meta("tokenizer.ggml.model"), "pre": meta("tokenizer.ggml.pre"),
           "tokens": tokens, "scores": meta("tokenizer.ggml.scores"),
           "token_type": meta("tokenizer.ggml.token_type"), "merges": meta("tokenizer.ggml.merges"),
           "add_bos": meta("tokenizer.ggml.add_bos_token"),
           "add_space_prefix": meta("tokenizer.ggml.add_space_prefix"),
           "chat_template": meta("tokenizer.chat_template"),
           **{k: meta(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}}
    file_type = meta("general.file_type")
    model = GGUFModel(config, tensors, tok, types, raw, int(file_type) if file_type is not None else None)
    _check_model(model, path)
    return model


def _check_model(model: GGUFModel, path: Path) -> None:
    """The header's hyper-parameters and the tensors against each other: the checks every LM reader makes."""
    from dataclasses import fields

    from gentool.config import LMConfig
    from gentool.models.checkpoint import check_tensors

    try:
        config = LMConfig(**{f.name: model.config[f.name] for f in fields(LMConfig) if f.name in model.config})
    except UsageProblem as e:
        raise GentoolError(f"the GGUF header describes no valid model: {e.message}", path=path,
                           hint="the file is corrupt: write it again") from None
    shapes = {k: np.shape(v) for k, v in model.tensors.items()}
    check_tensors(config, {**shapes, **{k: np.shape(v) for k, v in model.raw.items()}}, path, packed=set(model.raw))


def check_block_scales(name: str, raw: np.ndarray, qtype: str, where: Path | str | None) -> None:
    """Refuse GGML blocks whose float16 scales (d, dmin) are NaN or infinite: every weight of the block would be."""
    if not scales_finite(raw, qtype):
        raise GentoolError(f"tensor {name} has NaN or infinite {qtype} block scales", path=where,
                           hint="the weights are broken; re-create or re-download them")


# --- export --------------------------------------------------------------------------------------------------------

def write_gguf(path: str | Path, config: dict[str, Any], tensors: dict[str, np.ndarray], *, qtype: str = "f16",
               tokenizer: dict[str, Any] | None = None, name: str = "gentool",
               quantized: dict[str, tuple[str, np.ndarray]] | None = None, float_types: dict[str, str] | None = None,
               tensor_types: list[str] | tuple = (), imatrix: dict[str, np.ndarray] | None = None,
               file_type: int | None = None, provenance: dict[str, str | int] | None = None) -> dict[str, str]:
    """Write a llama-architecture GGUF; returns the GGML type of each tensor (GGUF names).

    `tensors` (HF names -> float arrays) are written as `qtype`: f32, f16 (1-D tensors stay F32, as llama.cpp
    expects) or a llama-quantize mix (q8_0, q4_0, q4_k_m, q6_k, ...: llama-quantize's per-tensor types,
    `tensor_types` "PATTERN=TYPE" overrides, the blocks quantized here, with `imatrix` (HF names -> mean squared
    activations) as llama-quantize --imatrix). `quantized` (HF names -> (type, bytes (rows, row_bytes) in HF row
    order)) are copied as they are, and `float_types` pins F32/F16 per tensor. q/k rows get llama.cpp's order.
    `provenance`: llama-quantize's `quantize.imatrix.*` keys (strings and counts, see `imatrix_provenance`).
    A weight that float16 cannot hold, or a block whose float16 scale overflows, is refused by name."""
    import gguf

    from gentool.quantize.ggml import GGML_SCHEMES, mix_info, plan_types, quantize_tensor

    qtype = qtype.lower()
    if qtype not in FLOAT_EXPORTS + GGML_SCHEMES:
        raise UsageProblem(f"unknown GGUF type {qtype!r}", hint="use f32, f16 or " + ", ".join(GGML_SCHEMES))
    if qtype in FLOAT_EXPORTS and (tensor_types or imatrix):
        raise UsageProblem(f"--tensor-type and --imatrix apply to quantized types, not {qtype}")
    n_head, n_kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    quantized, float_types = dict(quantized or {}), dict(float_types or {})
    types: dict[str, str] = {}
    if qtype in GGML_SCHEMES and tensors:
        shapes = {k: np.shape(v) for k, v in tensors.items()}
        types = plan_types(shapes, qtype, n_layer=config["num_hidden_layers"], n_head=n_head, n_kv=n_kv,
                           overrides=tensor_types, has_imatrix=bool(imatrix))
        for k, t in types.items():
            if t not in FLOAT_TYPES:
                quantized[k] = (t, quantize_tensor(torch_from(tensors[k]), t, k, (imatrix or {}).get(k)).numpy())
            else:
                float_types.setdefault(k, t)
        file_type = mix_info(qtype)[2] if file_type is None else file_type
    for k, v in tensors.items():
        float_types.setdefault(k, "F32" if np.ndim(v) == 1 or qtype == "f32" else "F16")
    if file_type is None:
        file_type = 0 if qtype == "f32" else 1
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
    w.add_file_type(int(file_type))
    w.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in (provenance or {}).items():
        (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    if tokenizer:
        _add_tokenizer(w, tokenizer)
    written: dict[str, str] = {}
    GT = gguf.GGMLQuantizationType
    for hf in sorted(set(quantized) | set(float_types), key=_gguf_order):
        target = gguf_name(hf)
        if target is None:
            raise UsageProblem(f"tensor {hf} has no GGUF name", hint="only Llama-architecture tensors are exported")
        heads = qk_heads(hf, n_head, n_kv)
        if hf in quantized:
            t, arr = quantized[hf]
            arr = np.asarray(arr, dtype=np.uint8)
            arr = np.ascontiguousarray(permute_qk(arr, heads) if heads else arr)
            w.add_tensor(target, arr, raw_dtype=GT[t])
        else:
            t = float_types[hf]
            arr = np.asarray(tensors[hf], dtype=np.float32)
            arr = permute_qk(arr, heads) if heads else arr
            if t == "F16":
                arr = cast_weight(hf, torch_from(arr), torch_dtype("float16"), hint=_F32_HINT).numpy()
            w.add_tensor(target, np.ascontiguousarray(arr))
        written[target] = t
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


_F32_HINT = "export with --type f32"


def torch_from(arr: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _gguf_order(hf: str) -> tuple[int, int, str]:
    """convert_hf_to_gguf's order: token_embd, the blocks in order, output_norm, output."""
    m = re.search(r"layers\.(\d+)\.", hf)
    return (1, int(m.group(1)), hf) if m else (0 if "embed_tokens" in hf else 2, 0, hf)


def _hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Both transformers v4 and v5 spellings, so either version loads the checkpoint."""
    out = dict(config)
    out.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": out.get("rope_theta", 10000.0)})
    out.setdefault("torch_dtype", "float32")
    out.setdefault("dtype", out["torch_dtype"])
    return out


def _mix_name(file_type: int | None) -> str:
    from gentool.codecs.ggml_mixes import MIXES

    return next((k for k, (_, ft) in MIXES.items() if ft == file_type), f"gguf-file-type-{file_type}")


def import_gguf(src: str | Path, out: str | Path, *, keep_quantized: bool = False, force: bool = False):
    """GGUF file -> lm-checkpoint artifact (float32 weights, tokenizer rebuilt from the metadata); with
    `keep_quantized`, a quantized-checkpoint holding the file's blocks as they are (export-gguf writes them back
    byte for byte)."""
    from gentool.artifacts import check_output, create_artifact, input_ref, sha256_file

    check_output(out, force=force, sources=[src])
    model = read_gguf(src, keep_quantized=keep_quantized)
    kind = "quantized-checkpoint" if model.raw else "lm-checkpoint"
    ref = input_ref("import" if kind == "lm-checkpoint" else "base", src)
    with create_artifact(out, kind, force=force, config={"init": "import-gguf", "keep_quantized": keep_quantized},
                         inputs=[ref]) as art:
        cfg = model.config
        written = write_tokenizer(model.tokenizer, art.dir)
        tok = {"tokenizer_id": "sha256:" + sha256_file(art.dir / written[0]), "tokenizer_file": written[0]}
        if kind == "quantized-checkpoint":
            stats = _write_quantized(model, art.dir)
            art.contents.update(architecture="llama", base_model_relation="quantized", base_id=ref.get("sha256"),
                                vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"],
                                **tok, **stats)
        else:
            _write_float(model, art)
            art.contents.update(**tok)
    return art.manifest


def _write_float(model: GGUFModel, art) -> None:
    from safetensors.numpy import save_file

    cfg = model.config
    (art.dir / "config.json").write_text(json.dumps(_hf_config(cfg), indent=2) + "\n")
    save_file({k: np.ascontiguousarray(v) for k, v in model.tensors.items()}, str(art.dir / "model.safetensors"),
              metadata={"format": "pt"})
    n_params = int(sum(v.size for v in model.tensors.values()))
    embed = int(model.tensors["model.embed_tokens.weight"].size)
    art.contents.update(
        architecture="llama", n_params=n_params,
        n_params_non_embedding=n_params - embed * (1 if cfg["tie_word_embeddings"] else 2),
        vocab_size=cfg["vocab_size"], context_length=cfg["max_position_embeddings"], dtype="float32",
        gguf_tensor_types=sorted(set(model.tensor_types.values())))


def _write_quantized(model: GGUFModel, directory: Path) -> dict[str, Any]:
    import torch

    from gentool.config import LMConfig
    from gentool.quantize.ggml import config_shapes, write_checkpoint

    config = LMConfig.from_hf_dict(_hf_config(model.config))
    shapes = config_shapes(config)
    state = {k: torch.from_numpy(np.array(v, dtype=np.uint8)) for k, v in model.raw.items()}
    for k, v in model.tensors.items():
        t = torch.from_numpy(np.array(v, dtype=np.float32))
        state[k] = cast_weight(k, t, torch.float16 if model.tensor_types[k] == "F16" else None)
    stats = write_checkpoint(directory, config, state, model.tensor_types, {k: shapes[k] for k in state},
                             mix=_mix_name(model.file_type), base_dtype=torch.float32,
                             extra={"file_type": model.file_type})
    return {**stats, "n_params": config.n_params()}


def _read_checkpoint(ckpt: Path, qconf: dict | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """config.json (HF fields) and the tensors (float32 arrays; GGML blocks as uint8) of a checkpoint, read with
    the checked loader and checked against the config, as every LM reader does."""
    from gentool.models.checkpoint import check_tensors, read_config, read_lm_state, read_tensors, weight_files

    if qconf is None:
        config, state = read_lm_state(ckpt)
    else:
        config = read_config(ckpt)
        state = read_tensors(weight_files(ckpt))
        packed = {k for k, t in (qconf.get("tensor_types") or {}).items() if t not in FLOAT_TYPES}
        check_tensors(config, {k: tuple(v.shape) for k, v in state.items()}, ckpt, packed=packed)
    tensors = {k: t.float().numpy() if t.is_floating_point() else t.numpy() for k, t in state.items()}
    return config.to_hf_dict(), tensors


def export_gguf(ckpt: str | Path, out: str | Path, *, qtype: str | None = None, tensor_types=(),
                imatrix: str | Path | None = None, force: bool = False, verify: bool = True) -> dict[str, Any]:
    """lm-checkpoint, HF Llama directory or GGML quantized-checkpoint -> GGUF file (temporary sibling, renamed).
    A quantized-checkpoint's blocks are copied as they are (never re-quantized); a 16-bit checkpoint is written
    as `qtype` (default f16), quantized here for a llama-quantize mix."""
    from gentool.artifacts import MANIFEST, atomic_file, check_output, read_artifact
    from gentool.models.checkpoint import quantization_config

    ckpt, out = Path(ckpt), Path(out)
    check_output(out, force=force, sources=[ckpt, imatrix], file=True)
    if not (ckpt / "config.json").is_file():
        raise UsageProblem("no config.json: not an LM checkpoint", path=ckpt, hint="pass an lm-checkpoint directory")
    qconf = quantization_config(ckpt)
    if (ckpt / MANIFEST).is_file():
        read_artifact(ckpt, "quantized-checkpoint" if qconf else "lm-checkpoint", verify=verify)
    config, tensors = _read_checkpoint(ckpt, qconf)
    quantized, float_types, file_type = {}, {}, None
    if qconf is not None:
        if qconf.get("scheme") != "ggml":
            raise UsageProblem(f"a {qconf.get('scheme')} quantized checkpoint has no GGUF form", path=ckpt,
                               hint="export its 16-bit base (with --type q4_k_m, ...), or a GGML-quantized one "
                                    "(gentool quantize --scheme q4_k_m)")
        mix = qconf.get("mix")
        if (qtype is not None and qtype.lower() != mix) or tensor_types or imatrix:
            raise UsageProblem(f"the checkpoint is already quantized ({mix}); export-gguf copies its blocks and "
                               "never re-quantizes", path=ckpt,
                               hint="drop --type/--tensor-type/--imatrix, or export the 16-bit base instead")
        for k, t in qconf["tensor_types"].items():
            if t in FLOAT_TYPES:
                float_types[k] = t
            else:
                quantized[k] = (t, tensors.pop(k))
        file_type, qtype = qconf.get("file_type"), "f16"
        if file_type is None:
            file_type = 1
    qtype = (qtype or "f16").lower()
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    values, provenance = _imatrix_values(imatrix, tensors) if imatrix else (None, None)
    if (ckpt / "tokenizer.model").is_file():
        tok = tokenizer_metadata_from_sentencepiece(ckpt / "tokenizer.model")
    elif (ckpt / "tokenizer.json").is_file():
        tok = tokenizer_metadata_from_json(ckpt)
    else:
        raise UsageProblem("no tokenizer.model or tokenizer.json", path=ckpt, hint="llama.cpp needs the tokenizer")
    with atomic_file(out) as tmp:  # a full disk: one line naming the directory, no temporary left
        types = write_gguf(tmp, config, tensors, qtype=qtype, tokenizer=tok, name=ckpt.name, quantized=quantized,
                           float_types=float_types, tensor_types=tensor_types, imatrix=values, file_type=file_type,
                           provenance=provenance)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"output": str(out), "type": qconf.get("mix") if qconf else qtype, "tensors": len(types),
            "tensor_types": dict(sorted(counts.items())), "copied_blocks": len(quantized),
            "bytes": out.stat().st_size}


def _imatrix_values(path, tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str | int]]:
    """An imatrix file's values under HF names, refused when it was made for another model, and the
    `quantize.imatrix.*` keys llama-quantize writes for it."""
    from gentool.codecs.imatrix import check_imatrix, read_imatrix

    imx = read_imatrix(path)
    values = imx.values()
    shapes = {gguf_name(k): np.shape(v) for k, v in tensors.items() if gguf_name(k)}
    check_imatrix(values, shapes, path=path)
    return {hf_name(k): v for k, v in values.items() if hf_name(k) in tensors}, imatrix_provenance(path, imx, values)


def imatrix_provenance(path, imx, values: dict) -> dict[str, str | int]:
    """tools/quantize/quantize.cpp's keys: the file as given and the first dataset (each cut to 127 bytes, its
    buffer), the number of entries, and the chunks when the file records them."""
    out: dict[str, str | int] = {"quantize.imatrix.file": _cut(str(path))}
    if imx.datasets:
        out["quantize.imatrix.dataset"] = _cut(str(imx.datasets[0]))
    out["quantize.imatrix.entries_count"] = len(values)
    if imx.chunk_count > 0:
        out["quantize.imatrix.chunks_count"] = int(imx.chunk_count)
    return out


def _cut(text: str, limit: int = 127) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
