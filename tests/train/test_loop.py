"""The shared training loop on a toy task: exact resume, Ctrl-C, the NaN stop, keep-last-K, metrics, EMA."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gentool.errors import GentoolError, UsageProblem
from gentool.train import TrainConfig, make_ema, train
from gentool.train.checkpoint import latest_state
from gentool.train.metrics import read_metrics

_spec = importlib.util.spec_from_file_location("_toy", Path(__file__).with_name("_toy.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

CFG = {"steps": 20, "grad_accum": 2, "lr": 1e-2, "warmup": 3, "log_every": 1, "eval_every": 5, "save_every": 4, "keep": 2}


def _run(workdir, *, resume=False, ema=False, task_kw=None, **cfg):
    model = toy.toy_model(0, dropout=0.2)           # dropout: the torch RNG state must survive a resume
    task = toy.ToyTask(**(task_kw or {}))
    e = make_ema(model) if ema else None
    result = train(model, task, TrainConfig(**{**CFG, "ema_decay": 0.9 if ema else None, **cfg}), workdir,
                   resume=resume, ema=e)
    return model, e, result


def test_interrupt_then_resume_is_bit_identical(tmp_path, ema=True):
    model_a, ema_a, res_a = _run(tmp_path / "a", ema=ema)
    with pytest.raises(GentoolError) as exc:        # Ctrl-C during step 10: it finishes, saves, exits 130
        _run(tmp_path / "b", ema=ema, task_kw={"interrupt_at": 9})
    assert exc.value.exit_code == 130 and "step 10" in str(exc.value)
    assert latest_state(tmp_path / "b" / "state").name == "step-00000010"
    model_b, ema_b, res_b = _run(tmp_path / "b", resume=True, ema=ema)
    la, lb = read_metrics(tmp_path / "a" / "metrics.jsonl"), read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["step"] for m in lb] == list(range(1, 21))
    assert [m["loss"] for m in la] == [m["loss"] for m in lb]
    assert [m.get("val_loss") for m in la] == [m.get("val_loss") for m in lb]
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), k
    if ema:
        for a, b in zip(ema_a.parameters(), ema_b.parameters()):
            assert torch.equal(a, b)
    assert res_a.train_loss == res_b.train_loss and res_a.eval == res_b.eval
    assert lb[-1]["seconds"] >= lb[9]["seconds"]    # wall time adds up across the resume


def test_sigterm_saves_like_ctrl_c_and_exits_143(tmp_path):
    """What schedulers, `timeout` and container stops send: the step finishes, the state is saved."""
    with pytest.raises(GentoolError) as exc:
        _run(tmp_path, save_every=0, save_minutes=0, task_kw={"interrupt_at": 6, "interrupt_signal": "SIGTERM"})
    assert exc.value.exit_code == 143 and "terminated at step 7; state saved" in str(exc.value)
    assert latest_state(tmp_path / "state").name == "step-00000007"
    _run(tmp_path, resume=True, save_every=0, save_minutes=0)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 21))


@pytest.mark.parametrize("minutes, kept", [(0, ["step-00000020"]), (1e-9, ["step-00000019", "step-00000020"])])
def test_state_is_saved_by_wall_clock(tmp_path, minutes, kept):
    """--save-every 0 (the default) still leaves a resumable state every --save-minutes (here: every step)."""
    _run(tmp_path, save_every=0, save_minutes=minutes)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == kept


@pytest.mark.parametrize("bad", [{"warmup": -5}, {"lr": -1.0}, {"amp_dtype": "int8"}, {"keep": 0},
                                 {"save_minutes": -1.0}])
def test_config_refused_before_anything_exists(tmp_path, bad):
    with pytest.raises(UsageProblem):
        TrainConfig(**{**CFG, **bad})


def test_metrics_lines_and_keep_last(tmp_path):
    _, _, res = _run(tmp_path, keep=2)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    tokens_per_step = 2 * 8 * 12
    assert lines[-1]["tokens"] == 20 * tokens_per_step == res.tokens
    assert lines[-1]["flops"] == pytest.approx(res.flops) and res.flops > 0
    for m in lines:
        assert {"step", "tokens", "flops", "loss", "lr", "grad_norm", "tokens_per_s", "seconds"} <= set(m)
        assert ("val_loss" in m) == (m["step"] % 5 == 0)
    assert lines[0]["lr"] == pytest.approx(1e-2 / 3) and lines[-1]["lr"] == pytest.approx(1e-3)
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step-00000016", "step-00000020"]
    meta = json.loads((tmp_path / "state" / "step-00000020" / "state.json").read_text())
    assert meta["cursor"] == {"step": 20} and meta["aliases"] == {"head.weight": "embed.weight"}
    assert {"python", "numpy"} <= set(meta["rng"])


def test_nan_stops_naming_the_step_and_keeps_the_last_good_state(tmp_path):
    with pytest.raises(GentoolError) as exc:
        _run(tmp_path, task_kw={"nan_at": 7})
    msg = exc.value.one_line()
    assert exc.value.exit_code == 1 and "at step 7" in msg and "step 4" in msg, msg
    assert latest_state(tmp_path / "state").name == "step-00000004"   # nothing saved after the bad step
    assert max(m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")) == 6


def test_resume_with_a_different_recipe_is_refused(tmp_path):
    with pytest.raises(GentoolError):
        _run(tmp_path, task_kw={"interrupt_at": 5})
    with pytest.raises(UsageProblem, match="different configuration"):
        _run(tmp_path, resume=True, lr=5e-3)


def test_float16_and_unknown_dtype_are_refused(tmp_path):
    for dtype in ("float16", "int8"):
        with pytest.raises(UsageProblem):
            _run(tmp_path, amp_dtype=dtype)
