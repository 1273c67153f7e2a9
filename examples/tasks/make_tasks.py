"""Build the example downstream tasks from the bundled Shakespeare and a seeded arithmetic generator:

- shakespeare_next_line: multiple choice, which of four lines follows a speech's opening line (3 distractors
  drawn from the same play);
- shakespeare_cloze: loglikelihood (LAMBADA-style), a speech line with its last word held out;
- arithmetic: generate_until, "Q: 12 + 7 =" -> "19" (two-digit addition and subtraction).

Each writes test/train JSON lines beside its task YAML; the YAML is lm-eval's format, so the same file runs in
`lm_eval --include_path examples/tasks`. Run: python examples/tasks/make_tasks.py (deterministic)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUNDLED = HERE.parents[1] / "src" / "gentool" / "data" / "bundled" / "shakespeare"


def lines() -> list[str]:
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(BUNDLED.rglob("*.txt")))
    out = []
    for raw in text.splitlines():
        s = raw.strip()
        if 25 <= len(s) <= 80 and not s.isupper() and re.search(r"[a-z]", s) and not s.startswith(("[", "ACT", "SCENE")):
            out.append(s)
    return out


def write(name: str, rows: dict[str, list[dict]]) -> None:
    for split, rs in rows.items():
        with open(HERE / f"{name}.{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps(r) + "\n")


def main() -> None:
    rnd = random.Random(0)
    ls = lines()
    pairs = [(a, b) for a, b in zip(ls, ls[1:])]
    rnd.shuffle(pairs)
    mc = []
    for a, b in pairs[:300]:
        wrong = rnd.sample([x for _, x in pairs[300:]], 3)
        choices = wrong + [b]
        rnd.shuffle(choices)
        mc.append({"context": a, "choices": choices, "label": choices.index(b)})
    write("shakespeare_next_line", {"test": mc[:200], "train": mc[200:]})
    cloze = []
    for s in ls[::7][:300]:
        m = re.match(r"^(.*\S)\s+([A-Za-z']+)[^A-Za-z']*$", s)
        if m:
            cloze.append({"text": m.group(1), "word": m.group(2)})
    write("shakespeare_cloze", {"test": cloze[:200], "train": cloze[200:]})
    arith = []
    for _ in range(300):
        a, b, op = rnd.randint(10, 99), rnd.randint(10, 99), rnd.choice("+-")
        arith.append({"question": f"{a} {op} {b}", "answer": str(a + b if op == "+" else a - b)})
    write("arithmetic", {"test": arith[:200], "train": arith[200:]})


if __name__ == "__main__":
    main()
