"""`gentool quantize`: write a quantized-checkpoint (or a dequantized LM checkpoint) and measure the damage.

The damage report compares base and quantized model on the same tokens and windows, with the figures llama.cpp's
`perplexity --kl-divergence` prints: perplexity of both and its relative change, mean and 99th-percentile
KL(base ‖ quant) of the next-token distributions, top-1 agreement; plus size and bits per weight.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gentool import console
from gentool.errors import UsageProblem

SCHEME_NAMES = {"int8": "int8-channel", "int4": "int4-group", "nf4": "nf4", "fp8": "fp8-e4m3"}


def _base_dtype(path: Path) -> torch.dtype:
    from gentool.models.checkpoint import DTYPES

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    return DTYPES.get(cfg.get("torch_dtype") or cfg.get("dtype") or "float32", torch.float32)


def _weights_bytes(path: Path) -> int:
    from gentool.models.checkpoint import weight_files

    return sum(f.stat().st_size for f in weight_files(path))


def _copy_tokenizer(lm, directory: Path) -> dict[str, Any]:
    from gentool.artifacts import sha256_file

    if lm.tokenizer_path is None:
        return {}
    shutil.copy(lm.tokenizer_path, directory / lm.tokenizer_path.name)
    for extra in ("tokenizer_config.json", "special_tokens_map.json"):
        if (lm.path / extra).is_file():
            shutil.copy(lm.path / extra, directory / extra)
    return {"tokenizer_file": lm.tokenizer_path.name, "tokenizer_id": "sha256:" + sha256_file(lm.tokenizer_path)}


def check_options(scheme: str, group_size: int | None) -> int:
    from gentool.models.quant_pack import INT4_GROUP_SIZES, SCHEMES

    if scheme not in SCHEMES:
        raise UsageProblem(f"unknown scheme {scheme!r}", hint="use --scheme " + ", ".join(SCHEMES))
    if group_size is not None and scheme != "int4":
        raise UsageProblem(f"--group-size applies to int4 only ({scheme} uses "
                           f"{'blocks of 64' if scheme == 'nf4' else 'one scale per output row'})")
    group_size = group_size or 128
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise UsageProblem(f"group size {group_size} is not supported",
                           hint="use --group-size " + ", ".join(map(str, INT4_GROUP_SIZES)))
    return group_size


def quantize_checkpoint(ckpt: Path, out: Path, *, scheme: str | None, group_size: int | None = None,
                        skip: list[str] | None = None, keep_16bit: list[str] | None = None, dequantize: bool = False,
                        eval_data: list[str] | None = None, eval_options: dict | None = None, force: bool = False,
                        verify: bool = True) -> dict[str, Any]:
    from gentool.artifacts import MANIFEST, check_output, create_artifact, input_ref, read_artifact
    from gentool.models.checkpoint import load_lm, save_lm
    from gentool.models.quant import (DEFAULT_SKIP, dequantize_model, keep_16bit_patterns, quantization_config,
                                      quantize_model, quantized_modules)

    ckpt = Path(ckpt)
    check_output(out, force=force)
    qconf = quantization_config(ckpt) if ckpt.is_dir() else None
    if qconf is not None and not dequantize:
        raise UsageProblem(f"the checkpoint is already quantized ({qconf.get('scheme')})", path=ckpt,
                           hint="quantize the 16-bit original, or pass --dequantize to write it back as an LM "
                                "checkpoint")
    if qconf is None and scheme is None:
        raise UsageProblem("no --scheme given", hint="use --scheme int8, int4, nf4 or fp8")
    if qconf is None:
        group_size = check_options(scheme, group_size)
    elif scheme is not None:
        raise UsageProblem("--scheme with --dequantize of a quantized checkpoint", path=ckpt,
                           hint="drop --scheme: the checkpoint's own scheme is undone")
    skip = list(DEFAULT_SKIP if skip is None else skip)
    manifest = read_artifact(ckpt, verify=verify) if (ckpt / MANIFEST).is_file() else None
    lm = load_lm(ckpt, verify=verify)  # float32; a quantized checkpoint comes with its quantized layers
    base_dtype = _base_dtype(ckpt) if qconf is None else _base_dtype_from(qconf)
    info = {}
    if qconf is None:
        keep = keep_16bit_patterns(keep_16bit or [], lm.config.num_hidden_layers)
        info = quantize_model(lm.model, scheme, group_size=group_size, skip=skip, keep_16bit=keep)
        if not info["quantized"]:
            raise UsageProblem("--skip and --keep-16bit leave no layer to quantize")
    recipe = ({"dequantize": True} if qconf is not None else
              {"scheme": SCHEME_NAMES[scheme], "group_size": group_size if scheme == "int4" else None,
               "symmetric": scheme in ("int8", "fp8"), "skip": skip, "keep_16bit": list(keep_16bit or []),
               "calibration": None, "dequantize": dequantize})
    inputs = [input_ref("base", manifest or ckpt)]
    kind = "lm-checkpoint" if dequantize else "quantized-checkpoint"
    with create_artifact(out, kind, force=force, config=recipe, inputs=inputs) as art:
        tok = _copy_tokenizer(lm, art.dir)
        if dequantize:
            if qconf is None:  # what the quantized checkpoint would hold: the kept tensors rounded to 16-bit
                qmods = quantized_modules(lm.model)
                with torch.no_grad():
                    for k, t in lm.model.state_dict().items():
                        if t.is_floating_point() and (k.rsplit(".", 1)[0] not in qmods or k.endswith(".bias")):
                            t.copy_(t.to(_half(base_dtype)))
            dequantize_model(lm.model)
            save_lm(lm.model, lm.config, art.dir, dtype=base_dtype)
            art.contents.update(architecture="llama", n_params=lm.config.n_params(), vocab_size=lm.config.vocab_size,
                                n_params_non_embedding=lm.config.n_params(non_embedding=True),
                                context_length=lm.config.max_position_embeddings,
                                dtype=str(base_dtype).replace("torch.", ""), **tok,
                                dequantized_from=(qconf or {}).get("scheme", SCHEME_NAMES.get(scheme)))
            result = {"output": str(out), "kind": kind, "dequantized": True}
        else:
            stats = save_quantized(lm, art.dir, scheme, group_size, skip, keep_16bit or [], info, base_dtype)
            base_bytes = _weights_bytes(ckpt)
            base_sha = (manifest.files.get("model.safetensors", {}).get("sha256") if manifest else None)
            art.contents.update(architecture="llama", base_model_relation="quantized",
                                base_id=manifest.id if manifest else inputs[0].get("sha256"), base_sha256=base_sha
                                or inputs[0].get("sha256"), base_bytes=base_bytes,
                                compression_ratio=base_bytes / stats["bytes"], vocab_size=lm.config.vocab_size,
                                context_length=lm.config.max_position_embeddings, **tok, **stats)
            result = {"output": str(out), "scheme": SCHEME_NAMES[scheme], "group_size": recipe["group_size"],
                      "layers_quantized": len(info["quantized"]), "tensors_16bit": len(stats["skipped"]),
                      "bits_per_weight": stats["bits_per_weight"], "bits_per_param": stats["bits_per_param"],
                      "bytes": stats["bytes"], "base_bytes": base_bytes, "compression_ratio": base_bytes / stats["bytes"]}
        lm.model = None  # free it before loading the two models to compare
        if eval_data:
            console.log("measuring the damage on " + ", ".join(map(str, eval_data)))
            opts = dict(eval_options or {})
            device, dtype = opts.pop("device", "cpu"), opts.pop("dtype", torch.float32)
            base = load_lm(ckpt, device=device, dtype=dtype, verify=False)
            quant = load_lm(art.dir, device=device, dtype=dtype, verify=False)
            report = damage_report(base, quant, eval_data, device=device, dtype=dtype, verify=verify, **opts)
            art.metrics.update(report)
            result.update(report)
    return result


def _base_dtype_from(qconf: dict) -> torch.dtype:
    from gentool.models.checkpoint import DTYPES

    return DTYPES.get(qconf.get("base_dtype", "bfloat16"), torch.bfloat16)


def _half(base_dtype: torch.dtype) -> torch.dtype:
    """The 16-bit dtype of the tensors a quantized checkpoint keeps: the base's own, or bfloat16."""
    return base_dtype if base_dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def save_quantized(lm, directory: Path, scheme: str, group_size: int, skip: list[str], keep_16bit: list[str],
                   info: dict, base_dtype: torch.dtype) -> dict[str, Any]:
    """model.safetensors (codes + companions, the rest in 16-bit), config.json with `quantization_config`."""
    from safetensors.torch import save_file

    from gentool.models.checkpoint import DTYPE_NAMES, save_lm
    from gentool.models.quant import quantized_modules

    half = _half(base_dtype)
    qmods = quantized_modules(lm.model)
    state = {}
    for k, v in lm.model.state_dict().items():
        if k.rsplit(".", 1)[0] in qmods and not k.endswith(".bias"):
            state[k] = v
        else:
            state[k] = v.to(half) if v.is_floating_point() else v
    if lm.config.tie_word_embeddings and "lm_head" not in qmods:
        state.pop("lm_head.weight", None)
    save_lm(state, lm.config, directory)  # config.json + generation_config.json (+ weights, rewritten below)
    state = {k: v.contiguous().cpu() for k, v in state.items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt", "gentool.quantization": scheme})
    cfg = json.loads((directory / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if key in cfg:
            cfg[key] = DTYPE_NAMES[half]
    qbits = sum(v.numel() * v.element_size() * 8 for k, v in state.items() if k.rsplit(".", 1)[0] in qmods
                and not k.endswith(".bias"))
    qweights = sum(m.in_features * m.out_features for m in qmods.values())
    n_params = sum(m.in_features * m.out_features for m in qmods.values()) + sum(
        v.numel() for k, v in state.items() if k.rsplit(".", 1)[0] not in qmods or k.endswith(".bias"))
    all_bits = sum(v.numel() * v.element_size() * 8 for v in state.values())
    skipped = [k for k in info["skipped"] if k in state]
    cfg["quantization_config"] = {
        "quant_method": "gentool", "scheme": scheme, "group_size": group_size if scheme == "int4" else None,
        "skip": skip, "keep_16bit": keep_16bit, "base_dtype": DTYPE_NAMES.get(base_dtype, "float32"),
        "tensors": {"int8": "weight int8 (out, in); weight_scale float32 (out,): w = q * scale",
                    "int4": "weight uint8 (out, in/2), two codes per byte, high nibble first; weight_scale, "
                            "weight_zero bf16 (out, in/group): w = (q - 8) * scale + zero",
                    "nf4": "weight uint8 (out, in/2) NF4 codes, high nibble first, blocks of 64 row-major; "
                           "weight_absmax int8 per block, weight_absmax_scale float32 per 256 blocks, "
                           "weight_absmax_mean float32: absmax = q * scale + mean",
                    "fp8": "weight float8_e4m3fn (out, in); weight_scale float32 (out,): w = q * scale"}[scheme]}
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return {"scheme": SCHEME_NAMES[scheme], "group_size": group_size if scheme == "int4" else None,
            "tensors_quantized": [f"{n}.weight" for n in qmods], "skipped": skipped,
            "bits_per_weight": qbits / max(qweights, 1), "bits_per_param": all_bits / max(n_params, 1),
            "bytes": (directory / "model.safetensors").stat().st_size, "n_params": n_params}


# --- damage -------------------------------------------------------------------------------------------------------------
def eval_ids(lm, data: list[str], *, split: str = "val", max_tokens: int | None = None, verify: bool = True):
    """Token ids of token shards (checked against the model's tokenizer) or text files."""
    from gentool.artifacts import MANIFEST
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.perplexity import load_text_ids

    tok = load_tokenizer(lm.tokenizer_path) if lm.tokenizer_path else None
    if len(data) == 1 and Path(data[0]).is_dir() and (Path(data[0]) / MANIFEST).is_file():
        from gentool.data.shards import open_shards

        shards = open_shards(data[0], split, verify=verify)
        if tok is None or shards.tokenizer_id != tok.sha256:
            raise UsageProblem("the shards were encoded with a different tokenizer than the checkpoint's",
                               path=data[0], hint="use shards made with the checkpoint's tokenizer")
        n = len(shards) if max_tokens is None else min(len(shards), max_tokens + 1)
        ids = torch.from_numpy(shards.tokens(0, n)).long()
    else:
        if tok is None:
            raise UsageProblem("the checkpoint has no tokenizer", path=lm.path, hint="evaluate on token shards")
        ids, _ = load_text_ids(data, tok)
        ids = ids[: max_tokens + 1] if max_tokens is not None else ids
    if len(ids) < 2:
        raise UsageProblem("the evaluation data holds fewer than two tokens", hint="pass more text")
    if int(ids.max()) >= lm.config.vocab_size:
        raise UsageProblem(f"token id {int(ids.max())} is outside the model's vocabulary", hint="wrong tokenizer")
    return ids


@torch.no_grad()
def compare_logits(base: torch.nn.Module, quant: torch.nn.Module, ids: torch.Tensor, *, window: int,
                   stride: int | None = None, batch_size: int = 8, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Score every token once (gentool's windows) under both models; per-token NLLs, KL(base‖quant), top-1."""
    from gentool.lm.perplexity import plan_windows

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
    ids = eval_ids(quant_lm, data, split=split, max_tokens=max_tokens, verify=verify)
    window = window or quant_lm.config.max_position_embeddings
    if not 2 <= window <= quant_lm.config.max_position_embeddings:
        raise UsageProblem(f"--window must be between 2 and the model's context "
                           f"({quant_lm.config.max_position_embeddings})")
    return compare_logits(base_lm.model, quant_lm.model, ids, window=window, stride=stride, batch_size=batch_size,
                          device=device, dtype=dtype)


def compare_checkpoints(quant: Path, reference: Path, data: list[str], *, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, verify: bool = True, **options) -> dict[str, Any]:
    """`gentool perplexity QUANT --reference BASE DATA`: the damage report of any model against a reference."""
    from gentool.models.checkpoint import load_lm

    if not data:
        raise UsageProblem("no data to score", hint="pass a token-shards directory, text files, or - for stdin")
    base = load_lm(reference, device=device, dtype=dtype, verify=verify)
    q = load_lm(quant, device=device, dtype=dtype, verify=verify)
    report = damage_report(base, q, data, device=device, dtype=dtype, verify=verify, **options)
    qc = q.manifest.contents if q.manifest is not None and q.manifest.kind == "quantized-checkpoint" else {}
    extra = {k: qc[k] for k in ("scheme", "bits_per_weight", "bytes", "compression_ratio") if k in qc}
    return {"checkpoint": str(quant), "reference": str(reference), **extra, **report}
