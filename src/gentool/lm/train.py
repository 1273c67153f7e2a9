"""`train-lm`: a LLaMA-style transformer on token shards, through the shared training loop.

What is learned from the token windows is an `Objective`: next-token prediction here, masked diffusion in
lm/masked.py; the model shape, data, budget, LoRA, run directory and final artifact are the same for both.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from gentool import console
from gentool.artifacts import input_ref
from gentool.config import LMConfig, config_from_preset
from gentool.data.shards import TokenShards, open_shards
from gentool.errors import UsageProblem
from gentool.models.checkpoint import load_lm, quantization_config, save_lm
from gentool.models.transformer import Transformer
from gentool.train import SCHEDULES, Task, TrainConfig, distributed, train
from gentool.train.optim import OPTIMIZERS
from gentool.train.rundir import RunDir, RunOptions


@dataclass(kw_only=True)
class LMRunOptions(RunOptions):
    tokens_dir: Path
    preset: str | None = "small"
    dims: dict[str, Any] = field(default_factory=dict)   # explicit HF-named overrides
    seq_len: int = 256
    micro_batch: int = 16
    batch_tokens: int | None = None                      # global tokens per step (default: one micro-batch)
    steps: int | None = None
    tokens: int | None = None
    flops: float | None = None
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_tokens: int = 65536
    keep: int = 2
    init_from: Path | None = None
    lora: dict[str, Any] | None = None
    optimizer: str = "adamw"                             # adamw, muon or normuon (gentool.train.optim)
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    embed_lr: float | None = None                        # muon: the embeddings' AdamW rate (None: the default)
    head_lr: float | None = None                         # muon: an untied output head's AdamW rate
    parallel: str = "ddp"                                # under torchrun: ddp or fsdp
    cooldown: float = 0.2                                # wsd: fraction of the steps spent decaying
    zero_init: bool = False                              # output projections (o_proj, down_proj) start at zero
    ema_decay: float | None = None                       # evaluate and save an EMA of the weights


class LMTask:
    """Next-token prediction on random windows of the train shards; batches depend only on (seed, step, micro,
    rank), so the data order is fixed by --seed and the step is the whole data cursor."""

    compile_loss = True  # with --compile the cross-entropy fuses with the output head
    extra = 1            # a window holds one token more than the model reads: the last position's target

    def __init__(self, train: TokenShards, val: TokenShards | None, config: LMConfig, *, seq_len: int,
                 micro_batch: int, seed: int, world: int, device: str, eval_tokens: int):
        self.train, self.val, self.seq_len, self.micro, self.seed = train, val, seq_len, micro_batch, seed
        self.world, self.device = world, device
        self.tokens_per_micro = micro_batch * seq_len
        self.flops_per_micro = float(config.train_flops_per_token(seq_len) * self.tokens_per_micro)
        self.eval_windows = None
        if val is not None and len(val) >= seq_len + self.extra:
            n = max(1, min(eval_tokens, len(val) - self.extra) // seq_len)
            data = torch.from_numpy(val.tokens(0, n * seq_len + self.extra))
            self.eval_windows = torch.stack([data[i * seq_len:(i + 1) * seq_len + self.extra] for i in range(n)])
        self.bytes_per_token = val.bytes / max(1, len(val)) if val is not None else None

    def windows(self, step: int, micro: int, rank: int) -> tuple[np.random.Generator, torch.Tensor]:
        """The micro-batch's windows (CPU) and the generator that chose them (for any further randomness)."""
        rng = np.random.default_rng([self.seed, step, micro * self.world + rank])
        starts = rng.integers(0, len(self.train) - self.seq_len - self.extra, size=self.micro)
        span = self.seq_len + self.extra
        return rng, torch.from_numpy(np.stack([self.train.tokens(int(s), int(s) + span) for s in starts]))

    def batch(self, step: int, micro: int, rank: int) -> torch.Tensor:
        rows = self.windows(step, micro, rank)[1]
        if self.device.startswith("cuda"):
            rows = rows.pin_memory()
        return rows.to(self.device, non_blocking=True)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        if self.eval_windows is None:
            return {}
        was = model.training
        model.eval()
        nats = self.eval_nats(model)
        model.train(was)
        out = {"val_loss": nats}
        if self.bytes_per_token:
            out["val_bpb"] = nats / math.log(2) / self.bytes_per_token
        return out

    def eval_nats(self, model: torch.nn.Module) -> float:
        """Mean validation loss in nats per token."""
        total, n = 0.0, 0
        for chunk in self.eval_windows.split(self.micro):
            chunk = chunk.to(self.device)
            with torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16,
                                enabled=self.device.startswith("cuda")):
                logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
            n += chunk[:, 1:].numel()
        return total / n


def unigram_entropy(shards: TokenShards, limit: int = 1 << 22) -> float:
    """Entropy (nats/token) of the split's unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(shards.tokens(0, min(len(shards), limit)), minlength=shards.vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


class Objective:
    """Next-token prediction with causal attention (the default); lm/masked.py's MaskedObjective is the other."""

    kind = "lm-checkpoint"       # the artifact a run writes
    causal = True
    extra_vocab = 0              # vocabulary entries beyond the tokenizer's (the masked LM's mask token)
    allows_init = True           # --init-from and LoRA

    def task(self, train: TokenShards, val: TokenShards | None, config: LMConfig, **kw: Any) -> Task:
        return LMTask(train, val, config, **kw)

    def recipe(self, shards: TokenShards) -> dict[str, Any]:
        """What the objective adds to the run's recipe."""
        return {}

    def contents(self, shards: TokenShards, config: LMConfig, seq_len: int) -> dict[str, Any]:
        """What the objective adds to the checkpoint manifest's `contents`."""
        return {}


def _steps(opts: LMRunOptions, tokens_per_step: int, flops_per_token: float) -> int:
    given = [x is not None for x in (opts.steps, opts.tokens, opts.flops)]
    if sum(given) != 1:
        raise UsageProblem("give exactly one budget: --steps, --tokens or --flops")
    if opts.steps is not None:
        steps = opts.steps
    elif opts.tokens is not None:
        steps = math.ceil(opts.tokens / tokens_per_step)
    else:
        steps = math.ceil(opts.flops / (flops_per_token * tokens_per_step))
    if steps < 1:
        raise UsageProblem("the budget is smaller than one step")
    return steps


TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json")  # beside a tokenizer.json: its specials


def _tokenizer_source(shards: TokenShards, init) -> Path | None:
    """The tokenizer file the checkpoint gets: the shards' own (found relative to their manifest and checked by
    hash), else the --init-from checkpoint's. Resolved before training, so a missing or changed tokenizer stops the
    run before it starts."""
    own = shards.tokenizer_file()
    if own is not None:
        return own
    if init is not None and init.tokenizer_path is not None:
        return init.tokenizer_path
    console.warn("the tokenizer these shards were encoded with is not found from here (an older gentool recorded its "
                 "path as typed): the checkpoint will have no tokenizer; re-encode the data to record it")
    return None


def run_train_lm(opts: LMRunOptions, objective: Objective | None = None) -> dict[str, Any]:
    objective = objective or Objective()
    device = distributed.init_from_env(opts.device, always=opts.parallel == "fsdp")
    rank, world = distributed.rank(), distributed.world_size()
    if rank != 0:  # under torchrun only rank 0 talks
        console.configure(quiet=True)
    if opts.parallel not in ("ddp", "fsdp"):
        raise UsageProblem(f"unknown --parallel {opts.parallel!r}", hint="choose ddp or fsdp")
    sharded = opts.parallel == "fsdp"
    if sharded and not distributed.initialized():
        raise UsageProblem("--parallel fsdp shards the model over processes: launch it with torchrun",
                           hint="torchrun --nproc-per-node N -m gentool train-lm ... --parallel fsdp")
    if sharded and (opts.lora is not None or opts.ema_decay):
        raise UsageProblem("LoRA and --ema-decay are not sharded with --parallel fsdp", hint="use --parallel ddp")
    if opts.ema_decay is not None and not 0 < opts.ema_decay < 1:
        raise UsageProblem(f"--ema-decay {opts.ema_decay} is out of range", hint="e.g. 0.99 (0 < decay < 1)")
    run = RunDir(opts.out, resume=opts.resume, force=opts.force)
    out = opts.out
    train_shards = open_shards(opts.tokens_dir, "train")
    try:
        val_shards: TokenShards | None = open_shards(opts.tokens_dir, "val", verify=False)
    except UsageProblem:
        val_shards = None
    run.check(sources=[opts.tokens_dir, opts.init_from])
    if not objective.allows_init and (opts.init_from or opts.lora):
        raise UsageProblem("--init-from and LoRA are for autoregressive LMs", hint="train the masked LM from scratch")
    if opts.init_from and opts.lora is None and quantization_config(opts.init_from):
        raise UsageProblem("a quantized-checkpoint cannot be fine-tuned in full: its weights are frozen codes",
                           path=opts.init_from, hint="train LoRA adapters on it (QLoRA) with --lora-rank R")
    init = load_lm(opts.init_from) if opts.init_from else None
    config = init.config if init else config_from_preset(
        opts.preset if opts.preset or any(v is not None for v in opts.dims.values()) else "small",
        vocab_size=train_shards.vocab_size + objective.extra_vocab, min_context=opts.seq_len, **opts.dims)
    init_tok = init.manifest.contents.get("tokenizer_id") if init is not None and init.manifest else None
    if init_tok and init_tok != train_shards.tokenizer_id:
        raise UsageProblem("the token shards come from a different tokenizer than the --init-from checkpoint",
                           path=opts.tokens_dir, hint="encode the data with the checkpoint's tokenizer.model")
    tokenizer = _tokenizer_source(train_shards, init)
    if train_shards.vocab_size > config.vocab_size:
        raise UsageProblem(f"the data's vocabulary ({train_shards.vocab_size}) is larger than the model's "
                           f"({config.vocab_size})", path=opts.tokens_dir, hint="use shards from the model's tokenizer")
    if opts.seq_len > config.max_position_embeddings:
        raise UsageProblem(f"--seq-len {opts.seq_len} exceeds the model's context {config.max_position_embeddings}")
    if type(objective) is Objective and len(train_shards) < opts.seq_len + 2:  # examples/pairs: any length
        raise UsageProblem(f"too little data: {len(train_shards)} train tokens for --seq-len {opts.seq_len}",
                           path=opts.tokens_dir, hint="encode more text or lower --seq-len")
    if opts.schedule not in SCHEDULES:
        raise UsageProblem(f"unknown --schedule {opts.schedule!r}", hint="choose " + ", ".join(SCHEDULES))
    for name, value, ok in (("--micro-batch", opts.micro_batch, opts.micro_batch >= 1),
                            ("--seq-len", opts.seq_len, opts.seq_len >= 1)):  # the trainer's own: TrainConfig
        if not ok:
            raise UsageProblem(f"{name} {value} is out of range")
    if opts.optimizer not in OPTIMIZERS:
        raise UsageProblem(f"unknown --optimizer {opts.optimizer!r}", hint="choose " + ", ".join(OPTIMIZERS))
    seq_tokens = opts.micro_batch * opts.seq_len
    batch_tokens = opts.batch_tokens or seq_tokens * world
    if batch_tokens % (seq_tokens * world):
        raise UsageProblem(f"--batch-tokens {batch_tokens} is not a multiple of micro-batch x seq-len x processes "
                           f"({seq_tokens * world})")
    accum = batch_tokens // (seq_tokens * world)
    steps = _steps(opts, batch_tokens, config.train_flops_per_token(opts.seq_len))
    tcfg = TrainConfig(steps=steps, grad_accum=accum, lr=opts.lr, min_lr_ratio=opts.min_lr_ratio,
                       warmup=opts.warmup if opts.warmup is not None else min(100, steps // 10),
                       schedule=opts.schedule, weight_decay=opts.weight_decay, grad_clip=opts.grad_clip,
                       eval_every=opts.eval_every or max(1, steps // 5), save_every=opts.save_every,
                       save_minutes=opts.save_minutes, keep=opts.keep,
                       seed=opts.seed, device=device, amp_dtype=opts.dtype, compile=opts.compile,
                       log_every=max(1, min(10, steps // 20)), optimizer=opts.optimizer, muon_lr=opts.muon_lr,
                       muon_momentum=opts.muon_momentum, embed_lr=opts.embed_lr, head_lr=opts.head_lr,
                       parallel=opts.parallel, cooldown=opts.cooldown,
                       ema_decay=opts.ema_decay, log_to=tuple(opts.log_to))
    recipe = {"model": config.to_hf_dict(), "train": tcfg.recipe(), "seq_len": opts.seq_len,
              "micro_batch": opts.micro_batch, "batch_tokens": batch_tokens, "data": train_shards.manifest.id,
              "init": str(opts.init_from) if opts.init_from else "scratch", "lora": opts.lora,
              **({"zero_init": True} if opts.zero_init else {}),
              **objective.recipe(train_shards)}
    if val_shards is None or len(val_shards) < opts.seq_len + 1:
        console.warn(f"the val split has fewer than {opts.seq_len + 1} tokens: no validation loss will be measured")
    run.begin(recipe)
    torch.manual_seed(opts.seed)
    if init is not None:
        model = init.model
    else:
        with torch.device(device):
            model = Transformer(config, causal=objective.causal)
        model.init_weights(opts.seed, zero_out=opts.zero_init)
    adapter = None
    if opts.lora is not None:
        from gentool.adapters import lora_config_from_options, prepare_lora

        adapter = lora_config_from_options(**opts.lora)
        info = prepare_lora(model, adapter)
    model.train()
    task = objective.task(train_shards, val_shards, config, seq_len=opts.seq_len, micro_batch=opts.micro_batch,
                          seed=opts.seed, world=world, device=device, eval_tokens=opts.eval_tokens)
    if hasattr(objective, "prepare"):  # e.g. a preference loss's reference log-probs, before the first step
        objective.prepare(model, run.partial, lora=opts.lora is not None)
    console.log(f"model: {config.n_params():,} parameters ({config.n_params(non_embedding=True):,} non-embedding); "
                f"{steps} steps of {batch_tokens:,} tokens")
    t0 = time.time()
    ema = None
    if opts.ema_decay:
        from gentool.train import make_ema

        ema = make_ema(model)
    result = train(model, task, tcfg, run.partial, resume=opts.resume, ema=ema)
    if ema is not None:  # evaluated all along; it is the model the run delivers
        model = ema
    if sharded:  # gather the FSDP2 shards (every rank) into a plain model for the artifact (rank 0)
        weights = distributed.full_state_dict(model)
        model = Transformer(config, causal=objective.causal)
        model.load_state_dict(weights)
    entropy = unigram_entropy(val_shards) if val_shards is not None and len(val_shards) else None
    distributed.shutdown()
    if rank == 0:
        val = result.eval.get("val_loss")
        console.log(f"final train loss {result.train_loss:.4f}, val loss " + (f"{val:.4f}" if val is not None else "-")
                    + " nats/token" + (f"; the val data's unigram entropy is {entropy:.4f} nats/token (the loss of a "
                                       "model that ignores context)" if entropy is not None else ""))
    summary = {"output": str(out), "steps": result.step, "tokens": result.tokens, "flops": result.flops,
               "train_loss": result.train_loss, **result.eval, "val_unigram_entropy": entropy,
               "tokens_per_s": round(result.tokens_per_s, 1), "mfu": result.mfu,
               "n_params": config.n_params(), "n_params_non_embedding": config.n_params(non_embedding=True)}
    if rank != 0:
        return summary
    kind = "lora-adapter" if opts.lora is not None else objective.kind
    inputs = [input_ref("data", train_shards.manifest)]
    if init is not None:
        inputs.append(input_ref("base" if opts.lora is not None else "init", init.manifest or str(opts.init_from)))
    with run.finish(kind, config=recipe, inputs=inputs) as art:
        if opts.lora is not None:
            from gentool.adapters import adapter_contents, read_base, save_lora

            save_lora(art.dir, model, adapter, base_name=str(opts.init_from))
            art.contents.update(adapter_contents(adapter, info, read_base(opts.init_from)))
        else:
            save_lm(model, config, art.dir)
            art.contents.update(architecture="llama", n_params=config.n_params(),
                                n_params_non_embedding=config.n_params(non_embedding=True),
                                tokenizer_id=train_shards.tokenizer_id, vocab_size=config.vocab_size,
                                context_length=opts.seq_len, dtype="float32", step=result.step,
                                tokens_seen=result.tokens, train_flops=result.flops, flops_formula="6N+6LTd")
            art.contents.update(objective.contents(train_shards, config, opts.seq_len))
        if tokenizer is not None:
            for f in (tokenizer, *(tokenizer.parent / n for n in TOKENIZER_EXTRAS if tokenizer.suffix == ".json")):
                if f.is_file():
                    shutil.copy(f, art.dir / f.name)
        art.metrics.update({k: v for k, v in summary.items() if k not in ("output",)},
                           wall_seconds=round(time.time() - t0, 3))
    return summary
