"""Training throughput: gentool's train-lm loop and model vs transformers.LlamaForCausalLM, same shape and batch.

    python bench/train_lm.py --device cuda   # GPT-2-small shape (d768, 12 layers, 12 heads, seq 1024, vocab 50304),
                                             # bf16 autocast, torch.compile, fused AdamW; + the measured bf16 peak
    python bench/train_lm.py --device cpu    # a small shape in float32

Rows:
  gentool train-lm loop  the real loop (gentool.train.train + LMTask on memory-mapped shards: data, schedule,
                         clipping, accumulation, NaN checks, metrics), steady state after compilation
  gentool model, bare    one forward/backward/clip/AdamW step of the gentool Transformer (compiled on CUDA)
  transformers ...       the same step on LlamaForCausalLM of the same shape (SDPA attention, eager)
MFU = model FLOPs (LMConfig.train_flops_per_token: 6N + 6Vd + 6LTd) x tokens/s / peak, against the datasheet dense
bf16 peak (989 TFLOP/s on H100 SXM) and against the matmul peak measured in this run (8192^3 bf16 on CUDA).
"""

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import device_name, matmul_peak, parser, table, timed

from gentool.config import config_from_preset
from gentool.models.transformer import Transformer
from gentool.train.optim import build_optimizer, device_peak_flops


def make_shards(out: Path, vocab: int, n: int) -> Path:
    from gentool.artifacts import create_artifact
    from gentool.data.shards import dtype_for_vocab, write_shard

    dtype = dtype_for_vocab(vocab)
    with create_artifact(out, "token-shards") as art:
        write_shard(art.dir / "train-00000.safetensors", np.random.default_rng(0).integers(0, vocab, n).astype(dtype))
        art.contents.update(tokenizer_id="sha256:" + "0" * 64, vocab_size=vocab, eos_id=2, dtype=dtype.name,
                            splits={"train": {"shards": ["train-00000.safetensors"], "documents": 1, "tokens": n,
                                              "bytes": 4 * n}})
    return out


def loop_tokens_per_s(cfg, dev: str, seq: int, batch: int, steps: int, compile_: bool) -> float:
    """Steady-state tokens/s of gentool.train.train on an LMTask (the first logged window, which holds the
    compilation, is left out by TrainResult)."""
    from gentool.data.shards import open_shards
    from gentool.lm.train import LMTask
    from gentool.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        shards = open_shards(make_shards(Path(tmp) / "tokens", cfg.vocab_size, 2_000_000), "train")
        with torch.device(dev):
            model = Transformer(cfg)
        model.init_weights(0)
        task = LMTask(shards, None, cfg, seq_len=seq, micro_batch=batch, seed=0, world=1, device=dev, eval_tokens=0)
        tcfg = TrainConfig(steps=steps, lr=1e-4, warmup=0, log_every=max(1, steps // 3), device=dev,
                           compile=compile_)
        result = train(model, task, tcfg, Path(tmp) / "run")
    return result.tokens_per_s


def step_fn(model, opt, x, hf: bool, amp: bool):
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
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row")
    p.add_argument("--hf-compile", action="store_true", help="also time transformers under torch.compile")
    args = p.parse_args()
    dev = args.device
    gpu = dev.startswith("cuda")
    if gpu:
        cfg = config_from_preset("gpt2-small")
        seq, batch, reps = 1024, args.batch or 16, args.steps or 20
    else:
        cfg = config_from_preset("small", vocab_size=4096)
        seq, batch, reps = 256, args.batch or 8, args.steps or 6
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(dev)
    sheet = device_peak_flops(dev) if gpu else None
    flops_tok = cfg.train_flops_per_token(seq)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=dev)

    results = [("gentool train-lm loop" + (" (compiled)" if gpu else ""),
                loop_tokens_per_s(cfg, dev, seq, batch, 3 * reps, gpu))]
    ours = Transformer(cfg).to(dev)
    ours.init_weights(0)
    variants = [("gentool model, bare step" + (" (compiled)" if gpu else ""), torch.compile(ours) if gpu else ours,
                 ours, False)]
    try:
        import transformers

        hcfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                           if k not in ("architectures", "dtype", "torch_dtype")})
        with torch.device(dev):
            hf = transformers.LlamaForCausalLM._from_config(hcfg, attn_implementation="sdpa")
        variants.append(("transformers LlamaForCausalLM (sdpa, eager)", hf, hf, True))
        if args.hf_compile:
            variants.append(("transformers LlamaForCausalLM (compiled)", torch.compile(hf), hf, True))
    except ImportError:
        print("transformers not installed: reference row skipped")
    for name, model, base, is_hf in variants:
        opt = build_optimizer(base, lr=1e-4, weight_decay=0.1, device=dev)
        sec = timed(step_fn(model, opt, x, is_hf, gpu), dev, warmup=3 if gpu else 1, reps=reps)
        results.append((name, batch * seq / sec))
        del opt
    ref = next((t for n, t in results if n.startswith("transformers") and "eager" in n), None)
    rows = []
    for name, tps in results:
        row = {"row": name, "tokens/s": tps, "TFLOP/s" if gpu else "GFLOP/s": tps * flops_tok / (1e12 if gpu else 1e9)}
        if sheet:
            row[f"MFU (of {sheet / 1e12:.0f} TF)"] = tps * flops_tok / sheet
        row["of measured matmul peak"] = tps * flops_tok / peak
        row["vs transformers"] = tps / ref if ref else float("nan")
        rows.append(row)
    table(f"train-lm throughput, {device_name(dev)}: d{cfg.hidden_size} x{cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, seq {seq}, batch {batch}, vocab {cfg.vocab_size}, "
          f"{'bf16 autocast' if gpu else 'float32'}; {flops_tok / 1e6:.1f} MFLOP/token; measured matmul peak "
          + (f"{peak / 1e12:.1f} TFLOP/s (8192^3 bf16)" if gpu else f"{peak / 1e9:.1f} GFLOP/s (1024^3 fp32)"), rows)


if __name__ == "__main__":
    main()
