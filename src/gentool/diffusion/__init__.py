"""Diffusion and flow matching (images and vectors), and masked diffusion for language (`masked`).

The entry points are imported lazily so that `import gentool.diffusion` stays free of torch:
`run_train_diffusion`, `sample_checkpoint`, `elbo`, `load_diffusion`.
"""

from __future__ import annotations

import json
from pathlib import Path

_LAZY = {"run_train_diffusion": "gentool.diffusion.train", "TrainDiffusionOptions": "gentool.diffusion.train",
         "sample_checkpoint": "gentool.diffusion.sample", "elbo": "gentool.diffusion.likelihood",
         "load_diffusion": "gentool.diffusion.checkpoint"}


def is_checkpoint(path: str | Path) -> bool:
    """True when PATH is an image/vector gentool.diffusion-checkpoint (reads only the manifest); masked-diffusion
    LMs (family masked-lm) are served by the LM commands."""
    try:
        m = json.loads((Path(path) / "manifest.json").read_text())
        return m.get("format") == "gentool.diffusion-checkpoint" and m.get("contents", {}).get("family") != "masked-lm"
    except (OSError, ValueError, AttributeError):
        return False


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
