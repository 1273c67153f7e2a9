"""Build the post-training demo's data from the bundled Shakespeare corpus (deterministic: --seed).

A *speech* is a blank-line block of the plays: a speaker line ("Ham.") and at least two lines of verse or prose.
  sft.jsonl    chat:        user "Continue this speech by <speaker>:\n<first line>", assistant "<second line>"
  pairs.jsonl  preference:  the same prompt; chosen = the true second line, rejected = the second line of a
                            random speech from a *different play* (a mismatched continuation of similar form)
  prompts.txt  the first 16 held-out prompts' first lines (one per line), for `gentool sample`
Every speech goes to one file only by a hash of its index (even: sft; odd: pairs), so SFT never sees the pairs.

    python make_data.py --out work/data [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from gentool.data.text import bundled_corpus  # noqa: E402


def speeches() -> list[tuple[str, str, str, str]]:
    """(play, speaker, first line, second line) of every speech with two lines or more."""
    out = []
    for f in sorted(bundled_corpus("shakespeare").rglob("*.txt")):
        for block in f.read_text(encoding="utf-8").split("\n\n"):
            lines = [x.strip() for x in block.strip().splitlines() if x.strip()]
            if len(lines) >= 3 and lines[0].endswith(".") and len(lines[0]) <= 24 and len(lines[1]) >= 12 \
                    and len(lines[2]) >= 12:
                out.append((f.stem, lines[0].rstrip("."), lines[1], lines[2]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    sp = speeches()
    a.out.mkdir(parents=True, exist_ok=True)
    prompts = []
    with open(a.out / "sft.jsonl", "w") as sft, open(a.out / "pairs.jsonl", "w") as pairs:
        for i, (play, who, first, second) in enumerate(sp):
            prompt = f"Continue this speech by {who}:\n{first}"
            if i % 2 == 0:
                sft.write(json.dumps({"messages": [{"role": "user", "content": prompt},
                                                   {"role": "assistant", "content": second}]}) + "\n")
                continue
            while True:
                other = sp[rng.randrange(len(sp))]
                if other[0] != play and other[3] != second:
                    break
            pairs.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                    "chosen": [{"role": "assistant", "content": second}],
                                    "rejected": [{"role": "assistant", "content": other[3]}]}) + "\n")
            if len(prompts) < 16:
                prompts.append(prompt.replace("\n", " "))
    (a.out / "prompts.txt").write_text("\n".join(prompts) + "\n")
    print(f"{len(sp)} speeches: {(len(sp) + 1) // 2} SFT chats, {len(sp) // 2} preference pairs in {a.out}")


if __name__ == "__main__":
    main()
