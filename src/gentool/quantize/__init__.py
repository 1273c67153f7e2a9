"""`gentool quantize`: write a quantized-checkpoint (or a dequantized LM checkpoint) and measure the damage.

Schemes: gentool's int8 / int4 (groups) / NF4 / FP8 (codecs/quant.py, models/quant.py) and llama.cpp's GGML types
by llama-quantize's mix names (q4_0 … q8_0, q2_k, q3_k_s/m/l, q4_k_m, q5_k_m, q6_k, iq4_nl, iq4_xs;
quantize/ggml.py), whose blocks are what llama-quantize writes byte for byte. Options that change the numbers:
- `--method optimized`: int4 scale/zero search (quantize/int4.py) instead of round-to-nearest;
- `--calibrate DATA`: an importance matrix from the model's own activations (quantize/calibrate.py), stored as
  `imatrix.gguf` in the artifact; it drives llama.cpp's importance-weighted block search for GGML types and GPTQ
  for int4; `--imatrix FILE` uses a llama.cpp imatrix instead;
- `--target-kl X`: per-tensor GGML types chosen for a mean-KL budget on the calibration data (quantize/target.py).
The damage report (evaluation/compare.py) compares base and quantized model on the same tokens with
`llama-perplexity --kl-divergence`'s figures.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import MANIFEST, check_output, create_artifact, input_ref, read_artifact
from gentool.codecs.quant import INT4_GROUP_SIZES, SCHEMES
from gentool.devices import dtype_name
from gentool.errors import UsageProblem
from gentool.evaluation.compare import damage_report
from gentool.models.checkpoint import load_lm, quantization_config, save_lm
from gentool.models.quant import (
    DEFAULT_SKIP,
    HEAD,
    LAYERS,
    Int4Linear,
    int4_group,
    dequantize_model,
    keep_16bit_patterns,
    layer_schemes,
    matches,
    quantize_model,
    quantized_modules,
)
from gentool.models.quant_ggml import dequantize_embeddings
from gentool.quantize import calibrate as cal_
from gentool.quantize.ggml import GGML_SCHEMES, is_ggml, plan_for, quantize_model_ggml, save_ggml, weight_shapes
from gentool.quantize.save import (
    SCHEME_NAMES,
    base_dtype,
    base_dtype_from,
    copy_tokenizer,
    half_dtype,
    save_quantized,
    weights_bytes,
)

METHODS = ("rtn", "optimized")
FLOAT_HEAD = ("float", "f32", "f16", "bf16")  # --output-tensor-type for gentool's schemes: the head kept 16-bit
__all__ = ["GGML_SCHEMES", "METHODS", "SCHEME_NAMES", "check_options", "quantize_checkpoint"]


def check_options(scheme: str, group_size: int | None, *, method: str = "rtn", tensor_types=(), skip=None,
                  keep_16bit=None, calibrated: bool = False, target_kl: float | None = None,
                  mix_flags: list[str] | tuple = ()) -> int:
    """Refuse option combinations that make no sense, before any work. Returns the int4 group size. `mix_flags`
    are llama-quantize's type options given (--pure, --output-tensor-type, --token-embedding-type)."""
    ggml = is_ggml(scheme)
    if scheme not in SCHEMES and not ggml:
        raise UsageProblem(f"unknown scheme {scheme!r}",
                           hint="use --scheme " + ", ".join(SCHEMES) + " or a GGML type: " + ", ".join(GGML_SCHEMES))
    if group_size is not None and scheme != "int4":
        raise UsageProblem(f"--group-size applies to int4 only ({scheme} uses "
                           f"{'blocks of 64' if scheme == 'nf4' else 'one scale per output row' if not ggml else 'its own blocks'})")
    if method not in METHODS:
        raise UsageProblem(f"unknown --method {method!r}", hint="use rtn or optimized")
    if method != "rtn" and scheme != "int4":
        raise UsageProblem(f"--method {method} applies to int4 (GGML types use llama.cpp's own search)")
    if tensor_types and not ggml:
        raise UsageProblem("--tensor-type applies to GGML schemes (q4_k_m, q6_k, ...)")
    if (flags := [f for f in mix_flags if f != "--output-tensor-type"]) and not ggml:
        raise UsageProblem(f"{flags[0]} applies to GGML schemes (q4_k_m, q6_k, ...)")
    if mix_flags and target_kl is not None:
        raise UsageProblem(f"{mix_flags[0]} and --target-kl both choose tensor types",
                           hint="under --target-kl pin a tensor's type with --tensor-type PATTERN=TYPE")
    if ggml and (skip is not None or keep_16bit):
        raise UsageProblem("--skip and --keep-16bit apply to gentool's schemes",
                           hint="with GGML types keep tensors 16-bit with --tensor-type PATTERN=f16")
    if calibrated and scheme not in ("int4",) and not ggml:
        raise UsageProblem(f"calibration drives int4 and GGML schemes, not {scheme}")
    if target_kl is not None:
        if not ggml:
            raise UsageProblem("--target-kl chooses GGML types", hint="use it with --scheme q4_k_m (or no --scheme)")
        if not target_kl > 0:
            raise UsageProblem("--target-kl must be positive")
    group_size = group_size or 128
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise UsageProblem(f"group size {group_size} is not supported",
                           hint="use --group-size " + ", ".join(map(str, INT4_GROUP_SIZES)))
    return group_size


def native_head(scheme: str, output_tensor_type: str | None, skip: list[str] | None) -> str:
    """The output head's scheme for gentool's schemes: --output-tensor-type (an int8/int4/nf4/fp8 scheme, or float:
    kept 16-bit), else "auto" (models/quant.py HEAD_SCHEME: int8 for int8/int4/nf4, 16-bit for fp8)."""
    if output_tensor_type is None:
        return "auto"
    head = output_tensor_type.lower()
    if head not in FLOAT_HEAD + SCHEMES:
        raise UsageProblem(f"--output-tensor-type {output_tensor_type}: with --scheme {scheme} the output head is "
                           "float (kept 16-bit), int8, int4, nf4 or fp8",
                           hint="GGML types (q8_0, q6_k, ...) apply to the GGML schemes (--scheme q4_k_m, ...)")
    if skip is not None and matches(HEAD, skip) and head not in FLOAT_HEAD:
        raise UsageProblem(f"--skip keeps {HEAD} 16-bit, --output-tensor-type {output_tensor_type} quantizes it",
                           hint="drop one of them")
    return "float" if head in FLOAT_HEAD else head


def quantize_checkpoint(ckpt: Path, out: Path, *, scheme: str | None, group_size: int | None = None,
                        method: str = "rtn", skip: list[str] | None = None, keep_16bit: list[str] | None = None,
                        tensor_types: list[str] | tuple = (), calibrate: list[str] | None = None,
                        calibrate_split: str = "train", calibrate_tokens: int = cal_.DEFAULT_TOKENS,
                        imatrix: Path | None = None, target_kl: float | None = None, dequantize: bool = False,
                        eval_data: list[str] | None = None, eval_options: dict | None = None, force: bool = False,
                        verify: bool = True, output_tensor_type: str | None = None,
                        token_embedding_type: str | None = None, pure: bool = False) -> dict[str, Any]:
    """`output_tensor_type`, `token_embedding_type` and `pure` are llama-quantize's --output-tensor-type,
    --token-embedding-type and --pure for the GGML schemes."""
    ckpt = Path(ckpt)
    mix_flags = [f for f, v in (("--pure", pure), ("--output-tensor-type", output_tensor_type),
                                ("--token-embedding-type", token_embedding_type)) if v]
    sources = [ckpt, *(eval_data or []), *(calibrate or []), *([imatrix] if imatrix else [])]
    check_output(out, force=force, sources=sources)
    if (kl_tokens := (eval_options or {}).get("kl_tokens")) is not None:
        check_output(kl_tokens, force=force, sources=[*sources, ("the output", out)], file=True,
                     option="--kl-tokens")
    qconf = quantization_config(ckpt) if ckpt.is_dir() else None
    if qconf is not None and not dequantize:
        raise UsageProblem(f"the checkpoint is already quantized ({qconf.get('mix') or qconf.get('scheme')})",
                           path=ckpt, hint="quantize the 16-bit original, or pass --dequantize to write it back as "
                                           "an LM checkpoint")
    if qconf is not None and (scheme is not None or calibrate or imatrix or target_kl or tensor_types or mix_flags):
        raise UsageProblem("--dequantize of a quantized checkpoint takes no quantization options", path=ckpt,
                           hint="drop --scheme and the rest: the checkpoint's own quantization is undone")
    if qconf is None and scheme is None:
        if target_kl is None:
            raise UsageProblem("no --scheme given", hint="use --scheme int8, int4, nf4, fp8 or a GGML type such "
                                                         "as q4_k_m")
        scheme = "q4_k_m"
    scheme = scheme.lower() if scheme else scheme
    if calibrate and imatrix:
        raise UsageProblem("--calibrate and --imatrix both given", hint="pass one source of importance")
    if target_kl is not None and not calibrate:
        raise UsageProblem("--target-kl measures KL on calibration data", hint="add --calibrate DATA")
    if qconf is None:
        group_size = check_options(scheme, group_size, method=method, tensor_types=tensor_types, skip=skip,
                                   keep_16bit=keep_16bit, calibrated=bool(calibrate or imatrix), target_kl=target_kl,
                                   mix_flags=mix_flags)
    ggml = qconf is None and is_ggml(scheme)
    head = "auto" if ggml or qconf is not None else native_head(scheme, output_tensor_type, skip)
    skip = [] if ggml else list(DEFAULT_SKIP if skip is None else skip)
    manifest = read_artifact(ckpt, verify=verify) if (ckpt / MANIFEST).is_file() else None
    lm = load_lm(ckpt, verify=verify)  # float32; a quantized checkpoint comes with its quantized layers
    base_dt = base_dtype(ckpt) if qconf is None else base_dtype_from(qconf)
    inputs = [input_ref("base", manifest or ckpt)]
    info: dict[str, Any] = {}
    cal = values = None
    recipe: dict[str, Any] = {"dequantize": True}
    if qconf is None:
        keep = keep_16bit_patterns(keep_16bit or [], lm.config.num_hidden_layers)
        targets = {} if ggml else layer_schemes(lm.model, scheme, skip + keep, group_size, head)
        shapes = weight_shapes(lm.model, lm.config) if ggml else {}
        if calibrate:
            ids, refs, source = cal_.calibration_ids(lm, calibrate, split=calibrate_split,
                                                     max_tokens=calibrate_tokens, verify=verify)
            inputs += refs
            window = min(512, lm.config.max_position_embeddings)
            gram_for = {f"{n}.weight" for n, s in targets.items() if s == "int4"}
            console.log(f"calibrating on {source['tokens']} tokens of " + ", ".join(source["data"]))
            cal = cal_.collect(lm.model, ids, window=window, gram_for=gram_for, source=source)
            values = cal.values()
        elif imatrix:
            inputs.append(input_ref("imatrix", imatrix))
            values = cal_.read_imatrix_file(Path(imatrix), shapes or _linear_shapes(lm.model))
        recipe = {"scheme": scheme if ggml else SCHEME_NAMES[scheme],
                  "group_size": group_size if scheme == "int4" else None,
                  "method": _method(scheme, ggml, method, calibrated=cal is not None, imatrix=values is not None),
                  "symmetric": scheme in ("int8", "fp8"), "skip": skip, "keep_16bit": list(keep_16bit or []),
                  "tensor_types": list(tensor_types), "target_kl": target_kl,
                  **({"pure": pure, "output_tensor_type": output_tensor_type,
                      "token_embedding_type": token_embedding_type} if ggml and mix_flags else {}),
                  **({} if ggml else {"output_tensor_type": head}),
                  "calibration": cal.source if cal is not None else None,
                  "imatrix": str(imatrix) if imatrix else None, "dequantize": dequantize}
        if ggml:
            if target_kl is not None:
                from gentool.quantize.target import choose_types

                types, info["target"] = choose_types(lm, ids, target_kl, values=values, overrides=tensor_types,
                                                     window=window)
            else:
                types = plan_for(lm.model, lm.config, scheme, overrides=tensor_types, has_imatrix=bool(values),
                                 output_type=output_tensor_type, token_embd_type=token_embedding_type, pure=pure)
            info.update(quantize_model_ggml(lm.model, types, imatrix=values))
        elif scheme == "int4" and (method == "optimized" or values is not None):
            info = _quantize_int4(lm.model, targets, group_size, cal, values)
        else:
            info = quantize_model(lm.model, scheme, group_size=group_size, skip=skip, keep_16bit=keep, head=head)
        if not ggml and not info["quantized"]:
            raise UsageProblem("--skip and --keep-16bit leave no layer to quantize")
    kind = "lm-checkpoint" if dequantize else "quantized-checkpoint"
    with create_artifact(out, kind, force=force, config=recipe, inputs=inputs) as art:
        tok = copy_tokenizer(lm, art.dir)
        if cal is not None:
            cal_.write_imatrix_file(cal, art.dir / "imatrix.gguf", tied=lm.config.tie_word_embeddings)
        if dequantize:
            _save_dequantized(lm, art.dir, qconf, ggml, base_dt)
            art.contents.update(architecture="llama", n_params=lm.config.n_params(), vocab_size=lm.config.vocab_size,
                                n_params_non_embedding=lm.config.n_params(non_embedding=True),
                                context_length=lm.config.max_position_embeddings, dtype=dtype_name(base_dt), **tok,
                                dequantized_from=(qconf or {}).get("mix") or (qconf or {}).get("scheme")
                                or recipe.get("scheme"))
            result = {"output": str(out), "kind": kind, "dequantized": True}
        else:
            extra = {"method": recipe["method"], "calibration": recipe["calibration"]}
            if ggml:
                stats = save_ggml(lm.model, lm.config, art.dir, types, mix=scheme if target_kl is None else
                                  "target-kl", base_dtype=base_dt, extra={**extra, "target_kl": target_kl})
            else:
                if info.get("group_sizes"):  # int4 tensors the default group size does not divide
                    extra["group_sizes"] = info["group_sizes"]
                    console.log(f"int4: group size {group_size} does not divide the input dimension of "
                                f"{len(info['group_sizes'])} layers; they use "
                                + ", ".join(f"{g} ({sum(v == g for v in info['group_sizes'].values())} layers)"
                                            for g in sorted(set(info["group_sizes"].values()), reverse=True)))
                stats = save_quantized(lm, art.dir, scheme, group_size, skip, keep_16bit or [], info, base_dt,
                                       extra=extra)
            base_bytes = weights_bytes(ckpt)
            base_sha = manifest.files.get("model.safetensors", {}).get("sha256") if manifest else None
            art.contents.update(architecture="llama", base_model_relation="quantized",
                                base_id=manifest.id if manifest else inputs[0].get("sha256"),
                                base_sha256=base_sha or inputs[0].get("sha256"), base_bytes=base_bytes,
                                compression_ratio=base_bytes / stats["bytes"], vocab_size=lm.config.vocab_size,
                                context_length=lm.config.max_position_embeddings, **tok, **stats,
                                **({"imatrix_file": "imatrix.gguf"} if cal is not None else {}))
            result = {"output": str(out), "scheme": stats["scheme"], "method": recipe["method"],
                      "group_size": recipe["group_size"], "layers_quantized": len(stats["tensors_quantized"]),
                      "bits_per_weight": stats["bits_per_weight"], "bits_per_param": stats.get("bits_per_param"),
                      "bytes": stats["bytes"], "base_bytes": base_bytes,
                      "compression_ratio": base_bytes / stats["bytes"]}
            if ggml:
                result["type_counts"] = stats["type_counts"]
            else:
                result["lm_head"] = stats["lm_head"]
            if info.get("group_sizes"):  # layers per fallback group size (config.json lists them by name)
                sizes = list(info["group_sizes"].values())
                result["group_size_fallback"] = {str(g): sizes.count(g) for g in sorted(set(sizes), reverse=True)}
            if cal is not None:
                result["calibration_tokens"] = cal.tokens
            if "target" in info:
                art.metrics["target_kl"] = info["target"]
                result["target"] = info["target"]
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


def _method(scheme: str, ggml: bool, method: str, *, calibrated: bool, imatrix: bool) -> str:
    """What decided the codes: llama.cpp's search (with an imatrix or not), GPTQ, importance-weighted or data-free
    int4 search, or round-to-nearest."""
    if ggml:
        return "imatrix" if imatrix else "llama.cpp"
    if scheme == "int4":
        return "gptq" if calibrated else "importance" if imatrix else method
    return "rtn"


def _linear_shapes(model) -> dict[str, tuple[int, ...]]:
    return {f"{n}.weight": tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def _quantize_int4(model, targets: dict[str, str], group_size: int, cal, values) -> dict[str, list[str]]:
    """int4 by GPTQ (calibration Gram matrices), importance-weighted search (an imatrix file) or the data-free
    search (--method optimized); the layers are the same Int4Linear as round-to-nearest's. `targets`: module name
    -> scheme; a layer of another scheme (the output head's int8) is rounded to nearest."""
    from gentool.quantize.int4 import quantize_int4_gptq, quantize_int4_optimized

    groups = {}
    with console.progress("quantizing", total=len(targets)) as bar:
        for name, scheme in targets.items():
            lin = model.get_submodule(name)
            if scheme != "int4":
                model.set_submodule(name, LAYERS[scheme].from_linear(lin, group_size))
                bar.update(1)
                continue
            w, key = lin.weight.detach(), f"{name}.weight"
            g = int4_group(lin.in_features, group_size)
            if g != group_size:
                groups[name] = g
            if cal is not None and key in cal.gram:
                t = quantize_int4_gptq(w, cal.gram.pop(key), g)
            else:
                imp = torch.from_numpy(values[key]) if values is not None and key in values else None
                t = quantize_int4_optimized(w, g, imp)
            bias = lin.bias.detach() if lin.bias is not None else None
            model.set_submodule(name, Int4Linear(lin.in_features, lin.out_features, t, bias, group_size=g,
                                                 dtype=w.dtype))
            bar.update(1)
    quantized = list(targets)
    skipped = [k for k, v in model.state_dict().items() if v.dim() == 2 and k.rsplit(".", 1)[0] not in quantized]
    return {"quantized": quantized, "skipped": skipped, "group_sizes": groups,
            "module_schemes": {n: s for n, s in targets.items() if s != "int4"}}


def _save_dequantized(lm, directory: Path, qconf: dict | None, ggml: bool, base_dt: torch.dtype) -> None:
    if qconf is None and not ggml:  # what the quantized checkpoint would hold: the kept tensors rounded to 16-bit
        qmods = quantized_modules(lm.model)
        with torch.no_grad():
            for k, t in lm.model.state_dict().items():
                if t.is_floating_point() and (k.rsplit(".", 1)[0] not in qmods or k.endswith(".bias")):
                    t.copy_(t.to(half_dtype(base_dt)))
    dequantize_model(lm.model)
    dequantize_embeddings(lm.model)
    config = lm.config  # a quantized head is a tensor of its own: the dequantized model is untied
    if config.tie_word_embeddings and lm.model.lm_head.weight is not lm.model.model.embed_tokens.weight:
        config = dataclasses.replace(config, tie_word_embeddings=False)
    save_lm(lm.model, config, directory, dtype=torch.float32 if ggml or (qconf or {}).get("scheme") == "ggml"
            else base_dt)
