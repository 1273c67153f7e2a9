"""Helpers shared by the quantize tests: a tiny Llama lm-checkpoint, GGUF tensors as bytes, the llama.cpp build."""

import shutil
from pathlib import Path

import _peers as peers
import numpy as np
import pytest

from gentool.config import config_from_preset
from gentool.models.checkpoint import save_lm
from gentool.models.transformer import Transformer


def llama_bin() -> Path | None:
    return peers.llama_bin("llama-quantize")


needs_llama = pytest.mark.skipif(llama_bin() is None, reason="llama.cpp tools not built ($GENTOOL_LLAMA_CPP_BIN)")


def make_lm(directory: Path, tokenizer: Path, *, tie=False, hidden=256, inter=512, layers=2, seed=0) -> Path:
    from gentool.artifacts import create_artifact

    cfg = config_from_preset("tiny", vocab_size=400, hidden_size=hidden, intermediate_size=inter,
                             num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
                             max_position_embeddings=128, tie_word_embeddings=tie)
    m = Transformer(cfg)
    m.init_weights(seed)
    with create_artifact(directory, "lm-checkpoint", config={"test": True}) as art:
        save_lm(m, cfg, art.dir)
        shutil.copy(tokenizer / "tokenizer.model", art.dir / "tokenizer.model")
    return directory


def gguf_tensors(path):
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(len(t.data), -1)
                     if t.tensor_type.name not in ("F32", "F16") else np.asarray(t.data)) for t in r.tensors}
