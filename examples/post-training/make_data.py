"""Build the post-training demo's data from the bundled Shakespeare corpus (deterministic: --seed).

A *speech* is a blank-line block of the plays: a speaker line ("Ham.") and at least two lines of verse or prose.
`--heldout-plays` plays (drawn by --seed) are kept out of everything that trains: the tokenizer, pretraining, SFT
and DPO see the other plays only, so the held-out figures measure what carries over to unseen works.
  pretrain/*.txt       the training plays' text (tokenizer and pretraining)
  sft.jsonl            chat:       user "Continue this speech by <speaker>:\n<first line>", assistant "<second line>"
  pairs.jsonl          preference: the same prompt; chosen = the true second line, rejected (--rejected):
                         other-play  the second line of a random speech from a *different play* (a mismatched
                                     continuation of similar form; a model of the demo's size cannot tell these
                                     apart on unseen plays: DPO reaches about 55% there)
                         shuffled    the true second line with its words in a random order (lines whose words
                                     cannot be reordered are left out)
                         echo        the prompt's own line repeated (the degenerate loop of small models)
  heldout-sft.jsonl    the held-out plays' speeches as chats (SFT's held-out completion NLL)
  heldout-pairs.jsonl  the held-out plays' speeches as pairs, rejected lines from the other held-out plays
  prompts.txt          the first 16 held-out prompts' first lines (one per line), for `gentool sample`
A training play's speeches alternate between sft.jsonl and pairs.jsonl, so SFT never sees the pairs' answers.

    python make_data.py --out work/data [--seed 0] [--heldout-plays 2] [--rejected other-play]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from gentool.data.text import bundled_corpus  # noqa: E402


def speeches(f: Path) -> list[tuple[str, str, str, str]]:
    """(play, speaker, first line, second line) of every speech with two lines or more in play file `f`."""
    out = []
    for block in f.read_text(encoding="utf-8").split("\n\n"):
        lines = [x.strip() for x in block.strip().splitlines() if x.strip()]
        if len(lines) >= 3 and lines[0].endswith(".") and len(lines[0]) <= 24 and len(lines[1]) >= 12 \
                and len(lines[2]) >= 12:
            out.append((f.stem, lines[0].rstrip("."), lines[1], lines[2]))
    return out


def chat(s: tuple[str, str, str, str]) -> dict:
    return {"messages": [{"role": "user", "content": f"Continue this speech by {s[1]}:\n{s[2]}"},
                         {"role": "assistant", "content": s[3]}]}


def pair(s: tuple[str, str, str, str], pool: list, rng: random.Random, rejected: str = "other-play") -> dict:
    """`s` as a preference pair, rejected: the second line of a random speech of `pool` from another play, or
    (shuffled) the true second line with its words in a random order."""
    if rejected == "echo":
        other = s
    if rejected == "shuffled":
        words = s[3].split()
        while len(set(words)) > 1 and " ".join(words) == s[3]:
            rng.shuffle(words)
        other = (s[0], s[1], s[2], " ".join(words))
    while rejected == "other-play":
        other = pool[rng.randrange(len(pool))]
        if other[0] != s[0] and other[3] != s[3]:
            break
    return {"prompt": [{"role": "user", "content": f"Continue this speech by {s[1]}:\n{s[2]}"}],
            "chosen": [{"role": "assistant", "content": s[3]}],
            "rejected": [{"role": "assistant", "content": other[2] if rejected == "echo" else other[3]}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-plays", type=int, default=2, help="plays kept out of training (at least 2)")
    p.add_argument("--rejected", choices=["other-play", "shuffled", "echo"], default="other-play")
    a = p.parse_args()
    rng = random.Random(a.seed)
    files = sorted(bundled_corpus("shakespeare").rglob("*.txt"))
    if not 2 <= a.heldout_plays <= len(files) - 2:
        p.error(f"--heldout-plays must be between 2 and {len(files) - 2}")
    held = set(rng.sample([f.stem for f in files], a.heldout_plays))
    (a.out / "pretrain").mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for f in files:
        if f.stem in held:
            test += speeches(f)
        else:
            train += speeches(f)
            (a.out / "pretrain" / f.name).write_text(f.read_text(encoding="utf-8"), encoding="utf-8")
    write_jsonl(a.out / "sft.jsonl", [chat(s) for s in train[0::2]])
    keep = (lambda s: len(set(s[3].split())) >= 2) if a.rejected == "shuffled" else (lambda s: True)  # reorderable
    write_jsonl(a.out / "pairs.jsonl", [pair(s, train, rng, a.rejected) for s in train[1::2] if keep(s)])
    write_jsonl(a.out / "heldout-sft.jsonl", [chat(s) for s in test])
    write_jsonl(a.out / "heldout-pairs.jsonl", [pair(s, test, rng, a.rejected) for s in test if keep(s)])
    (a.out / "prompts.txt").write_text("".join(f"Continue this speech by {s[1]}: {s[2]}\n" for s in test[:16]))
    print(f"held out: {', '.join(sorted(held))}; {len(train[0::2])} SFT chats, {len(train[1::2])} preference pairs; "
          f"held out: {len(test)} chats and pairs; in {a.out}")


if __name__ == "__main__":
    main()
