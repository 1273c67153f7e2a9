"""LoRA fine-tuning cost: gentool LoRA vs gentool full fine-tune vs transformers + peft, and lora-merge time.

    python bench/lora.py --device cpu      # small shape, fp32
    python bench/lora.py --device cuda     # the 1.1B (TinyLlama) shape, bf16

Each training configuration runs in its own subprocess so peak memory (CUDA max_memory_allocated, or the process's
peak RSS on CPU) belongs to that configuration alone. Same shape, batch, sequence length and dtype for all three.
Prints a table: trainable fraction, peak memory, tokens/s, and ratios against transformers + peft.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # HF LlamaConfig fields
    "small": {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "max_position_embeddings": 512},
    "1.1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 2048},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def build(impl: str, mode: str, shape: dict, r: int, device: str, dtype):
    """The model with its trainable parameters set up, and the trainable parameters."""
    import torch

    torch.manual_seed(0)
    if impl == "gentool":
        from gentool.config import LMConfig
        from gentool.models.transformer import Transformer

        fields = {k: v for k, v in shape.items()}
        model = Transformer(LMConfig(**fields, tie_word_embeddings=False))
    else:
        import transformers

        cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False, attn_implementation="sdpa")
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to(device=device, dtype=dtype)
    if mode == "lora" and impl == "gentool":
        from gentool.models.lora import LoRAConfig, inject_lora

        inject_lora(model, LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS))
    elif mode == "lora":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                                           task_type="CAUSAL_LM"))
    return model, [p for p in model.parameters() if p.requires_grad]


def one(args) -> dict:
    """Time fwd+bwd+AdamW steps for one (impl, mode) in this process."""
    import torch
    import torch.nn.functional as F

    device, dtype = args.device, (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    shape = SHAPES[args.shape]
    model, params = build(args.impl, args.mode, shape, args.rank, device, dtype)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    fwd = model
    if args.compile and args.impl == "gentool":
        fwd = torch.compile(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq + 1), generator=gen).to(device)
    x, y = ids[:, :-1], ids[:, 1:]

    def step():
        out = fwd(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    return {"impl": args.impl, "mode": args.mode, "params": total, "trainable": trainable,
            "trainable_frac": trainable / total, "peak_bytes": _peak_bytes(device),
            "tokens_per_s": args.batch * args.seq * args.steps / dt}


def merge_time(shape: dict, r: int, dtype_name: str) -> dict:
    """Seconds for `lora-merge` of a random base of this shape with an all-linear rank-r adapter."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from gentool.adapters import merge_checkpoint, write_adapter
    from gentool.models.lora import LoRAConfig

    dtype = getattr(torch, dtype_name)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        cfg = transformers.LlamaConfig(**shape, tie_word_embeddings=False, torch_dtype=dtype_name)
        with torch.device("meta"):
            meta = transformers.LlamaForCausalLM(cfg)
        sd = {k: (torch.randn(v.shape, dtype=dtype) * 0.02) for k, v in meta.state_dict().items()}
        (tmp / "base").mkdir()
        cfg.to_json_file(tmp / "base" / "config.json")
        save_file(sd, str(tmp / "base" / "model.safetensors"), metadata={"format": "pt"})
        lcfg = LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS)
        ad = {}
        for k, v in sd.items():
            if any(k.endswith(f"{t}.weight") for t in TARGETS):
                m = k[:-len(".weight")]
                ad[f"{m}.lora_A.weight"] = torch.randn(r, v.shape[1], dtype=dtype) * 0.01
                ad[f"{m}.lora_B.weight"] = torch.randn(v.shape[0], r, dtype=dtype) * 0.01
        (tmp / "ad").mkdir()
        write_adapter(tmp / "ad", ad, lcfg, base_name="bench")
        n_bytes = (tmp / "base" / "model.safetensors").stat().st_size
        del sd, ad
        t0 = time.perf_counter()
        merge_checkpoint(tmp / "base", [str(tmp / "ad")], tmp / "merged")
        return {"merge_seconds": time.perf_counter() - t0, "base_bytes": n_bytes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default=None, help="small or 1.1b (default: small on CPU, 1.1b on CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("1.1b" if cuda else "small")
    args.batch = args.batch or 4
    args.seq = args.seq or (2048 if cuda else 128)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.compile = cuda if args.compile is None else args.compile
    if args.impl:
        print(json.dumps(one(args)))
        return
    rows = []
    for impl, mode in (("gentool", "lora"), ("gentool", "full"), ("transformers+peft", "lora")):
        cmd = [sys.executable, __file__, "--impl", impl, "--mode", mode, "--device", args.device,
               "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--compile" if args.compile else "--no-compile"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append({"impl": impl, "mode": mode, "error": proc.stderr.strip().splitlines()[-1][:120]})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    ref = next((r for r in rows if r["impl"] == "transformers+peft" and "error" not in r), None)
    dev = args.device
    if cuda:
        import torch

        dev = torch.cuda.get_device_name()
    print(f"# LoRA fine-tune, shape {args.shape}, batch {args.batch}x{args.seq}, rank {args.rank}, "
          f"{'bf16' if cuda else 'fp32'}, compile={args.compile}, device {dev}")
    print("| impl | mode | trainable | peak memory | tokens/s | tokens/s vs peft | memory vs peft |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | {r['mode']} | failed: {r['error']} | | | | |")
            continue
        vs = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
        print(f"| {r['impl']} | {r['mode']} | {100 * r['trainable_frac']:.2f}% | {r['peak_bytes'] / 2**30:.2f} GiB "
              f"| {r['tokens_per_s']:.0f} | {vs} | {mem} |")
    m = merge_time(SHAPES[args.shape], args.rank, "bfloat16" if cuda else "float32")
    print(f"\nlora-merge of a {args.shape} base ({m['base_bytes'] / 2**30:.2f} GiB, rank-{args.rank} all-linear "
          f"adapter, CPU float32 math): {m['merge_seconds']:.2f} s")


if __name__ == "__main__":
    main()
