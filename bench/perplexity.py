"""Scoring throughput: gentool perplexity's scorer vs a plain transformers forward + loss, same weights and batch.

    python bench/perplexity.py --device cuda   # 1.1B shape (tinyllama-1.1b preset), batch 8 x 2048, bf16
    python bench/perplexity.py --device cpu    # a small shape, float32

Rows: gentool eager, gentool compiled (`gentool perplexity --compile`; default on CUDA, `--no-compile` skips it),
transformers.LlamaForCausalLM (sdpa) forward + float32 cross-entropy. FLOPs per token are the forward third of
LMConfig.train_flops_per_token ("6N+6LTd", N = non-embedding parameters + output head); MFU is against an 8192^3
bf16 matmul measured in the same run (1024^3 float32 on CPU). The mean NLL of both scorers on the same batch is
printed as a correctness check.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from _common import device_name, matmul_peak, parser, sync, table

from gentool.config import config_from_preset
from gentool.evaluation.windows import nll_fn, token_nlls
from gentool.models.transformer import Transformer


def hf_model(cfg, state, dev, dtype):
    import transformers

    hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                       if k not in ("architectures", "dtype", "torch_dtype")})
    with torch.device(dev):
        try:
            hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa", dtype=dtype)
        except TypeError:  # transformers v4 spells it torch_dtype
            hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa", torch_dtype=dtype)
    hf.load_state_dict(state, strict=False)
    return hf.eval()


def best_of(fns: dict, device: str, rounds: int, warmup: int = 2) -> dict:
    """Seconds per call of each function: the fastest of `rounds` calls, taken in interleaved rounds so that a
    shared machine's load hits every scorer alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main():
    p = parser(__doc__)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time the compiled scorer (default: on CUDA)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    dtype = torch.bfloat16 if gpu else torch.float32
    if gpu:
        cfg, batch, seq, reps = config_from_preset("tinyllama-1.1b"), args.batch or 8, args.seq or 2048, args.reps or 5
    else:
        cfg = config_from_preset("small", vocab_size=4096, max_position_embeddings=256)
        batch, seq, reps = args.batch or 4, args.seq or 256, args.reps or 5
    with torch.device(dev):
        model = Transformer(cfg)
    with torch.no_grad():
        for name, q in model.named_parameters():
            q.fill_(1.0) if name.endswith("norm.weight") else q.normal_(0, 0.02)
    model = model.to(dtype).eval()
    peak = matmul_peak(dev)
    # window = seq, stride = seq - 1: exactly `batch` windows of seq tokens, each scoring seq - 1 tokens
    ids = torch.randint(0, cfg.vocab_size, (batch * (seq - 1) + 1,))
    n_scored = len(ids) - 1
    flops_tok = cfg.train_flops_per_token(seq) / 3  # forward only
    rows, fns = [], {}

    def ours(nll):
        return lambda: token_nlls(model, ids, window=seq, stride=seq - 1, batch_size=batch, device=dev, dtype=dtype,
                                  nll=nll)

    fns["gentool (eager)"] = ours(nll_fn(model))
    if args.compile if args.compile is not None else gpu:
        fns["gentool (compiled)"] = ours(nll_fn(model, compile=True))
    try:
        hf = hf_model(cfg, model.state_dict(), dev, dtype)
        x = ids[:-1].view(batch, seq - 1)
        x = torch.cat([x, ids[seq - 1::seq - 1].view(batch, 1)], 1).to(dev)  # the same windows, one row each

        def ref():
            logits = hf(x[:, :-1]).logits
            return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())

        fns["transformers forward + loss"] = ref
    except ImportError:
        ref = None
    with torch.no_grad():
        nll_means = {name: float(fn().mean()) for name, fn in fns.items()}  # the same windows for every scorer
        for name, sec in best_of(fns, dev, reps).items():
            tps = n_scored / sec
            rows.append({"scorer": name, "tokens/s": tps, "TFLOP/s": tps * flops_tok / 1e12,
                         "MFU": tps * flops_tok / peak})
    if ref is not None:
        for r in rows:
            r["vs transformers"] = r["tokens/s"] / rows[-1]["tokens/s"]
    table(f"perplexity throughput, {device_name(dev)}, d{cfg.hidden_size} x{cfg.num_hidden_layers} (GQA "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}), batch {batch} x {seq}, "
          f"{str(dtype).replace('torch.', '')}; MFU of the measured matmul peak {peak / 1e12:.3g} TFLOP/s", rows)
    base = nll_means["gentool (eager)"]
    print("\nmean NLL on the same windows: " + ", ".join(
        f"{k} {v:.6f} (rel. diff {abs(v - base) / base:.1e})" for k, v in nll_means.items()))


if __name__ == "__main__":
    main()
