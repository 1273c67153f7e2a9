"""--log-to: every backend's own reader sees the scalars of metrics.jsonl, the recipe and the run's name."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from gentool.train import trackers

ALL = ("tensorboard", "mlflow", "wandb", "trackio")
RUN = ["train-diffusion", "builtin:moons", "--steps", "40", "--batch-size", "16", "--model", "mlp", "--width", "16",
       "--device", "cpu"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wandb_records(path: Path):
    """The records of a W&B offline run file (.wandb): LevelDB's log format (32 KiB blocks of crc32, length, type
    chunks) after a 7-byte ':W&B' header, each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, parts = path.read_bytes(), 7, []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def _which(mods):
    return [m for m in mods if __import__("importlib").util.find_spec(m) is None]


@pytest.mark.skipif(bool(_which(["tensorboard", "mlflow", "wandb", "trackio"])), reason="a tracker package is absent")
def test_every_backend_reads_back_what_metrics_jsonl_says(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "TRACKIO_DIR": str(tmp_path / "trackio"),
           "WANDB_MODE": "offline", "NO_COLOR": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "-m", "gentool", *RUN, "-o", str(tmp_path / "moons")]
    for b in ALL:
        args += ["--log-to", b]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr.lower(), r.stderr
    assert r.stdout.startswith("output") and "Trackio" not in r.stdout, r.stdout  # no tracker chatter on stdout
    run = tmp_path / "moons"
    lines = _metrics(run)
    want = {(m["step"], k): v for m in lines for k, v in m.items() if k != "step"}
    assert len(lines) >= 5 and any(k == "val_loss" or k.startswith("val") for _, k in want)

    def same(got: dict, what: str):
        assert got, what
        for key, value in got.items():
            assert key in want, (what, key)
            assert value == pytest.approx(want[key], rel=1e-6, abs=1e-6), (what, key)
        assert {k for k in want if k[1] == "loss"} <= set(got), what

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    same({(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}, "tensorboard")

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("gentool")
    (mrun,) = client.search_runs([exp.experiment_id])
    assert mrun.info.run_name == "moons" and mrun.data.params["train.steps"] == "40"
    history = {key: client.get_metric_history(mrun.info.run_id, key) for key in mrun.data.metrics}
    same({(m.step, key): m.value for key, ms in history.items() for m in ms}, "mlflow")

    (wfile,) = run.glob("wandb/offline-run-*/run-*.wandb")
    got, name, config = {}, None, {}
    for rec in _wandb_records(wfile):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            step = row.get("_step", rec.history.step.num)
            got.update({(step, k): v for k, v in row.items() if not k.startswith("_")})
        elif kind == "run":
            name = rec.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert name == "moons" and config["train"]["steps"] == 40
    same(got, "wandb")

    read = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps(S.get_logs('gentool', 'moons'), default=str))")
    r = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    logs = json.loads(r.stdout)
    same({(row["step"], k): v for row in logs for k, v in row.items() if k in {k2 for _, k2 in want}}, "trackio")


def test_a_missing_extra_is_one_line_before_any_work(cli, tmp_path, monkeypatch):
    real = trackers.importlib.util.find_spec
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda m, *a: None if m == "wandb" else real(m, *a))
    r = cli(*RUN, "-o", tmp_path / "m", "--log-to", "wandb")
    assert r.exit_code == 2 and "gentool[wandb]" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    assert not list(tmp_path.iterdir())
    r = cli(*RUN, "-o", tmp_path / "m", "--log-to", "neptune")
    assert r.exit_code == 2 and "unknown --log-to 'neptune'" in r.stderr and not list(tmp_path.iterdir())


def test_a_failing_logger_warns_once_and_training_goes_on(cli, tmp_path, monkeypatch):
    calls = []

    class Broken:
        def __init__(self, run_dir, name, config):
            calls.append(name)

        def log(self, step, scalars):
            raise OSError(28, "No space left on device")

        def close(self):
            raise AssertionError("closed after failing")

    monkeypatch.setitem(trackers._CLASSES, "tensorboard", Broken)
    r = cli(*RUN, "-o", tmp_path / "m", "--log-to", "tensorboard")
    assert r.exit_code == 0, r.output
    assert r.stderr.count("--log-to tensorboard failed") == 1 and "No space left" in r.stderr
    assert calls == ["m"] and _metrics(tmp_path / "m")[-1]["step"] == 40


def test_scalars_and_flat_config():
    line = {"step": 3, "loss": 1.5, "lr": 1e-3, "mfu": float("nan"), "tokens": 96, "note": "x", "ok": True}
    assert trackers._scalars(line) == {"loss": 1.5, "lr": 1e-3, "tokens": 96.0}
    assert trackers._flat({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}
