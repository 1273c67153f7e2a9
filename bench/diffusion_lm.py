"""AR vs masked diffusion (MDLM) vs block diffusion (BD3-LM) of one transformer shape, trained on the same shards for
the same tokens (the same windows in the same order: one --seed), measured side by side.

Table 1, likelihood: validation nats/token on the same non-overlapping windows (AR exact, each window's first token
given the token before it; MDLM and block models their NELBO, an upper bound, --eval-samples draws per window, with
the standard error of the mean), bits per byte, the ratio to AR, training FLOPs and tokens/s.
Table 2, sampling: for each diffusion model and sampler at a budget of 64/128/256 network calls for a 127-token
sample after an end-of-text token (block models: budget / blocks steps per block), the calls made (NFE, per
token), generative perplexity (the AR model of table 1 as judge) and the samples' mean unigram entropy (collapse
shows as low entropy), tokens/s. The AR model's own samples (temperature 1, 127 calls) are the reference row.
Then, per model: the fewest calls per token at which some sampler reaches the generative perplexity of the
ancestral sampler at the largest budget.

    python bench/diffusion_lm.py --device cpu                    # mini shape, seq 128, the bundled corpus
    python bench/diffusion_lm.py --device cuda --preset small --steps 3000 --blocks 16,8,4,2 --samples 32
"""

import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import device_name, parser, sync, table

from gentool import console
from gentool.data.shards import open_shards
from gentool.lm.diffusion.block import block_nelbo_per_sequence, train_block_lm
from gentool.lm.diffusion.masked import MaskSchedule, estimate_nelbo, nelbo_per_sequence, train_masked_lm
from gentool.lm.diffusion.samplers import denoise, generate_blocks, parse_sampler
from gentool.lm.train import LMRunOptions, run_train_lm
from gentool.models.checkpoint import load_lm
from gentool.tokenize import encode_corpus, train_tokenizer


def ar_nll(model, windows, prev, batch):
    """Exact NLL (nats/token) of each window (N, L) given the token before it (N,): (N,) values."""
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.cat([prev[i:i + batch, None], windows[i:i + batch]], 1)
            logits = model(x[:, :-1]).float()
            out.append(F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1).double())
    return torch.cat(out)


@torch.no_grad()
def ar_sample(model, n, length, eos, generator):
    """Ancestral AR sampling at temperature 1 with the static KV cache: (n, 1 + length) tokens, one call per token."""
    seq = torch.full((n, 1), eos, device=model.lm_head.weight.device)
    model.setup_cache(n, length + 1)
    try:
        logits = model(seq, input_pos=torch.tensor([0], device=seq.device))[:, -1]
        for i in range(length):
            nxt = torch.multinomial(F.softmax(logits.double(), -1), 1, generator=generator)
            seq = torch.cat([seq, nxt], 1)
            if i < length - 1:
                logits = model(nxt, input_pos=torch.tensor([i + 1], device=seq.device))[:, -1]
    finally:
        model.reset_cache()
    return seq


def judge(ar, seqs):
    """Generative perplexity of samples (n, 1 + length) under the AR model, and their mean unigram entropy."""
    with torch.no_grad():
        logits = ar(seqs[:, :-1]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), seqs[:, 1:]).item()
    ents = []
    for row in seqs[:, 1:]:
        p = torch.bincount(row).double()
        p = p[p > 0] / p.sum()
        ents.append(-(p * p.log()).sum().item())
    return math.exp(nll), sum(ents) / len(ents)


def main():
    p = parser(__doc__)
    p.add_argument("--preset", default="mini")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--blocks", default="16,8,4")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--samples", type=int, default=16, help="sequences generated per sampler and budget")
    p.add_argument("--nfe", default="64,128,256")
    p.add_argument("--samplers", default="ancestral,confidence,margin,remdm")
    p.add_argument("--work", type=Path, default=None, help="keep tokenizer, shards and runs here (default: tmp)")
    p.add_argument("--reuse", default="", help="comma-separated runs (AR, MDLM, block-B) to take from --work "
                                               "instead of training them again (same recipe)")
    args = p.parse_args()
    dev, L = args.device, args.seq_len
    console.configure(quiet=True)
    tmp = args.work or Path(tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    if not (tmp / "tokens").exists():
        train_tokenizer(["builtin:shakespeare"], tmp / "tok", vocab_size=args.vocab)
        encode_corpus(["builtin:shakespeare"], tmp / "tok", tmp / "tokens")
    blocks = [int(b) for b in args.blocks.split(",") if b]
    common = dict(tokens_dir=tmp / "tokens", preset=args.preset, seq_len=L, micro_batch=args.micro_batch,
                  lr=args.lr, device=dev, steps=args.steps, eval_every=args.steps, force=True)
    runs = {}
    t_all = time.time()
    for name, train in [("AR", lambda o: run_train_lm(o)), ("MDLM", train_masked_lm)] + \
            [(f"block-{b}", lambda o, b=b: train_block_lm(o, b)) for b in blocks]:
        if name in args.reuse.split(","):
            m = json.loads((tmp / name / "manifest.json").read_text())
            assert m["config"]["train"]["steps"] == args.steps and m["config"]["seq_len"] == L, name
            runs[name] = {**m["metrics"], "seconds": m["metrics"]["wall_seconds"]}
            print(f"reused {name}: {runs[name]['tokens']:,} tokens, trained in {runs[name]['seconds']:.0f} s")
            continue
        t0 = time.time()
        runs[name] = train(LMRunOptions(out=tmp / name, **common))
        runs[name]["seconds"] = time.time() - t0
        print(f"trained {name}: {runs[name]['tokens']:,} tokens in {runs[name]['seconds']:.0f} s", flush=True)
    train_s = time.time() - t_all

    val = open_shards(tmp / "tokens", "val")
    n_win = min(args.eval_tokens, len(val) - 1) // L
    ids = torch.from_numpy(val.tokens(0, n_win * L + 1)).to(dev)
    prev, windows = ids[:-1][::L][:n_win], ids[1:].view(n_win, L)
    bpt = val.bytes / len(val)
    ar = load_lm(tmp / "AR", device=dev).model
    eos = open_shards(tmp / "tokens", "train").eos_id
    models, rows = {}, []
    for name, run in runs.items():
        if name == "AR":
            v = ar_nll(ar, windows, prev, 32)
            mean, err = v.mean().item(), (v.std() / math.sqrt(len(v))).item()
            kind = "exact NLL"
        else:
            m = load_lm(tmp / name, device=dev, causal=False, kind="diffusion-checkpoint").model
            b = int(name.split("-")[1]) if name.startswith("block") else None
            per_seq = nelbo_per_sequence if b is None else \
                (lambda *a, b=b, **k: block_nelbo_per_sequence(*a, block_size=b, **k))
            mean, err, _ = estimate_nelbo(m, windows, m.config.vocab_size - 1, MaskSchedule(),
                                          samples=args.eval_samples, batch_size=32,
                                          generator=torch.Generator(device=dev).manual_seed(0), per_sequence=per_seq)
            models[name] = (m, b)
            kind = "NELBO bound"
        rows.append({"model": name, "val nats/token": f"{mean:.3f} ± {err:.3f}", "kind": kind,
                     "bits/byte": mean / math.log(2) / bpt, "_nll": mean,
                     "train tokens": run["tokens"], "train FLOPs": f"{run['flops']:.3g}",
                     "train tokens/s": run["tokens_per_s"]})
    ar_ref = rows[0]["_nll"]
    for r in rows:
        r["vs AR"] = f"{r.pop('_nll') / ar_ref:.3f}x"
    table(f"AR vs diffusion LMs: {args.preset} shape, seq {L}, {runs['AR']['tokens']:,} training tokens each, "
          f"{n_win * L:,} val tokens, {device_name(dev)} (training {train_s:.0f} s)", rows)

    new = L - 1
    g = torch.Generator(device=dev).manual_seed(1)
    t0 = time.perf_counter()
    seqs = ar_sample(ar, args.samples, new, eos, g)
    sync(dev)
    dt = time.perf_counter() - t0
    gp, ent = judge(ar, seqs)
    srows = [{"model": "AR", "sampler": "ancestral", "budget": new, "NFE": new, "NFE/token": 1.0,
              "gen. PPL (AR judge)": gp, "entropy": ent, "tokens/s": args.samples * new / dt}]
    best = []
    for name, (m, b) in models.items():
        mask = m.config.vocab_size - 1
        mine = []
        for budget in [int(x) for x in args.nfe.split(",")]:
            for spec in args.samplers.split(","):
                sampler = parse_sampler(spec)
                g = torch.Generator(device=dev).manual_seed(1)
                start = torch.full((args.samples, 1), eos, device=dev)
                t0 = time.perf_counter()
                if b is None:
                    z = torch.cat([start, torch.full((args.samples, new), mask, device=dev)], 1)
                    res = denoise(lambda c: m(c), z, mask, steps=budget, sampler=sampler, generator=g)
                else:
                    res = generate_blocks(m, start, new, mask, b, context=L, steps=max(1, budget * b // L),
                                          sampler=sampler, generator=g)
                sync(dev)
                dt = time.perf_counter() - t0
                gp, ent = judge(ar, res.tokens)
                row = {"model": name, "sampler": str(sampler), "budget": budget, "NFE": res.nfe,
                       "NFE/token": res.nfe / new, "gen. PPL (AR judge)": gp, "entropy": ent,
                       "tokens/s": args.samples * new / dt}
                srows.append(row)
                mine.append(row)
        top = max((r for r in mine if r["sampler"] == "ancestral"), key=lambda r: r["budget"])
        ok = [r for r in mine if r["gen. PPL (AR judge)"] <= top["gen. PPL (AR judge)"]]
        fastest = min(ok, key=lambda r: r["NFE"])
        best.append({"model": name, "target gen. PPL (ancestral, largest budget)": top["gen. PPL (AR judge)"],
                     "its NFE/token": top["NFE/token"], "fewest NFE/token reaching it": fastest["NFE/token"],
                     "by": f"{fastest['sampler']} @ {fastest['budget']}", "entropy there": fastest["entropy"]})
    table(f"sampling {args.samples} x {new} tokens after EOS, {device_name(dev)}", srows)
    table("calls per token at equal generative perplexity", best)
    print(f"\ntotal {time.time() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
