"""`tokenize encode --format chat|prompt-completion|preference`: JSONL examples into token shards with a loss
mask, or into preference pairs (see gentool.data.examples for the layout).

Formats (TRL's dataset types; `auto` decides from the first record's keys):
  chat               {"messages": [{"role", "content"}, ...]}: rendered with the chat template; the assistant's
                     tokens are trained on (`--train-on assistant`, default) or all of them (`all`).
  prompt-completion  {"prompt", "completion"}, strings or message lists: the completion's tokens are trained on
                     (`completion`, default; `assistant` means the same) or all. Strings: BOS (if the tokenizer has
                     one) + prompt + completion + EOS, as TRL's SFTTrainer tokenises them; messages: the prompt
                     rendered with the generation prompt, then the rest of the rendering of prompt + completion.
  preference         {"prompt", "chosen", "rejected"}, strings or message lists. Strings: prompt = BOS + prompt,
                     chosen/rejected + EOS (TRL's DPOTrainer); messages: the prompt rendered with the generation
                     prompt, chosen and rejected the rest of the renderings of prompt + chosen / + rejected.
Over-long examples (`--max-len`): `truncate` keeps the first max-len tokens of a masked example; for a pair it
keeps the prompt's last max-len/2 tokens at most, then cuts chosen and rejected to fit. `drop` leaves them out.
Both are counted in the manifest (truncated, dropped), never silent; an example left with nothing to train on is
dropped and counted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gentool import console
from gentool.artifacts import check_output, create_artifact, input_ref, read_artifact
from gentool.data.chat import ChatTemplate, check_messages
from gentool.data.examples import write_masked, write_pairs
from gentool.data.shards import dtype_for_vocab
from gentool.data.text import expand_inputs
from gentool.data.tokenizer import load_tokenizer
from gentool.errors import GentoolError, UsageProblem
from gentool.tokenize import val_mask

FORMATS = ("text", "chat", "prompt-completion", "preference")
KEYS = {"chat": {"messages"}, "prompt-completion": {"prompt", "completion"},
        "preference": {"prompt", "chosen", "rejected"}, "text": {"text"}}


def _records(sources: list[Path | str]) -> Iterator[tuple[str, int, dict]]:
    for src in sources:
        f = sys.stdin if src == "-" else open(src, encoding="utf-8", errors="replace")
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{'stdin' if src == '-' else Path(src).name} line {n}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageProblem(f"not JSON ({e.msg}) at {where}", hint="write one JSON object per line") \
                        from None
                if not isinstance(rec, dict):
                    raise UsageProblem(f"not a JSON object at {where}", hint="write one JSON object per line")
                yield where, n, rec
        finally:
            if f is not sys.stdin:
                f.close()


def detect_format(inputs: list[str], fmt: str = "auto", glob: str = "*.txt", text_field: str = "text", *,
                  train_on: str | None = None, max_len: int | None = None, overlong: str = "truncate") -> str:
    """The format asked for, or (auto) the one the first JSONL record's keys name (text: it has `text_field`):
    text for non-JSONL input. The examples' options (--train-on, --max-len, --overlong) are refused for text
    rather than ignored."""
    found = _detect(inputs, fmt, glob, text_field)
    given = [o for o, v in (("--train-on", train_on), ("--max-len", max_len), ("--overlong", overlong))
             if v is not None and not (o == "--overlong" and v == "truncate")]
    if found == "text" and given:
        raise UsageProblem(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to chat, "
                           f"prompt-completion and preference examples, not to text",
                           hint="leave them out for plain text, or pass --format for JSONL examples")
    return found


def _detect(inputs: list[str], fmt: str, glob: str, text_field: str) -> str:
    if fmt not in ("auto", *FORMATS):
        raise UsageProblem(f"unknown --format {fmt!r}", hint="use auto, " + ", ".join(FORMATS))
    if fmt != "auto":
        return fmt
    files = [s for s in expand_inputs(inputs, glob)]
    if not files or files[0] == "-" or not str(files[0]).endswith(".jsonl"):
        return "text"
    first = next(_records(files[:1]), None)
    if first is None:
        return "text"
    keys = set(first[2])
    found = [f for f in ("preference", "prompt-completion", "chat", "text")
             if (KEYS[f] if f != "text" else {text_field}) <= keys]
    if "preference" in found:
        found.remove("prompt-completion") if "prompt-completion" in found else None
    if len(found) != 1:
        raise UsageProblem(f"cannot tell the format from the keys {sorted(keys)} ({first[0]})",
                           hint="pass --format text, chat, prompt-completion or preference")
    return found[0]


class _Encoder:
    def __init__(self, tok: Any, template: ChatTemplate):
        self.tok, self.t = tok, template
        self.bos = [tok.bos_id] if tok.bos_id is not None else []
        self.eos = [tok.eos_id] if tok.eos_id is not None else []

    def text(self, s: str) -> list[int]:
        return self.tok.encode(s)

    def prompt_completion(self, prompt: Any, completion: Any, where: str) -> tuple[list[int], list[bool]]:
        """Token ids and the completion's mask."""
        if isinstance(prompt, str) and isinstance(completion, str):
            p = self.bos + self.text(prompt)
            c = self.text(completion) + self.eos
            return p + c, [False] * len(p) + [True] * len(c)
        head, text = self._conversation(prompt, completion, where)
        return self.t.encode_text(text, [(len(head), len(text))])

    def _conversation(self, prompt: Any, rest: Any, where: str) -> tuple[str, str]:
        if not isinstance(prompt, list) or not isinstance(rest, list):
            raise UsageProblem(f"prompt and completion must both be strings or both message lists ({where})",
                               hint='e.g. "prompt": [{"role": "user", "content": "..."}]')
        check_messages(prompt, self.t.template, need_assistant=False, where=where)
        check_messages(prompt + rest, self.t.template, where=where)
        head = self.t.render(prompt, add_generation_prompt=True)
        text = self.t.render(prompt + rest)
        if not text.startswith(head):
            raise GentoolError(f"the chat template renders the prompt differently inside the whole chat ({where})",
                               hint="use string prompts and completions, or a template that renders incrementally")
        return head, text

    def pair(self, prompt: Any, chosen: Any, rejected: Any, where: str) -> tuple[list[int], list[int], list[int]]:
        for name, v in (("chosen", chosen), ("rejected", rejected)):
            if not v or (isinstance(v, str) and not v.strip()):
                raise UsageProblem(f"a preference row has an empty {name} ({where})",
                                   hint="give every row a non-empty chosen and rejected answer")
        if chosen == rejected:
            raise UsageProblem(f"a preference row's chosen and rejected are identical ({where})",
                               hint="remove the row: it carries no preference")
        if isinstance(prompt, str) and isinstance(chosen, str) and isinstance(rejected, str):
            return self.bos + self.text(prompt), self.text(chosen) + self.eos, self.text(rejected) + self.eos
        head, c_text = self._conversation(prompt, chosen, where)
        _, r_text = self._conversation(prompt, rejected, where)
        p_ids, _ = self.t.encode_text(head, [])
        c_ids, _ = self.t.encode_text(c_text, [])
        r_ids, _ = self.t.encode_text(r_text, [])
        # the prompt's tokens as they occur in the whole renderings (a token may straddle the boundary: rare)
        n = len(p_ids)
        if c_ids[:n] != p_ids or r_ids[:n] != p_ids:
            raise GentoolError(f"the prompt's tokens change when an answer follows it ({where})",
                               hint="end the template's generation prompt with a special token or a newline")
        return p_ids, c_ids[n:], r_ids[n:]


def _fit_masked(ids: list[int], mask: list[bool], max_len: int | None, overlong: str, counts: dict):
    if max_len is not None and len(ids) > max_len:
        if overlong == "drop":
            counts["dropped"] += 1
            return None
        ids, mask = ids[:max_len], mask[:max_len]
        counts["truncated"] += 1
    if not any(mask[1:]):  # the first token is never a target
        counts["dropped_untrained"] += 1
        return None
    return np.asarray(ids), np.asarray(mask, dtype=bool)


def _fit_pair(p: list[int], c: list[int], r: list[int], max_len: int | None, overlong: str, counts: dict):
    if max_len is not None and len(p) + max(len(c), len(r)) > max_len:
        if overlong == "drop":
            counts["dropped"] += 1
            return None
        p = p[-(max_len // 2):] if len(p) > max_len // 2 else p
        c, r = c[:max_len - len(p)], r[:max_len - len(p)]
        counts["truncated"] += 1
        if c == r:
            counts["dropped_untrained"] += 1
            return None
    return np.asarray(p), np.asarray(c), np.asarray(r)


def encode_examples(inputs: list[str], tokenizer: Path, out: Path, *, fmt: str, train_on: str | None = None,
                    max_len: int | None = None, overlong: str = "truncate", val_fraction: float = 0.05,
                    split_seed: int = 0, template: str | None = None, glob: str = "*.jsonl", force: bool = False):
    """Encode chat, prompt-completion or preference JSONL into a token-shards artifact with loss masks or pairs."""
    if fmt not in FORMATS[1:]:
        raise UsageProblem(f"unknown --format {fmt!r}", hint="use chat, prompt-completion or preference")
    default = {"chat": "assistant", "prompt-completion": "completion", "preference": None}[fmt]
    train_on = train_on or default
    if fmt == "chat" and train_on not in ("assistant", "all"):
        raise UsageProblem(f"--train-on {train_on} does not apply to chats", hint="use assistant or all")
    if fmt == "prompt-completion" and train_on not in ("completion", "assistant", "all"):
        raise UsageProblem(f"unknown --train-on {train_on!r}", hint="use completion or all")
    if fmt == "preference" and train_on not in (None, "completion", "assistant"):
        raise UsageProblem("--train-on all does not apply to preference pairs",
                           hint="pairs are scored on their answers; drop --train-on")
    if overlong not in ("truncate", "drop"):
        raise UsageProblem(f"unknown --overlong {overlong!r}", hint="use truncate or drop")
    if max_len is not None and max_len < 2:
        raise UsageProblem(f"--max-len {max_len} is out of range", hint="give 2 tokens or more")
    if not 0 <= val_fraction < 1:
        raise UsageProblem("--val-fraction must be in [0, 1)")
    check_output(out, force=force, sources=[*inputs, tokenizer])
    tok = load_tokenizer(tokenizer)
    try:
        tok_ref = input_ref("tokenizer", read_artifact(tokenizer, verify=False))
    except (GentoolError, UsageProblem):
        tok_ref = input_ref("tokenizer", tokenizer)
    chat = ChatTemplate.of(tok, template)
    enc = _Encoder(tok, chat)
    sources = expand_inputs(inputs, glob)
    counts = {"examples_read": 0, "truncated": 0, "dropped": 0, "dropped_untrained": 0}
    kept: dict[str, list] = {"train": [], "val": []}
    t0 = time.time()
    for where, _, rec in _records(sources):
        missing = KEYS[fmt] - set(rec)
        if missing:
            raise UsageProblem(f"a {fmt} record lacks {', '.join(sorted(missing))} ({where})",
                               hint="check --format, or the record's keys")
        split = "val" if val_mask(np.array([counts["examples_read"]]), split_seed, val_fraction)[0] else "train"
        counts["examples_read"] += 1
        if fmt == "preference":
            item = _fit_pair(*enc.pair(rec["prompt"], rec["chosen"], rec["rejected"], where), max_len, overlong,
                             counts)
        else:
            if fmt == "chat":
                check_messages(rec["messages"], chat.template, need_assistant=train_on != "all", where=where)
                ids, mask = chat.encode(rec["messages"])
            else:
                ids, mask = enc.prompt_completion(rec["prompt"], rec["completion"], where)
            if train_on == "all":
                mask = [True] * len(ids)
            item = _fit_masked(ids, mask, max_len, overlong, counts)
        if item is not None:
            kept[split].append(item)
    if not kept["train"]:
        raise UsageProblem(f"no {fmt} examples left for the train split ({counts['examples_read']} read, "
                           f"{counts['dropped'] + counts['dropped_untrained']} dropped)",
                           path=", ".join(map(str, sources))[:200], hint="give more examples or raise --max-len")
    if counts["truncated"] or counts["dropped"] or counts["dropped_untrained"]:
        console.warn(f"{counts['truncated']} examples truncated, {counts['dropped']} dropped as over-long, "
                     f"{counts['dropped_untrained']} dropped with nothing left to train on (--max-len {max_len})")
    dtype = dtype_for_vocab(tok.vocab_size)
    config = {"format": fmt, "train_on": train_on, "max_len": max_len, "overlong": overlong,
              "val_fraction": val_fraction, "split_seed": split_seed, "template_sha256": chat.hash,
              "dtype": dtype.name}
    with create_artifact(out, "token-shards", force=force, config=config,
                         inputs=[tok_ref] + [input_ref("data", s) for s in sources]) as art:
        splits = {}
        for split, items in kept.items():
            if not items:
                continue
            if fmt == "preference":
                splits[split] = write_pairs(art.dir, split, items, dtype)
            else:
                splits[split] = write_masked(art.dir, split, [i[0] for i in items], [i[1] for i in items], dtype)
        art.contents.update(tokenizer_id=tok.sha256, vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                            bos_id=tok.bos_id, pad_id=tok.pad_id, unk_id=getattr(tok, "unk_id", None),
                            dtype=dtype.name, format=fmt, train_on=train_on, template_sha256=chat.hash,
                            splits=splits, examples=sum(s["documents"] for s in splits.values()),
                            trained_tokens=sum(s["trained_tokens"] for s in splits.values()), **counts,
                            **({"pairs": sum(s["pairs"] for s in splits.values())} if fmt == "preference" else {}))
        art.metrics.update(seconds=round(time.time() - t0, 3))
    return art.manifest
