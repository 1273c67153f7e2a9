"""`gentool sample` for language models: load, generate, print (streamed text or JSON lines), --bench."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from gentool import console
from gentool.errors import UsageProblem


def run_sample(checkpoint: Path, prompts: list[str], *, max_new_tokens: int, temperature: float, top_k, top_p, min_p,
               repetition_penalty: float, num_samples: int, stop: list[str], seed: int, device: str, dtype,
               compile, bench: bool, as_json: bool, adapter: Path | None = None) -> None:
    from gentool.cli._options import resolve_device, resolve_dtype
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.sample import Generator, SamplingParams, measure_copy_bandwidth
    from gentool.models.checkpoint import load_lm

    if max_new_tokens < 1 or num_samples < 1:
        raise UsageProblem("--max-new-tokens and --num-samples must be at least 1")
    dev = resolve_device(device)
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
