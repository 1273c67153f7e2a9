"""How well does `scale-fit --form curve` forecast a run's final loss from its beginning? A sweep of gentool's own
train-lm runs on the bundled corpus (cosine and WSD schedules, two model sizes, several learning rates and seeds),
each cut at 25%, 50% and 75% of its steps and forecast with the real CLI.

    python bench/forecast.py --work /tmp/forecast            # train the sweep (about 25 CPU-minutes), then score it
    python bench/forecast.py --work /tmp/forecast --tuning   # the runs the method's constants were measured on

The evaluation runs (SWEEP) were not used to choose the method or its constants (curve.py: the annealing shape and
the prior on B); those came from the TUNING runs (seed 0, other lengths and learning rates). Each cut copies the
run's recipe (run.json) and the first lines of its metrics.jsonl into RUN.partial/, exactly what an unfinished run
looks like, and runs `gentool scale-fit RUN.partial --form curve --json`. The error is (forecast - actual) / actual
of the final validation loss; coverage counts the 95% intervals that contain the actual final loss."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#        name,              preset, steps, schedule, lr,   seed
SWEEP = [("tiny-cos-2500",  "tiny", 2500, "cosine", 2e-3, 1), ("tiny-wsd-2500", "tiny", 2500, "wsd", 2e-3, 1),
         ("tiny-cos-2000",  "tiny", 2000, "cosine", 5e-3, 2), ("tiny-wsd-2000", "tiny", 2000, "wsd", 5e-3, 2),
         ("mini-cos-2000",  "mini", 2000, "cosine", 3e-3, 1), ("mini-wsd-2000", "mini", 2000, "wsd", 3e-3, 1)]
TUNING = [(f"tiny-{s}-{n}", "tiny", n, s, 3e-3, 0) for n in (400, 800, 2000) for s in ("constant", "cosine", "wsd")] \
    + [(f"tiny-{s}-400-lr{k}", "tiny", 400, s, lr, 0) for k, lr in ((1, 1e-3), (8, 8e-3)) for s in ("cosine", "wsd")] \
    + [(f"mini-{s}-{n}", "mini", n, s, lr, 0) for n, lr in ((400, 3e-3), (1200, 2e-3)) for s in ("cosine", "wsd")]
CUTS = (0.25, 0.5, 0.75)


def gentool(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gentool", *args], env=env, capture_output=True, text=True,
                          check=False, **kw)


def train(work: Path, runs: list[tuple]) -> None:
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if not (work / "tokens" / "manifest.json").is_file():
        for cmd in (("tokenize", "train", "builtin:shakespeare", "-o", str(work / "tok"), "--vocab-size", "1024",
                     "--force"),
                    ("tokenize", "encode", "builtin:shakespeare", "--tokenizer", str(work / "tok"), "-o",
                     str(work / "tokens"), "--force")):
            r = gentool(*cmd)
            if r.returncode:
                sys.exit(r.stderr)
    for name, preset, steps, schedule, lr, seed in runs:
        out = work / "runs" / name
        if (out / "manifest.json").is_file():
            continue
        t0 = time.time()
        r = gentool("-q", "train-lm", str(work / "tokens"), "-o", str(out), "--preset", preset, "--steps", str(steps),
                    "--schedule", schedule, "--lr", str(lr), "--seed", str(seed),
                    "--eval-every", "10" if steps <= 800 else "20",
                    "--eval-tokens", "8192", "--seq-len", "64", "--micro-batch", "16", "--force")
        if r.returncode:
            sys.exit(f"{name}: {r.stderr}")
        print(f"trained {name} in {time.time() - t0:.0f} s", file=sys.stderr)


def cut(run: Path, frac: float, dest: Path) -> None:
    """dest = an unfinished copy of `run` after frac of its steps: run.json + the first metrics.jsonl lines."""
    manifest = json.loads((run / "manifest.json").read_text())
    steps = manifest["config"]["train"]["steps"]
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    (dest / "run.json").write_text(json.dumps(manifest["config"]))
    lines = [ln for ln in (run / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= frac * steps]
    (dest / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def score(work: Path, runs: list[tuple]) -> list[dict]:
    rows = []
    for name, preset, steps, schedule, lr, seed in runs:
        run = work / "runs" / name
        actual = json.loads((run / "manifest.json").read_text())["metrics"]["val_loss"]
        row = {"run": name, "schedule": schedule, "preset": preset, "steps": steps, "lr": lr, "actual": actual}
        for frac in CUTS:
            part = work / "cuts" / f"{name}-{int(frac * 100)}.partial"
            cut(run, frac, part)
            r = gentool("scale-fit", str(part), "--form", "curve", "--json")
            if r.returncode:
                row[f"{frac:.0%}"] = {"error": r.stderr.strip()}
                continue
            pred = json.loads(r.stdout)["predictions"][0]["loss"]
            lo, hi = pred["ci95"]
            row[f"{frac:.0%}"] = {"predicted": pred["value"], "err": (pred["value"] - actual) / actual,
                                  "covered": lo <= actual <= hi, "ci95": [lo, hi]}
        rows.append(row)
    return rows


def report(rows: list[dict], title: str) -> None:
    print(f"\n## {title}\n")
    print("| run | schedule | actual final | " + " | ".join(f"from {c:.0%}: error [95% interval]" for c in CUTS) + " |")
    print("|---|---|---|" + "---|" * len(CUTS))
    for r in rows:
        cells = []
        for c in CUTS:
            v = r[f"{c:.0%}"]
            cells.append(f"error: {v['error'][:40]}" if "error" in v else
                         f"{100 * v['err']:+.2f}% [{100 * (v['ci95'][0] / r['actual'] - 1):+.1f}, "
                         f"{100 * (v['ci95'][1] / r['actual'] - 1):+.1f}]")
        print(f"| {r['run']} | {r['schedule']} | {r['actual']:.4f} | " + " | ".join(cells) + " |")
    for sched in ("cosine", "wsd", None):
        sel = [r for r in rows if sched is None or r["schedule"] == sched]
        parts = []
        for c in CUTS:
            ok = [r[f"{c:.0%}"] for r in sel if "err" in r[f"{c:.0%}"]]
            if ok:
                parts.append(f"from {c:.0%}: mean |error| {100 * sum(abs(v['err']) for v in ok) / len(ok):.2f}%, "
                             f"max {100 * max(abs(v['err']) for v in ok):.2f}%, "
                             f"interval coverage {sum(v['covered'] for v in ok)}/{len(ok)}")
        print(f"\n{sched or 'all'}: " + "; ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--tuning", action="store_true", help="the tuning runs instead of the evaluation sweep")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--device", default="cpu", help="accepted for the bench convention; training runs on CPU")
    args = ap.parse_args()
    runs = TUNING if args.tuning else SWEEP
    train(args.work, runs)
    if not args.train_only:
        report(score(args.work, runs), "tuning runs" if args.tuning else "evaluation sweep")


if __name__ == "__main__":
    main()
