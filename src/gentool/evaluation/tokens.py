"""The tokens an evaluation scores: one split of a token-shards artifact, or text files / stdin encoded with the
model's tokenizer, with the UTF-8 bytes they stand for (for bits per byte)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import MANIFEST
from gentool.data.tokenizer import adds_bos
from gentool.errors import UsageProblem


@dataclass
class EvalTokens:
    ids: torch.Tensor                 # (N,) int64, the stream to score (its first token is context only)
    total_bytes: int | None           # exact UTF-8 bytes of the scored tokens, when known
    bytes_per_token: float | None     # average UTF-8 bytes per token of the data, for partial scoring
    source: dict[str, Any] = field(default_factory=dict)   # for reports: {"data": ..., "split": ...}
    from_shards: bool = False


def is_shards(p: str | Path) -> bool:
    path = Path(p)
    return path.is_dir() and (path / MANIFEST).is_file()


def load_text_ids(paths: list[str], tokenizer) -> tuple[torch.Tensor, int]:
    """Token ids of text files or stdin ("-"), BOS first where the tokenizer adds one (`adds_bos`), and the UTF-8
    byte count of the text."""
    for p in paths:
        if p != "-" and not Path(p).is_file():
            what = "is a directory, not a token-shards artifact or a text file" if Path(p).is_dir() else \
                "no such file"
            raise UsageProblem(what, path=p, hint="pass token shards (gentool tokenize encode), text files or - "
                                                  "for stdin")
    ids: list[int] = []
    n_bytes = 0
    bos = adds_bos(tokenizer)
    for p in paths:
        data = sys.stdin.buffer.read() if p == "-" else Path(p).read_bytes()
        text = data.decode("utf-8", errors="replace")
        ids.extend(tokenizer.encode(text, bos=bos))
        n_bytes += len(text.encode())
    return torch.tensor(ids, dtype=torch.long), n_bytes


def bos_rule(tokenizer, *, protocol: str = "gentool", from_shards: bool = False) -> tuple[bool, str]:
    """(is a BOS token scored in front, what happens to the stream's first token) for the report: the
    tokenizer's own setting (`adds_bos`, with where it came from), as llama-perplexity applies it."""
    bos = adds_bos(tokenizer)
    source = f" ({getattr(tokenizer, 'add_bos_source', 'tokenizer')})" if tokenizer is not None else ""
    if protocol == "llama.cpp":
        return (True, "replaces each chunk's first token, as llama-perplexity" + source) if bos else \
            (False, "none: the tokenizer adds no BOS, chunks start as in the data" + source)
    if from_shards:
        return False, "EOS prepended (documents are EOS-separated)"
    return (True, "prepended to the text" + source) if bos else \
        (False, "none: the tokenizer adds no BOS, the first token is context only" + source)


def _decoded_bytes(tokenizer, ids: torch.Tensor, encoded_with: str) -> int | None:
    """UTF-8 bytes of the text a prefix of the stream stands for (gentool's tokenizers decode to exactly the text
    they encoded); None when the tokens come from another tokenizer."""
    if tokenizer is None or tokenizer.sha256 != encoded_with:
        return None
    return len(tokenizer.decode(ids.tolist()).encode())


def load_eval_tokens(data: list[str], tokenizer, *, vocab_size: int, split: str = "val",
                     max_tokens: int | None = None, verify: bool = True, allow_tokenizer_mismatch: bool = False,
                     where: Path | None = None) -> EvalTokens:
    """Tokens to score from `data`: one token-shards artifact (its `split`, checked against `tokenizer`) or text
    files / "-". The stream's first token is context only: shards' documents end with EOS, so one EOS in front makes
    their first token scored like every other; text starts with BOS where the tokenizer adds one. AR perplexity
    and the diffusion LMs' NELBO score the same tokens of it. At most `max_tokens` tokens are scored."""
    if not data:
        raise UsageProblem("no data to score", hint="pass a token-shards directory, text files, or - for stdin")
    if len(data) == 1 and is_shards(data[0]):
        from gentool.data.shards import open_shards

        shards = open_shards(data[0], split, verify=verify)
        if tokenizer is None or shards.tokenizer_id != tokenizer.sha256:
            if not allow_tokenizer_mismatch:
                raise UsageProblem("the shards were encoded with a different tokenizer than the checkpoint's"
                                   if tokenizer else "the checkpoint has no tokenizer to compare with the shards",
                                   path=data[0], hint="use shards from the checkpoint's tokenizer, or pass "
                                                      "--allow-tokenizer-mismatch")
            console.warn("scoring shards from another tokenizer (--allow-tokenizer-mismatch)")
        n = len(shards) if max_tokens is None else min(len(shards), max_tokens)
        ids = torch.cat([torch.tensor([shards.eos_id]), torch.from_numpy(shards.tokens(0, n))])
        total_bytes = shards.bytes if n == len(shards) else _decoded_bytes(tokenizer, ids, shards.tokenizer_id)
        out = EvalTokens(ids, total_bytes, shards.bytes / max(1, len(shards)), {"data": str(data[0]), "split": split},
                         from_shards=True)
    else:
        if tokenizer is None:
            raise UsageProblem("the checkpoint has no tokenizer.model or tokenizer.json", path=where,
                               hint="score token shards instead of text")
        ids, n_bytes = load_text_ids(data, tokenizer)
        per_token = n_bytes / max(1, len(ids))
        if max_tokens is not None and max_tokens + 1 < len(ids):
            ids = ids[: max_tokens + 1]
            n_bytes = _decoded_bytes(tokenizer, ids, tokenizer.sha256)
        out = EvalTokens(ids, n_bytes, per_token, {"data": [str(d) for d in data]})
    if len(out.ids) < 2:
        raise UsageProblem("the data holds fewer than two tokens", hint="pass more text")
    if int(out.ids.max()) >= vocab_size:
        raise UsageProblem(f"token id {int(out.ids.max())} is outside the model's vocabulary ({vocab_size})",
                           hint="the data was encoded with another tokenizer")
    return out
