"""Token shards: safetensors files holding one 1-D `tokens` tensor (uint16 when the vocabulary fits, else uint32),
split into train/val, memory-mapped on read.

Reading goes through numpy, not torch: torch has little uint16 support, and a numpy memmap at the tensor's offset
(the safetensors header says where) is zero-copy for any corpus size. `TokenShards.tokens(start, end)` returns an
int64 copy of just that slice, ready for `torch.from_numpy`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gentool.artifacts import Manifest, read_artifact
from gentool.artifacts.tensorfiles import read_header
from gentool.errors import GentoolError, UsageProblem

_DTYPES = {"U16": np.uint16, "U32": np.uint32, "I32": np.int32, "I64": np.int64}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    from safetensors.numpy import save_file

    save_file({"tokens": np.ascontiguousarray(tokens)}, str(path))


def mmap_tokens(path: Path) -> np.ndarray:
    """The `tokens` tensor of a shard as a read-only memmap (the safetensors header says where it starts)."""
    try:
        header = read_header(path)
    except GentoolError as e:
        raise GentoolError(f"not a valid token shard: {e.message}", path=path, hint="re-create the shards") from None
    info = header.get("tokens")
    if info is None or info["dtype"] not in _DTYPES or len(info["shape"]) != 1 or len(header) != 1:
        raise GentoolError("not a valid token shard (one 1-D integer `tokens` tensor expected)", path=path,
                           hint="re-create the shards")
    dtype = np.dtype(_DTYPES[info["dtype"]])
    count = info["shape"][0]
    if count == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + info["data_offsets"][0], shape=(count,))


@dataclass
class TokenShards:
    """One split of a token-shards artifact as a single virtual array."""

    manifest: Manifest
    split: str
    arrays: list[np.ndarray]

    def __post_init__(self):
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def contents(self) -> dict:
        return self.manifest.contents

    @property
    def tokenizer_id(self) -> str:
        return self.contents["tokenizer_id"]

    def tokenizer_file(self) -> Path | None:
        """The tokenizer file these shards were encoded with, checked against their `tokenizer_id` (its sha256).

        The manifest records it relative to the shards directory (`tokenizer_file`: found when the two move together)
        and absolute (`tokenizer_file_absolute`: when the shards move alone); manifests of older gentools
        recorded only the tokenizer directory as typed at `tokenize encode`, which is used where it still resolves
        (None where it does not). A recorded file that is gone or changed is an error: a tokenizer retrained in
        place would pair the tokens with the wrong text."""
        from gentool.data.tokenizer import file_id

        recorded = self.contents.get("tokenizer_file")
        if recorded is not None:
            places = [(self.manifest.path.resolve() / recorded).resolve(),
                      *([Path(self.contents["tokenizer_file_absolute"])] if "tokenizer_file_absolute" in self.contents
                        else [])]
            file = next((f for f in places if f.is_file()), None)
            if file is None:
                raise GentoolError("the tokenizer these shards were encoded with is gone", path=places[-1],
                                   hint="restore it, or encode the data again with `gentool tokenize encode`")
        else:
            typed = next((i.get("path") for i in self.manifest.inputs if i.get("role") == "tokenizer"), None)
            file = _tokenizer_in(Path(typed)) if typed else None
            if file is None:
                return None
        if file_id(file) != self.tokenizer_id:
            raise GentoolError("the tokenizer changed since these shards were encoded (its sha256 differs)",
                               path=file, hint="encode the data again with it, or restore the tokenizer used")
        return file

    @property
    def vocab_size(self) -> int:
        return int(self.contents["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.contents["eos_id"])

    @property
    def bytes(self) -> int:
        return int(self.contents["splits"][self.split]["bytes"])

    @property
    def documents(self) -> int:
        return int(self.contents["splits"][self.split]["documents"])

    def tokens(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) across shard boundaries, as int64."""
        start, end = max(0, start), min(end, len(self))
        out = []
        i = int(np.searchsorted(self.offsets, start, side="right") - 1)
        while start < end:
            a, off = self.arrays[i], int(self.offsets[i])
            take = min(end, off + len(a)) - start
            out.append(np.asarray(a[start - off:start - off + take], dtype=np.int64))
            start += take
            i += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _tokenizer_in(path: Path) -> Path | None:
    if path.is_file():
        return path
    return next((path / n for n in ("tokenizer.model", "tokenizer.json") if (path / n).is_file()), None)


def open_shards(path: str | Path, split: str = "train", *, verify: bool = True) -> TokenShards:
    manifest = read_artifact(path, "token-shards", verify=verify)
    splits = manifest.contents.get("splits", {})
    if split not in splits:
        raise UsageProblem(f"no {split!r} split (have {', '.join(splits) or 'none'})", path=path,
                           hint="pick another --split")
    arrays = [mmap_tokens(manifest.path / name) for name in splits[split]["shards"]]
    return TokenShards(manifest, split, arrays)
