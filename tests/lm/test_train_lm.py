import json
import os
import signal

import pytest
import torch

from gentool.train.metrics import read_metrics


@pytest.fixture
def tokens(tiny_tokens):
    return tiny_tokens


def _losses(run):
    return [m["loss"] for m in read_metrics(run / "metrics.jsonl")]


ARGS = ["--preset", "tiny", "--seq-len", "32", "--micro-batch", "4", "--device", "cpu", "--eval-every", "100"]


def test_train_writes_checkpoint_and_beats_unigram(tokens, tmp_path, cli):
    r = cli("train-lm", tokens, "-o", tmp_path / "full", "--steps", "80", *ARGS, "--micro-batch", "8", "--lr", "1e-2",
            "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["val_loss"] < summary["val_unigram_entropy"] - 0.15      # it learned more than unigram counts
    assert "unigram entropy" in r.stderr
    run = tmp_path / "full"
    manifest = json.loads((run / "manifest.json").read_text())
    c, m = manifest["contents"], manifest["metrics"]
    assert manifest["format"] == "gentool.lm-checkpoint" and c["architecture"] == "llama"
    assert c["tokens_seen"] == 80 * 8 * 32 and c["step"] == 80 and c["vocab_size"] == 400
    from gentool.config import config_from_preset

    cfg = config_from_preset("tiny", vocab_size=400, max_position_embeddings=128)
    assert c["n_params"] == cfg.n_params() and c["n_params_non_embedding"] == cfg.n_params(non_embedding=True)
    assert c["train_flops"] == pytest.approx(cfg.train_flops_per_token(32) * c["tokens_seen"])
    assert {"train_loss", "val_loss", "val_bpb", "tokens_per_s", "wall_seconds"} <= set(m)
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model", "metrics.jsonl"):
        assert (run / f).is_file(), f
    assert not (tmp_path / "full.partial").exists()
    lines = read_metrics(run / "metrics.jsonl")
    assert lines[-1]["step"] == 80 and lines[-1]["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)
    from gentool.models.checkpoint import load_lm

    assert load_lm(run).config.vocab_size == 400
    # nothing is overwritten without --force
    before = (run / "model.safetensors").read_bytes()
    r = cli("train-lm", tokens, "-o", run, "--steps", "2", *ARGS)
    assert r.exit_code == 2 and "--force" in r.output and (run / "model.safetensors").read_bytes() == before


def test_ctrl_c_saves_and_resume_is_bit_identical(tokens, tmp_path, cli, monkeypatch):
    from gentool.lm import train as lm_train

    base = ["train-lm", tokens, "--steps", "20", *ARGS, "--lr", "5e-3"]
    assert cli(*base, "-o", tmp_path / "a").exit_code == 0
    orig = lm_train.LMTask.batch

    def batch(self, step, micro, rank):
        if step == 9 and micro == 0:
            os.kill(os.getpid(), signal.SIGINT)        # Ctrl-C during step 10
        return orig(self, step, micro, rank)

    monkeypatch.setattr(lm_train.LMTask, "batch", batch)
    r = cli(*base, "-o", tmp_path / "b")
    assert r.exit_code == 130 and "interrupted at step 10" in r.output, r.output
    assert (tmp_path / "b.partial" / "state" / "step-00000010").is_dir() and not (tmp_path / "b").exists()
    monkeypatch.setattr(lm_train.LMTask, "batch", orig)
    r = cli(*base, "-o", tmp_path / "b")
    assert r.exit_code == 2 and "--resume" in r.output
    r = cli(*base[:-1], "1e-3", "-o", tmp_path / "b", "--resume")     # a different recipe is refused
    assert r.exit_code == 2 and "different configuration" in r.output
    r = cli(*base, "-o", tmp_path / "b", "--resume")
    assert r.exit_code == 0, r.output
    assert len(_losses(tmp_path / "a")) == 20 and _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_budgets(tokens, tmp_path, cli):
    r = cli("train-lm", tokens, "-o", tmp_path / "t", "--tokens", "1000", *ARGS, "--json")   # 128 tokens per step
    assert r.exit_code == 0 and json.loads(r.stdout)["steps"] == 8
    from gentool.config import config_from_preset

    per_step = config_from_preset("tiny", vocab_size=400, max_position_embeddings=128).train_flops_per_token(32) * 128
    r = cli("train-lm", tokens, "-o", tmp_path / "f", "--flops", str(3.5 * per_step), *ARGS, "--json",
            "--batch-tokens", "256")
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["steps"] == 2 and out["tokens"] == 512


def test_ddp_ranks_split_the_global_batch(tokens):
    """P processes x A micro-batches see the batches of 1 process x P·A (so DDP matches one process)."""
    from gentool.config import config_from_preset
    from gentool.data.shards import open_shards
    from gentool.lm.train import LMTask

    shards, cfg = open_shards(tokens, "train"), config_from_preset("tiny", vocab_size=400)
    kw = {"seq_len": 16, "micro_batch": 2, "seed": 3, "device": "cpu", "eval_tokens": 64}
    one, two = LMTask(shards, None, cfg, world=1, **kw), LMTask(shards, None, cfg, world=2, **kw)
    for step in (0, 5):
        assert torch.equal(one.batch(step, 0, 0), two.batch(step, 0, 0))
        assert torch.equal(one.batch(step, 1, 0), two.batch(step, 0, 1))
        assert not torch.equal(one.batch(step, 0, 0), one.batch(step, 1, 0))


def test_bad_inputs(tokens, tiny_tokenizer, tmp_path, cli):
    from gentool.config import config_from_preset
    from gentool.models.checkpoint import save_lm
    from gentool.models.transformer import Transformer

    small_vocab = tmp_path / "hf300"      # a plain HF Llama directory with a smaller vocabulary than the data's
    small_vocab.mkdir()
    cfg = config_from_preset("tiny", vocab_size=300)
    save_lm(Transformer(cfg), cfg, small_vocab)
    short = tmp_path / "hf-ctx128"         # vocabulary large enough, context 128
    short.mkdir()
    cfg = config_from_preset("tiny", vocab_size=512)
    save_lm(Transformer(cfg), cfg, short)
    tok_dir = tiny_tokenizer
    x = tmp_path / "x"
    cases = [
        (["train-lm", tok_dir, "-o", x, "--steps", "1"], "expected gentool.token-shards"),
        (["train-lm", tokens, "-o", x, "--preset", "huge", "--steps", "1"], "unknown preset"),
        (["train-lm", tokens, "-o", x, "--preset", "tiny", "--seq-len", "10000000", "--steps", "1"],
         "too little data"),
        (["train-lm", tokens, "-o", x, "--steps", "1", "--tokens", "5"], "exactly one budget"),
        (["train-lm", tokens, "-o", x, "--init-from", small_vocab, "--steps", "1"], "larger than the model's"),
        (["train-lm", tokens, "-o", x, "--init-from", short, "--steps", "1", "--seq-len", "1024"],
         "exceeds the model's context"),
        (["train-lm", tokens, "-o", x, *ARGS, "--steps", "1", "--schedule", "step"], "unknown --schedule"),
        (["train-lm", tokens, "-o", x, *ARGS, "--steps", "1", "--batch-tokens", "100"], "not a multiple"),
        (["train-lm", tokens, "-o", x, "--hidden-size", "30", "--num-layers", "1", "--num-heads", "4",
          "--steps", "1"], "not divisible"),
        (["train-lm", tokens, "-o", x, *ARGS, "--steps", "1", "--optimizer", "sgd"], "unknown --optimizer"),
        (["train-lm", tokens, "-o", x, *ARGS, "--steps", "1", "--optimizer", "muon", "--muon-lr", "0"],
         "--muon-lr 0.0 is out of range"),
        (["train-lm", tokens, "-o", x, *ARGS, "--steps", "1", "--parallel", "fsdp"], "launch it with torchrun"),
        (["train-lm", tokens, "-o", x, *ARGS, "--steps", "1", "--parallel", "zero3"], "unknown --parallel"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.exit_code == 2 and msg in r.output, (args, r.output)
        assert not x.exists() and not (tmp_path / "x.partial").exists(), args


def test_nan_loss_stops_with_step(tokens, tmp_path, cli):
    r = cli("train-lm", tokens, "-o", tmp_path / "n", "--steps", "5", *ARGS, "--lr", "1e30")
    assert r.exit_code == 1 and "at step" in r.output and "not finite" in r.output, r.output
    assert not (tmp_path / "n").exists()


@pytest.mark.slow
@pytest.mark.parametrize("parallel,optimizer", [("ddp", "adamw"), ("fsdp", "muon")])
def test_torchrun_two_processes_match_one(tokens, tmp_path, parallel, optimizer):
    """train-lm under torchrun (gloo, 2 CPU processes; DDP replicas or FSDP2 shards) logs the losses of one
    process with the same global batch, and writes the same plain checkpoint."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    common = ["train-lm", str(tokens), "--steps", "6", *ARGS, "--batch-tokens", "256", "--lr", "5e-3",
              "--optimizer", optimizer]
    one = subprocess.run([sys.executable, "-m", "gentool", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, check=False)
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "gentool", *common, "-o", str(tmp_path / "two"), "--json", "--parallel", parallel],
                         capture_output=True, text=True, env=env, check=False, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(two.stdout.strip().splitlines()) == 1                  # rank 0 reports, once
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["contents"]["tokens_seen"] == 6 * 256
    w1, w2 = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.slow
def test_muon_lora_zero_init_and_ema(tokens, tmp_path, cli):
    """--optimizer muon trains LoRA adapters; --zero-init starts the output projections at zero; --ema-decay saves
    the EMA copy (decay ~0: the weights themselves; 0.9: something else)."""
    from safetensors.torch import load_file

    from gentool.config import config_from_preset
    from gentool.models.transformer import Transformer

    m = Transformer(config_from_preset("tiny", vocab_size=64))
    m.init_weights(0, zero_out=True)
    zero = [n for n, p in m.named_parameters() if not p.any()]
    assert sorted(zero) == sorted(f"model.layers.{i}.{k}" for i in range(2)
                                  for k in ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
    base = ["train-lm", tokens, "--steps", "6", *ARGS, "--lr", "5e-3", "--optimizer", "muon", "--zero-init"]
    r = cli(*base, "-o", tmp_path / "base", "--json")
    assert r.exit_code == 0, r.output
    r2 = cli("train-lm", tokens, "-o", tmp_path / "ada", "--init-from", tmp_path / "base", "--lora-rank", "4",
             "--steps", "16", *ARGS, "--lr", "5e-3", "--optimizer", "muon", "--muon-lr", "0.01", "--json")
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["val_loss"] < json.loads(r.stdout)["val_loss"] - 0.03   # the adapters learned
    runs = {}
    for name, extra in (("plain", []), ("ema0", ["--ema-decay", "1e-9"]), ("ema9", ["--ema-decay", "0.9"])):
        assert cli(*base, "-o", tmp_path / name, *extra).exit_code == 0
        runs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    for k, v in runs["plain"].items():
        torch.testing.assert_close(runs["ema0"][k], v, rtol=1e-6, atol=1e-7)
    assert any(not torch.allclose(runs["ema9"][k], v) for k, v in runs["plain"].items())


def test_sigterm_from_outside_saves_and_exits_143(tokens, tmp_path):
    """`timeout`, schedulers and container stops send SIGTERM: the real process saves, says so and exits 143."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gentool", "train-lm", str(tokens), "-o", str(out), "--steps", "100000",
           "--save-minutes", "0", *ARGS, "--eval-every", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run.partial" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "terminated at step" in last and "state saved" in last, err
    assert "Traceback" not in err and not out.exists()
    assert any((tmp_path / "run.partial" / "state").iterdir())


def test_the_checkpoint_gets_the_shards_tokenizer_from_any_directory(tiny_tokenizer, tmp_path, cli, monkeypatch):
    """The shards record their tokenizer relative to themselves, with its hash: a run from another directory still
    copies it, and a tokenizer changed since encoding stops the run before it starts."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copytree(tiny_tokenizer, a / "tok")
    (a / "text.txt").write_text("Now is the winter of our discontent made glorious summer by this sun of York.\n\n"
                                * 40)
    monkeypatch.chdir(a)
    assert cli("tokenize", "encode", "text.txt", "--tokenizer", "tok", "-o", "tokens", "--workers", "1").exit_code == 0
    monkeypatch.chdir(b)
    small = ["--preset", "tiny", "--steps", "1", "--seq-len", "16", "--micro-batch", "2", "--device", "cpu"]
    r = cli("train-lm", "../a/tokens", "-o", "run", *small)
    assert r.exit_code == 0, r.output
    assert (b / "run" / "tokenizer.model").read_bytes() == (a / "tok" / "tokenizer.model").read_bytes()
    (a / "tok" / "tokenizer.model").write_bytes((a / "tok" / "tokenizer.model").read_bytes() + b"\0")
    r = cli("train-lm", "../a/tokens", "-o", "run2", *small)
    assert r.exit_code == 1 and "tokenizer changed since these shards were encoded" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(b.glob("run2*"))
