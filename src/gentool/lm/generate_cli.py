"""`gentool sample` for language models: load, generate, print (streamed text or JSON lines), --bench."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from gentool import console
from gentool.errors import UsageProblem


def run_sample(checkpoint: Path, prompts: list[str], *, max_new_tokens: int, temperature: float, top_k, top_p, min_p,
               repetition_penalty: float, num_samples: int, stop: list[str], seed: int, device: str, dtype,
               compile, bench: bool, as_json: bool, adapter: Path | None = None, steps: int = 64,
               cache: bool = True) -> None:
    from gentool.cli._options import resolve_device, resolve_dtype
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.sample import Generator, SamplingParams, measure_copy_bandwidth
    from gentool.models.checkpoint import load_lm

    if max_new_tokens < 1 or num_samples < 1:
        raise UsageProblem("--max-new-tokens and --num-samples must be at least 1")
    dev = resolve_device(device)
    from gentool.artifacts import MANIFEST, read_artifact

    manifest = read_artifact(checkpoint, verify=False) if (Path(checkpoint) / MANIFEST).is_file() else None
    if manifest is not None and manifest.kind == "diffusion-checkpoint" and \
            manifest.contents.get("family") == "masked-lm":
        return run_masked_sample(checkpoint, manifest, prompts, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, num_samples=num_samples,
                                 seed=seed, device=dev, steps=steps, cache=cache, as_json=as_json)
    lm = load_lm(checkpoint, device=dev, dtype=resolve_dtype(dtype, dev))
    if adapter is not None:
        from gentool.adapters import attach_adapter

        attach_adapter(lm.model, checkpoint, adapter)
        lm.model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
    if lm.tokenizer_path is None:
        raise UsageProblem("the checkpoint has no tokenizer.model or tokenizer.json", path=checkpoint,
                           hint="copy the tokenizer used for training into the checkpoint directory")
    tok = load_tokenizer(lm.tokenizer_path)
    if tok.vocab_size > lm.config.vocab_size:
        raise UsageProblem(f"the tokenizer ({tok.vocab_size} ids) does not fit the model ({lm.config.vocab_size})",
                           path=lm.tokenizer_path, hint="the checkpoint's tokenizer file belongs to another model")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    gen = Generator(lm.model, tok, device=dev, compile=compile)
    prompts = prompts or [""]
    stream = len(prompts) == 1 and num_samples == 1 and not as_json and not bench
    speeds = []
    for prompt in prompts:
        if stream:
            sys.stdout.write(prompt)
            results = gen.generate(prompt, params, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()))
            sys.stdout.write("\n")
        else:
            results = gen.generate(prompt, params, num_samples=num_samples)
        for r in results:
            speeds.append(r.tokens_per_s * num_samples)
            if as_json:
                console.emit(asdict(r), as_json=True)
            elif not stream:
                sys.stdout.write(prompt + r.completion + "\n")
        sys.stdout.flush()
    if bench:
        # batch-1 decoding reads every weight once per token: the copy bandwidth bounds tokens/s
        results = gen.generate(prompts[0], params)  # warm (compiled, graphs captured) second run
        tps = results[0].tokens_per_s
        weight_bytes = sum(p.numel() * p.element_size() for n, p in lm.model.named_parameters()
                           if "embed_tokens" not in n)
        bw = measure_copy_bandwidth(dev) / 2  # bytes read per second (copy counts read + write)
        console.emit({"device": dev, "tokens_per_s": tps, "weight_bytes_per_token": weight_bytes,
                      "achieved_gb_s": tps * weight_bytes / 1e9, "copy_read_gb_s": bw / 1e9,
                      "roofline_tokens_per_s": bw / weight_bytes, "pct_of_roofline": 100 * tps * weight_bytes / bw},
                     as_json=as_json, title="decode benchmark (batch 1)")


def run_masked_sample(checkpoint: Path, manifest, prompts: list[str], *, max_new_tokens: int, temperature: float,
                      top_k, top_p, num_samples: int, seed: int, device: str, steps: int, cache: bool,
                      as_json: bool) -> None:
    """Ancestral unmasking (MDLM) of max_new_tokens after each prompt; semi-autoregressive blocks beyond a window."""
    import time

    import torch

    from gentool.data.tokenizer import load_tokenizer
    from gentool.diffusion.masked import MaskSchedule, sample_blocks
    from gentool.models.checkpoint import load_lm

    if steps < 1:
        raise UsageProblem("--steps must be at least 1")
    lm = load_lm(checkpoint, device=device, causal=False, kind="diffusion-checkpoint")
    if lm.tokenizer_path is None:
        raise UsageProblem("the checkpoint has no tokenizer", path=checkpoint)
    tok = load_tokenizer(lm.tokenizer_path)
    shape = manifest.contents["data_shape"]
    seq_len, mask_id = shape["seq_len"], shape["mask_id"]
    schedule = MaskSchedule(manifest.contents.get("schedule", "loglinear"))
    gen = torch.Generator(device=device).manual_seed(seed)
    for prompt in prompts or [""]:
        ids = tok.encode(prompt)[-(seq_len // 2):] if prompt else [tok.eos_id]
        start = torch.tensor([ids] * num_samples, device=device)
        t0 = time.time()
        res = sample_blocks(lm.model, start, max_new_tokens, mask_id, schedule, context=seq_len,
                            block=min(max_new_tokens, seq_len - len(ids)), steps=steps, cache=cache,
                            temperature=max(temperature, 1e-6), top_k=top_k, top_p=top_p, generator=gen)
        dt = time.time() - t0
        for row in res.tokens[:, len(ids):].tolist():
            text = tok.decode(row)
            if as_json:
                console.emit({"prompt": prompt, "completion": text, "tokens": len(row), "nfe": res.nfe,
                              "steps": steps, "cached": cache, "tokens_per_s": len(row) * num_samples / dt},
                             as_json=True)
            else:
                sys.stdout.write(prompt + text + "\n")
    sys.stdout.flush()
