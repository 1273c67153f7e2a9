"""What is this directory? One cheap answer for every command that dispatches on its input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from gentool.artifacts.kinds import PREFIX

# diffusion-checkpoint families; the masked- and block-diffusion LMs are served by the language-model commands
DDPM, FLOW_MATCHING, MASKED_LM, BLOCK_LM = "ddpm", "flow-matching", "masked-lm", "block-lm"
LM_FAMILIES = (MASKED_LM, BLOCK_LM)


class Probe(NamedTuple):
    kind: str | None     # artifact kind ("lm-checkpoint", ...), or None: no readable gentool manifest
    family: str | None   # diffusion-checkpoint: ddpm | flow-matching | masked-lm | block-lm; otherwise None

    @property
    def is_denoiser(self) -> bool:
        """An image/vector diffusion-checkpoint (served by gentool.diffusion); everything else a command that takes
        models hands to the language-model code, whose loaders say what is wrong with it."""
        return self.kind == "diffusion-checkpoint" and self.family not in LM_FAMILIES


def probe(path: str | Path) -> Probe:
    """(kind, family) from PATH/manifest.json alone, without verifying anything; never raises (a missing or broken
    manifest gives kind None, and the command's loader reports what is wrong)."""
    try:
        m = json.loads((Path(path) / "manifest.json").read_text(encoding="utf-8"))
        fmt = m["format"]
    except (OSError, ValueError, TypeError, KeyError):
        return Probe(None, None)
    if not isinstance(fmt, str) or not fmt.startswith(PREFIX):
        return Probe(None, None)
    contents = m.get("contents") if isinstance(m.get("contents"), dict) else {}
    family = contents.get("family") if fmt == PREFIX + "diffusion-checkpoint" else None
    return Probe(fmt[len(PREFIX):], family if isinstance(family, str) else None)
