"""Token shards of whole examples for post-training: masked examples (SFT) and preference pairs (DPO family).

A token-shards artifact whose `contents.format` is `chat`, `prompt-completion` or `preference` holds, per split,
the usual `SPLIT-00000.safetensors` (one 1-D `tokens` tensor: the examples back to back, readable by every
token-shards reader) and `SPLIT-examples.safetensors` beside it:
  masked examples: `offsets` int64 (N+1,) where example i is tokens[offsets[i]:offsets[i+1]], and `mask` uint8
    (same length as tokens): 1 on the tokens trained on (the target of a next-token loss);
  preference pairs: `spans` int64 (N, 3), the lengths of prompt, chosen and rejected; pair i is those three
    spans back to back, after pair i-1's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gentool.data.shards import TokenShards, open_shards, write_shard
from gentool.errors import UsageProblem

MASKED = ("chat", "prompt-completion")
FORMATS = (*MASKED, "preference")


def examples_file(split: str) -> str:
    return f"{split}-examples.safetensors"


def write_masked(directory: Path, split: str, ids: list[np.ndarray], masks: list[np.ndarray], dtype) -> dict:
    """Write one split's masked examples; returns its `splits` entry."""
    from safetensors.numpy import save_file

    tokens = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype)
    mask = np.concatenate(masks).astype(np.uint8) if masks else np.zeros(0, np.uint8)
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in ids])]).astype(np.int64)
    name = f"{split}-00000.safetensors"
    write_shard(directory / name, tokens)
    save_file({"offsets": offsets, "mask": mask}, str(directory / examples_file(split)))
    return {"shards": [name], "examples": examples_file(split), "documents": len(ids), "tokens": int(len(tokens)),
            "trained_tokens": int(mask.sum()), "bytes": 0}


def write_pairs(directory: Path, split: str, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], dtype) -> dict:
    from safetensors.numpy import save_file

    flat = [a for p in pairs for a in p]
    tokens = np.concatenate(flat).astype(dtype) if flat else np.zeros(0, dtype)
    spans = np.array([[len(a) for a in p] for p in pairs], dtype=np.int64).reshape(-1, 3)
    name = f"{split}-00000.safetensors"
    write_shard(directory / name, tokens)
    save_file({"spans": spans}, str(directory / examples_file(split)))
    return {"shards": [name], "examples": examples_file(split), "documents": len(pairs), "pairs": len(pairs),
            "tokens": int(len(tokens)), "trained_tokens": int(spans[:, 1:].sum()), "bytes": 0}


def shards_format(path: str | Path) -> str:
    """`text` for plain token shards, else the examples' format."""
    from gentool.artifacts import read_artifact

    return read_artifact(path, "token-shards", verify=False).contents.get("format", "text")


@dataclass
class MaskedExamples:
    shards: TokenShards
    offsets: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.shards.tokens(a, b), self.mask[a:b].astype(bool)


@dataclass
class PreferencePairs:
    shards: TokenShards
    spans: np.ndarray

    def __post_init__(self):
        self.starts = np.concatenate([[0], np.cumsum(self.spans.sum(1))]).astype(np.int64)

    def __len__(self) -> int:
        return len(self.spans)

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = int(self.starts[i])
        p, c, r = (int(x) for x in self.spans[i])
        t = self.shards.tokens(a, a + p + c + r)
        return t[:p], t[p:p + c], t[p + c:]


def _open(path: str | Path, split: str, formats: tuple[str, ...], verify: bool):
    from safetensors.numpy import load_file

    shards = open_shards(path, split, verify=verify)
    fmt = shards.contents.get("format", "text")
    if fmt not in formats:
        raise UsageProblem(f"the token shards hold {fmt} data, not {' or '.join(formats)}", path=path,
                           hint="encode the data with gentool tokenize encode --format " + formats[0])
    return shards, load_file(str(shards.manifest.path / shards.contents["splits"][split]["examples"]))


def open_masked(path: str | Path, split: str = "train", *, verify: bool = True) -> MaskedExamples:
    shards, t = _open(path, split, MASKED, verify)
    return MaskedExamples(shards, t["offsets"], t["mask"])


def open_pairs(path: str | Path, split: str = "train", *, verify: bool = True) -> PreferencePairs:
    shards, t = _open(path, split, ("preference",), verify)
    return PreferencePairs(shards, t["spans"])
