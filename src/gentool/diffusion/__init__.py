"""Diffusion and flow matching on images and vectors. (The masked-diffusion language model lives in lm/masked.py.)

The entry points are imported lazily so that `import gentool.diffusion` stays free of torch:
`run_train_diffusion`, `sample_checkpoint`, `elbo`, `load_diffusion`.
"""

from __future__ import annotations

_LAZY = {"run_train_diffusion": "gentool.diffusion.train", "TrainDiffusionOptions": "gentool.diffusion.train",
         "sample_checkpoint": "gentool.diffusion.sample", "elbo": "gentool.diffusion.likelihood",
         "load_diffusion": "gentool.diffusion.checkpoint"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
