"""Two models on the same tokens: the damage report of quantization (and of any other change to a model's weights),
with the figures of llama.cpp's `llama-perplexity --kl-divergence`, computed the same way (its `mean_and_uncertainty`,
`covariance` and `percentile`):

    PPL(Q), PPL(base) ± their standard errors; Cor(ln PPL(Q), ln PPL(base)); mean ln(PPL(Q)/PPL(base)) ± and
    PPL(Q)/PPL(base) ±, PPL(Q) - PPL(base) ± (the errors of the two NLL means, correlated token by token);
    mean KL(base ‖ Q) ± its standard error, maximum, 99.9 / 99 / 95 / 90 / 50 / 10 / 5 / 1 %, minimum;
    same top token % ±; Δp (probability of the right token, Q minus base) mean ±, RMS ±.

Streaming: both models run a window batch to their final hidden states; the output head and the log-softmaxes run
over slices of `chunk_rows` positions, reduced at once to per-token figures. Memory is O(chunk_rows · vocab) for the
logits whatever the length of the data (llama.cpp's base-logits file for Llama 3 on wikitext is ~37 GiB), plus a
few floats per scored token for the percentiles. `kl_tokens` writes each scored token as a JSON line.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gentool import console
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.evaluation.metrics import exp_or_inf
from gentool.evaluation.tokens import bos_rule, load_eval_tokens
from gentool.evaluation.windows import PROTOCOLS, check_stride, pick_window, plan_for, trained_length
from gentool.models.quant_ggml import llama_cpp_arithmetic


def _mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0


def _covariance(a: float, b: float, ab: float, n: int) -> float:
    return 0.0 if n < 10 else (ab / n - (a / n) * (b / n)) / (n - 1)


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


class KLStats:
    """Running sums of llama.cpp's kl_divergence_result, and the per-token KL and Δp for the percentiles."""

    def __init__(self, per_token=None):
        self.sums = dict.fromkeys(("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "p_diff",
                                   "p_diff2", "p_diff4"), 0.0)
        self.same_top = self.count = 0
        self.kl: list[np.ndarray] = []
        self.p_diff: list[np.ndarray] = []
        self.per_token = per_token

    @torch.no_grad()
    def add(self, logits_base: torch.Tensor, logits_quant: torch.Tensor, targets: torch.Tensor,
            positions: torch.Tensor | None = None) -> None:
        """One slice of scored positions: logits (n, V) of both models, the tokens they predict (n,)."""
        lb = logits_base.float().log_softmax(-1)
        lq = logits_quant.float().log_softmax(-1)
        t = targets[:, None]
        nll_b = -lb.gather(-1, t)[:, 0].double()
        nll_q = -lq.gather(-1, t)[:, 0].double()
        kl = (lb.exp() * (lb - lq)).double().sum(-1)
        same = lb.argmax(-1) == lq.argmax(-1)
        p_diff = torch.exp(-nll_q) - torch.exp(-nll_b)
        s = self.sums
        for key, v in (("nll", nll_q), ("nll2", nll_q * nll_q), ("nll_base", nll_b), ("nll_base2", nll_b * nll_b),
                       ("nll_nll_base", nll_q * nll_b), ("kld", kl), ("kld2", kl * kl), ("p_diff", p_diff),
                       ("p_diff2", p_diff ** 2), ("p_diff4", p_diff ** 4)):
            s[key] += float(v.sum())
        self.same_top += int(same.sum())
        self.count += len(kl)
        self.kl.append(kl.float().cpu().numpy())
        self.p_diff.append(p_diff.float().cpu().numpy())
        if self.per_token is not None:
            pos = positions.tolist() if positions is not None else [None] * len(kl)
            for i, tok, k, b, q, m in zip(pos, targets.tolist(), kl.tolist(), nll_b.tolist(), nll_q.tolist(),
                                          same.tolist()):
                self.per_token.write(json.dumps({"index": i, "token": tok, "kl": k, "nll_base": b, "nll_quant": q,
                                                 "same_top": m}) + "\n")

    def report(self) -> dict[str, Any]:
        s, n = self.sums, self.count
        if n == 0:
            raise UsageProblem("no token was scored", hint="pass more data or a smaller --window")
        log_q, log_q_err = _mean_and_uncertainty(s["nll"], s["nll2"], n)
        log_b, log_b_err = _mean_and_uncertainty(s["nll_base"], s["nll_base2"], n)
        ppl_q, ppl_b = exp_or_inf(log_q), exp_or_inf(log_b)
        cov = _covariance(s["nll"], s["nll_base"], s["nll_nll_base"], n)
        ratio_err = math.sqrt(max(log_q_err ** 2 + log_b_err ** 2 - 2 * cov, 0.0))
        ppl_cov = ppl_q * ppl_b * cov
        ppl_q_err, ppl_b_err = ppl_q * log_q_err, ppl_b * log_b_err
        kl_mean, kl_err = _mean_and_uncertainty(s["kld"], s["kld2"], n)
        p_mse, p_mse_err = _mean_and_uncertainty(s["p_diff2"], s["p_diff4"], n)
        p_mean, p_mean_err = _mean_and_uncertainty(s["p_diff"], s["p_diff2"], n)
        top = self.same_top / n
        kl = np.sort(np.concatenate(self.kl))
        pd = np.sort(np.concatenate(self.p_diff))
        rms = math.sqrt(p_mse)
        return {
            "tokens": n, "ppl_base": ppl_b, "ppl_base_err": ppl_b_err, "ppl_quant": ppl_q, "ppl_quant_err": ppl_q_err,
            "ppl_correlation": cov / (log_q_err * log_b_err) if log_q_err * log_b_err > 0 else None,
            "ln_ppl_ratio": log_q - log_b, "ln_ppl_ratio_err": ratio_err,
            "ppl_ratio": exp_or_inf(log_q - log_b), "ppl_ratio_err": exp_or_inf(log_q - log_b) * ratio_err,
            "delta_ppl": ppl_q - ppl_b,
            "delta_ppl_err": math.sqrt(max(ppl_q_err ** 2 + ppl_b_err ** 2 - 2 * ppl_cov, 0.0)),
            "delta_ppl_pct": 100 * (ppl_q / ppl_b - 1),
            "kl_mean": kl_mean, "kl_mean_err": kl_err, "kl_max": float(kl[-1]),
            "kl_p999": _percentile(kl, 0.999), "kl_p99": _percentile(kl, 0.99), "kl_p95": _percentile(kl, 0.95),
            "kl_p90": _percentile(kl, 0.90), "kl_median": _percentile(kl, 0.5), "kl_p10": _percentile(kl, 0.10),
            "kl_p05": _percentile(kl, 0.05), "kl_p01": _percentile(kl, 0.01), "kl_min": float(kl[0]),
            "top1_agreement": top, "top1_agreement_err": math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
            "p_diff_mean": p_mean, "p_diff_mean_err": p_mean_err, "p_diff_rms": rms,
            "p_diff_rms_err": 0.5 / rms * p_mse_err if rms > 0 else 0.0, "p_diff_max": float(max(-pd[0], pd[-1])),
        }


def _hidden(model, x):
    return model.hidden_states(x) if hasattr(model, "hidden_states") else None


@torch.no_grad()
def compare_logits(base: torch.nn.Module, quant: torch.nn.Module, ids: torch.Tensor, *, window: int,
                   stride: int | None = None, batch_size: int = 8, device: str = "cpu",
                   dtype: torch.dtype = torch.float32, protocol: str = "gentool", bos_id: int | None = None,
                   kl_tokens: str | Path | None = None, chunk_rows: int = 256,
                   llama_arithmetic: bool | None = None) -> dict[str, Any]:
    """Score every token of `ids` the evaluation windows pick under both models; llama.cpp's figures. The
    llama.cpp protocol also rounds the GGML layers' activations as llama.cpp's CPU backend does (unless
    `llama_arithmetic` is False), so its figures for the same GGUF files come out the same."""
    plan = plan_for(protocol, len(ids), window, stride)
    if llama_arithmetic is None:
        llama_arithmetic = protocol == "llama.cpp"
    autocast = device.startswith("cuda") and dtype != torch.float32
    with contextlib.ExitStack() as stack:
        if kl_tokens:  # through a temporary sibling: a failure or Ctrl-C leaves no half-written file
            from gentool.artifacts import atomic_file

            kl_tokens = stack.enter_context(atomic_file(kl_tokens))
        stats = KLStats(stack.enter_context(open(kl_tokens, "w", encoding="utf-8")) if kl_tokens else None)
        if llama_arithmetic:
            stack.enter_context(llama_cpp_arithmetic(base, quant))
        bar = stack.enter_context(console.progress("comparing (tokens)",
                                                   total=sum(w.end - w.score_from for w in plan)))
        for i in range(0, len(plan), batch_size):
            group = plan[i:i + batch_size]
            lengths = {w.end - w.start for w in group}  # equal lengths batch together; a short last one alone
            for chunk in [group] if len(lengths) == 1 else [[w] for w in group]:
                x = torch.stack([ids[w.start:w.end] for w in chunk]).to(device)
                if protocol == "llama.cpp" and bos_id is not None:  # llama.cpp overwrites each chunk's first token
                    x[:, 0] = bos_id
                with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=autocast):
                    hb, hq = _hidden(base, x[:, :-1]), _hidden(quant, x[:, :-1])
                    if hb is None or hq is None:  # a module that only returns logits
                        hb, hq = base(x[:, :-1]), quant(x[:, :-1])
                    for j, w in enumerate(chunk):
                        first = w.score_from - w.start - 1
                        for r in range(first, x.shape[1] - 1, chunk_rows):
                            rows = slice(r, min(r + chunk_rows, x.shape[1] - 1))
                            lb = base.lm_head(hb[j, rows]) if hasattr(base, "hidden_states") else hb[j, rows]
                            lq = quant.lm_head(hq[j, rows]) if hasattr(quant, "hidden_states") else hq[j, rows]
                            pos = torch.arange(w.start + 1 + rows.start, w.start + 1 + rows.stop)
                            stats.add(lb, lq, x[j, 1:][rows], pos)
            bar.update(advance=sum(w.end - w.score_from for w in group))
    return {**stats.report(), "window": window, "protocol": protocol}


def damage_report(base_lm, quant_lm, data: list[str], *, split: str = "val", window: int | None = None,
                  stride: int | None = None, max_tokens: int | None = None, batch_size: int = 8,
                  device: str = "cpu", dtype: torch.dtype = torch.float32, verify: bool = True,
                  protocol: str = "gentool", kl_tokens: str | Path | None = None) -> dict[str, Any]:
    if protocol not in PROTOCOLS:
        raise UsageProblem(f"unknown --protocol {protocol!r}", hint="use " + ", ".join(PROTOCOLS))
    if base_lm.config.vocab_size != quant_lm.config.vocab_size:
        raise UsageProblem("the two models have different vocabularies", path=base_lm.path,
                           hint="--reference must be the checkpoint that was quantized")
    from gentool.data.tokenizer import adds_bos, load_tokenizer

    context = quant_lm.config.max_position_embeddings
    trained = trained_length(quant_lm.manifest, context) or trained_length(base_lm.manifest, context)
    window, window_from = pick_window(window, context=context, trained=trained, protocol=protocol)
    check_stride(window, stride)
    tok = load_tokenizer(quant_lm.tokenizer_path) if quant_lm.tokenizer_path else None
    ev = load_eval_tokens(data, tok, vocab_size=quant_lm.config.vocab_size, split=split, max_tokens=max_tokens,
                          verify=verify, where=quant_lm.path)
    bos, rule = bos_rule(tok, protocol=protocol, from_shards=ev.from_shards)
    report = compare_logits(base_lm.model, quant_lm.model, ev.ids, window=window, stride=stride,
                            batch_size=batch_size, device=device, dtype=dtype, protocol=protocol, kl_tokens=kl_tokens,
                            bos_id=tok.bos_id if adds_bos(tok) and protocol == "llama.cpp" else None)
    for key, lm in (("ppl_base", base_lm), ("ppl_quant", quant_lm)):
        if math.isnan(report[key]):  # NaN logits: an infinite NLL is a perplexity, NaN is not
            raise GentoolError(f"the NLL is not finite (nan) in {dtype_name(dtype)}: the model's activations overflow",
                               path=lm.path, hint="score with --dtype bfloat16 or float32")
    return {**report, "window_from": window_from, "bos": bos, "bos_rule": rule}


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


def llama_logits_tokens(path: str | Path) -> tuple[int, int, torch.Tensor]:
    """n_ctx, n_vocab and the tokens of a `llama-perplexity --kl-divergence-base` file (its header: "_logits_",
    u32 n_ctx, i32 n_vocab, i32 n_chunk, then n_ctx·n_chunk i32 tokens), to score exactly llama.cpp's tokens."""
    import struct

    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:8] != b"_logits_":
            raise UsageProblem("not a llama-perplexity logits file", path=path,
                               hint="write one with llama-perplexity --kl-divergence-base FILE")
        n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:])
        data = f.read(4 * n_ctx * n_chunk)
    if len(data) < 4 * n_ctx * n_chunk:
        raise UsageProblem("truncated llama-perplexity logits file", path=path)
    return n_ctx, n_vocab, torch.from_numpy(np.frombuffer(data, "<i4").astype(np.int64))
