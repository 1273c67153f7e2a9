"""`gentool evaluate` equals lm-evaluation-harness (`lm_eval.simple_evaluate` with HFLM on a transformers
LlamaForCausalLM holding the same weights, the same tokenizer.json, the same task YAML): per-example
log-likelihoods within 1e-4, every metric identical, few-shot prompts identical text for k = 0, 1, 3."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gentool.config import config_from_preset
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer

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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("evaloracle")
    text = (TASKS / "shakespeare_next_line.train.jsonl").read_text() + (TASKS / "arithmetic.train.jsonl").read_text()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    lm = d / "lm"
    lm.mkdir()
    cfg = config_from_preset("tiny", vocab_size=tok.get_vocab_size(), max_position_embeddings=64,
                             bos_token_id=0, eos_token_id=1)
    m = Transformer(cfg)
    m.init_weights(3)
    save_lm(m, cfg, lm)
    tok.save(str(lm / "tokenizer.json"))
    (lm / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                          "tokenizer_class": "PreTrainedTokenizerFast"}))
    tasks = d / "tasks"
    tasks.mkdir()
    for name in ("shakespeare_next_line", "shakespeare_cloze", "arithmetic"):
        y = (TASKS / f"{name}.yaml").read_text()
        for split in ("test", "train"):
            y = y.replace(f"{name}.{split}.jsonl", str(TASKS / f"{name}.{split}.jsonl"))
        (tasks / f"{name}.yaml").write_text(y)
    (tasks / "shakespeare_rolling.yaml").write_text(ROLLING.format(data=TASKS / "shakespeare_next_line.test.jsonl"))
    return lm, tasks


def lm_eval_run(lm, tasks, names, k, limit):
    pytest.importorskip("lm_eval")
    transformers = pytest.importorskip("transformers")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    os.environ["DISABLE_MULTIPROC"] = "1"
    hf = transformers.LlamaForCausalLM.from_pretrained(lm, dtype=torch.float32).eval()
    htok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(lm / "tokenizer.json"), bos_token="<s>",
                                                eos_token="</s>")
    model = HFLM(pretrained=hf, tokenizer=htok, batch_size=4, max_length=64, device="cpu")
    return simple_evaluate(model=model, tasks=names, task_manager=TaskManager(include_path=str(tasks)),
                           num_fewshot=k, limit=limit, log_samples=True, fewshot_random_seed=1234)


def ours(lm, tasks, name, k, limit):
    from gentool.evaluation.tasks import load_task
    from gentool.lm.evaluate import load_scorer, run_task

    scorer, _ = load_scorer(lm, adapter=None, device="cpu", dtype=torch.float32, batch_size=5, mc_samples=1, seed=0)
    return run_task(scorer, load_task(tasks / f"{name}.yaml"), num_fewshot=k, limit=limit, seed=1234,
                    max_gen_toks=None)


def args_of(sample):
    a = sample["arguments"]
    if isinstance(a, dict):
        return [tuple(v.values()) for v in a.values()]
    return [tuple(x) for x in a]


@pytest.mark.oracle
@pytest.mark.parametrize("name,k", [("shakespeare_next_line", 0), ("shakespeare_next_line", 3),
                                    ("shakespeare_cloze", 1), ("shakespeare_rolling", 0), ("arithmetic", 3)])
def test_equal_to_lm_eval(setup, name, k):
    lm, tasks = setup
    limit = 10
    ref = lm_eval_run(lm, tasks, [name], k, limit)
    summary, log = ours(lm, tasks, name, k, limit)
    samples = sorted(ref["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(log) == limit
    for s, rec in zip(samples, log):
        if name != "shakespeare_rolling":
            assert args_of(s)[0][0] == rec["prompt"]       # the same prompt text, few-shot examples included
        if name == "arithmetic":
            assert s["filtered_resps"][0] == rec["prediction"]
            continue
        resps = [r[0] for r in s["resps"]]
        if name == "shakespeare_rolling":
            assert resps[0] == pytest.approx(rec["loglikelihood"], abs=1e-4)
            continue
        lls = [r[0] if isinstance(r, (list, tuple)) else r for r in resps]
        ours_lls = rec["loglikelihoods"] if isinstance(rec["loglikelihoods"], list) else [rec["loglikelihoods"]]
        assert lls == pytest.approx(ours_lls, abs=1e-4)
    metrics = ref["results"][name]
    for key, value in summary.items():
        if key in ("task", "output_type", "num_fewshot", "samples"):
            continue
        metric = key.removesuffix("_stderr")
        theirs = metrics[f"{metric}_stderr,none" if key.endswith("_stderr") else f"{key},none"]
        if theirs == "N/A":
            assert value is None
        else:
            assert value == pytest.approx(theirs, rel=1e-6, abs=1e-9), key
