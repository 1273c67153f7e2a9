"""Downstream-task metrics exactly as lm-evaluation-harness (0.4.x) computes and aggregates them.

Per document:
- multiple_choice: acc (argmax of the choices' log-likelihoods is the gold), acc_norm (of log-likelihood / the
  choice's length in *characters*, lm-eval's `len(choice)`), acc_bytes (per UTF-8 byte, lm-eval's acc_bytes);
- loglikelihood: perplexity (the item is the log-likelihood), acc (the target is the greedy continuation);
- loglikelihood_rolling: word_perplexity, byte_perplexity, bits_per_byte (items: (log-likelihood, words or bytes),
  words = len(re.split(r"\\s+", text)));
- generate_until: exact_match of the filtered prediction and the target (numpy string equality, as lm-eval's
  copy of HF evaluate), with ignore_case / ignore_punctuation / regexes_to_ignore from metric_list.

Aggregation: mean; perplexity = exp(-mean); weighted_perplexity = exp(-sum ll / sum n); bits_per_byte =
-sum ll / sum n / ln 2. Standard errors: sample std / sqrt(n) for means; lm-eval's bootstrap for perplexity
(100 chunks of 1000 resamples, chunk i drawn by random.Random(i).choices: reproduced draw for draw, vectorised
by handing Python's Mersenne Twister state to numpy, whose random_sample is the same 53-bit double); none (null)
for the weighted metrics, as lm-eval reports "N/A".
"""

from __future__ import annotations

import math
import random
import re
import string
from typing import Any

import numpy as np

from gentool.errors import UsageProblem

AGGREGATION = {"acc": "mean", "acc_norm": "mean", "acc_bytes": "mean", "exact_match": "mean", "perplexity": "perplexity",
               "word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
               "bits_per_byte": "bits_per_byte"}
KNOWN = {"multiple_choice": {"acc", "acc_norm", "acc_bytes"}, "loglikelihood": {"perplexity", "acc"},
         "loglikelihood_rolling": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
         "generate_until": {"exact_match"}}


def exp_or_inf(x: float) -> float:
    """exp(x), infinite past 709.78 where a float overflows (a perplexity, not an OverflowError); NaN stays NaN."""
    return math.inf if x > 709.78 else math.exp(x)


def check_metrics(output_type: str, metrics: list[dict], where) -> list[str]:
    names = []
    for m in metrics:
        name = m.get("metric") if isinstance(m, dict) else None
        if name not in KNOWN[output_type]:
            raise UsageProblem(f"metric {name!r} is not supported for {output_type}", path=where,
                               hint="use " + ", ".join(sorted(KNOWN[output_type])))
        names.append(name)
    return names


def multiple_choice(lls: list[float], choices: list[str], gold: int | list[int]) -> dict[str, Any]:
    lls_a = np.array(lls)
    pred = int(np.argmax(lls_a))
    pred_norm = int(np.argmax(lls_a / np.array([float(len(c)) for c in choices])))
    pred_bytes = int(np.argmax(lls_a / np.array([float(len(c.encode("utf-8"))) for c in choices])))
    hit = (lambda p: p in gold) if isinstance(gold, list) else (lambda p: p == gold)
    return {"acc": float(hit(pred)), "acc_norm": float(hit(pred_norm)), "acc_bytes": float(hit(pred_bytes)),
            "pred": pred, "pred_norm": pred_norm}


def rolling(ll: float, text: str) -> dict[str, Any]:
    words, n_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
    return {"word_perplexity": (ll, words), "byte_perplexity": (ll, n_bytes), "bits_per_byte": (ll, n_bytes)}


def exact_match(prediction: str, reference: str, *, ignore_case: bool = False, ignore_punctuation: bool = False,
                ignore_numbers: bool = False, regexes_to_ignore: list[str] | None = None) -> float:
    p, r = [prediction], [reference]
    for rx in regexes_to_ignore or []:
        p, r = [re.sub(rx, "", x) for x in p], [re.sub(rx, "", x) for x in r]
    pa, ra = np.asarray(p), np.asarray(r)
    if ignore_case:
        pa, ra = np.char.lower(pa), np.char.lower(ra)
    if ignore_punctuation:
        table = string.punctuation.maketrans("", "", string.punctuation)
        pa, ra = np.char.translate(pa, table=table), np.char.translate(ra, table=table)
    if ignore_numbers:
        table = string.digits.maketrans("", "", string.digits)
        pa, ra = np.char.translate(pa, table=table), np.char.translate(ra, table=table)
    return float(np.mean(pa == ra))


def apply_filters(text: str, steps: list[dict]) -> str:
    """lm-eval's filter pipeline subset: regex (regex_pattern, group_select, fallback) and take_first."""
    for step in steps:
        fn = step.get("function")
        if fn == "take_first":
            continue
        if fn != "regex":
            raise UsageProblem(f"filter function {fn!r} is not supported", hint="use regex and take_first")
        rx = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
        group, fallback = step.get("group_select", 0), step.get("fallback", "[invalid]")
        found = rx.findall(text)
        if found:
            m = found[group]
            if isinstance(m, tuple):
                m = [x for x in m if x]
                m = m[0] if m else fallback
            text = m.strip()
        else:
            text = fallback
    return text


def _mean(xs) -> float:
    return sum(xs) / len(xs)


def sample_stddev(xs) -> float:
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def bootstrap_perplexity(xs: list[float], iters: int = 100000) -> float:
    """lm-eval's bootstrap_stderr(perplexity, xs, iters): chunks of min(1000, iters) resamples, chunk i drawn
    with random.Random(i).choices(xs, k=len(xs)) (= xs[floor(random() * n)] per draw)."""
    n, chunk = len(xs), min(1000, iters)
    arr = np.asarray(xs, dtype=np.float64)
    res: list[float] = []
    for i in range(iters // chunk):
        state = random.Random(i).getstate()[1]
        rs = np.random.RandomState()
        rs.set_state(("MT19937", np.array(state[:-1], dtype=np.uint32), state[-1]))
        idx = np.floor(rs.random_sample(chunk * n) * n).astype(np.int64).reshape(chunk, n)
        # perplexity = exp(-mean) with Python's left-to-right float sum, as statistics-free `sum(xs) / len(xs)`
        picked = arr[idx]
        sums = picked[:, 0].copy()
        for j in range(1, n):
            sums += picked[:, j]
        res.extend(exp_or_inf(-s / n) for s in sums.tolist())
    return sample_stddev(res)


def aggregate(name: str, items: list, bootstrap_iters: int = 100000) -> tuple[float, float | None]:
    """(value, standard error) of one metric over the documents' items."""
    kind = AGGREGATION[name]
    if kind == "mean":
        value = _mean(items)
        return value, (sample_stddev(items) / math.sqrt(len(items)) if len(items) > 1 else None)
    if kind == "perplexity":
        value = exp_or_inf(-_mean(items))
        return value, (bootstrap_perplexity(items, bootstrap_iters) if len(items) > 1 and bootstrap_iters else None)
    ll, n = sum(a for a, _ in items), sum(b for _, b in items)
    if kind == "weighted_perplexity":
        return exp_or_inf(-ll / n), None
    return -ll / n / math.log(2), None
