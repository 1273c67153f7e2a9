"""Experiment trackers beside metrics.jsonl: `--log-to tensorboard|wandb|mlflow|trackio` (repeatable).

Every backend gets the scalars of each metrics.jsonl line at its step, the run's recipe (the command's resolved
options) as config/params, and the run directory's name as the run name. All are local by default: TensorBoard
event files in RUN/tensorboard/, MLflow's file store in RUN/mlruns/ (unless MLFLOW_TRACKING_URI is set), W&B in
offline mode under RUN/wandb/ (unless WANDB_MODE says otherwise), Trackio's local store (TRACKIO_DIR, by default
under HF_HOME). A backend whose extra is missing is refused before training starts; one that fails while training
(a full disk, a closed server) warns once and is dropped: training never stops for a logger.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Any

from gentool import console
from gentool.errors import UsageProblem

# backend -> (module that must import, the extra that brings it)
BACKENDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
PROJECT = "gentool"
LOCAL_DIRS = ("tensorboard", "mlruns", "wandb")  # what the backends write into the run directory


def check_backends(names: tuple[str, ...] | list[str]) -> None:
    """Refuse unknown backends and backends whose package is missing (before a run directory exists)."""
    for name in names:
        if name not in BACKENDS:
            raise UsageProblem(f"unknown --log-to {name!r}", hint="use tensorboard, wandb, mlflow or trackio")
        module, extra = BACKENDS[name]
        if importlib.util.find_spec(module) is None:
            raise UsageProblem(f"--log-to {name} needs the {module} package",
                               hint=f"pip install 'gentool[{extra}]'")


def _scalars(line: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in line.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.writer.add_text("recipe", "\n".join(f"    {k} = {v}" for k, v in _flat(config).items()), 0)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow's local file store (in maintenance mode upstream, still MLflow's serverless store)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(PROJECT)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True)
        with contextlib.redirect_stdout(sys.stderr):
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, dir=str(run_dir),
                                  config=config, mode=mode, settings=settings, reinit="create_new")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()


class _Trackio:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any]):
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            self.run = trackio.init(project=PROJECT, name=name, config=_flat(config), embed=False,
                                    auto_log_gpu=False, auto_log_cpu=False, capture_console=False)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import trackio

        with contextlib.redirect_stdout(sys.stderr):
            self.run.finish()
        if trackio.context_vars.current_run.get() is self.run:  # else trackio's atexit hook finishes it again, on
            trackio.context_vars.current_run.set(None)           # stdout


_CLASSES = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb, "trackio": _Trackio}


class Trackers:
    """The backends of one run; each failure warns once and drops that backend."""

    def __init__(self, names: tuple[str, ...] | list[str], run_dir: Path, config: dict[str, Any]):
        self.live: dict[str, Any] = {}
        name = run_dir.name.removesuffix(".partial")
        for backend in dict.fromkeys(names):
            self._guard(backend, lambda b=backend: self.live.__setitem__(b, _CLASSES[b](run_dir, name, config)))

    def _guard(self, backend: str, call) -> None:
        try:
            call()
        except Exception as e:  # a logger never stops training
            console.warn(f"--log-to {backend} failed ({type(e).__name__}: {str(e)[:160]}); it logs no more")
            self.live.pop(backend, None)

    def log(self, line: dict[str, Any]) -> None:
        scalars = _scalars(line)
        for backend, tracker in list(self.live.items()):
            self._guard(backend, lambda t=tracker: t.log(int(line["step"]), scalars))

    def close(self) -> None:
        for backend, tracker in list(self.live.items()):
            self._guard(backend, tracker.close)
        self.live.clear()
