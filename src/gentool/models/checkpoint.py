"""LM checkpoints on disk in the Hugging Face Llama layout: config.json + model.safetensors (or shards with
model.safetensors.index.json) + tokenizer. Reads gentool lm-checkpoint artifacts and plain HF directories."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gentool.artifacts import MANIFEST, Manifest, read_artifact
from gentool.config import LMConfig
from gentool.errors import GentoolError, UsageProblem
from gentool.models.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class LoadedLM:
    model: Transformer
    config: LMConfig
    path: Path
    tokenizer_path: Path | None      # tokenizer.model (SentencePiece) or tokenizer.json
    manifest: Manifest | None        # None for a plain Hugging Face directory
    source: str                      # "gentool" | "hf"


def save_lm(model_or_state: Transformer | dict[str, torch.Tensor], config: LMConfig, directory: str | Path, *,
            dtype: torch.dtype | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write config.json, generation_config.json and model.safetensors (HF names) into `directory`."""
    from safetensors.torch import save_file

    directory = Path(directory)
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else dict(model_or_state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shared with the embedding; transformers re-ties it
    out = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous().cpu()
    stored = next((v.dtype for v in out.values() if v.is_floating_point()), torch.float32)
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(DTYPE_NAMES.get(stored, "float32")),
                                                      indent=2) + "\n")
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
           "pad_token_id": config.pad_token_id}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def read_config(path: Path) -> LMConfig:
    f = path / "config.json"
    if not f.is_file():
        raise UsageProblem("no config.json: not an LM checkpoint", path=path,
                           hint="pass a gentool lm-checkpoint or a Hugging Face Llama directory")
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GentoolError(f"config.json is not valid JSON ({e})", path=f, hint="the checkpoint is corrupt") from None
    return LMConfig.from_hf_dict(data, path=f)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GentoolError(f"bad safetensors index ({e})", path=index, hint="the checkpoint is corrupt") from None
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise UsageProblem("only pickle weights (.bin/.pt) found", path=path,
                           hint="gentool never unpickles; convert them to safetensors first")
    raise UsageProblem("no model.safetensors", path=path, hint="pass a checkpoint directory with safetensors weights")


def read_tensors(files: list[Path], *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """Tensors from safetensors files, cast one by one (no full-precision copy of a bf16 model)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise GentoolError("missing weight shard", path=f, hint="the checkpoint is incomplete")
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    t = handle.get_tensor(key)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[key] = t.to(device)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise GentoolError(f"cannot read safetensors ({e})", path=f,
                               hint="the file is truncated or corrupt; re-create or re-download it") from None
    return out


def find_tokenizer(path: Path) -> Path | None:
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return path / name
    return None


def load_lm(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            verify: bool = True, causal: bool = True, kind: str = "lm-checkpoint") -> LoadedLM:
    """Load a gentool lm-checkpoint (or `kind`) or a Hugging Face Llama directory. dtype None means float32."""
    path = Path(path)
    manifest = None
    if not path.is_dir():
        raise UsageProblem("no such checkpoint directory", path=path,
                           hint="pass a gentool lm-checkpoint or a Hugging Face Llama directory")
    if kind == "lm-checkpoint":  # a quantized checkpoint loads with its quantized layers swapped in
        from gentool.models.quant import load_quantized, quantization_config

        if quantization_config(path) is not None:
            return load_quantized(path, device=device, dtype=dtype, verify=verify, causal=causal)
    if (path / MANIFEST).is_file():
        manifest = read_artifact(path, kind, verify=verify)
    config = read_config(path)
    state = read_tensors(weight_files(path), dtype=dtype or torch.float32, device=device)
    with torch.device("meta"):
        model = Transformer(config, causal=causal)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    extra = [k for k in extra if not k.endswith("rotary_emb.inv_freq")]
    if missing or extra:
        what = (f"missing tensors {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
               (f"unexpected tensors {extra[:3]}" if extra else "")
        raise GentoolError(f"weights do not fit config.json: {what}", path=path,
                           hint="the checkpoint is corrupt or not a Llama model")
    for k, v in state.items():
        want = model.get_parameter(k).shape if k in expected else None
        if want is not None and tuple(v.shape) != tuple(want):
            raise GentoolError(f"tensor {k} has shape {tuple(v.shape)}, config.json implies {tuple(want)}",
                               path=path, hint="the checkpoint is corrupt")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers(device)
    model.eval()
    return LoadedLM(model, config, path, find_tokenizer(path), manifest, "gentool" if manifest else "hf")


def n_params_summary(config: LMConfig) -> dict[str, Any]:
    return {"n_params": config.n_params(), "n_params_non_embedding": config.n_params(non_embedding=True)}
