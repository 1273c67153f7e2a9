"""train-lm on example shards end to end: SFT (masked, packed), DPO with LoRA (reference precomputed with the
adapters off) and full DPO (reference log-probs stored in the run directory, reused on resume); TRL's metric
names in metrics.jsonl."""

import json

import pytest

G = ["--seq-len", "48", "--micro-batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def post(tmp_path_factory, tiny_tokenizer, tiny_tokens):
    from typer.testing import CliRunner

    from gentool.cli import app

    w = tmp_path_factory.mktemp("post")
    lines = [f"Line {i}: " + "to be or not " * (i % 3 + 1) for i in range(40)]
    (w / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": lines[i]}, {"role": "assistant", "content": lines[i + 1]}]}) + "\n"
        for i in range(0, 38)))
    (w / "pairs.jsonl").write_text("".join(json.dumps({"prompt": lines[i], "chosen": lines[i + 1],
                                                       "rejected": lines[(i + 7) % 40]}) + "\n" for i in range(38)))

    def ok(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, (args, r.output)
        return r

    ok("train-lm", tiny_tokens, "-o", w / "lm", "--preset", "tiny", "--steps", "2", *G)
    ok("tokenize", "encode", w / "chat.jsonl", "--tokenizer", tiny_tokenizer, "-o", w / "sft-tokens")
    ok("tokenize", "encode", w / "pairs.jsonl", "--tokenizer", tiny_tokenizer, "-o", w / "pairs")
    return w, ok


def _metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_sft_then_dpo_lora(post):
    w, ok = post
    ok("train-lm", w / "sft-tokens", "-o", w / "sft", "--init-from", w / "lm", "--steps", "3", *G)
    assert json.loads((w / "sft" / "manifest.json").read_text())["contents"]["objective"] == "sft"
    ok("train-lm", w / "pairs", "-o", w / "dpo", "--init-from", w / "sft", "--objective", "dpo", "--lora-rank", "2",
       "--steps", "3", *G)
    last = _metrics(w / "dpo")[-1]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert k in last
    from gentool.artifacts import probe

    assert probe(w / "dpo")[0] == "lora-adapter"


@pytest.mark.parametrize("objective", ["ipo", "simpo", "orpo"])
def test_other_objectives_run(post, objective):
    w, ok = post
    ok("train-lm", w / "pairs", "-o", w / objective, "--init-from", w / "lm", "--objective", objective,
       "--steps", "2", *G)
    assert "rewards/margins" in _metrics(w / objective)[-1]


def test_full_dpo_reference_stored_and_reused(post):
    w, ok = post
    ok("train-lm", w / "pairs", "-o", w / "full", "--init-from", w / "lm", "--objective", "dpo", "--steps", "2",
       "--save-every", "1", *G)
    assert _metrics(w / "full")[0]["step"] >= 1
    # the reference file lives in the run directory while the run goes on: a resumed run finds it there
    from gentool.data.shards import open_shards
    from gentool.lm.preference import PreferenceConfig, PreferenceTask
    from gentool.models.checkpoint import load_lm

    shards = open_shards(w / "pairs")
    init = load_lm(w / "lm")
    task = PreferenceTask(shards, None, init.config, seq_len=48, micro_batch=4, seed=0, world=1, device="cpu",
                          eval_tokens=100, cfg=PreferenceConfig("dpo"))
    run = w / "run.partial"
    run.mkdir()
    task.prepare(init.model, run, lora=False)
    stored = (run / "reference_logps.safetensors").stat().st_mtime_ns
    first = task.reference["train"].clone()
    task.prepare(init.model, run, lora=False)  # a resume: loaded, not recomputed
    assert (run / "reference_logps.safetensors").stat().st_mtime_ns == stored
    assert (task.reference["train"] == first).all() and first.shape == (len(task.pairs["train"]), 2)


def test_reference_written_by_rank_zero_only(post, monkeypatch):
    """Under torchrun every rank computes the reference log-probs, rank 0 alone writes the file, then a barrier."""
    w, _ = post
    from gentool.data.shards import open_shards
    from gentool.lm.preference import PreferenceConfig, PreferenceTask
    from gentool.models.checkpoint import load_lm
    from gentool.train import distributed

    init = load_lm(w / "lm")
    task = PreferenceTask(open_shards(w / "pairs"), None, init.config, seq_len=48, micro_batch=4, seed=0, world=2,
                          device="cpu", eval_tokens=100, cfg=PreferenceConfig("dpo"))
    calls = []
    monkeypatch.setattr(distributed, "barrier", lambda: calls.append("barrier"))
    for r in (1, 0):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        run = w / f"rank{r}.partial"
        run.mkdir()
        task.prepare(init.model, run, lora=False)
        assert (run / "reference_logps.safetensors").is_file() == (r == 0)
        assert task.reference["train"].shape == (len(task.pairs["train"]), 2)
        assert calls.pop() == "barrier" and not list(run.glob("*.tmp"))
