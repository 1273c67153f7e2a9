"""What --log-to costs: train-lm's steady-state tokens/s with no tracker and with all four at once.

    python bench/trackers.py                 # CPU, the tiny preset, 300 steps, 3 interleaved rounds
    python bench/trackers.py --steps 600 --rounds 5

Each run is `gentool train-lm` in its own process on the same token shards (the bundled comedies, tokenized once),
logging every step window as train-lm does; tokens/s is the run's steady-state figure (its JSON summary), so
process start and the trackers' own start-up (W&B's service, MLflow's store) are left out, as they are once per run.
The runs alternate (none, all, none, all, ...) so a shared machine's load falls on both alike; best and median per
configuration and their ratio are printed with the load average. Every tracker writes locally (TensorBoard and
MLflow files and W&B offline in the run directory, Trackio's store under a temporary HF_HOME).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import parser, table

BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio")


def run(tokens: Path, out: Path, steps: int, log_to: tuple[str, ...], env: dict) -> float:
    cmd = [sys.executable, "-m", "gentool", "--quiet", "train-lm", str(tokens), "-o", str(out), "--preset", "tiny",
           "--steps", str(steps), "--seq-len", "128", "--micro-batch", "8", "--device", "cpu", "--json", "--force"]
    for b in log_to:
        cmd += ["--log-to", b]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return float(json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_s"])


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    from gentool.tokenize import encode_corpus, train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_tokenizer(["builtin:shakespeare/comedies"], tmp / "tok", vocab_size=512)
        encode_corpus(["builtin:shakespeare/comedies"], tmp / "tok", tmp / "tokens", workers=1)
        env = {**os.environ, "HF_HOME": str(tmp / "hf"), "WANDB_MODE": "offline", "NO_COLOR": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
        env.pop("MLFLOW_TRACKING_URI", None)
        rates: dict[str, list[float]] = {"none": [], "all four": []}
        for i in range(args.rounds):
            for name, log_to in (("none", ()), ("all four", BACKENDS)):
                rates[name].append(run(tmp / "tokens", tmp / f"run-{name[:4]}", args.steps, log_to, env))
                print(f"round {i + 1}: {name} {rates[name][-1]:,.0f} tokens/s (load {os.getloadavg()[0]:.1f})",
                      file=sys.stderr)
    base = max(rates["none"])
    rows = [{"--log-to": name, "tokens/s best": max(v), "tokens/s median": statistics.median(v),
             "vs none (best)": max(v) / base, "vs none (median)": statistics.median(v) / statistics.median(rates["none"])}
            for name, v in rates.items()]
    table(f"train-lm with and without trackers (tiny preset, {args.steps} steps, {args.rounds} rounds, load average "
          f"{os.getloadavg()[0]:.1f})", rows)


if __name__ == "__main__":
    main()
