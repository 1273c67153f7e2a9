"""Two models on the same tokens: perplexity of each, KL(base || other) of the next-token distributions, top-1
agreement -- the damage report of quantization (llama.cpp's `perplexity --kl-divergence` figures), and of any
other change to a model's weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from gentool.errors import UsageProblem
from gentool.evaluation.tokens import load_eval_tokens
from gentool.evaluation.windows import plan_windows


@torch.no_grad()
def compare_logits(base: torch.nn.Module, quant: torch.nn.Module, ids: torch.Tensor, *, window: int,
                   stride: int | None = None, batch_size: int = 8, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Score every token once (gentool's windows) under both models; per-token NLLs, KL(base‖quant), top-1."""
    plan = plan_windows(len(ids), window, stride or max(1, window // 2))
    nll_b, nll_q, kls, same = [], [], [], []
    autocast = device.startswith("cuda") and dtype != torch.float32
    for i in range(0, len(plan), batch_size):
        group = plan[i:i + batch_size]
        lengths = {w.end - w.start for w in group}  # equal lengths batch together; a short last one alone
        chunks = [group] if len(lengths) == 1 else [[w] for w in group]
        for chunk in chunks:
            x = torch.stack([ids[w.start:w.end] for w in chunk]).to(device)
            with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=autocast):
                lb, lq = base(x[:, :-1]).float().log_softmax(-1), quant(x[:, :-1]).float().log_softmax(-1)
            for j, w in enumerate(chunk):
                s = slice(w.score_from - w.start - 1, None)
                b, q, t = lb[j, s], lq[j, s], x[j, 1:][s]
                nll_b.append(-b.gather(-1, t[:, None])[:, 0].double().cpu())
                nll_q.append(-q.gather(-1, t[:, None])[:, 0].double().cpu())
                kls.append((b.exp() * (b - q)).sum(-1).clamp_min(0).double().cpu())
                same.append((b.argmax(-1) == q.argmax(-1)).cpu())
    nb, nq, kl, top = torch.cat(nll_b), torch.cat(nll_q), torch.cat(kls), torch.cat(same)
    ppl_b, ppl_q = math.exp(float(nb.mean())), math.exp(float(nq.mean()))
    return {"tokens": len(nb), "window": window, "ppl_base": ppl_b, "ppl_quant": ppl_q, "delta_ppl": ppl_q - ppl_b,
            "delta_ppl_pct": 100 * (ppl_q / ppl_b - 1), "ln_ppl_ratio": float(nq.mean() - nb.mean()),
            "kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl, 0.99)), "kl_max": float(kl.max()),
            "top1_agreement": float(top.float().mean())}


def damage_report(base_lm, quant_lm, data: list[str], *, split: str = "val", window: int | None = None,
                  stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                  device: str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True) -> dict[str, Any]:
    if base_lm.config.vocab_size != quant_lm.config.vocab_size:
        raise UsageProblem("the two models have different vocabularies", path=base_lm.path,
                           hint="--reference must be the checkpoint that was quantized")
    from gentool.data.tokenizer import load_tokenizer

    tok = load_tokenizer(quant_lm.tokenizer_path) if quant_lm.tokenizer_path else None
    ids = load_eval_tokens(data, tok, vocab_size=quant_lm.config.vocab_size, split=split, max_tokens=max_tokens,
                           verify=verify, where=quant_lm.path).ids
    window = window or quant_lm.config.max_position_embeddings
    if not 2 <= window <= quant_lm.config.max_position_embeddings:
        raise UsageProblem(f"--window must be between 2 and the model's context "
                           f"({quant_lm.config.max_position_embeddings})")
    return compare_logits(base_lm.model, quant_lm.model, ids, window=window, stride=stride, batch_size=batch_size,
                          device=device, dtype=dtype)


def compare_checkpoints(quant: Path, reference: Path, data: list[str], *, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, verify: bool = True, **options) -> dict[str, Any]:
    """`gentool perplexity MODEL --reference BASE DATA`: the damage report of any model against a reference."""
    from gentool.models.checkpoint import load_lm

    base = load_lm(reference, device=device, dtype=dtype, verify=verify)
    q = load_lm(quant, device=device, dtype=dtype, verify=verify)
    report = damage_report(base, q, data, device=device, dtype=dtype, verify=verify, **options)
    qc = q.manifest.contents if q.manifest is not None and q.manifest.kind == "quantized-checkpoint" else {}
    extra = {k: qc[k] for k in ("scheme", "bits_per_weight", "bytes", "compression_ratio") if k in qc}
    return {"checkpoint": str(quant), "reference": str(reference), **extra, **report}
