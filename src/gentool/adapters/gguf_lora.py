"""LoRA adapters as llama.cpp GGUF files (`export-gguf ADAPTER --adapter-of BASE`, `import-gguf FILE --adapter-of
BASE`), in the layout of llama.cpp's convert_lora_to_gguf.py, which `llama-cli/-server/-perplexity --lora` and
`llama-export-lora` load:

- metadata: general.architecture = llama, general.type = adapter, adapter.type = lora, adapter.lora.alpha (one
  float for the file);
- tensors: `<llama.cpp weight name>.lora_a` = A (r, in) and `.lora_b` = B (out, r) as PEFT stores them, B's rows of
  attn_q / attn_k in llama.cpp's rotary order (the permutation applied to the weights themselves);
- llama.cpp scales each pair by alpha / r, r read from the pair's shape. PEFT's per-module scalings that this
  cannot express (rsLoRA's alpha/√r, alpha_pattern) are folded into B on export, so the file means the same.
gentool adds `gentool.base_sha256` / `gentool.base_id` (llama.cpp ignores them) to check the base on import.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gentool.adapters.peft import Adapter, check_adapter, linear_modules, read_adapter, read_base
from gentool.artifacts.tensorfiles import cast_weight
from gentool.errors import GentoolError, UsageProblem
from gentool.gguf import gguf_name, hf_name, permute_qk, read_field, unpermute_qk
from gentool.models.lora import LoRAConfig


def _heads(base_path: Path) -> tuple[dict, int, int]:
    try:
        cfg = json.loads((base_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageProblem(f"cannot read config.json ({e})", path=base_path, hint="pass the adapter's base") from None
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch != "LlamaForCausalLM":
        raise UsageProblem(f"architecture {arch} is not supported", path=base_path, hint="Llama bases export")
    n_head = cfg["num_attention_heads"]
    return cfg, n_head, cfg.get("num_key_value_heads") or n_head


def _permute(module: str, b: np.ndarray, n_head: int, n_kv: int, fn) -> np.ndarray:
    if module.endswith("q_proj"):
        return fn(b, n_head)
    if module.endswith("k_proj"):
        return fn(b, n_kv)
    return b


def export_adapter(adapter_path: Path, out: Path, *, base_path: Path, qtype: str = "f16", force: bool = False,
                   verify: bool = True) -> dict[str, Any]:
    """A lora-adapter (or PEFT adapter) of BASE -> a GGUF LoRA file llama.cpp loads with --lora."""
    import gguf

    from gentool.artifacts import atomic_file, check_output

    out = Path(out)
    check_output(out, force=force, sources=[adapter_path, base_path], file=True)
    if qtype not in ("f32", "f16"):
        raise UsageProblem(f"--type {qtype} is not available for adapters", hint="use f32 or f16")
    ad = read_adapter(adapter_path, verify=verify)
    base = read_base(base_path, verify=verify)
    cfg, n_head, n_kv = _heads(base.path)
    check_adapter(ad, base.shapes, base_sha256=base.sha256, base_path=base.path)
    if ad.cfg.use_dora:
        raise UsageProblem("llama.cpp has no DoRA adapters", path=ad.path, hint="merge it with lora-merge instead")
    if ad.saved:
        raise UsageProblem(f"llama.cpp adapters cannot hold modules_to_save ({next(iter(ad.saved))})", path=ad.path,
                           hint="merge it with lora-merge instead")
    alpha = ad.cfg.alpha if ad.cfg.alpha > 0 else float(ad.cfg.r)
    tensors: dict[str, np.ndarray] = {}
    for module, p in sorted(ad.lora.items()):
        name = gguf_name(f"{module}.weight")
        if name is None:
            raise UsageProblem(f"{module} has no llama.cpp tensor name", path=ad.path)
        if module.endswith("lm_head") and cfg.get("tie_word_embeddings"):
            raise UsageProblem("the adapter changes lm_head, which a tied-embedding model has no separate tensor "
                               "for in llama.cpp", path=ad.path, hint="merge it with lora-merge instead")
        r = p["A"].shape[0]
        fold = ad.scaling(module) / (alpha / r)  # llama.cpp scales by alpha / r
        a = p["A"].float().numpy()
        b = _permute(module, (p["B"].float() * fold).numpy(), n_head, n_kv, permute_qk)
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, b
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(ad.path.name)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_string("gentool.base_sha256", base.sha256)
        if base.manifest is not None:
            w.add_string("gentool.base_id", base.manifest.id)
        for name, arr in tensors.items():
            if qtype != "f32":
                arr = cast_weight(name, torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), torch.float16,
                                  hint="export with --type f32").numpy()
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32 if qtype == "f32" else np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"output": str(out), "kind": "gguf lora adapter", "type": qtype, "alpha": alpha,
            "modules": len(ad.lora), "tensors": len(tensors), "bytes": out.stat().st_size}


def read_gguf_adapter(path: Path) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """(metadata, {llama.cpp weight name: {"a": (r, in), "b": (out, r)}}) of a GGUF LoRA file, float32."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UsageProblem("no such file", path=path, hint="pass a .gguf LoRA adapter")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 (the reader raises ValueError/IndexError/struct errors on bad files)
        raise GentoolError(f"not a readable GGUF file ({type(e).__name__}: {e})", path=path,
                           hint="the file is truncated or not GGUF") from None

    def field(key, default=None):
        return read_field(reader, key, default, path=path)

    if field("general.type") != "adapter" or field("adapter.type") != "lora":
        raise UsageProblem(f"not a GGUF LoRA adapter (general.type {field('general.type')!r}, adapter.type "
                           f"{field('adapter.type')!r})", path=path,
                           hint="import a model without --adapter-of" if field("general.type") != "adapter" else None)
    if field("general.architecture") != "llama":
        raise UsageProblem(f"architecture {field('general.architecture')!r} is not supported", path=path,
                           hint="gentool imports llama-architecture adapters")
    meta = {"alpha": float(field("adapter.lora.alpha", 0.0) or 0.0), "base_sha256": field("gentool.base_sha256"),
            "base_id": field("gentool.base_id"), "name": field("general.name")}
    if field("adapter.alora.invocation_tokens") is not None:
        raise UsageProblem("activated LoRA (adapter.alora.invocation_tokens) is not supported", path=path)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    skipped = []
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            if t.name.endswith("_norm.weight"):  # llama.cpp ignores these too (mergekit writes them)
                skipped.append(t.name)
                continue
            raise UsageProblem(f"LoRA tensor {t.name!r} has an unexpected suffix", path=path)
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UsageProblem(f"block type {t.tensor_type.name} of {t.name} is not supported", path=path) from None
        pairs.setdefault(stem, {})[part[-1]] = np.asarray(arr, dtype=np.float32)
    for stem, p in pairs.items():
        if set(p) != {"a", "b"}:
            raise UsageProblem(f"LoRA pair of {stem} lacks lora_{'b' if 'a' in p else 'a'}", path=path)
        if p["a"].ndim != 2 or p["b"].ndim != 2 or p["a"].shape[0] != p["b"].shape[1]:
            raise UsageProblem(f"{stem}: lora_a {p['a'].shape} and lora_b {p['b'].shape} do not form a low-rank "
                               f"pair", path=path)
    if skipped:
        from gentool.console import warn

        warn(f"{len(skipped)} norm tensor(s) in the adapter are ignored, as llama.cpp ignores them")
    if not pairs:
        raise UsageProblem("the adapter holds no LoRA tensors", path=path)
    return meta, pairs


def import_adapter(src: Path, base_path: Path, out: Path, *, force: bool = False, verify: bool = True):
    """A GGUF LoRA file of BASE -> a lora-adapter artifact (PEFT layout)."""
    from gentool.adapters.finetune import adapter_contents
    from gentool.adapters.peft import write_adapter
    from gentool.artifacts import check_output, create_artifact, input_ref

    check_output(out, force=force, sources=[src, base_path])
    meta, pairs = read_gguf_adapter(src)
    base = read_base(base_path, verify=verify)
    _, n_head, n_kv = _heads(base.path)
    if meta["base_sha256"] and meta["base_sha256"] != base.sha256:
        raise UsageProblem(f"the adapter was exported for a base with weights sha256 {meta['base_sha256'][:12]}…, "
                           f"this base has {base.sha256[:12]}…", path=src, hint="pass the adapter's base")
    lora = {}
    for stem, p in sorted(pairs.items()):
        hf = hf_name(stem)
        if hf is None or not hf.endswith(".weight") or hf.endswith("embed_tokens.weight"):
            raise UsageProblem(f"LoRA on {stem} is not supported", path=src, hint="gentool adapts linear layers")
        module = hf.removesuffix(".weight")
        b = _permute(module, p["b"], n_head, n_kv, unpermute_qk)
        lora[module] = {"A": torch.from_numpy(np.ascontiguousarray(p["a"])),
                        "B": torch.from_numpy(np.ascontiguousarray(b))}
    ranks = {m: p["A"].shape[0] for m, p in lora.items()}
    values = list(ranks.values())
    r = max(set(values), key=values.count)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != r}
    alpha = meta["alpha"] or float(r)  # alpha 0: llama.cpp applies scale 1, i.e. alpha = r for every pair
    alpha_pattern = {} if meta["alpha"] else {k: float(v) for k, v in pattern.items()}
    suffixes = sorted({m.rpartition(".")[2] for m in lora})
    every = {m for m in linear_modules(base.shapes) if m.rpartition(".")[2] in suffixes}
    targets = suffixes if every == set(lora) else sorted(lora)
    cfg = LoRAConfig(r=r, alpha=alpha, target_modules=targets, rank_pattern=pattern, alpha_pattern=alpha_pattern)
    ad = Adapter(Path(src), cfg, lora, {})
    check_adapter(ad, base.shapes, base_path=base.path)
    tensors = {f"{m}.lora_{k}.weight": t for m, p in lora.items() for k, t in p.items()}
    info = {"n_trainable_params": sum(t.numel() for t in tensors.values())}
    with create_artifact(out, "lora-adapter", force=force, config={"init": "import-gguf"},
                         inputs=[input_ref("import", src), input_ref("base", base.manifest or base.path)]) as art:
        write_adapter(art.dir, tensors, cfg, base_name=str(base.path))
        art.contents = adapter_contents(cfg, info, base)
    return {"output": str(out), "base": str(base.path), "modules": len(lora), "r": r, "alpha": alpha,
            "rank_pattern": pattern or None}
