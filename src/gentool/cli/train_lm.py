"""`gentool train-lm`: train a LLaMA-style LM (or LoRA adapters) on token shards."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from gentool.cli._options import (RUNTIME, Compile, Device, Dtype, Force, Json, LogTo, Output, Resume, SaveMinutes,
                                  Seed, examples)
from gentool.cli._posttrain import (Beta, EmbedLr, HeadLr, LabelSmoothing, Objective, ReferenceLive, SimpoGamma,
                                    objective)
from gentool.cli._recipe import Config

Int = Optional[int]
SHAPE, OPTIM, EVAL, LORA = "Model shape", "Optimizer and schedule", "Evaluation and checkpoints", "LoRA fine-tuning"


def train_lm(
    tokens: Annotated[Path, typer.Argument(help="Token-shards artifact (gentool tokenize encode).")],
    output: Output,
    preset: Annotated[Optional[str], typer.Option(help="Model shape: tiny, mini, small, base, gpt2-small, medium, "
                                                       "tinyllama-1.1b, llama2-7b.")] = None,
    steps: Annotated[Int, typer.Option(min=1, help="Budget: optimizer steps.")] = None,
    tokens_budget: Annotated[Int, typer.Option("--tokens", min=1, help="Budget: training tokens.")] = None,
    flops: Annotated[Optional[float], typer.Option(min=0, help="Budget: training FLOPs (e.g. 1e15).")] = None,
    seq_len: Annotated[int, typer.Option(min=1, help="Context length of training windows.")] = 256,
    micro_batch: Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")] = 16,
    batch_tokens: Annotated[Int, typer.Option(min=1,
                                              help="Global tokens per step (gradient accumulation fills it).")] = None,
    lr: Annotated[float, typer.Option(min=0, help="Peak learning rate.")] = 1e-3,
    schedule: Annotated[str, typer.Option(help="cosine, constant or wsd (warmup-stable-decay).")] = "cosine",
    optimizer: Annotated[str, typer.Option(help="adamw; muon (Muon on hidden matrices, AdamW on embeddings, head, "
                                                "norms); normuon (Muon + Polar Express + NorMuon).")] = "adamw",
    hidden_size: Annotated[Int, typer.Option(min=1, help="Model width (overrides the preset).",
                                                    rich_help_panel=SHAPE)] = None,
    num_layers: Annotated[Int, typer.Option(min=1, help="Transformer blocks.", rich_help_panel=SHAPE)] = None,
    num_heads: Annotated[Int, typer.Option(min=1, help="Attention heads.", rich_help_panel=SHAPE)] = None,
    num_kv_heads: Annotated[Int, typer.Option(min=1, help="Key/value heads (1 = multi-query).",
                                                     rich_help_panel=SHAPE)] = None,
    intermediate_size: Annotated[Int, typer.Option(min=1, help="SwiGLU hidden width.", rich_help_panel=SHAPE)] = None,
    tie_embeddings: Annotated[Optional[bool], typer.Option(help="Tie input and output embeddings.",
                                                           rich_help_panel=SHAPE)] = None,
    min_lr_ratio: Annotated[float, typer.Option(min=0, max=1, help="Final learning rate as a fraction of --lr.",
                                                              rich_help_panel=OPTIM)] = 0.1,
    warmup: Annotated[Int, typer.Option(min=0, help="Warmup steps (default: 10% of steps, at most 100).",
                                               rich_help_panel=OPTIM)] = None,
    weight_decay: Annotated[float, typer.Option(min=0, help="Decoupled weight decay of matrices (lr x decay per step, "
                                                            "Muon too).", rich_help_panel=OPTIM)] = 0.1,
    muon_lr: Annotated[float, typer.Option(min=0, help="Muon's peak learning rate (scaled by sqrt(rows/cols) for tall "
                                                       "matrices); --lr stays AdamW's.", rich_help_panel=OPTIM)] = 0.02,
    muon_momentum: Annotated[float, typer.Option(min=0, max=1,
                                                 help="Muon's Nesterov momentum.", rich_help_panel=OPTIM)] = 0.95,
    embed_lr: EmbedLr = None,
    head_lr: HeadLr = None,
    cooldown: Annotated[float, typer.Option(min=0, max=1, help="wsd: fraction of the steps spent decaying to the "
                                            "floor.", rich_help_panel=OPTIM)] = 0.2,
    zero_init: Annotated[bool, typer.Option(help="Start the output projections (o_proj, down_proj) at zero.",
                                            rich_help_panel=OPTIM)] = False,
    ema_decay: Annotated[Optional[float], typer.Option(min=0, max=1, help="Keep an EMA of the weights (e.g. 0.99): "
                                                       "evaluated and saved instead.", rich_help_panel=OPTIM)] = None,
    grad_clip: Annotated[float, typer.Option(min=0, help="Clip the global gradient norm (0: off).",
                                                    rich_help_panel=OPTIM)] = 1.0,
    eval_every: Annotated[int, typer.Option(min=0, help="Validate every N steps (0: five times per run).",
                                                   rich_help_panel=EVAL)] = 0,
    eval_tokens: Annotated[int, typer.Option(min=1,
                                             help="Validation tokens per evaluation.", rich_help_panel=EVAL)] = 65536,
    save_every: Annotated[int, typer.Option(min=0, help="Save resumable state every N steps (0: at the end).",
                                                   rich_help_panel=EVAL)] = 0,
    save_minutes: SaveMinutes = 10.0,
    keep: Annotated[int, typer.Option(min=1, help="Resumable states to keep in OUTPUT.partial/state/.",
                                             rich_help_panel=EVAL)] = 2,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from an lm-checkpoint or HF Llama directory.",
                                                      rich_help_panel=LORA)] = None,
    lora_rank: Annotated[Int, typer.Option(min=1, help="Train LoRA adapters of this rank on a frozen --init-from base.",
                                                  rich_help_panel=LORA)] = None,
    lora_alpha: Annotated[Optional[float], typer.Option(min=0, help="LoRA alpha (default: twice the rank).",
                                                               rich_help_panel=LORA)] = None,
    lora_targets: Annotated[str, typer.Option(help="Comma-separated HF module names or all-linear.",
                                              rich_help_panel=LORA)] = "all-linear",
    lora_dropout: Annotated[float, typer.Option(min=0, max=1,
                                                help="Dropout on the LoRA input.", rich_help_panel=LORA)] = 0.0,
    rslora: Annotated[bool, typer.Option(help="Scale by alpha/sqrt(rank) (rsLoRA).", rich_help_panel=LORA)] = False,
    objective_: Objective = None, beta: Beta = 0.1, label_smoothing: LabelSmoothing = 0.0,
    simpo_gamma: SimpoGamma = 0.5, reference_live: ReferenceLive = False,
    seed: Seed = 0,
    device: Device = "auto",
    dtype: Dtype = None,
    compile_: Compile = False,
    parallel: Annotated[str, typer.Option(help="Under torchrun: ddp (replicas) or fsdp (FSDP2: weights, grads, "
                                               "optimizer state sharded).", rich_help_panel=RUNTIME)] = "ddp",
    resume: Resume = False,
    log_to: LogTo = None,
    force: Force = False,
    config: Config = None,
    json_: Json = False,
) -> None:
    """Train a LLaMA-style causal LM; resumable, metrics in JSON lines.

    Works in OUTPUT.partial/ (state/ checkpoints, metrics.jsonl) and renames it into an lm-checkpoint (Hugging
    Face layout) at the end. Ctrl-C saves state and exits 130; --resume continues exactly. A NaN loss stops with
    an error naming the step. Under torchrun the global batch is split across processes (DDP, or FSDP2 with
    --parallel fsdp). --optimizer muon trains hidden matrices with Muon at --muon-lr, the embeddings and head with
    AdamW at --embed-lr / --head-lr, norms and biases with AdamW at --lr.
    With --lora-rank the --init-from base is frozen and only adapters train; the output is a lora-adapter.
    On example shards (tokenize encode --format chat|prompt-completion) it trains on the masked tokens only (SFT,
    packed without cross-attention); on preference pairs with --objective dpo|ipo|simpo|orpo.
    """
    from gentool import console
    from gentool.devices import resolve_device
    from gentool.errors import UsageProblem
    from gentool.lm.train import LMRunOptions, run_train_lm

    if lora_rank is not None and init_from is None:
        raise UsageProblem("--lora-rank needs --init-from", hint="pass the base checkpoint to adapt")
    lora = None if lora_rank is None else dict(rank=lora_rank, alpha=lora_alpha, targets=lora_targets,
                                               dropout=lora_dropout, rslora=rslora)
    dims = dict(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                tie_word_embeddings=tie_embeddings)
    opts = LMRunOptions(tokens_dir=tokens, out=output, preset=preset, dims=dims, seq_len=seq_len,
                        micro_batch=micro_batch, batch_tokens=batch_tokens, steps=steps, tokens=tokens_budget,
                        flops=flops, lr=lr, min_lr_ratio=min_lr_ratio, warmup=warmup, schedule=schedule,
                        weight_decay=weight_decay, grad_clip=grad_clip, eval_every=eval_every,
                        eval_tokens=eval_tokens, save_every=save_every, save_minutes=save_minutes, keep=keep,
                        seed=seed,
                        device=resolve_device(device), dtype=dtype, compile=compile_, resume=resume, force=force,
                        init_from=init_from, lora=lora, optimizer=optimizer, muon_lr=muon_lr,
                        muon_momentum=muon_momentum, embed_lr=embed_lr, head_lr=head_lr, parallel=parallel,
                        cooldown=cooldown, zero_init=zero_init, ema_decay=ema_decay, log_to=tuple(log_to or ()))
    if opts.steps is None and opts.tokens is None and opts.flops is None:
        opts.steps = 200
    summary = run_train_lm(opts, objective(tokens, objective_, beta, label_smoothing, simpo_gamma, reference_live))
    if int(os.environ.get("RANK", "0")):  # torchrun: rank 0 reports
        return
    console.log(f"wrote {output}")
    console.emit(summary, as_json=json_)


train_lm.epilog = examples(
    "gentool train-lm tokens -o runs/lm --preset small --steps 300",
    "gentool train-lm tokens -o runs/lm2 --config recipe.toml --seed 2 --flops 1e14",
    "gentool train-lm tokens -o runs/ada --init-from runs/lm --lora-rank 8 --steps 100",
    "gentool train-lm pairs -o runs/dpo --init-from runs/sft --objective dpo --beta 0.1 --lora-rank 8",
    "gentool train-lm tokens -o runs/mu --optimizer muon --muon-lr 0.02 --schedule wsd --cooldown 0.5",
    "torchrun --nproc-per-node 8 -m gentool train-lm tokens -o runs/big --preset base --tokens 1000000000 \\",
    "    --batch-tokens 524288 --micro-batch 32 --seq-len 512 --device cuda --compile --parallel fsdp",
)
