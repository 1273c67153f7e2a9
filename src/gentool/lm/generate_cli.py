"""`gentool sample` for language models: load, generate, print (streamed text or JSON lines), --bench."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

from gentool import console
from gentool.errors import UsageProblem


def read_prompts(prompt: str | None, prompt_file: str | None, stdin) -> list[str]:
    """--prompt TEXT (may be empty: unconditional), else one prompt per non-blank line of --prompt-file (- is
    stdin), else of stdin when it is not a terminal, else one unconditional sample."""
    if prompt is not None and prompt_file is not None:
        raise UsageProblem("--prompt and --prompt-file both given", hint="pass one of them")
    if prompt is not None:
        return [prompt]
    if prompt_file is None and stdin.isatty():
        return [""]
    name = "stdin" if prompt_file in (None, "-") else prompt_file
    try:
        if name == "stdin":
            lines = stdin.read().splitlines()
        else:
            lines = Path(name).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UsageProblem("no such prompt file", path=name, hint="pass an existing file, or - for stdin") from None
    except UnicodeDecodeError:
        raise UsageProblem("the prompt file is not UTF-8 text", path=name) from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UsageProblem("empty input: no prompts (one per line expected)", path=name,
                           hint="pass --prompt TEXT; --prompt '' samples unconditionally")
    return prompts


def run_sample(checkpoint: Path, prompts: list[str], *, max_new_tokens: int, temperature: float, top_k, top_p, min_p,
               repetition_penalty: float, num_samples: int, stop: list[str], seed: int, device: str, dtype,
               compile, bench: bool, as_json: bool, adapter: Path | None = None, chat: bool = False,
               tokenizer: Path | None = None, batch_size: int = 16) -> None:
    """Autoregressive sampling from an lm-checkpoint or a Hugging Face Llama directory."""
    from gentool.cli._options import resolve_device, resolve_dtype
    from gentool.data.tokenizer import load_tokenizer
    from gentool.lm.sample import Generator, SamplingParams, benchmark
    from gentool.models.checkpoint import load_lm

    if max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise UsageProblem("--max-new-tokens, --num-samples and --batch-size must be at least 1")
    if temperature < 0 or (top_k is not None and top_k < 1) or repetition_penalty <= 0 or \
            not (top_p is None or 0 < top_p <= 1) or not (min_p is None or 0 <= min_p <= 1):
        raise UsageProblem("bad sampling option", hint="--temperature >= 0, --top-k >= 1, 0 < --top-p <= 1, "
                                                       "0 <= --min-p <= 1, --repetition-penalty > 0")
    dev = resolve_device(device)
    lm = load_lm(checkpoint, device=dev, dtype=resolve_dtype(dtype, dev))
    if adapter is not None:
        from gentool.adapters import attach_adapter

        attach_adapter(lm.model, checkpoint, adapter)
        lm.model.to(device=dev, dtype=resolve_dtype(dtype, dev)).eval()
    tok = load_tokenizer(tokenizer or _tokenizer_path(lm, checkpoint))
    recorded = lm.manifest.contents.get("tokenizer_id") if lm.manifest is not None else None
    if recorded and tok.sha256 != recorded:
        raise UsageProblem(f"the tokenizer ({tok.sha256[:19]}) is not the one the model was trained with "
                           f"({recorded[:19]})", path=tokenizer or lm.tokenizer_path,
                           hint="drop --tokenizer to use the checkpoint's own tokenizer")
    if tok.vocab_size > lm.config.vocab_size:
        raise UsageProblem(f"the tokenizer ({tok.vocab_size} ids) does not fit the model ({lm.config.vocab_size})",
                           path=tokenizer or lm.tokenizer_path, hint="use the tokenizer that belongs to this model")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    gen = Generator(lm.model, tok, device=dev, compile=compile)
    if chat:  # the model's chat template (jinja2, as transformers renders it); it writes BOS itself
        if not getattr(tok, "chat_template", None):
            raise UsageProblem("this model ships no chat template", path=checkpoint, hint="drop --chat")
        texts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    else:
        texts = prompts
    rows = [(p, gen.encode(t, max_new_tokens, add_bos=not chat)) for p, t in zip(prompts, texts)
            for _ in range(num_samples)]
    samples = [j for _ in prompts for j in range(num_samples)]
    if len(rows) == 1 and not as_json:  # one sample: stream it
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
        gen.generate_ids(rows, params, samples=samples,
                         on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
        sys.stdout.write("\n")
    else:
        for i in range(0, len(rows), batch_size):
            for r in gen.generate_ids(rows[i:i + batch_size], params, samples=samples[i:i + batch_size]):
                if as_json:
                    console.emit({k: v for k, v in asdict(r).items() if k not in ("token_ids", "logprobs")},
                                 as_json=True)
                else:
                    sys.stdout.write(r.prompt + r.completion + "\n")
            sys.stdout.flush()
    if bench:  # batch-1 decoding reads every weight once per token: the copy bandwidth bounds tokens/s
        console.emit(benchmark(gen, params, rows[0][1]), as_json=as_json, title="decode benchmark (batch 1)")


def _tokenizer_path(lm, checkpoint: Path) -> Path:
    if lm.tokenizer_path is None:
        raise UsageProblem("the checkpoint has no tokenizer.model or tokenizer.json", path=checkpoint,
                           hint="copy the model's tokenizer into the directory, or pass --tokenizer")
    return lm.tokenizer_path


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
