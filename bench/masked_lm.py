"""AR vs masked-diffusion LM of the same shape on the same shards: validation nats/token at equal tokens seen and at
equal FLOPs (AR exact, diffusion an upper bound), and masked-diffusion sampling speed and generative perplexity
(judged by the AR model, with the samples' unigram entropy) against the number of steps, with and without caching.

    python bench/masked_lm.py --device cpu                 # small shape on the bundled corpus
    python bench/masked_lm.py --device cuda --preset base --steps 3000 --seq-len 256   # the GPU run
"""

import math
import tempfile
import time
from pathlib import Path

import torch

from _common import device_name, parser, table

from gentool.evaluation.windows import perplexity
from gentool.lm.masked import MaskSchedule, sample, score_nelbo, train_masked_lm
from gentool.lm.train import LMRunOptions, run_train_lm
from gentool.models.checkpoint import load_lm
from gentool.tokenize import encode_corpus, train_tokenizer
from gentool.data.shards import open_shards


def main():
    p = parser(__doc__)
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--samples", type=int, default=4)
    args = p.parse_args()
    dev = args.device
    tmp = Path(tempfile.mkdtemp())
    train_tokenizer(["builtin:shakespeare"], tmp / "tok", vocab_size=2048)
    encode_corpus(["builtin:shakespeare"], tmp / "tok", tmp / "tokens")
    common = dict(tokens_dir=tmp / "tokens", preset=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch,
                  lr=2e-3, device=dev, eval_every=args.steps)
    t0 = time.time()
    ar = run_train_lm(LMRunOptions(out=tmp / "ar", steps=args.steps, **common))
    mdlm = train_masked_lm(LMRunOptions(out=tmp / "mdlm", steps=args.steps, **common))
    mdlm_flops = train_masked_lm(LMRunOptions(out=tmp / "mdlm-flops", flops=ar["flops"], **common))
    mdlm_2x = train_masked_lm(LMRunOptions(out=tmp / "mdlm-2x", steps=2 * args.steps, **common))
    train_s = time.time() - t0
    val = torch.from_numpy(open_shards(tmp / "tokens", "val").tokens(0, 32768))
    arm = load_lm(tmp / "ar", device=dev)
    ar_nll = perplexity(arm.model, val, window=args.seq_len, stride=args.seq_len // 2, device=dev).nll
    rows = [{"model": "AR (exact)", "tokens seen": ar["tokens"], "train FLOPs": ar["flops"], "val nats/token": ar_nll,
             "vs AR": 0.0}]
    for name, run, s in (("masked diffusion, equal tokens", mdlm, "mdlm"), ("masked diffusion, equal FLOPs", mdlm_flops,
                                                                            "mdlm-flops"),
                         ("masked diffusion, 2x tokens", mdlm_2x, "mdlm-2x")):
        m = load_lm(tmp / s, device=dev, causal=False, kind="diffusion-checkpoint")
        b = score_nelbo(m.model, val, seq_len=args.seq_len, mask_id=m.config.vocab_size - 1, schedule="loglinear",
                        samples=4, steps=None, batch_size=16, device=dev)
        rows.append({"model": name + " (bound)", "tokens seen": run["tokens"], "train FLOPs": run["flops"],
                     "val nats/token": b["nll"], "vs AR": 100 * (b["nll"] / ar_nll - 1)})
    for r in rows:
        r["vs AR"] = f"{r['vs AR']:+.1f}%"
    table(f"AR vs masked diffusion, {args.preset} shape, seq {args.seq_len}, {device_name(dev)} "
          f"(training {train_s:.0f} s)", rows)

    md = load_lm(tmp / "mdlm-2x", device=dev, causal=False, kind="diffusion-checkpoint")
    mask = md.config.vocab_size - 1
    srows = []
    for steps in (8, 16, 32, 64, 128, 256):
        for cache in (False, True):
            z = torch.full((args.samples, args.seq_len), mask, device=dev)
            g = torch.Generator(device=dev).manual_seed(0)
            t0 = time.time()
            res = sample(md.model, z, mask, MaskSchedule(), steps=steps, cache=cache, generator=g)
            dt = time.time() - t0
            toks = res.tokens.cpu()
            gen = perplexity(arm.model, toks.flatten(), window=args.seq_len, stride=args.seq_len // 2, device=dev)
            counts = torch.bincount(toks.flatten(), minlength=mask).double()
            pr = counts[counts > 0] / counts.sum()
            srows.append({"steps": steps, "cache": cache, "NFE": res.nfe, "tokens/s": toks.numel() / dt,
                          "gen. perplexity (AR judge)": math.exp(gen.nll),
                          "unigram entropy (nats)": float(-(pr * pr.log()).sum())})
    table(f"masked-diffusion sampling, {args.samples} x {args.seq_len} tokens, {device_name(dev)}", srows)


if __name__ == "__main__":
    main()
