"""`--target-kl X`: per-tensor GGML types (Q4_K, Q5_K, Q6_K, Q8_0, with llama.cpp's fallbacks for shapes they do
not fit) meeting a mean-KL budget on the calibration data at the smallest size.

1. Sensitivity, from one forward and backward pass over the calibration tokens with next tokens *sampled from the
   model itself*: the gradient g of Σ log p(y) at a layer's output then has E[g gᵀ] = the Fisher information of
   that output, so a weight error ΔW adds KL ≈ ½ Σ_ij M_ij ΔW_ij² per token, M = Σ_positions g² ⊗ x² / N
   (x the layer's input; the diagonal of the Fisher, second order in ΔW). An embedding row's error counts through
   the gradient at the embedding output for the tokens that look it up; a tied head gets both.
2. Every tensor is quantized to every candidate type (with the importance matrix when there is one) and its
   predicted KL is ½ Σ M ⊙ (W - Ŵ)².
3. Types are chosen greedily: all start at the smallest; the upgrade with the largest predicted KL saved per byte
   added is taken until the predicted total is within budget.
4. The choice is measured: the quantized model against the float one on the calibration tokens. The prediction is
   rescaled by measured/predicted and step 3 rerun (at most 4 rounds); the smallest choice measured within the
   target wins, else the best measured one is returned and the report says the target was missed.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from gentool import console
from gentool.codecs import ggml
from gentool.codecs.ggml_mixes import allows_quantization
from gentool.codecs.gguf_names import gguf_name
from gentool.evaluation.compare import compare_logits
from gentool.models.quant_ggml import FLOAT_TYPES, install_ggml
from gentool.quantize.ggml import KQUANT_TYPES, plan_types, weight_shapes

FISHER_TOKENS, MEASURE_TOKENS, ROUNDS = 2048, 2048, 4


def fisher(model: nn.Module, ids: torch.Tensor, *, window: int, seed: int = 0) -> tuple[dict, int]:
    """name -> M (same shape as the weight): Σ over positions of g² ⊗ x² for linear layers, of g² added into the
    looked-up rows for the embedding; and the number of positions."""
    acc: dict[str, torch.Tensor] = {}
    hooks = []

    def linear_hook(name):
        def fn(_m, args, out):
            x2 = args[0].detach().reshape(-1, args[0].shape[-1]).float() ** 2

            def grad(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float() ** 2
                acc[name] = acc.get(name, 0) + g2.T @ x2
            out.register_hook(grad)
        return fn

    embed = model.model.embed_tokens
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(f"{name}.weight")))
    gen = torch.Generator().manual_seed(seed)
    n = 0
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad(), console.progress("sensitivity", total=len(ids)) as bar:
            for s in range(0, min(len(ids), FISHER_TOKENS) - 1, window):
                x = ids[s:s + window][None]
                h = embed(x).detach().requires_grad_(True)  # the embedding output, a leaf: its gradient
                logits = _forward_from(model, x, h)
                y = torch.multinomial(logits.detach().float().softmax(-1).reshape(-1, logits.shape[-1]), 1,
                                      generator=gen).reshape(x.shape)
                logits.float().log_softmax(-1).gather(-1, y[..., None]).sum().backward()
                m = acc.setdefault("model.embed_tokens.weight", torch.zeros(embed.weight.shape))
                m.index_add_(0, x.reshape(-1), h.grad.reshape(-1, h.shape[-1]).float() ** 2)
                n += x.numel()
                bar.update(x.numel())
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), params):
            p.requires_grad_(r)
    return acc, n


def _forward_from(model, ids, h):
    """The Transformer's forward with the embedding output given (so the embedding's gradient hook fires once)."""
    emb = model.model.embed_tokens
    model.model.embed_tokens = _Given(h)
    try:
        return model(ids)
    finally:
        model.model.embed_tokens = emb


class _Given(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.h = h

    def forward(self, _ids):
        return self.h


def candidates(name: str, shape) -> list[str]:
    out = []
    for t in KQUANT_TYPES:
        f = ggml.fallback_type(t, shape[-1])
        if f not in out:
            out.append(f)
    return sorted(out, key=lambda t: ggml.ggml_type(t).bits_per_weight)


def _greedy(costs: dict[str, dict[str, float]], sizes: dict[str, dict[str, int]], budget: float) -> dict[str, str]:
    choice = {k: min(c, key=lambda t: sizes[k][t]) for k, c in costs.items()}
    total = sum(costs[k][t] for k, t in choice.items())
    while total > budget:
        best = None
        for k, t in choice.items():
            for u, kl in costs[k].items():
                db = sizes[k][u] - sizes[k][t]
                gain = costs[k][t] - kl
                if db > 0 and gain > 0 and (best is None or gain / db > best[0]):
                    best = (gain / db, k, u, gain)
        if best is None:
            break
        _, k, u, gain = best
        choice[k], total = u, total - gain
    return choice


@torch.no_grad()
def choose_types(lm, ids: torch.Tensor, target: float, *, values: dict[str, np.ndarray] | None = None,
                 overrides=(), window: int = 512) -> tuple[dict[str, str], dict[str, Any]]:
    """Per-tensor types (Hugging Face names, F32 for the rest) for mean KL ≤ target; and what was chosen."""
    model, config = lm.model, lm.config
    shapes = weight_shapes(model, config)
    fixed = plan_types(shapes, "q8_0", n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                       n_kv=config.num_key_value_heads, overrides=overrides)  # overridden and float tensors
    forced = {k for k in shapes if any(p.search(gguf_name(k)) for p, _ in _parsed(overrides))}
    free = [k for k in shapes if k not in forced and allows_quantization(gguf_name(k), shapes[k])]
    m, n = fisher(model, ids, window=window)
    sd = model.state_dict()
    costs: dict[str, dict[str, float]] = {}
    sizes: dict[str, dict[str, int]] = {}
    raw: dict[tuple[str, str], np.ndarray] = {}
    with console.progress("trying types", total=len(free)) as bar:
        for k in free:
            w = sd[k].float().numpy()
            sens = m.get(k, 0) + (m.get("lm_head.weight", 0) if k == "model.embed_tokens.weight"
                                  and config.tie_word_embeddings else 0)
            costs[k], sizes[k] = {}, {}
            for t in candidates(k, shapes[k]):
                b = ggml.quantize(w, t, imatrix=(values or {}).get(k), name=gguf_name(k))
                dw = torch.from_numpy(w - ggml.dequantize(b, t, w.shape[-1]).reshape(w.shape))
                costs[k][t] = float(0.5 * (torch.as_tensor(sens) * dw * dw).sum() / n)
                sizes[k][t] = b.nbytes
                raw[k, t] = b
            bar.update(1)
    eval_ids = ids[:MEASURE_TOKENS]
    scale, tried = 1.0, []
    for round_ in range(ROUNDS):
        choice = _greedy(costs, sizes, target / scale)
        predicted = sum(costs[k][t] for k, t in choice.items())
        types = {**fixed, **choice}
        if any(types == t for t, *_ in tried):
            break
        measured = _measure(model, types, raw, eval_ids, window, values)
        size = sum(sizes[k][t] for k, t in choice.items())
        tried.append((types, measured, predicted, size))
        console.log(f"target-kl round {round_ + 1}: predicted {predicted:.4g}, measured {measured:.4g}, "
                    f"{8 * size / sum(np.prod(shapes[k]) for k in choice):.3f} bits/weight")
        scale = scale * measured / max(predicted, 1e-12) if predicted > 0 else scale
        if measured <= target and round_ > 0 and measured > 0.8 * target:
            break
    ok = [t for t in tried if t[1] <= target]
    types, measured, predicted, size = min(ok, key=lambda t: t[3]) if ok else min(tried, key=lambda t: t[1])
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    report = {"target_kl": target, "measured_kl": measured, "predicted_kl": predicted, "met": bool(ok),
              "rounds": len(tried), "tokens": len(eval_ids), "type_counts": dict(sorted(counts.items())),
              "choices": {k: t for k, t in sorted(types.items()) if t not in FLOAT_TYPES}}
    return types, report


def _parsed(overrides):
    from gentool.codecs.ggml_mixes import parse_tensor_type

    return [parse_tensor_type(o) for o in overrides]


def _measure(model, types, raw, ids, window, values) -> float:
    """Mean KL of the float model to a copy quantized with `types` (bytes from the candidates' cache)."""
    q = copy.deepcopy(model)
    state = {}
    for k, t in types.items():
        if t in FLOAT_TYPES:
            continue
        b = raw.get((k, t))
        if b is None:  # a fixed (overridden) type: quantize it now
            w = model.state_dict()[k].float().numpy()
            b = ggml.quantize(w, t, imatrix=(values or {}).get(k), name=gguf_name(k))
        state[k] = torch.from_numpy(b)
    for k, t in types.items():
        if t == "F16":
            q.state_dict()[k].copy_(q.state_dict()[k].half().float())
    install_ggml(q, state, {"tensor_types": types}, dtype=torch.float32)
    r = compare_logits(model, q, ids, window=window, batch_size=4)
    del q
    return r["kl_mean"]
