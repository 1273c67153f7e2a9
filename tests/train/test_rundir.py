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
