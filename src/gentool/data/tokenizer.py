"""Tokenizers behind one interface: SentencePiece `tokenizer.model` (gentool's own) and HF `tokenizer.json`.

Identity: a tokenizer's id is "sha256:<hex of its file's bytes>". Token shards record it as `tokenizer_id`, LM
checkpoints carry a copy of the file, and commands compare the two to refuse mismatched pairs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

from gentool.errors import GentoolError, UsageProblem

SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2, "pad": 3}  # fixed in every tokenizer gentool trains


class AnyTokenizer(Protocol):
    sha256: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    vocab_size: int

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def adds_bos(tokenizer) -> bool:
    """Does text encoded for this model start with BOS? The one answer every evaluation uses (text perplexity, the
    llama.cpp protocol, calibration, export-gguf's tokenizer.ggml.add_bos_token): the tokenizer's own setting,
    decided when it was loaded (`add_bos`, from `add_bos_source`), and a BOS token to put there."""
    return tokenizer is not None and tokenizer.bos_id is not None and bool(getattr(tokenizer, "add_bos", True))


def config_add_bos(directory: Path) -> bool | None:
    """tokenizer_config.json's add_bos_token when it is a bool (import-gguf writes it from the GGUF's
    tokenizer.ggml.add_bos_token), else None."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("add_bos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise GentoolError(f"invalid tokenizer_config.json ({e})", path=path, hint="repair or remove the file") \
            from None
    return value if isinstance(value, bool) else None


def file_id(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


class Tokenizer:
    """SentencePiece with byte fallback: decode(encode(text)) == text for any UTF-8 text."""

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.path = Path(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise GentoolError(f"cannot load SentencePiece model ({e})", path=self.path,
                               hint="the tokenizer file is corrupt; re-create it with `gentool tokenize train`") \
                from None
        self.sha256 = file_id(self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.eos_ids = {self.eos_id} if self.eos_id is not None else set()
        # llama.cpp's default for SentencePiece ("llama") vocabularies is to add BOS; a tokenizer_config.json beside
        # the model (import-gguf writes one) can say otherwise
        setting = config_add_bos(self.path.parent)
        self.add_bos = True if setting is None else setting
        self.add_bos_source = "SentencePiece default" if setting is None else "tokenizer_config.json add_bos_token"
        self.chat_template = None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """From a tokenizer artifact, an LM checkpoint directory, or a tokenizer.model / tokenizer.json file."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            from gentool.data.hf_tokenizer import HFTokenizer

            return HFTokenizer(path)  # type: ignore[return-value]
        raise UsageProblem("no tokenizer.model or tokenizer.json", path=path,
                           hint="pass a tokenizer artifact (gentool tokenize train) or a checkpoint with a tokenizer")
    if path.name == "tokenizer.json" and path.is_file():
        from gentool.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(path.parent)  # type: ignore[return-value]
    if path.is_file():
        return Tokenizer(path)
    raise UsageProblem("no such tokenizer", path=path, hint="pass a tokenizer directory or tokenizer.model")
