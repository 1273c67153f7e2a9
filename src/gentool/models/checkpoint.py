"""LM checkpoints on disk in the Hugging Face Llama layout: config.json + model.safetensors (or shards with
model.safetensors.index.json) + tokenizer. Reads gentool lm-checkpoint artifacts and plain HF directories."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from gentool.artifacts import MANIFEST, Manifest, read_artifact
from gentool.artifacts.tensorfiles import cast_weight, load_tensors
from gentool.config import LMConfig
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.models.quant import QuantLinear, install_from_state
from gentool.models.quant_ggml import install_ggml
from gentool.models.transformer import Transformer


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
    out = {k: cast_weight(k, v.detach(), dtype).contiguous().cpu() for k, v in state.items()}
    stored = next((v.dtype for v in out.values() if v.is_floating_point()), torch.float32)
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt", **(metadata or {})})
    save_lm_config(config, directory, stored)


def save_lm_config(config: LMConfig, directory: str | Path, stored: torch.dtype) -> None:
    """config.json (HF fields, `torch_dtype` = the weights' stored dtype) and generation_config.json."""
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(dtype_name(stored)), indent=2) + "\n")
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
    if not isinstance(data, dict):
        raise GentoolError(f"config.json holds a JSON {type(data).__name__}, not an object", path=f,
                           hint="the checkpoint is corrupt")
    return LMConfig.from_hf_dict(data, path=f)


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise GentoolError(f"bad safetensors index ({e})", path=index, hint="the checkpoint is corrupt") from None
        if not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            raise GentoolError("the safetensors index names a file outside the checkpoint", path=index,
                               hint="the checkpoint is corrupt")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise UsageProblem("only pickle weights (.bin/.pt) found", path=path,
                           hint="gentool never unpickles; convert them to safetensors first")
    raise UsageProblem("no model.safetensors", path=path, hint="pass a checkpoint directory with safetensors weights")


def read_tensors(files: list[Path], *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """Tensors from safetensors files (headers checked, weights finite), cast one by one to `dtype`."""
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise GentoolError("missing weight shard", path=f, hint="the checkpoint is incomplete")
        for key, t in load_tensors(f, dtype=dtype, device=device).items():
            if key in out:
                raise GentoolError(f"tensor {key} is in two weight shards", path=f, hint="the checkpoint is corrupt")
            out[key] = t
    return out


def lm_shapes(config: LMConfig, *, causal: bool = True) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape of every tensor a checkpoint of this config holds (from a meta-device model)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Transformer(config, causal=causal).state_dict().items()}


def check_tensors(config: LMConfig, shapes: dict[str, tuple], path: Path | str | None, *,
                  skip_modules: Collection[str] = frozenset(), packed: Collection[str] = frozenset(),
                  causal: bool = True) -> None:
    """The one check of a checkpoint's tensor set against its config.json, for every reader: `shapes` (name ->
    shape of what is stored) must hold every tensor of the model and nothing else, each of the model's shape.
    `skip_modules`: quantized layers already taken out of the state; `packed`: tensors stored as codes (GGML
    blocks) whose stored shape is not the dense one. A tied output head may be stored or not (it is dropped)."""
    expected = {k: v for k, v in lm_shapes(config, causal=causal).items() if k.rsplit(".", 1)[0] not in skip_modules}
    have = dict(shapes)
    if config.tie_word_embeddings and "lm_head" not in skip_modules:
        have.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(have))
    extra = [k for k in sorted(set(have) - set(expected)) if not k.endswith("rotary_emb.inv_freq")]
    if missing or extra:
        what = (f"missing tensors {missing[:3]}" if missing else "") + (" and " if missing and extra else "") + \
               (f"unexpected tensors {extra[:3]}" if extra else "")
        raise GentoolError(f"weights do not fit config.json: {what}", path=path,
                           hint="the checkpoint is corrupt or not a Llama model")
    for k, want in expected.items():
        if k not in packed and tuple(have[k]) != want:
            raise GentoolError(f"tensor {k} has shape {tuple(have[k])}, config.json implies {want}", path=path,
                               hint="the checkpoint is corrupt")


def read_lm_state(path: str | Path, *, dtype: torch.dtype | None = None) -> tuple[LMConfig, dict[str, torch.Tensor]]:
    """config.json and the weights of a 16-bit/32-bit LM checkpoint (no quantization_config), read with the
    checked loader (headers, duplicate names, finite values, casts) and checked against the config."""
    path = Path(path)
    config = read_config(path)
    state = read_tensors(weight_files(path), dtype=dtype)
    check_tensors(config, {k: tuple(v.shape) for k, v in state.items()}, path)
    return config, state


def find_tokenizer(path: Path) -> Path | None:
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            return path / name
    return None


def quantization_config(path: str | Path) -> dict | None:
    """config.json's `quantization_config` block, or None for a plain checkpoint."""
    f = Path(path) / "config.json"
    try:
        q = json.loads(f.read_text(encoding="utf-8")).get("quantization_config") if f.is_file() else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None  # read_config reports the bad JSON
    if q is not None and (not isinstance(q, dict) or q.get("quant_method") != "gentool"):
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise UsageProblem(f"quantization method {method!r} is not supported", path=f,
                           hint="gentool reads its own quantized checkpoints (gentool quantize) and 16-bit models")
    return q


def load_lm(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            verify: bool = True, causal: bool = True, kind: str = "lm-checkpoint") -> LoadedLM:
    """Load a gentool lm-checkpoint (or `kind`), a quantized-checkpoint (its quantized layers swapped in) or a
    Hugging Face Llama directory: built on the meta device, weights assigned without copies. The model computes
    in `dtype` (float32 by default); quantized codes and scales keep their stored dtypes."""
    path = Path(path)
    if not path.is_dir():
        raise UsageProblem("no such checkpoint directory", path=path,
                           hint="pass a gentool lm-checkpoint or a Hugging Face Llama directory")
    dtype = dtype or torch.float32
    qconfig = quantization_config(path) if kind == "lm-checkpoint" else None
    manifest = None
    if (path / MANIFEST).is_file():
        manifest = read_artifact(path, "quantized-checkpoint" if qconfig else kind, verify=verify)
    config = read_config(path)
    with torch.device("meta"):
        model = Transformer(config, causal=causal)
    if qconfig is None:
        state = read_tensors(weight_files(path), dtype=dtype, device=device)
        quantized: set[str] = set()
    else:  # codes and scales as stored; the rest cast below
        state = read_tensors(weight_files(path))
        install = install_ggml if qconfig.get("scheme") == "ggml" else install_from_state
        quantized = set(install(model, state, qconfig, dtype=dtype, where=path))
        state = {k: cast_weight(k, v, dtype, path).to(device) for k, v in state.items()}
    tied = config.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear)
    check_tensors(config, {k: tuple(v.shape) for k, v in state.items()}, path, skip_modules=quantized,
                  causal=causal)
    if tied:
        state.pop("lm_head.weight", None)
    expected = {k for k in model.state_dict() if k.rsplit(".", 1)[0] not in quantized and k in state}
    model.load_state_dict({k: state[k] for k in expected}, strict=False, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_buffers(device)
    model.to(device)
    model.eval()
    return LoadedLM(model, config, path, find_tokenizer(path), manifest, "gentool" if manifest else "hf")
