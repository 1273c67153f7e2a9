"""Training throughput: gentool's Transformer vs transformers.LlamaForCausalLM, same shape/batch, and MFU.

    python bench/train_lm.py --device cuda   # GPT-2-small shape (d768, 12 layers, seq 1024, vocab 50304), bf16
    python bench/train_lm.py --device cpu    # a small shape
"""

import torch
import torch.nn.functional as F

from _common import device_name, matmul_peak, parser, table, timed

from gentool.config import config_from_preset
from gentool.models.transformer import Transformer
from gentool.train.optim import build_optimizer


def step_fn(model, opt, x, hf: bool, amp):
    def run():
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x[:, :-1]).logits if hf else model(x[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def main():
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    if gpu:
        cfg = config_from_preset("gpt2-small")
        seq, batch, reps = 1024, args.batch or 16, args.steps or 10
    else:
        cfg = config_from_preset("small", vocab_size=4096)
        seq, batch, reps = 256, args.batch or 8, args.steps or 6
    torch.manual_seed(0)
    peak = matmul_peak(dev)
    flops_tok = cfg.train_flops_per_token(seq)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)
    rows = []
    ours = Transformer(cfg).to(dev)
    ours.init_weights(0)
    variants = [("gentool (compiled)" if gpu else "gentool", torch.compile(ours) if gpu else ours, False)]
    try:
        import transformers

        hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                           if k not in ("architectures", "dtype", "torch_dtype")})
        with torch.device(dev):
            hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa")
        variants.append(("transformers LlamaForCausalLM", hf, True))
    except ImportError:
        print("transformers not installed: reference row skipped")
    results = {}
    for name, model, is_hf in variants:
        base = model._orig_mod if hasattr(model, "_orig_mod") else model
        opt = build_optimizer(base, lr=1e-4, weight_decay=0.1, device=dev)
        sec = timed(step_fn(model, opt, x, is_hf, gpu), dev, warmup=3 if gpu else 2, reps=reps)
        tps = batch * seq / sec
        results[name] = tps
        rows.append({"model": name, "tokens/s": tps, "TFLOP/s": tps * flops_tok / 1e12,
                     "MFU (989 TF)" if gpu else "of measured peak": tps * flops_tok / (989e12 if gpu else peak),
                     "of measured matmul": tps * flops_tok / peak})
        del opt
    ref = rows[-1]["tokens/s"] if len(rows) > 1 else None
    for r in rows:
        r["vs transformers"] = r["tokens/s"] / ref if ref else float("nan")
    table(f"train-lm throughput, {device_name(dev)}: d{cfg.hidden_size} x{cfg.num_hidden_layers}, seq {seq}, "
          f"batch {batch}, vocab {cfg.vocab_size}, {'bf16 autocast' if gpu else 'fp32'}; "
          f"measured matmul peak {peak / 1e12:.1f} TFLOP/s", rows)


if __name__ == "__main__":
    main()
