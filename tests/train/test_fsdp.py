"""FSDP2 (--parallel fsdp) on CPU: 2 gloo processes, each block sharded, give the loss curve and weights of one
process with the same global batch (to float tolerance: the reduce order differs), and an interrupted sharded run
resumes bit-identically from the consolidated safetensors state. On a GPU the same worker runs over NCCL."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gentool.train import train
from gentool.train.metrics import read_metrics

WORKER = Path(__file__).with_name("_fsdp_worker.py")
_spec = importlib.util.spec_from_file_location("_fsdp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def _launch(out: Path, optimizer: str, device: str = "cpu", nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           str(WORKER), str(out), optimizer, device], capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _check(tmp_path: Path, optimizer: str, device: str, rel: float) -> None:
    from safetensors.torch import load_file

    model = worker.tiny_lm()                       # one process, accumulation 2: the same global batch
    train(model, worker.toy.ToyTask(), worker.cfg(optimizer, 1), tmp_path / "one")
    one = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    _launch(tmp_path / "two", optimizer, device)
    two = [m["loss"] for m in read_metrics(tmp_path / "two" / "a" / "metrics.jsonl")]
    assert len(one) == len(two) == worker.STEPS and one[-1] < one[0]
    assert two == pytest.approx(one, rel=rel, abs=1e-6)
    sharded = load_file(str(tmp_path / "two" / "a.st"))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sharded[k], v, rtol=rel * 10, atol=1e-5, msg=k)
    resumed = [m["loss"] for m in read_metrics(tmp_path / "two" / "b" / "metrics.jsonl")]
    assert resumed == two                          # interrupted at step 4, resumed: bit-identical
    final_b = load_file(str(tmp_path / "two" / "b.st"))
    for k, v in sharded.items():
        assert torch.equal(final_b[k], v), k
    state = tmp_path / "two" / "b" / "state" / f"step-{worker.STEPS:08d}"
    assert load_file(str(state / "model.safetensors")).keys() <= model.state_dict().keys()   # whole tensors


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "normuon"])
def test_fsdp_two_processes_match_one_and_resume(tmp_path, optimizer):
    _check(tmp_path, optimizer, "cpu", rel=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 1, reason="needs a GPU")
def test_fsdp_on_gpu(tmp_path):
    _launch(tmp_path / "gpu", "muon", "cuda", nproc=1)   # one GPU: FSDP2 over a mesh of one, bf16 mixed precision
    a, b = (read_metrics(tmp_path / "gpu" / r / "metrics.jsonl") for r in ("a", "b"))
    assert a[-1]["loss"] < a[0]["loss"]
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], rel=1e-2)
