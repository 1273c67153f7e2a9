"""What `lora-merge` combines: adapters and fully fine-tuned checkpoints of one base (task vectors), checked against
the base and each other before any work, then combined per module by one of adapters/methods.py's methods into
low-rank factors (an adapter) or dense changes (folded into the base)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gentool.adapters.methods import (FACTOR_METHODS, SVD_METHODS, check_method, combine, combine_factors,
                                      dense_kind, peft_injection_draws, single_adapter_method, svd_factors)
from gentool.adapters.peft import ADAPTER_CONFIG, Adapter, Base, check_adapter, linear_modules, read_adapter, read_base
from gentool.errors import UsageProblem


@dataclass
class Source:
    path: Path
    weight: float
    adapter: Adapter | None = None     # a LoRA adapter (gentool or PEFT)
    tuned: Base | None = None          # or a fully fine-tuned checkpoint of the base: its task vector θ − θ_base


@dataclass
class Plan:
    method: str
    space: str                  # "factors": A and B combined separately (PEFT); "dense": the changes ΔW
    rank: int | None            # SVD truncation of every combined linear change (None: none)
    as_adapter: bool
    density: float | None = None
    majority_sign: str = "total"
    seed: int = 0
    svd_clamp: float | None = None


@dataclass
class Combined:
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B), s = 1
    dense: dict[str, torch.Tensor] = field(default_factory=dict)    # tensor name -> combined change (float32)
    exact: dict[str, torch.Tensor] = field(default_factory=dict)    # tensor name -> merged value, taken as is


def parse_source_arg(arg: str) -> tuple[Path, float]:
    """`DIR` or `DIR:WEIGHT` (the weight a float)."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(arg), 1.0


def read_sources(args: list[str], *, verify: bool = True) -> list[Source]:
    out = []
    for arg in args:
        path, w = parse_source_arg(arg)
        if (path / ADAPTER_CONFIG).is_file() or not (path / "config.json").is_file():
            out.append(Source(path, w, adapter=read_adapter(path, verify=verify)))
            continue
        tuned = read_base(path, verify=verify)
        if tuned.quantization:
            raise UsageProblem("a quantized checkpoint cannot be merged as a fine-tune (its changes are rounding)",
                               path=path, hint="merge adapters or 16-bit fine-tunes of the base")
        out.append(Source(path, w, tuned=tuned))
    return out


def plan_merge(base: Base, sources: list[Source], *, method: str = "task_arithmetic", density: float | None = None,
               majority_sign: str = "total", seed: int = 0, rank: int | None = None, svd_clamp: float | None = None,
               as_adapter: bool = False, ignore_base_mismatch: bool = False) -> Plan:
    """Every refusal before any work: bases, shapes, and what the method cannot take (mixed ranks, DoRA, ...)."""
    check_method(method, density, majority_sign)
    if not sources:
        raise UsageProblem("nothing to merge", hint="pass one or more adapter (or fine-tuned checkpoint) directories")
    if svd_clamp is not None and not 0.0 < svd_clamp <= 1.0:
        raise UsageProblem(f"--svd-clamp {svd_clamp:g} is outside (0, 1]", hint="it is a quantile, e.g. 0.99")
    if rank is not None and method not in SVD_METHODS and not as_adapter:
        raise UsageProblem(f"--rank applies to the SVD methods ({', '.join(SVD_METHODS)}) and to --as-adapter, "
                           f"not to --method {method}")
    adapters = [s for s in sources if s.adapter is not None]
    tuned = [s for s in sources if s.tuned is not None]
    _check_bases(base, adapters, tuned, ignore_base_mismatch)
    if len(sources) == 1 and adapters:
        single = single_adapter_method(method, rank, any("m" in p for p in adapters[0].adapter.lora.values()))
        if single != method:
            from gentool.console import log

            log(f"one adapter: merged by {single}, as PEFT merges a single adapter linearly whatever the method "
                f"(--method {method} prunes or drops only across adapters)")
            method, density = single, None
    if as_adapter and method == "task_arithmetic" and not tuned and rank is None:
        method = "cat"  # the exact sum of adapters as one adapter: their factors stacked (rank Σ r)
    space = "factors" if method in (*FACTOR_METHODS, "cat") and not tuned else "dense"
    name = f"--method {method}"
    if space == "factors":
        for s in adapters:
            if s.adapter.cfg.use_dora:
                raise UsageProblem(f"{name} cannot take the DoRA adapter {s.path}: its magnitude vector has no "
                                   f"low-rank form", path=s.path, hint="merge it into a checkpoint with "
                                   "task_arithmetic, or use an SVD method (svd, ties_svd, ...)")
        if method != "cat":
            _check_equal_ranks(name, adapters)
    if as_adapter:
        for s in adapters:
            if s.adapter.saved:
                raise UsageProblem(f"{s.path} has modules_to_save ({next(iter(s.adapter.saved))}), which a LoRA "
                                   f"adapter cannot hold", path=s.path, hint="merge into a checkpoint instead")
    ranks = [max(s.adapter.lora[m]["A"].shape[0] for m in s.adapter.lora) for s in adapters if s.adapter.lora]
    if method in SVD_METHODS or (as_adapter and space == "dense"):
        if rank is None and as_adapter:
            if tuned or not ranks:
                raise UsageProblem(f"{name} writing an adapter needs --rank (fine-tuned checkpoints have none)")
            rank = max(ranks)  # PEFT's default svd_rank
    elif rank is not None:
        raise UsageProblem(f"--rank does not apply to {name} writing an adapter of the factors",
                           hint="use an SVD method (svd, ties_svd, ...) for a chosen rank")
    if rank is not None:
        _check_rank(rank, base, adapters, tuned)
    if svd_clamp is not None and rank is None:
        raise UsageProblem("--svd-clamp needs an SVD truncation (--rank, or --as-adapter with an SVD method)")
    return Plan(method, space, rank, as_adapter, density, majority_sign, seed, svd_clamp)


def _check_bases(base: Base, adapters: list[Source], tuned: list[Source], ignore: bool) -> None:
    seen: dict[str, Path] = {}
    for s in adapters:
        sha = s.adapter.base.get("sha256")
        if sha and seen and sha not in seen and not ignore:
            other, other_path = next(iter(seen.items()))
            raise UsageProblem(f"the adapters belong to different bases: {other_path} to weights sha256 "
                               f"{other[:12]}…, this one to {sha[:12]}…", path=s.path,
                               hint="merge adapters trained on one base")
        if sha:
            seen.setdefault(sha, s.path)
    for s in adapters:
        of_original = s.adapter.base.get("quantized_from") == base.sha256
        if of_original:
            from gentool.console import log

            log(f"{s.path}: trained on a quantized copy of this base (QLoRA); merging into the 16-bit original")
        check_adapter(s.adapter, base.shapes, base_sha256=base.sha256, ignore_base_mismatch=ignore or of_original,
                      base_path=base.path)
    check_fine_tunes(base, tuned, ignore)


def check_fine_tunes(base: Base, tuned: list[Source], ignore: bool) -> None:
    """Fine-tuned checkpoints must have the base's tensors and shapes, and (when recorded) come from it."""
    for s in tuned:
        if set(s.tuned.shapes) != set(base.shapes):
            key = min(set(s.tuned.shapes) ^ set(base.shapes))
            raise UsageProblem(f"tensor {key} is in only one of this checkpoint and the base", path=s.path,
                               hint="merge fine-tunes of the base, with the same architecture")
        for key, shape in base.shapes.items():
            if tuple(s.tuned.shapes[key]) != tuple(shape):
                raise UsageProblem(f"{key} has shape {tuple(s.tuned.shapes[key])}, the base's is {tuple(shape)}",
                                   path=s.path, hint="merge fine-tunes of the base")
        init = next((i.get("id") for i in (s.tuned.manifest.inputs if s.tuned.manifest else [])
                     if i.get("role") == "init"), None)
        base_id = getattr(base.manifest, "id", None)
        if init and base_id and init != base_id and not ignore:
            raise UsageProblem(f"this checkpoint was fine-tuned from {init[:19]}…, not from the base ({base_id[:19]}…)",
                               path=s.path, hint="merge fine-tunes of one base, or --ignore-base-mismatch")


def _check_equal_ranks(name: str, adapters: list[Source]) -> None:
    ranks: dict[str, tuple[int, Path]] = {}
    for s in adapters:
        for m, p in s.adapter.lora.items():
            r = p["A"].shape[0]
            first = ranks.setdefault(m, (r, s.path))
            if first[0] != r:
                raise UsageProblem(f"{name} combines LoRA factors, which needs equal ranks: {m} has rank {first[0]} "
                                   f"in {first[1]} and {r} here", path=s.path,
                                   hint="use cat, svd or ties_svd, which take mixed ranks")


def _check_rank(rank: int, base: Base, adapters: list[Source], tuned: list[Source]) -> None:
    if rank < 1:
        raise UsageProblem(f"--rank must be at least 1, got {rank}")
    modules = set(linear_modules(base.shapes)) if tuned else {m for s in adapters for m in s.adapter.lora}
    for m in sorted(modules):
        out_f, in_f = base.shapes[f"{m}.weight"]
        if rank > min(out_f, in_f):
            raise UsageProblem(f"--rank {rank} exceeds the rank of {m}'s ({out_f} x {in_f}) weight, "
                               f"{min(out_f, in_f)}", hint=f"use --rank {min(out_f, in_f)} or lower")


def module_order(config) -> dict[str, int]:
    """Position of every module and tensor in the model's definition order (PEFT walks modules in this order,
    which fixes the order of DARE's random draws)."""
    from gentool.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    names = [n for n, _ in model.named_modules()] + [k for k, _ in model.named_parameters()]
    return {n: i for i, n in enumerate(names)}


def _dora_weight(s: Source, module: str, weight: torch.Tensor) -> torch.Tensor:
    """DoRA's merged weight m ⊙ (W + s·B A) / ‖W + s·B A‖_row, float32."""
    p = s.adapter.lora[module]
    merged = weight + s.adapter.scaling(module) * (p["B"].float() @ p["A"].float())
    return merged * (p["m"].float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)


def _delta(s: Source, module: str, weight: torch.Tensor | None) -> torch.Tensor:
    """ΔW of one adapter at one module, float32: s·B A, or for DoRA the change of its merged weight."""
    p = s.adapter.lora[module]
    if "m" in p:
        return _dora_weight(s, module, weight) - weight
    return s.adapter.scaling(module) * (p["B"].float() @ p["A"].float())


def combine_sources(sources: list[Source], plan: Plan, base_weight, shapes: dict[str, tuple],
                    order: dict[str, int]) -> Combined:
    """Combine every module / tensor the sources change. `base_weight(name)` gives a base tensor in float32;
    `shapes` are the base's (dense) tensor shapes."""
    out = Combined()
    gen = torch.Generator().manual_seed(plan.seed)
    adapters = [s for s in sources if s.adapter is not None]
    tuned = [s for s in sources if s.tuned is not None]
    kw = {"density": plan.density, "majority_sign": plan.majority_sign, "gen": gen}
    modules = sorted({m for s in adapters for m in s.adapter.lora}, key=lambda m: (order.get(m, 1 << 30), m))
    if "dare" in plan.method and not tuned:  # PEFT's draws for the new adapter's layers come before the masks
        peft_injection_draws(gen, [tuple(shapes[f"{m}.weight"]) for m in modules], _peft_rank(adapters, plan),
                             adapters[0].adapter.raw_config.get("init_lora_weights", True))
    rank_modules = set(linear_modules(shapes)) if tuned else set()
    tuned_files = {}
    for s in tuned:
        from gentool.models.checkpoint import read_tensors

        tuned_files[s.path] = read_tensors(s.tuned.weight_files)
    for m in modules:
        users = [s for s in adapters if m in s.adapter.lora]
        if plan.space == "factors":
            pairs = [(s.adapter.lora[m]["A"].float(), s.adapter.lora[m]["B"].float()) for s in users]
            scal = [s.adapter.scaling(m) for s in users]
            if plan.method == "cat":
                out.factors[m] = (torch.cat([a * s.weight * c for (a, _), s, c in zip(pairs, users, scal)]),
                                  torch.cat([b for _, b in pairs], dim=1))
            else:
                out.factors[m] = combine_factors(plan.method, pairs, [s.weight for s in users], scal, **kw)
            continue
        if not tuned and plan.method in ("task_arithmetic", "svd") and plan.rank is not None \
                and not any("m" in s.adapter.lora[m] for s in users):  # stays low rank: SVD from the factors
            b_cat = torch.cat([s.weight * s.adapter.scaling(m) * s.adapter.lora[m]["B"].float() for s in users], 1)
            a_cat = torch.cat([s.adapter.lora[m]["A"].float() for s in users])
            a, b, _ = svd_factors(None, plan.rank, clamp=plan.svd_clamp, factors=(b_cat, a_cat))
            out.factors[m] = (a, b)
            continue
        w0 = base_weight(f"{m}.weight") if any("m" in s.adapter.lora[m] for s in users) or tuned else None
        deltas = [_delta(s, m, w0) for s in users]
        if plan.method == "task_arithmetic" and not tuned and len(users) == 1 and users[0].weight == 1.0 \
                and w0 is not None and plan.rank is None:  # one DoRA adapter: its merged weight, bit for bit
            out.exact[f"{m}.weight"] = w0 + deltas[0] if "m" not in users[0].adapter.lora[m] else \
                _dora_weight(users[0], m, w0)
            continue
        weights = [s.weight for s in users]
        for s in tuned:
            deltas.append(tuned_files[s.path][f"{m}.weight"].float() - (w0 if w0 is not None else
                                                                         base_weight(f"{m}.weight")))
            weights.append(s.weight)
        _dense_or_factors(out, m, combine(dense_kind(plan.method), deltas, weights, **kw), plan)
    _rest(out, sources, plan, base_weight, list(shapes), set(modules), rank_modules, tuned_files, order, kw)
    return out


def _peft_rank(adapters: list[Source], plan: Plan) -> int:
    """The rank PEFT gives the merged adapter: the adapters' (largest) rank, or the SVD rank."""
    ranks = []
    for s in adapters:
        raw = s.adapter.raw_config
        r = raw.get("r") or max(p["A"].shape[0] for p in s.adapter.lora.values())
        ranks.append(max([r, *(raw.get("rank_pattern") or {}).values()]))
    return plan.rank if plan.method in SVD_METHODS and plan.rank is not None else max(ranks)


def _dense_or_factors(out: Combined, module: str, delta: torch.Tensor, plan: Plan) -> None:
    if plan.rank is None:
        out.dense[f"{module}.weight"] = delta
    else:
        a, b, _ = svd_factors(delta, plan.rank, clamp=plan.svd_clamp)
        out.factors[module] = (a, b)


def _rest(out, sources, plan, base_weight, keys, done, rank_modules, tuned_files, order, kw) -> None:
    """Tensors that are not LoRA modules of the adapters: modules_to_save tensors and the fine-tunes' changes."""
    touched = {k for s in sources if s.adapter is not None for k in s.adapter.saved}
    if tuned_files:
        touched |= set(keys)
    for key in sorted(touched - {f"{m}.weight" for m in done}, key=lambda k: (order.get(k, 1 << 30), k)):
        w0 = base_weight(key).float()
        users = [s for s in sources if (s.adapter is not None and key in s.adapter.saved) or s.tuned is not None]
        fulls = [s.adapter.saved[key].float() if s.adapter is not None else tuned_files[s.path][key].float()
                 for s in users]
        module = key.removesuffix(".weight")
        lowrank = plan.rank is not None and module in rank_modules and key.endswith(".weight")
        if plan.method == "task_arithmetic" and len(users) == 1 and users[0].weight == 1.0 and not lowrank \
                and not plan.as_adapter:
            if not torch.equal(fulls[0], w0):
                out.exact[key] = fulls[0]  # one full tensor at weight 1: itself, bit for bit
            continue
        delta = combine(dense_kind(plan.method), [f - w0 for f in fulls], [s.weight for s in users], **kw)
        if not torch.any(delta):
            continue
        if lowrank:
            _dense_or_factors(out, module, delta, plan)
        elif plan.as_adapter:
            from gentool.console import warn

            warn(f"{key} changes but is not a linear layer a LoRA adapter can hold: left out of the adapter")
        else:
            out.dense[key] = delta
