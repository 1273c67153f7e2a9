"""GGUF tokenizer metadata to and from the tokenizer files of a checkpoint: SentencePiece `tokenizer.model`
("llama" GGUF tokenizers) and byte-level BPE `tokenizer.json` ("gpt2").

SentencePiece's ModelProto is read and written here with a few lines of protobuf wire format (only the fields GGUF
carries: pieces with score and type; trainer_spec model_type, byte_fallback and the special ids; normalizer_spec
name, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces), so no protobuf runtime is needed.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from gentool.errors import GentoolError, UsageProblem

# field numbers of sentencepiece_model.proto
_PIECES, _TRAINER, _NORMALIZER = 1, 2, 3
_PIECE, _SCORE, _TYPE = 1, 2, 3
_MODEL_TYPE, _BYTE_FALLBACK, _UNK, _BOS, _EOS, _PAD = 3, 35, 40, 41, 42, 43
_NAME, _DUMMY_PREFIX, _REMOVE_WS, _ESCAPE_WS = 1, 3, 4, 5
_BPE = 2
# byte-level BPE pre-tokenizers for which llama.cpp adds BOS when the GGUF has no tokenizer.ggml.add_bos_token
# (llama-vocab.cpp); SentencePiece ("llama") vocabularies add it by default
_BOS_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"}


def gguf_add_bos(tok: dict[str, Any]) -> bool:
    """Does llama.cpp add BOS for this GGUF tokenizer? tokenizer.ggml.add_bos_token where present, else its
    per-vocabulary default."""
    if tok.get("add_bos") is not None:
        return bool(tok["add_bos"])
    return tok.get("model") == "llama" or tok.get("pre") in _BOS_PRE


def _varint(data: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        if i >= len(data):
            raise GentoolError("truncated SentencePiece model")
        c = data[i]
        i += 1
        out |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return out, i


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        wire = key & 7
        if wire == 0:
            v, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            v, i = data[i:i + n], i + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            v, i = data[i:i + n], i + n
        else:
            raise GentoolError(f"unsupported protobuf wire type {wire} in a SentencePiece model")
        yield key >> 3, wire, v


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def read_sentencepiece(model_file: str | Path) -> dict[str, Any]:
    """pieces [(piece, score, type)], the normalizer's add_dummy_prefix and the trainer's special ids."""
    pieces, norm, trainer = [], {}, {}
    for f, _, v in _fields(Path(model_file).read_bytes()):
        if f == _PIECES:
            p = {_PIECE: b"", _SCORE: 0.0, _TYPE: 1}
            for f2, w2, v2 in _fields(v):
                p[f2] = struct.unpack("<f", v2)[0] if f2 == _SCORE and w2 == 5 else v2
            pieces.append((p[_PIECE].decode("utf-8"), float(p[_SCORE]), int(p[_TYPE])))
        elif f == _NORMALIZER:
            norm.update({f2: v2 for f2, _, v2 in _fields(v)})
        elif f == _TRAINER:
            trainer.update({f2: v2 for f2, w2, v2 in _fields(v) if w2 == 0})
    return {"pieces": pieces, "add_dummy_prefix": bool(norm.get(_DUMMY_PREFIX, 1)),
            **{k: _signed(trainer[n]) for k, n in (("unk", _UNK), ("bos", _BOS), ("eos", _EOS), ("pad", _PAD))
               if n in trainer}}


def _key(field: int, wire: int) -> bytes:
    return _uvarint(field << 3 | wire)


def _uvarint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _uvarint(len(payload)) + payload


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _uvarint(value)


def write_sentencepiece(pieces, *, byte_fallback: bool, unk: int, bos: int, eos: int, pad: int,
                        add_dummy_prefix: bool) -> bytes:
    """A BPE ModelProto with these pieces [(piece, score, type)] and special ids (-1: none)."""
    out = bytearray()
    for piece, score, typ in pieces:
        body = _len(_PIECE, piece.encode("utf-8")) + _key(_SCORE, 5) + struct.pack("<f", score) + _int(_TYPE, typ)
        out += _len(_PIECES, body)
    trainer = (_int(_MODEL_TYPE, _BPE) + _int(_BYTE_FALLBACK, int(byte_fallback)) + _int(_UNK, unk)
               + _int(_BOS, bos) + _int(_EOS, eos) + _int(_PAD, pad))
    norm = (_len(_NAME, b"identity") + _int(_DUMMY_PREFIX, int(add_dummy_prefix)) + _int(_REMOVE_WS, 0)
            + _int(_ESCAPE_WS, 1))
    return bytes(out + _len(_TRAINER, trainer) + _len(_NORMALIZER, norm))


def write_tokenizer(tok: dict[str, Any], directory: Path) -> list[str]:
    """Rebuild the tokenizer files from GGUF metadata; returns the file names written."""
    model = tok.get("model")
    written = []
    if model == "llama":
        scores = tok.get("scores") or [0.0] * len(tok["tokens"])
        types = tok.get("token_type") or [1] * len(tok["tokens"])
        bos = tok.get("bos") if tok.get("bos") is not None else -1
        eos = tok.get("eos") if tok.get("eos") is not None else -1
        # GGUF token types are SentencePiece's enum
        data = write_sentencepiece(list(zip(tok["tokens"], map(float, scores), map(int, types))),
                                   byte_fallback=6 in types, bos=bos, eos=eos,
                                   unk=tok.get("unknown") if tok.get("unknown") is not None else 0,
                                   pad=tok.get("padding") if tok.get("padding") not in (None, eos, bos) else -1,
                                   add_dummy_prefix=tok.get("add_space_prefix", True) is not False)
        (directory / "tokenizer.model").write_bytes(data)
        written.append("tokenizer.model")
    elif model == "gpt2":
        try:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
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
        if gguf_add_bos(tok) and tok.get("bos") is not None:  # as transformers writes add_bos_token: BOS first
            bos = tok["tokens"][tok["bos"]]
            t.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                             special_tokens=[(bos, int(tok["bos"]))])
        t.save(str(directory / "tokenizer.json"))
        written.append("tokenizer.json")
    else:
        raise UsageProblem(f"GGUF tokenizer model {model!r} is not supported", hint="llama and gpt2 are")
    names = tok["tokens"]
    cfg = {"add_bos_token": gguf_add_bos(tok),
           "add_eos_token": False,
           **{f"{k}_token": names[tok[g]] for k, g in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"),
                                                       ("pad", "padding")) if tok.get(g) is not None}}
    if tok.get("chat_template"):
        cfg["chat_template"] = tok["chat_template"]
    if tok.get("pre"):  # llama.cpp's pre-tokenizer name, so export-gguf writes it back
        cfg["gguf_pre"] = tok["pre"]
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return written + ["tokenizer_config.json"]


def _add_tokenizer(w, tokenizer: dict[str, Any]) -> None:
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


def tokenizer_metadata_from_sentencepiece(model_file: str | Path) -> dict[str, Any]:
    """GGUF tokenizer metadata ("llama" model) from a SentencePiece tokenizer.model; add_bos_token is the
    tokenizer's own setting (`adds_bos`)."""
    from gentool.data.tokenizer import Tokenizer, adds_bos

    tokenizer = Tokenizer(model_file)
    sp = tokenizer.sp
    proto = read_sentencepiece(model_file)
    pieces = proto["pieces"]
    return {"model": "llama", "tokens": [p[0] for p in pieces], "scores": [p[1] for p in pieces],
            "token_type": [p[2] for p in pieces], "bos": sp.bos_id() if sp.bos_id() >= 0 else None,
            "eos": sp.eos_id() if sp.eos_id() >= 0 else None, "unknown": sp.unk_id(),
            "padding": sp.pad_id() if sp.pad_id() >= 0 else None, "add_bos": adds_bos(tokenizer),
            "add_space_prefix": proto["add_dummy_prefix"]}


def tokenizer_metadata_from_json(directory: Path) -> dict[str, Any]:
    """GGUF tokenizer metadata ("gpt2" model) from a byte-level BPE tokenizer.json; add_bos_token is the
    tokenizer's own setting (post-processor, else tokenizer_config.json: `hf_add_bos`, as `adds_bos` reads it)."""
    from gentool.data.hf_tokenizer import hf_add_bos

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
            "merges": merges, "pre": cfg.get("gguf_pre"), "bos": tid("bos"), "eos": tid("eos"), "unknown": tid("unk"),
            "padding": tid("pad"), "add_bos": hf_add_bos(data, cfg)[0] and tid("bos") is not None,
            "chat_template": cfg.get("chat_template")}
