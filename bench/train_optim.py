"""Training step cost of Muon vs AdamW on the same model and batch: what the orthogonalisation costs.

    python bench/train_optim.py --device cpu    # small shape (d128, 4 layers), vocab 2048, seq 128, batch 16, fp32
    python bench/train_optim.py --device cuda   # GPT-2-small shape (d768, 12 layers), seq 1024, batch 16, bf16
                                                # autocast, compiled model, fused AdamW

Rows: one full step (forward, backward, clip, optimizer step) with --optimizer adamw / muon (Newton-Schulz) /
normuon (Polar Express + NorMuon), and the optimizer step alone. Repeats are interleaved across the rows (a shared
machine's load falls on all of them alike); best and median of --repeats are reported. "NS GFLOP/step" is the
orthogonalisation's matrix-multiply work, 5 x (4m^2n + 2m^3) per m x n matrix (m <= n), against the model's
training FLOPs per step (LMConfig.train_flops_per_token x tokens).

    python bench/train_optim.py --grid SHARDS [SHARDS ...] --out runs/optim-grid   # training quality, CPU

--grid: does `--optimizer muon` at its defaults beat AdamW at the better of --lr 1e-3 and 3e-3? For each token-shard
directory (`gentool tokenize encode`; each with its own tokenizer) and each --shapes entry (LAYERSxWIDTH, 4 heads,
2 key/value heads), `gentool train-lm` runs --seeds seeds of each arm one after another (--steps steps of
--micro-batch x --seq-len tokens, default 200 of 8 x 64, OMP_NUM_THREADS=1, --device cpu; one evaluation, at the
end, on 16384 val tokens); finished runs under --out are reused. Per cell: final val loss mean +- std per arm,
and the one-sided Welch p (`gentool compare`) that Muon's mean is lower than each AdamW arm's. --muon-args
passes extra train-lm flags to the Muon arm (e.g. "--embed-lr 3e-2").
"""

import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import device_name, parser, sync, table

from gentool.config import config_from_preset
from gentool.models.transformer import Transformer
from gentool.train.optim import build_optimizer, muon_split


def ns_flops(model: torch.nn.Module, steps: int = 5) -> float:
    total = 0.0
    for p in muon_split(model)[0]:
        m, n = sorted(p.shape)
        total += steps * (4 * m * m * n + 2 * m ** 3)
    return total


ARMS = {"muon": ["--optimizer", "muon"], "adamw-1e-3": ["--lr", "1e-3"], "adamw-3e-3": ["--lr", "3e-3"]}


def grid(args) -> None:
    from gentool.compare import compare

    out = Path(args.out)
    arms = {**ARMS, "muon": ARMS["muon"] + shlex.split(args.muon_args)}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    rows = []
    for shards in args.grid:
        for shape in args.shapes.split(","):
            layers, width = (int(v) for v in shape.lower().split("x"))
            cell = f"{Path(shards).name} {layers}x{width}"
            dirs = {}
            for arm, flags in arms.items():
                dirs[arm] = [out / f"{Path(shards).name}-{layers}x{width}-{arm}-s{seed}" for seed in range(args.seeds)]
                for seed, d in enumerate(dirs[arm]):
                    if d.is_dir():
                        continue
                    cmd = [sys.executable, "-m", "gentool", "train-lm", str(shards), "-o", str(d), "--force",
                           "--num-layers", str(layers), "--hidden-size", str(width), "--num-heads", "4",
                           "--num-kv-heads", "2", "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                           "--micro-batch", str(args.micro_batch), "--eval-every", str(args.steps), "--eval-tokens",
                           "16384", "--device", "cpu",
                           "--seed", str(seed), *flags]
                    print(f"# {cell} {arm} seed {seed}", file=sys.stderr, flush=True)
                    subprocess.run(cmd, env=env, check=True, capture_output=True)
            res = compare([str(d) for d in dirs["muon"]] + [str(d) for arm in ARMS if arm != "muon"
                                                           for d in dirs[arm]], alpha=0.05)
            finals = {arm: g["final_val_loss"] for arm, g in zip(arms, res["groups"])}
            tests = dict(zip(list(arms)[1:], res["tests"]))
            best = min(tests, key=lambda a: finals[a]["mean"])
            row = {"corpus, shape": cell}
            for arm in arms:
                row[arm] = f"{finals[arm]['mean']:.3f} +- {finals[arm]['std'] or 0:.3f}"
            row["better AdamW"] = best
            row["muon / it"] = finals["muon"]["mean"] / finals[best]["mean"]
            for arm in tests:
                row[f"p vs {arm}"] = tests[arm]["p"]
            rows.append(row)
    table(f"Muon (train-lm defaults{' ' + args.muon_args if args.muon_args else ''}) vs AdamW: final val loss, "
          f"mean +- std over {args.seeds} seeds, {args.steps} steps of {args.micro_batch} x {args.seq_len} tokens, "
          f"one-sided Welch p that Muon is lower", rows)


def main():
    p = parser(__doc__)
    p.add_argument("--grid", nargs="+", default=None, help="token-shard directories: run the quality grid")
    p.add_argument("--shapes", default="4x96,2x128", help="--grid: LAYERSxWIDTH, comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--out", default="runs/optim-grid", help="--grid: run directories (finished ones are reused)")
    p.add_argument("--muon-args", default="", help="--grid: extra train-lm flags of the Muon arm")
    p.add_argument("--shape", default=None, help="preset (default: small on CPU, gpt2-small on CUDA)")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.grid:
        args.steps = args.steps or 200
        return grid(args)
    dev = args.device
    gpu = dev.startswith("cuda")
    shape = args.shape or ("gpt2-small" if gpu else "small")
    cfg = config_from_preset(shape, **({"vocab_size": args.vocab or 2048} if not gpu or args.vocab else {}),
                             min_context=args.seq)
    seq, batch = args.seq or (1024 if gpu else 128), args.batch or 16
    steps = args.steps or (10 if gpu else 3)
    torch.manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    runs = {}
    for name in ("adamw", "muon", "normuon"):
        with torch.device(dev):
            model = Transformer(cfg)
        model.init_weights(0)
        opt = build_optimizer(model, lr=1e-4, weight_decay=0.1, device=dev, optimizer=name, muon_lr=1e-3)
        fwd = torch.compile(model) if gpu else model
        runs[name] = (model, fwd, opt)

    def step(name, times):
        model, fwd, opt = runs[name]
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = F.cross_entropy(fwd(x[:, :-1]).float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        sync(dev)
        t = time.perf_counter()
        opt.step()
        sync(dev)
        times.append(time.perf_counter() - t)
        opt.zero_grad(set_to_none=True)

    for name in runs:  # warm up (compilation, allocator)
        for _ in range(2):
            step(name, [])
    full = {n: [] for n in runs}
    optim = {n: [] for n in runs}
    for _ in range(args.repeats):
        for name in runs:
            ot = []
            sync(dev)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(name, ot)
            sync(dev)
            full[name].append((time.perf_counter() - t0) / steps)
            optim[name].append(sum(ot) / steps)
    model_flops = cfg.train_flops_per_token(seq) * batch * seq
    ns = ns_flops(runs["muon"][0])
    rows, base = [], statistics.median(full["adamw"])
    for name in runs:
        best, med = min(full[name]), statistics.median(full[name])
        rows.append({"optimizer": name, "tokens/s (best)": batch * seq / best, "tokens/s (median)": batch * seq / med,
                     "step ms (median)": 1e3 * med, "optimizer ms (median)": 1e3 * statistics.median(optim[name]),
                     "optimizer share": statistics.median(optim[name]) / med,
                     "step time vs adamw": med / base})
    table(f"Muon vs AdamW step, {device_name(dev)}: {shape} (d{cfg.hidden_size} x{cfg.num_hidden_layers}), vocab "
          f"{cfg.vocab_size}, batch {batch} x seq {seq}, {'bf16 autocast, compiled' if gpu else 'float32'}; "
          f"{args.repeats} interleaved repeats of {steps} steps; NS {ns / 1e9:.2f} GFLOP/step = "
          f"{100 * ns / model_flops:.1f}% of the model's {model_flops / 1e9:.1f} GFLOP/step", rows)


if __name__ == "__main__":
    main()
