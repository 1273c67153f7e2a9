"""The loop's CUDA paths (skipped without a GPU): bf16 autocast + compile train (AdamW, Muon, NorMuon), the NaN stop
names the step without a per-step host sync, and a resumed run continues where it left off."""

import importlib.util
from pathlib import Path

import pytest

from gentool.errors import GentoolError
from gentool.train import TrainConfig, train
from gentool.train.checkpoint import latest_state
from gentool.train.metrics import read_metrics

pytestmark = pytest.mark.cuda
_spec = importlib.util.spec_from_file_location("_toy", Path(__file__).with_name("_toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _cfg(**kw):
    return TrainConfig(**{"steps": 30, "lr": 1e-2, "warmup": 3, "log_every": 10, "save_every": 10,
                          "device": "cuda", "compile": True, **kw})


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "normuon"])
def test_compiled_bf16_training_learns_and_resumes(tmp_path, optimizer):
    cfg = _cfg(optimizer=optimizer, muon_lr=0.05)
    res = train(toy.toy_model(0), toy.ToyTask(device="cuda"), cfg, tmp_path / "a")
    lines = read_metrics(tmp_path / "a" / "metrics.jsonl")
    assert [m["step"] for m in lines] == [10, 20, 30] and lines[-1]["loss"] < lines[0]["loss"]
    assert res.tokens_per_s > 0
    with pytest.raises(GentoolError):
        train(toy.toy_model(0), toy.ToyTask(device="cuda", interrupt_at=14), cfg, tmp_path / "b")
    assert latest_state(tmp_path / "b" / "state").name == "step-00000015"
    train(toy.toy_model(0), toy.ToyTask(device="cuda"), cfg, tmp_path / "b", resume=True)
    resumed = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [10, 20, 30]
    assert resumed[-1]["loss"] == pytest.approx(lines[-1]["loss"], rel=2e-2)


def test_nan_on_gpu_names_the_first_bad_step(tmp_path):
    with pytest.raises(GentoolError, match="at step 13,"):
        train(toy.toy_model(0), toy.ToyTask(device="cuda", nan_at=13), _cfg(compile=False), tmp_path)
    assert latest_state(tmp_path / "state").name == "step-00000010"
