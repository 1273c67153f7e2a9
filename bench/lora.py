"""LoRA benchmarks (issues 8 and 19), each part printing a table of ratios measured side by side in one run.

    python bench/lora.py --part throughput   # gentool LoRA vs transformers + peft (and full fine-tune), interleaved
    python bench/lora.py --part qlora        # QLoRA on an NF4 base vs LoRA on the bf16 base: loss, memory, tokens/s
    python bench/lora.py --part merge        # two-task merge methods (tragedies vs comedies adapters): per-task NLL
    python bench/lora.py --part extract      # lora-extract of a full fine-tune at R = 4, 16, 64: KL vs the fine-tune
    python bench/lora.py                     # all four (about 15 minutes on 2 shared CPU cores)
    python bench/lora.py --device cuda --part throughput   # the 1.1B (TinyLlama) shape, bf16

Every training configuration runs in its own subprocess so its peak memory (CUDA max_memory_allocated, or on CPU
the process's peak RSS above its own baseline after imports, the peak reset through /proc/self/clear_refs once the
model is loaded) belongs to that configuration alone. Same shape, data, batches, steps and dtype within a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

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


# --- QLoRA vs LoRA -------------------------------------------------------------------------------------------------

# weights dominate: 8 layers of 1024 x 2816 (103M linear weights) against a 400-token vocabulary and 64-token steps
QSHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
          "num_key_value_heads": 16, "max_position_embeddings": 128}
SMALL = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "max_position_embeddings": 128}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _gentool(*args: str) -> dict:
    """Run a gentool command in a subprocess; its --json result."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    proc = subprocess.run([sys.executable, "-m", "gentool", "-q", *map(str, args), "--json"], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"gentool {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _data(work: Path) -> Path:
    """Tokenizer (BPE 400) of the bundled Shakespeare, and train/val shards of all of it, of the tragedies and of
    the comedies."""
    if not (work / "com" / "manifest.json").is_file():
        _gentool("tokenize", "train", "builtin:shakespeare", "-o", work / "tok", "--vocab-size", "400")
        for name, src in (("all", "builtin:shakespeare"), ("tra", "builtin:shakespeare/tragedies"),
                          ("com", "builtin:shakespeare/comedies")):
            _gentool("tokenize", "encode", src, "--tokenizer", work / "tok", "-o", work / name)
    return work


def _dims(shape: dict) -> list[str]:
    flags = {"hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size",
             "num_hidden_layers": "--num-layers", "num_attention_heads": "--num-heads",
             "num_key_value_heads": "--num-kv-heads"}
    return [x for k, v in shape.items() if k in flags for x in (flags[k], str(v))]


def _warm_up() -> None:
    """One LoRA step of a tiny model with bf16 and NF4 layers, so the runtime's one-time costs (thread pools,
    oneDNN kernels, autograd engine) are paid before the baseline is taken, alike in every child."""
    import gc

    import torch

    from gentool.adapters import prepare_lora
    from gentool.config import LMConfig
    from gentool.models.lora import LoRAConfig
    from gentool.models.quant import quantize_model
    from gentool.models.transformer import Transformer

    model = Transformer(LMConfig(vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    model.init_weights(0)
    quantize_model(model, "nf4", skip=["embed_tokens", "lm_head", "mlp"])
    model.to(torch.bfloat16)
    prepare_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.randint(0, 400, (2, 32))).float().square().mean().backward()
    opt.step()
    del model, opt
    gc.collect()


def qlora_child(args) -> dict:
    """One LoRA training run in this process on the checkpoint given (bf16 or NF4 base, bf16 compute): LoRA on
    every linear layer with float32 adapter weights, AdamW, fixed random windows of the train split; then the
    mean validation NLL on the first val windows."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gentool.adapters import prepare_lora
    from gentool.data.shards import open_shards
    from gentool.models.checkpoint import load_lm
    from gentool.models.lora import LoRAConfig, lora_modules

    torch.set_num_threads(2)
    _warm_up()
    base_kb = _status_kb("VmRSS:")
    lm = load_lm(args.ckpt, dtype=torch.bfloat16)
    prepare_lora(lm.model, LoRAConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    for _, m in lora_modules(lm.model):
        m.lora_A.float(), m.lora_B.float()
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    shards = open_shards(args.tokens, "train")
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(np.stack([shards.tokens(int(s), int(s) + args.seq + 1) for s in
                                          rng.integers(0, len(shards) - args.seq - 2, args.batch)]))
               for _ in range(args.steps)]
    lm.model.train()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak from here on: training only
    losses, t0 = [], None
    for i, b in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        loss = F.cross_entropy(lm.model(b[:, :-1]).float().flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    dt = time.perf_counter() - t0
    peak = (_status_kb("VmHWM:") - base_kb) / 1024
    lm.model.eval()
    val = open_shards(args.tokens, "val", verify=False)
    ids = torch.from_numpy(val.tokens(0, min(len(val) - 1, 64 * (args.seq + 1)))).long()
    ids = ids[: len(ids) // (args.seq + 1) * (args.seq + 1)].view(-1, args.seq + 1)
    with torch.no_grad():
        val_nll = float(F.cross_entropy(lm.model(ids[:, :-1]).float().flatten(0, 1), ids[:, 1:].flatten()))
    weights = sum(t.numel() * t.element_size() for n, t in lm.model.state_dict().items() if "lora_" not in n)
    return {"final_loss": float(np.mean(losses[-10:])), "first_loss": losses[0], "val_nll": val_nll,
            "peak_mb": peak, "weights_mb": weights / 2**20,
            "tokens_per_s": args.batch * args.seq * (args.steps - 1) / dt}


def _bf16_and_nf4(src: Path, work: Path, tag: str) -> tuple[Path, Path]:
    """A bf16 copy of a checkpoint (the 16-bit base) and its NF4 quantization (embeddings, head kept 16-bit)."""
    import torch

    from gentool.models.checkpoint import load_lm, save_lm
    from gentool.quantize import quantize_checkpoint

    bf16, nf4 = work / f"{tag}-bf16", work / f"{tag}-nf4"
    if not (bf16 / "config.json").is_file():
        lm = load_lm(src)
        bf16.mkdir(exist_ok=True)
        save_lm(lm.model, lm.config, bf16, dtype=torch.bfloat16)
        shutil.copy(lm.tokenizer_path, bf16 / lm.tokenizer_path.name)
    if not (nf4 / "manifest.json").is_file():
        quantize_checkpoint(bf16, nf4, scheme="nf4")
    return bf16, nf4


def _child(ckpt: Path, tokens: Path, steps: int, batch: int, seq: int, rank: int, lr: float) -> dict:
    cmd = [sys.executable, __file__, "--qlora-child", str(ckpt), "--tokens", str(tokens), "--steps", str(steps),
           "--batch", str(batch), "--seq", str(seq), "--rank", str(rank), "--lr", str(lr)]
    # a fixed mmap threshold: freed large tensors go back to the system at once, so RSS follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def part_qlora(args, work: Path) -> None:
    """Loss on a trained model (the 2 x 128 base of the merge part); memory and speed on a model where weights
    dominate (random weights: its size, not its knowledge, is what matters there)."""
    from gentool.config import LMConfig
    from gentool.models.checkpoint import save_lm
    from gentool.models.transformer import Transformer

    data, small = _small(args, work)
    s16, s4 = _bf16_and_nf4(small, work, "small")
    loss = {name: _child(ck, data / "com", args.qlora_steps, 8, 64, 8, 3e-3)
            for name, ck in (("LoRA, bf16 base", s16), ("QLoRA, NF4 base", s4))}
    big = work / "qbig"
    if not (big / "config.json").is_file():
        cfg = LMConfig(vocab_size=400, **QSHAPE)
        model = Transformer(cfg)
        model.init_weights(0)
        big.mkdir()
        save_lm(model, cfg, big)
        shutil.copy(data / "tok" / "tokenizer.model", big / "tokenizer.model")
    b16, b4 = _bf16_and_nf4(big, work, "big")
    mem = {name: _child(ck, data / "com", args.memory_steps, 2, 32, 4, 2e-3)
           for name, ck in (("LoRA, bf16 base", b16), ("QLoRA, NF4 base", b4))}
    n = LMConfig(vocab_size=400, **QSHAPE).n_params()
    print("\n## QLoRA vs LoRA, bf16 compute, float32 adapters, AdamW, CPU; same data, windows and steps")
    print(f"Loss: the 2 x 128 model pre-trained {args.base_steps} steps on all Shakespeare, LoRA r=8 all-linear on "
          f"the comedies, {args.qlora_steps} steps of 8 x 64 tokens, lr 3e-3; val NLL on 4,160 comedies val tokens.")
    print("| run | first loss | final train loss (last 10) | val NLL | val NLL vs LoRA |")
    print("|---|---|---|---|---|")
    ref = loss["LoRA, bf16 base"]
    for name, r in loss.items():
        print(f"| {name} | {r['first_loss']:.4f} | {r['final_loss']:.4f} | {r['val_nll']:.4f} "
              f"| {r['val_nll'] / ref['val_nll']:.4f} |")
    print(f"\nMemory and speed: {n / 1e6:.1f}M parameters (8 x 1024, FFN 2816, vocab 400; random weights), LoRA r=4 "
          f"all-linear, {args.memory_steps} steps of 2 x 32 tokens; peak RSS during training above the process's "
          f"baseline (after imports and a warm-up step of a tiny model; glibc's mmap threshold fixed at 128 KiB).")
    print("| run | base weights in memory | peak memory | vs LoRA | tokens/s | vs LoRA |")
    print("|---|---|---|---|---|---|")
    ref = mem["LoRA, bf16 base"]
    for name, r in mem.items():
        print(f"| {name} | {r['weights_mb']:.1f} MB | {r['peak_mb']:.1f} MB | {r['peak_mb'] / ref['peak_mb']:.2f}x "
              f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x |")


# --- merge methods and extraction on a small model ----------------------------------------------------------------

def _small(args, work: Path) -> tuple[Path, Path]:
    data = _data(work)
    base = work / "sbase"
    if not (base / "manifest.json").is_file():
        _gentool("train-lm", data / "all", "-o", base, *_dims(SMALL), "--seq-len", "64", "--micro-batch", "8",
                 "--steps", str(args.base_steps), "--lr", "3e-3", "--device", "cpu", "--eval-tokens", "4096")
    return data, base


def _nll(ckpt: Path, data: Path, adapter: Path | None = None) -> float:
    """`gentool perplexity CKPT DATA --max-tokens 8192 --window 64 [--adapter A]`, in this process."""
    from gentool.lm.perplexity import score_checkpoint

    return score_checkpoint(ckpt, [str(data)], window=64, max_tokens=8192, adapter=adapter, verify=False)["nll"]


def part_merge(args, work: Path) -> None:
    data, base = _small(args, work)
    ads = {}
    for name in ("tra", "com"):
        ads[name] = work / f"lora-{name}"
        if not (ads[name] / "manifest.json").is_file():
            _gentool("train-lm", data / name, "-o", ads[name], "--init-from", base, "--lora-rank", "8",
                     "--lora-targets", "all-linear", "--seq-len", "64", "--micro-batch", "8", "--steps",
                     str(args.adapter_steps), "--lr", "3e-3", "--device", "cpu", "--eval-tokens", "2048")
    t, c = ads["tra"], ads["com"]
    methods = [("task_arithmetic 1, 1", ["--method", "task_arithmetic"], (1, 1)),
               ("task_arithmetic 0.5, 0.5", ["--method", "task_arithmetic"], (0.5, 0.5)),
               ("linear (PEFT factors) 1, 1", ["--method", "linear"], (1, 1)),
               ("cat 1, 1", ["--method", "cat"], (1, 1)),
               ("svd rank 8", ["--method", "svd", "--rank", "8"], (1, 1)),
               ("ties d=0.5 (factors)", ["--method", "ties", "--density", "0.5"], (1, 1)),
               ("ties_svd d=0.5 (dense, no truncation)", ["--method", "ties_svd", "--density", "0.5"], (1, 1)),
               ("dare_linear d=0.5 seed 0 (factors)", ["--method", "dare_linear", "--density", "0.5"], (1, 1)),
               ("dare_ties_svd d=0.5 seed 0 (dense)", ["--method", "dare_ties_svd", "--density", "0.5"], (1, 1)),
               ("magnitude_prune_svd d=0.5 (dense)", ["--method", "magnitude_prune_svd", "--density", "0.5"],
                (1, 1))]
    rows = [("base", _nll(base, data / "tra"), _nll(base, data / "com")),
            ("tragedies adapter", _nll(base, data / "tra", t), _nll(base, data / "com", t)),
            ("comedies adapter", _nll(base, data / "tra", c), _nll(base, data / "com", c))]
    for name, opts, (wt, wc) in methods:
        out = work / ("merge-" + name.split()[0] + str(len(rows)))
        _gentool("lora-merge", base, f"{t}:{wt}", f"{c}:{wc}", "-o", out, *opts, "--force")
        rows.append((name, _nll(out, data / "tra"), _nll(out, data / "com")))
        shutil.rmtree(out)
    bt, bc = rows[1][1], rows[2][2]
    print(f"\n## Merging two adapters of one base (2 x 128 model pre-trained {args.base_steps} steps of 8 x 64 "
          "tokens on all Shakespeare; LoRA r=8 "
          f"all-linear, {args.adapter_steps} steps of 8 x 64 on the tragedies / the comedies): NLL (nats/token) "
          "on 8192 val tokens of each task, window 64")
    print("| model | NLL tragedies | vs tragedies adapter | NLL comedies | vs comedies adapter | mean |")
    print("|---|---|---|---|---|---|")
    for name, nt, nc in rows:
        print(f"| {name} | {nt:.4f} | {nt - bt:+.4f} | {nc:.4f} | {nc - bc:+.4f} | {(nt + nc) / 2:.4f} |")


def part_extract(args, work: Path) -> None:
    data, base = _small(args, work)
    full = work / "full-com"
    if not (full / "manifest.json").is_file():
        _gentool("train-lm", data / "com", "-o", full, "--init-from", base, "--seq-len", "64", "--micro-batch", "8",
                 "--steps", str(args.adapter_steps), "--lr", "1e-3", "--device", "cpu", "--eval-tokens", "2048")
    print(f"\n## lora-extract of a full fine-tune (2 x 128 model, {args.adapter_steps} steps on the comedies): "
          "KL(fine-tune || base + adapter) on 8192 comedies val tokens, window 64")
    print("| R | adapter params | mean rel. error | max rel. error | energy kept | KL mean | KL p99 | top-1 agree "
          "| ΔPPL % | KL of the base | KL recovered |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in (4, 16, 64):
        out = work / f"ex{r}"
        rep = _gentool("lora-extract", base, full, "-o", out, "--rank", str(r), "--eval", data / "com",
                       "--max-tokens", "8192", "--window", "64", "--force")
        n = json.loads((out / "manifest.json").read_text())["contents"]["n_trainable_params"]
        print(f"| {r} | {n:,} | {rep['rel_error_mean']:.4f} | {rep['rel_error_max']:.4f} | {rep['energy_mean']:.4f} "
              f"| {rep['kl_mean']:.3g} | {rep['kl_p99']:.3g} | {rep['top1_agreement']:.4f} "
              f"| {rep['delta_ppl_pct']:+.3f} | {rep['kl_mean_base']:.3g} | {rep['kl_recovered']:.4f} |")


# --- throughput vs transformers + peft ------------------------------------------------------------------------------

def part_throughput(args) -> None:
    cuda = args.device.startswith("cuda")
    shape = args.shape or ("1.1b" if cuda else "small")
    batch, seq = args.batch or 4, args.seq or (2048 if cuda else 128)
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup if args.warmup is not None else (5 if cuda else 1)
    comp = cuda if args.compile is None else args.compile
    runs: dict[tuple, list] = {}
    configs = [("gentool", "lora"), ("transformers+peft", "lora"), ("gentool", "full")]
    for rep in range(args.repeats):  # interleaved: a load spike hits every configuration alike
        for impl, mode in configs:
            if mode == "full" and rep:
                continue
            cmd = [sys.executable, __file__, "--impl", impl, "--mode", mode, "--device", args.device,
                   "--shape", shape, "--batch", str(batch), "--seq", str(seq), "--rank", str(args.rank),
                   "--steps", str(steps), "--warmup", str(warmup), "--compile" if comp else "--no-compile"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                runs.setdefault((impl, mode), []).append({"error": proc.stderr.strip().splitlines()[-1][:120]})
                continue
            runs.setdefault((impl, mode), []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    dev = args.device
    if cuda:
        import torch

        dev = torch.cuda.get_device_name()

    def best(key):
        ok = [r for r in runs.get(key, []) if "error" not in r]
        return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None

    import statistics

    ref = best(("transformers+peft", "lora"))
    print(f"\n## LoRA fine-tune throughput, shape {shape}, batch {batch}x{seq}, rank {args.rank}, "
          f"{'bf16' if cuda else 'fp32'}, compile={comp}, device {dev}, {args.repeats} interleaved repeats")
    print("| impl | mode | trainable | peak memory | tokens/s best | tokens/s median | best vs peft | memory vs peft |")
    print("|---|---|---|---|---|---|---|---|")
    for key in configs:
        b = best(key)
        if b is None:
            print(f"| {key[0]} | {key[1]} | failed: {runs[key][-1].get('error')} | | | | | |")
            continue
        med = statistics.median(r["tokens_per_s"] for r in runs[key] if "error" not in r)
        vs = f"{b['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else "-"
        mem = f"{b['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
        print(f"| {key[0]} | {key[1]} | {100 * b['trainable_frac']:.2f}% | {b['peak_bytes'] / 2**30:.2f} GiB "
              f"| {b['tokens_per_s']:.0f} | {med:.0f} | {vs} | {mem} |")
    m = merge_time(SHAPES[shape], args.rank, "bfloat16" if cuda else "float32")
    print(f"\nlora-merge of a {shape} base ({m['base_bytes'] / 2**30:.2f} GiB, rank-{args.rank} all-linear "
          f"adapter, CPU float32 math): {m['merge_seconds']:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", default="all", choices=["all", "throughput", "qlora", "merge", "extract"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", default=None, help="keep data and checkpoints here between runs (default: a temp dir)")
    ap.add_argument("--shape", default=None, help="throughput: small or 1.1b (default: small on CPU, 1.1b on CUDA)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--qlora-steps", type=int, default=60)
    ap.add_argument("--memory-steps", type=int, default=6)
    ap.add_argument("--base-steps", type=int, default=150)
    ap.add_argument("--adapter-steps", type=int, default=80)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--qlora-child", dest="ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--tokens", help=argparse.SUPPRESS)
    ap.add_argument("--lr", type=float, default=2e-3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        cuda = args.device.startswith("cuda")
        args.shape = args.shape or ("1.1b" if cuda else "small")
        print(json.dumps(one(args)))
        return
    if args.ckpt:
        print(json.dumps(qlora_child(args)))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        for part in (["throughput", "qlora", "merge", "extract"] if args.part == "all" else [args.part]):
            t1 = time.perf_counter()
            if part == "throughput":
                part_throughput(args)
            else:
                {"qlora": part_qlora, "merge": part_merge, "extract": part_extract}[part](args, work)
            print(f"\n({part}: {time.perf_counter() - t1:.0f} s)", flush=True)
        print(f"(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
