import json
import subprocess
import sys

import pytest
import torch

from gentool.train.optim import build_optimizer, lr_at


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    from gentool.tokenize import encode_corpus, train_tokenizer

    d = tmp_path_factory.mktemp("data")
    train_tokenizer(["builtin:shakespeare/comedies"], d / "tok", vocab_size=400)
    encode_corpus(["builtin:shakespeare/comedies"], d / "tok", d / "tokens", workers=1)
    return d / "tokens"


def _losses(run):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


ARGS = ["--preset", "tiny", "--seq-len", "32", "--micro-batch", "4", "--device", "cpu", "--eval-every", "100"]


def test_train_writes_checkpoint_and_beats_unigram(tokens, tmp_path, cli):
    r = cli("train-lm", tokens, "-o", tmp_path / "full", "--steps", "80", *ARGS, "--lr", "1e-2", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    manifest = json.loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["contents"]["tokens_seen"] == 80 * 4 * 32 and manifest["contents"]["train_flops"] > 0
    assert summary["val_loss"] < summary["val_unigram_entropy"]
    assert (tmp_path / "full" / "tokenizer.model").is_file() and not (tmp_path / "full.partial").exists()


def test_interrupted_run_resumes_exactly(tokens, tmp_path):
    """Kill a run after its step-10 checkpoint, resume, and compare every logged loss with a straight run."""
    code = f"""
import sys
from gentool.train import loop
orig = loop.save_state
def save_then_stop(*a, **k):
    path = orig(*a, **k)
    if k['step'] == 10:
        raise KeyboardInterrupt
    return path
loop.save_state = save_then_stop
from gentool.cli import main
sys.argv = ['gentool', 'train-lm', r'{tokens}', '-o', r'{tmp_path / "b"}', '--steps', '20', '--save-every', '10',
            {", ".join(repr(a) for a in ARGS)}]
main()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and (tmp_path / "b.partial").is_dir() and not (tmp_path / "b").exists()
    base = [sys.executable, "-m", "gentool", "train-lm", str(tokens), "--steps", "20", "--save-every", "10", *ARGS]
    again = subprocess.run(base + ["-o", str(tmp_path / "b")], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(base + ["-o", str(tmp_path / "b"), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run(base + ["-o", str(tmp_path / "a")], capture_output=True, text=True)
    assert straight.returncode == 0
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_bad_inputs(tokens, tmp_path, cli):
    tok_dir = tokens.parent / "tok"
    cases = [
        (["train-lm", tok_dir, "-o", tmp_path / "x", "--steps", "1"], "expected gentool.token-shards"),
        (["train-lm", tokens, "-o", tmp_path / "x", "--preset", "huge", "--steps", "1"], "unknown preset"),
        (["train-lm", tokens, "-o", tmp_path / "x", "--preset", "tiny", "--seq-len", "10000000", "--steps", "1"],
         "too little data"),
        (["train-lm", tokens, "-o", tmp_path / "x", "--steps", "1", "--tokens", "5"], "exactly one budget"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert not (tmp_path / "x").exists()


def test_nan_loss_stops_with_step(tokens, tmp_path, cli):
    r = cli("train-lm", tokens, "-o", tmp_path / "n", "--steps", "5", *ARGS, "--lr", "1e30")
    assert r.exit_code == 1 and "at step" in r.output, r.output
    assert not (tmp_path / "n").exists()


def test_schedules_and_decay_groups():
    assert lr_at(0, total=100, lr=1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(99, total=100, lr=1.0, warmup=10, min_ratio=0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, total=100, lr=1.0, warmup=0, schedule="constant") == 1.0
    assert lr_at(50, total=100, lr=1.0, warmup=0, schedule="wsd") == 1.0
    assert lr_at(100, total=100, lr=1.0, warmup=0, schedule="wsd", min_ratio=0.0) == 0.0
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    m[1].weight.requires_grad_(False)
    opt = build_optimizer(m, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 2  # linear bias + layernorm bias; the frozen weight has no state
