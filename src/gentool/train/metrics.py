"""metrics.jsonl: one JSON object per logged step.

    {"step", "tokens", "flops", "loss", "val_loss"?, "lr", "grad_norm", "tokens_per_s", "mfu"?, "seconds",
     "train_seconds"}

tokens and flops are cumulative (D and C so far); tokens_per_s and mfu are measured over the steps since the previous
line (so compilation and evaluation do not blur them); seconds is the wall time of the run so far (summed over resumes);
train_seconds is the part of it spent training (evaluation and checkpointing left out): what `gentool compare`
counts as time to a loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    """Appends lines to metrics.jsonl (rank 0 only) and measures throughput between lines."""

    def __init__(self, path: Path, *, tokens_per_step: int, flops_per_step: float, peak_flops: float | None,
                 start_step: int, resume: bool, write: bool = True):
        self.path, self.write = path, write
        self.tokens_per_step, self.flops_per_step, self.peak = tokens_per_step, flops_per_step, peak_flops
        kept = [m for m in read_metrics(path) if m["step"] <= start_step] if resume else []
        if write:  # on resume, drop lines logged after the state we resume from (they will be logged again)
            from gentool.artifacts import atomic_file

            with atomic_file(path) as tmp:  # a full disk here loses no line
                tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
        self.wall0 = time.time() - (kept[-1]["seconds"] if kept else 0.0)  # wall time adds up across resumes
        self.train_seconds = kept[-1].get("train_seconds", 0.0) if kept else 0.0
        self.mark_step, self.mark_time = start_step, time.perf_counter()
        self.excluded = 0.0   # seconds spent in evaluation/checkpointing since the mark

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def _busy(self) -> float:
        return max(time.perf_counter() - self.mark_time - self.excluded, 1e-9)

    def rate(self, step: int) -> tuple[float, float | None]:
        """(tokens/s, MFU) over the steps since the last line."""
        dt = self._busy()
        steps = step - self.mark_step
        tps = self.tokens_per_step * steps / dt
        mfu = self.flops_per_step * steps / dt / self.peak if self.peak else None
        return tps, mfu

    def log(self, step: int, *, loss: float, lr: float, grad_norm: float, extra: dict[str, float] | None = None
            ) -> dict[str, Any]:
        busy = self._busy()
        tps, mfu = self.rate(step)
        line: dict[str, Any] = {"step": step, "tokens": step * self.tokens_per_step,
                                "flops": step * self.flops_per_step, "loss": round(loss, 6)}
        line.update({k: round(v, 6) for k, v in (extra or {}).items()})
        line.update(lr=lr, grad_norm=round(grad_norm, 6), tokens_per_s=round(tps, 1))
        if mfu is not None:
            line["mfu"] = round(mfu, 4)
        self.train_seconds += busy
        line["seconds"] = round(time.time() - self.wall0, 3)
        line["train_seconds"] = round(self.train_seconds, 3)
        if self.write:
            self._append(json.dumps(line) + "\n")
        self.mark_step, self.mark_time, self.excluded = step, time.perf_counter(), 0.0
        return line

    def _append(self, text: str) -> None:
        """One line, or (a full disk) none: a half line would stop --resume from reading the file."""
        size = self.path.stat().st_size if self.path.exists() else 0
        try:
            with open(self.path, "a") as f:
                f.write(text)
        except OSError as e:
            import os

            from gentool.artifacts.store import write_failure
            from gentool.train.checkpoint import resume_hint

            try:
                os.truncate(self.path, size)
            except OSError:
                pass
            raise write_failure(e, self.path, hint=resume_hint(self.path.parent / "state")) from e
