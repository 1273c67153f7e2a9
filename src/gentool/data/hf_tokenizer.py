"""Hugging Face `tokenizer.json` tokenizers (byte-level BPE and others) through the `tokenizers` library.

Special-token behaviour comes from `tokenizer_config.json` (add_bos_token / add_eos_token, bos/eos/unk/pad
tokens) and `generation_config.json` (eos_token_id), as `transformers.AutoTokenizer` reads them; whether text
starts with BOS from tokenizer.json's post-processor first (`post_processor_bos`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from gentool.data.chat import render_chat_template
from gentool.errors import GentoolError, UsageProblem


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} (AddedToken serialisation)
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GentoolError(f"invalid JSON ({e})", path=path, hint="repair or remove the file") from None
    return data if isinstance(data, dict) else {}


def post_processor_bos(processor: dict[str, Any] | None, bos: str | None) -> bool | None:
    """Does tokenizer.json's post-processor put BOS first? True or False where it says, None where it has no say.
    Read as llama.cpp's converter reads it (gguf-py SpecialVocab): ByteLevel alone adds nothing, RobertaProcessing
    adds <s>, a TemplateProcessing whose single-sequence template starts with a special token adds it (BOS when it is
    the bos_token); transformers 5 agrees (a ByteLevel post-processor wins over tokenizer_config's add_bos_token)."""
    verdict = None
    for p in (processor or {}).get("processors", [processor] if processor else []):
        kind = p.get("type")
        if kind == "ByteLevel" and verdict is None:
            verdict = False
        elif kind == "RobertaProcessing":
            verdict = True
        elif kind == "TemplateProcessing":
            single = p.get("single", [])
            first = single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None
            if first:
                verdict = bos is None or first == bos
    return verdict


def hf_add_bos(tokenizer_json: dict[str, Any], config: dict[str, Any]) -> tuple[bool, str]:
    """(adds BOS, where that was decided): the post-processor when it says, else tokenizer_config.json's
    add_bos_token, else no BOS (llama.cpp's default for byte-level BPE vocabularies)."""
    said = post_processor_bos(tokenizer_json.get("post_processor"), _token_text(config.get("bos_token")))
    if said is not None:
        return said, "tokenizer.json post-processor"
    if isinstance(config.get("add_bos_token"), bool):
        return config["add_bos_token"], "tokenizer_config.json add_bos_token"
    return False, "default for tokenizer.json (none)"


class HFTokenizer:
    """The same interface as gentool's SentencePiece tokenizer, over a tokenizer.json."""

    def __init__(self, directory: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageProblem("tokenizer.json needs the `tokenizers` package", path=directory,
                               hint="pip install 'gentool[hf]'") from None
        directory = Path(directory)
        self.path = directory / "tokenizer.json"
        raw = self.path.read_bytes()
        try:
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
            spec = json.loads(raw)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise GentoolError(f"cannot read tokenizer.json ({e})", path=self.path,
                               hint="the file is corrupt or from an unsupported tokenizers version") from None
        self.config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        self.sha256 = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.chat_template = self.config.get("chat_template")
        if self.chat_template is None and (directory / "chat_template.jinja").is_file():
            self.chat_template = (directory / "chat_template.jinja").read_text(encoding="utf-8")

        def token_id(name: str) -> int | None:
            text = _token_text(self.config.get(f"{name}_token"))
            return self._tok.token_to_id(text) if text is not None else None

        self.bos_id, self.unk_id, self.pad_id = token_id("bos"), token_id("unk"), token_id("pad")
        eos = generation.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.eos_id = token_id("eos")
        if self.eos_id is None and self.eos_ids:
            self.eos_id = min(self.eos_ids)
        if self.eos_id is not None:
            self.eos_ids.add(self.eos_id)
        self.add_bos, self.add_bos_source = hf_add_bos(spec if isinstance(spec, dict) else {}, self.config)
        # transformers honours add_eos_token only for the tokenizer classes that define it (Llama's, Gemma's)
        honours = str(self.config.get("tokenizer_class", "")).startswith(("Llama", "CodeLlama", "Gemma"))
        self.add_eos = honours and bool(self.config.get("add_eos_token", False))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Without special tokens, as `encode`; the batch is encoded in parallel, outside the GIL."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def encode_default(self, text: str) -> list[int]:
        """What AutoTokenizer(text) gives: the post-processor's special tokens, plus add_bos/add_eos if set."""
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        if self.add_eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: list[int], *, skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> str:
        """Render the model's chat template with jinja2, as transformers does."""
        if not self.chat_template:
            raise UsageProblem("this model ships no chat template", path=self.path.parent,
                               hint="drop --chat and write the prompt yourself")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=_token_text(self.config.get("bos_token")) or "",
                                    eos_token=_token_text(self.config.get("eos_token")) or "")

