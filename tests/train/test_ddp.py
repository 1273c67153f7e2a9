"""DDP on CPU (gloo, 2 processes): the same global batch gives the same losses as one process."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gentool.train import TrainConfig, train
from gentool.train.metrics import read_metrics

WORKER = Path(__file__).with_name("_toy.py")
_spec = importlib.util.spec_from_file_location("_toy", WORKER)
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


@pytest.mark.slow
def test_two_processes_match_one_with_accumulation(tmp_path):
    model = toy.toy_model(0)                          # one process, two micro-batches per step
    train(model, toy.ToyTask(), TrainConfig(steps=8, grad_accum=2, lr=1e-2, warmup=2, log_every=1), tmp_path / "one")
    one = [m["loss"] for m in read_metrics(tmp_path / "one" / "metrics.jsonl")]
    (tmp_path / "two").mkdir()                        # two gloo processes, one micro-batch each
    proc = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "two"), "2", "1", "8"], capture_output=True, check=False,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [m["loss"] for m in read_metrics(tmp_path / "two" / "metrics.jsonl")]
    assert len(one) == len(two) == 8 and one[-1] < one[0]
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    w2 = json.loads((tmp_path / "two" / "weights.json").read_text())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(w2[k]), v, rtol=1e-4, atol=1e-6)
