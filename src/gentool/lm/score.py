"""Glue for `gentool perplexity`: load a checkpoint and its data, check tokenizers, score."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import MANIFEST, read_artifact
from gentool.errors import UsageProblem
from gentool.lm.perplexity import load_text_ids, perplexity
from gentool.models.checkpoint import load_lm


def _is_shards(p: str) -> bool:
    path = Path(p)
    return path.is_dir() and (path / MANIFEST).is_file()


def score_lm(checkpoint: Path, data: list[str], *, split: str = "val", window: int | None = None,
             stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8, device: str = "cpu",
             dtype: torch.dtype = torch.float32, allow_tokenizer_mismatch: bool = False,
             verify: bool = True, adapter: Path | None = None, samples: int = 1, steps: int | None = None,
             seed: int = 0, protocol: str = "gentool", compile: bool = False) -> dict[str, Any]:
    from gentool.lm.perplexity import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise UsageProblem(f"unknown --protocol {protocol!r}", hint="use " + ", ".join(PROTOCOLS))
    if not data:
        raise UsageProblem("no data to score", hint="pass a token-shards directory, text files, or - for stdin")
    manifest = read_artifact(checkpoint, verify=False) if (Path(checkpoint) / MANIFEST).is_file() else None
    masked = manifest is not None and manifest.kind == "diffusion-checkpoint" and \
        manifest.contents.get("family") == "masked-lm"
    if masked:
        lm = load_lm(checkpoint, device=device, dtype=dtype, verify=verify, causal=False, kind="diffusion-checkpoint")
    else:
        lm = load_lm(checkpoint, device=device, dtype=dtype, verify=verify)
    if adapter is not None:
        from gentool.adapters import attach_adapter

        attach_adapter(lm.model, checkpoint, adapter, verify=verify)
        lm.model.to(device=device, dtype=dtype).eval()
    window = window or (512 if protocol == "llama.cpp" else lm.config.max_position_embeddings)
    if window < 2:
        raise UsageProblem("--window must be at least 2")
    if window > lm.config.max_position_embeddings:
        raise UsageProblem(f"--window {window} exceeds the model's context ({lm.config.max_position_embeddings})")
    stride = stride or max(1, window // 2)
    from gentool.data.tokenizer import load_tokenizer

    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    total_bytes = None
    bytes_per_token = None
    if len(data) == 1 and _is_shards(data[0]):
        from gentool.data.shards import open_shards

        shards = open_shards(data[0], split, verify=verify)
        if tok is None or shards.tokenizer_id != tok.sha256:
            if not allow_tokenizer_mismatch:
                raise UsageProblem("the shards were encoded with a different tokenizer than the checkpoint's"
                                   if tok else "the checkpoint has no tokenizer to compare with the shards",
                                   path=data[0], hint="use shards from the checkpoint's tokenizer, or pass "
                                                      "--allow-tokenizer-mismatch")
            console.warn("scoring shards from another tokenizer (--allow-tokenizer-mismatch)")
        # Documents in the shards end with EOS, so one EOS in front scores the first document like the others:
        # every token of the split is scored and bits per byte divide by the split's exact UTF-8 byte count.
        n = len(shards) if max_tokens is None else min(len(shards), max_tokens)
        ids = torch.from_numpy(shards.tokens(0, n))
        if not masked:
            ids = torch.cat([torch.tensor([shards.eos_id]), ids])
            total_bytes = shards.bytes if n == len(shards) else None
        bytes_per_token = shards.bytes / max(1, len(shards))
        source = {"data": str(data[0]), "split": split}
    else:
        if tok is None:
            raise UsageProblem("the checkpoint has no tokenizer.model or tokenizer.json", path=checkpoint,
                               hint="score token shards instead of text")
        ids, n_bytes = load_text_ids(data, tok)
        if max_tokens is not None:
            ids = ids[: max_tokens + 1]
        total_bytes = n_bytes if max_tokens is None else None
        bytes_per_token = n_bytes / max(1, len(ids))
        source = {"data": [str(d) for d in data]}
    if len(ids) < 2:
        raise UsageProblem("the data holds fewer than two tokens", hint="pass more text")
    if int(ids.max()) >= lm.config.vocab_size:
        raise UsageProblem(f"token id {int(ids.max())} is outside the model's vocabulary ({lm.config.vocab_size})",
                           hint="the data was encoded with another tokenizer")
    if masked:
        from gentool.lm.masked import score_nelbo

        shape = manifest.contents["data_shape"]
        out = score_nelbo(lm.model, ids, seq_len=min(window, shape["seq_len"]), mask_id=shape["mask_id"],
                          schedule=manifest.contents.get("schedule", "loglinear"), samples=samples, steps=steps,
                          batch_size=batch_size, device=device, seed=seed)
        bpb = out["nll"] / math.log(2) / bytes_per_token if bytes_per_token else None
        return {"nll": out["nll"], "perplexity": math.exp(out["nll"]), "bits_per_byte": bpb,
                "nll_stderr": out["nll_stderr"], "tokens": out["tokens"], "samples": samples,
                "kind": f"upper bound (NELBO, {out['bound']})", **source, "checkpoint": str(checkpoint),
                "dtype": str(dtype).replace("torch.", "")}
    res = perplexity(lm.model, ids, window=window, stride=stride, batch_size=batch_size, device=device, dtype=dtype,
                     bytes_per_token=None if total_bytes else bytes_per_token, total_bytes=total_bytes,
                     protocol=protocol, bos_id=tok.bos_id if tok is not None and protocol == "llama.cpp" else None,
                     compile=compile)
    if "split" in source and protocol != "llama.cpp":
        res.bos = "EOS prepended (documents are EOS-separated)"
    if protocol != "llama.cpp" and isinstance(source["data"], list) and tok is not None and tok.bos_id is not None:
        res.bos = "prepended to the text"
    if total_bytes and res.tokens < len(ids) - 1:  # protocols that skip tokens: bytes in proportion
        res.bytes = total_bytes * res.tokens / (len(ids) - 1)
    return {**res.as_dict(), "kind": "exact", **source, "checkpoint": str(checkpoint),
            **({"adapter": str(adapter)} if adapter else {}),
            "dtype": str(dtype).replace("torch.", "")}
