"""The run directory of a training command, the same for every trainer.

While a run is going it lives in OUTPUT.partial/: run.json (the recipe), state/step-N/ (resumable state),
metrics.jsonl. At the end rank 0 builds the OUTPUT artifact in a temporary sibling (manifest last, then rename)
and removes OUTPUT.partial/. An existing OUTPUT is refused without --force, an unfinished run without --resume
or --force, and --resume only continues a run made with the same recipe.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gentool.artifacts import (ArtifactBuilder, WriteFailed, atomic_file, canonical_json, check_output,
                               create_artifact)
from gentool.artifacts.store import check_not_an_input
from gentool.errors import UsageProblem
from gentool.train import distributed
from gentool.train.checkpoint import latest_state
from gentool.train.trackers import LOCAL_DIRS

RECIPE = "run.json"


@dataclass(kw_only=True)
class RunOptions:
    """What every training command takes besides its data, model and objective (the CLI flags of these names)."""

    out: Path
    eval_every: int = 0          # 0: a few times per run
    save_every: int = 0          # 0: at the end only
    save_minutes: float = 10.0   # and by wall clock (0: off)
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None     # autocast dtype; None: bfloat16 on CUDA, float32 on CPU
    compile: bool = False
    resume: bool = False
    force: bool = False
    log_to: tuple[str, ...] = ()  # experiment trackers (train/trackers.py)


class RunDir:
    def __init__(self, out: str | Path, *, resume: bool = False, force: bool = False):
        self.out = Path(out)
        self.partial = self.out.parent / (self.out.name + ".partial")  # check() refuses "", "." and ".."
        self.resume, self.force = resume, force

    def check(self, sources=()) -> None:
        """Before any work: the output and the unfinished run this command would replace, and that neither is one
        of the run's inputs (`sources`, paths)."""
        check_output(self.out, force=self.force, sources=sources, parents=True)  # begin() makes the parents
        check_not_an_input(self.partial, sources)
        if self.partial.exists() and not (self.resume or self.force):
            raise UsageProblem("an unfinished run is here", path=self.partial,
                               hint="continue it with --resume, or --force")

    def begin(self, recipe: dict[str, Any]) -> None:
        """Rank 0 creates OUTPUT.partial/ with the recipe, or on --resume continues an unfinished run made with the
        same recipe that saved a state. Every rank checks (so a refusal never leaves a peer waiting), and under
        torchrun none goes on before the directory exists."""
        saved_file = self.partial / RECIPE
        if self.resume:
            if not self.partial.exists():
                raise UsageProblem("nothing to resume: no unfinished run", path=self.partial,
                                   hint="drop --resume to start a new run")
            saved = json.loads(saved_file.read_text()) if saved_file.is_file() else None
            if saved is not None and saved != json.loads(canonical_json(recipe)):
                raise UsageProblem("the unfinished run was started with a different configuration", path=self.partial,
                                   hint="repeat the original options, or start over with --force")
            if saved is None or latest_state(self.partial / "state") is None:
                raise UsageProblem("the unfinished run saved no state to resume from", path=self.partial,
                                   hint="start it over with --force")
        distributed.barrier()
        if distributed.rank() == 0 and not self.resume:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            try:
                with atomic_file(saved_file) as tmp:
                    tmp.write_text(canonical_json(recipe))
            except BaseException:  # a full disk now leaves nothing a rerun would take for an unfinished run
                shutil.rmtree(self.partial, ignore_errors=True)
                raise
        distributed.barrier()

    @contextmanager
    def finish(self, kind: str, *, config: dict[str, Any], inputs: list[dict]) -> Iterator[ArtifactBuilder]:
        """Rank 0: the final artifact, with the run's metrics.jsonl; OUTPUT.partial/ goes once it is in place. When
        it cannot be written (a full disk) the run stays in OUTPUT.partial/, and --resume writes it again."""
        try:
            with create_artifact(self.out, kind, force=True, config=config, inputs=inputs) as art:
                yield art
                shutil.copy(self.partial / "metrics.jsonl", art.dir / "metrics.jsonl")
                for name in LOCAL_DIRS:  # --log-to's local logs go with the run
                    if (self.partial / name).is_dir():
                        shutil.copytree(self.partial / name, art.dir / name)
        except WriteFailed as e:
            raise WriteFailed(e.message, path=e.path, hint=f"the finished run is kept in {self.partial}; free some "
                                                           "space, then rerun with --resume to write it") from e
        shutil.rmtree(self.partial, ignore_errors=True)
