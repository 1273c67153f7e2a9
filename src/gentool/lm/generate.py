"""`gentool sample` for autoregressive LMs: load the checkpoint (an adapter on top), check its tokenizer, turn
prompts into rows of ids and decode them in batches with the KV-cache generator (lm/sample.py)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

from gentool.data.chat import ChatTemplate
from gentool.data.tokenizer import load_tokenizer
from gentool.devices import resolve_dtype
from gentool.errors import GentoolError, UsageProblem
from gentool.lm.sample import Completion, Generator, SamplingParams
from gentool.models.checkpoint import load_lm

Row = tuple[str, list[int]]   # (prompt text, prompt ids)


def check_params(params: SamplingParams, *, num_samples: int, batch_size: int) -> None:
    if params.max_new_tokens < 1 or num_samples < 1 or batch_size < 1:
        raise UsageProblem("--max-new-tokens, --num-samples and --batch-size must be at least 1")
    if params.temperature < 0 or (params.top_k is not None and params.top_k < 1) or \
            params.repetition_penalty <= 0 or not (params.top_p is None or 0 < params.top_p <= 1) or \
            not (params.min_p is None or 0 <= params.min_p <= 1):
        raise UsageProblem("bad sampling option", hint="--temperature >= 0, --top-k >= 1, 0 < --top-p <= 1, "
                                                       "0 <= --min-p <= 1, --repetition-penalty > 0")


def open_generator(checkpoint: Path, *, device: str, dtype: str | None = None, compile: bool | None = None,
                   adapter: Path | None = None, tokenizer: Path | None = None) -> Generator:
    """A Generator over an lm-checkpoint, quantized checkpoint or HF Llama directory, with its own tokenizer
    (or `tokenizer`, which must be the one the model was trained with)."""
    torch_dtype = resolve_dtype(dtype, device)
    lm = load_lm(checkpoint, device=device, dtype=torch_dtype)
    if adapter is not None:
        from gentool.adapters import attach_adapter

        attach_adapter(lm.model, checkpoint, adapter)
        lm.model.to(device=device, dtype=torch_dtype).eval()
    if tokenizer is None and lm.tokenizer_path is None:
        raise UsageProblem("the checkpoint has no tokenizer.model or tokenizer.json", path=checkpoint,
                           hint="copy the model's tokenizer into the directory, or pass --tokenizer")
    tok = load_tokenizer(tokenizer or lm.tokenizer_path)
    recorded = lm.manifest.contents.get("tokenizer_id") if lm.manifest is not None else None
    if recorded and tok.sha256 != recorded:
        raise UsageProblem(f"the tokenizer ({tok.sha256[:19]}) is not the one the model was trained with "
                           f"({recorded[:19]})", path=tokenizer or lm.tokenizer_path,
                           hint="drop --tokenizer to use the checkpoint's own tokenizer")
    if tok.vocab_size > lm.config.vocab_size:
        raise UsageProblem(f"the tokenizer ({tok.vocab_size} ids) does not fit the model ({lm.config.vocab_size})",
                           path=tokenizer or lm.tokenizer_path, hint="use the tokenizer that belongs to this model")
    return Generator(lm.model, tok, device=device, compile=compile)


def encode_prompts(gen: Generator, prompts: list[str], *, max_new_tokens: int, num_samples: int,
                   chat: bool = False) -> tuple[list[Row], list[int]]:
    """One row per (prompt, sample), and each row's sample index (its random stream). With `chat`, each prompt
    becomes a user message in the model's chat template (jinja2, as transformers renders it; it writes BOS), or
    for a SentencePiece tokenizer without one gentool's default template (data/chat.py: what `tokenize encode`
    trains chats on), its BOS/EOS strings encoded as the special ids."""
    if chat:
        if not getattr(gen.tok, "chat_template", None) and not hasattr(gen.tok, "sp"):
            raise UsageProblem("this model ships no chat template", hint="drop --chat")
        template = ChatTemplate.of(gen.tok)
        texts = [template.encode([{"role": "user", "content": p}], add_generation_prompt=True)[0] for p in prompts]
    else:
        texts = prompts
    rows = [(p, gen.encode(t, max_new_tokens)) for p, t in zip(prompts, texts) for _ in range(num_samples)]
    return rows, [j for _ in prompts for j in range(num_samples)]


def generate(gen: Generator, rows: list[Row], samples: list[int], params: SamplingParams, *, batch_size: int = 16,
             on_text: Callable[[str], None] | None = None) -> Iterator[Completion]:
    """Completions in row order, decoded `batch_size` rows at a time; on_text streams the first row's text."""
    for i in range(0, len(rows), batch_size):
        done = gen.generate_ids(rows[i:i + batch_size], params, samples=samples[i:i + batch_size],
                                on_text=on_text if i == 0 else None)
        if not all(math.isfinite(c.sum_logprob) for c in done):  # NaN/inf logits draw a meaningless token
            raise GentoolError("the model's logits are not finite (NaN or inf): its activations overflow in "
                               "this dtype", hint="sample with --dtype bfloat16 or float32")
        yield from done
