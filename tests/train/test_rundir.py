import pytest

from gentool.artifacts import read_artifact
from gentool.errors import UsageProblem
from gentool.train.rundir import RunDir


def _run(tmp_path, recipe, **kw):
    run = RunDir(tmp_path / "out", **kw)
    run.check()
    run.begin(recipe)
    (run.partial / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def test_lifecycle_ends_in_an_artifact_and_no_partial(tmp_path):
    run = _run(tmp_path, {"lr": 1})
    assert (run.partial / "run.json").is_file()
    with run.finish("lm-checkpoint", config={"lr": 1}, inputs=[]) as art:
        (art.dir / "model.safetensors").write_bytes(b"x")
    m = read_artifact(tmp_path / "out", "lm-checkpoint")
    assert set(m.files) == {"model.safetensors", "metrics.jsonl"} and not run.partial.exists()
    with pytest.raises(UsageProblem, match="output exists"):
        RunDir(tmp_path / "out").check()
    RunDir(tmp_path / "out", force=True).check()


def test_unfinished_runs_need_resume_with_the_same_recipe(tmp_path):
    _run(tmp_path, {"lr": 1})
    with pytest.raises(UsageProblem, match="unfinished run"):
        RunDir(tmp_path / "out").check()
    with pytest.raises(UsageProblem, match="different configuration"):
        _run(tmp_path, {"lr": 2}, resume=True)
    with pytest.raises(UsageProblem, match="saved no state to resume from"):  # killed before its first save
        _run(tmp_path, {"lr": 1}, resume=True)
    (tmp_path / "out.partial" / "state" / "step-00000010").mkdir(parents=True)
    (tmp_path / "out.partial" / "state" / "step-00000010" / "state.json").write_text("{}")
    run = _run(tmp_path, {"lr": 1}, resume=True)
    run = _run(tmp_path, {"lr": 2}, force=True)  # --force starts over
    assert not (run.partial / "state").exists()
    with pytest.raises(UsageProblem, match="nothing to resume"):
        _run(tmp_path / "new", {"lr": 1}, resume=True)


def test_a_failed_finish_keeps_the_run(tmp_path):
    run = _run(tmp_path, {"lr": 1})
    with pytest.raises(RuntimeError):
        with run.finish("lm-checkpoint", config={}, inputs=[]):
            raise RuntimeError("disk on fire")
    assert run.partial.is_dir() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out.partial"]  # no temporary sibling left


def _toy():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_toy", Path(__file__).with_name("_toy.py"))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    return toy


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_full_disk_while_saving_keeps_the_last_state_and_resumes(tmp_path, monkeypatch):
    """The disk fills up half way through writing the second state: one line naming the directory and how to
    resume, the first state as it was, no temporary left; --resume then finishes the run as if nothing happened."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from gentool.artifacts import WriteFailed
    from gentool.train import TrainConfig, train
    from gentool.train.checkpoint import latest_state

    toy = _toy()
    cfg = TrainConfig(steps=6, lr=1e-2, warmup=1, log_every=1, save_every=2, keep=3)
    reference = toy.toy_model(0)
    train(reference, toy.ToyTask(), cfg, tmp_path / "ref")
    state = tmp_path / "run" / "state"
    real, calls, before = safetensors.torch.save_file, [], {}

    def fills_up(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 6:  # step 4: model and optimizer written, the disk is full at rng.safetensors
            before.update(_tree(state / "step-00000002"))
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", fills_up)
        with pytest.raises(WriteFailed) as exc:
            train(toy.toy_model(0), toy.ToyTask(), cfg, tmp_path / "run")
    text = str(exc.value)
    assert f"no space left on {state}" in text and "step-00000002" in text and "--resume" in text, text
    assert [p.name for p in state.iterdir()] == ["step-00000002"] and _tree(state / "step-00000002") == before
    assert latest_state(state).name == "step-00000002"
    resumed = toy.toy_model(0)
    train(resumed, toy.ToyTask(), cfg, tmp_path / "run", resume=True)
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)  # the same arithmetic, the same machine


def test_a_full_disk_while_logging_leaves_no_half_line(tmp_path, monkeypatch):
    import builtins
    import errno

    from gentool.artifacts import WriteFailed
    from gentool.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl", tokens_per_step=8, flops_per_step=1.0, peak_flops=None, start_step=0,
                     resume=False)
    log.log(1, loss=2.0, lr=0.1, grad_norm=1.0)

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("gentool.train.metrics.open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)
    with pytest.raises(WriteFailed, match=f"no space left on {tmp_path}"):
        log.log(2, loss=2.0, lr=0.1, grad_norm=1.0)
    assert [m["step"] for m in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_outputs_without_a_name_are_refused_before_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("", ".", ".."):
        with pytest.raises(UsageProblem, match="needs a name"):
            RunDir(out, force=True).check()
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_resuming_keeps_the_metrics(tmp_path, monkeypatch):
    """--resume rewrites metrics.jsonl without the lines after the saved state: a full disk then loses nothing."""
    import errno
    from pathlib import Path

    from gentool.artifacts import WriteFailed
    from gentool.train.metrics import MetricsLog

    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1, "seconds": 1.0}\n{"step": 2, "seconds": 2.0}\n{"step": 3, "seconds": 3.0}\n'
    path.write_text(text)
    real = Path.write_text

    def half(self, data, *args, **kwargs):
        real(self, data[:7], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(WriteFailed, match=f"no space left on {tmp_path}"):
        MetricsLog(path, tokens_per_step=8, flops_per_step=1.0, peak_flops=None, start_step=2, resume=True)
    monkeypatch.undo()
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_full_disk_while_writing_the_recipe_leaves_no_unfinished_run(tmp_path, monkeypatch):
    """The disk fills as run.json is written: nothing is left that a rerun would take for an unfinished run (issue
    25 QA: the rerun was told "an unfinished run is here", and --resume "a different configuration")."""
    import errno
    from pathlib import Path

    from gentool.artifacts import WriteFailed

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(Path, "write_text", full)
        run = RunDir(tmp_path / "out")
        run.check()
        with pytest.raises(WriteFailed, match="no space left"):
            run.begin({"lr": 1})
    assert not (tmp_path / "out.partial").exists()
    _run(tmp_path, {"lr": 1})  # the same command again simply runs


def test_resume_of_a_run_without_its_recipe_says_there_is_nothing_to_resume(tmp_path):
    (tmp_path / "out.partial").mkdir()  # e.g. left by an older gentool killed at the start
    with pytest.raises(UsageProblem, match="saved no state to resume from"):
        _run(tmp_path, {"lr": 1}, resume=True)


def test_the_hint_after_a_full_disk_before_any_state_names_force(tmp_path):
    """A full disk before the first saved state: rerunning as before is refused (an unfinished run is here), so the
    hint must say --force."""
    from gentool.train.checkpoint import resume_hint

    run = _run(tmp_path, {"lr": 1})
    hint = resume_hint(run.partial / "state")
    with pytest.raises(UsageProblem, match="unfinished run"):
        RunDir(tmp_path / "out").check()
    assert "--force" in hint
    RunDir(tmp_path / "out", force=True).check()
