import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers (tests/_peers.py); --import-mode=importlib adds none


def pytest_configure(config):
    os.environ.setdefault("NO_COLOR", "1")
    # the CPU kernel for quantized layers is built once per session, not once per test or subprocess
    import tempfile

    if "GENTOOL_KERNEL_DIR" not in os.environ:
        os.environ["GENTOOL_KERNEL_DIR"] = config._gentool_kernels = tempfile.mkdtemp(prefix="gentool-kernels-")


def pytest_unconfigure(config):
    if getattr(config, "_gentool_kernels", None):
        import shutil

        shutil.rmtree(config._gentool_kernels, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _isolate(monkeypatch, tmp_path):
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("GENTOOL_CACHE_DIR", str(tmp_path / "cache"))
    from gentool import console

    console.configure()
    try:
        import torch
    except ImportError:
        yield
        return
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)
    if "torch._dynamo" in sys.modules:  # each test compiles new models; one process's recompile limit is for one run
        torch._dynamo.reset()


@pytest.fixture
def cli():
    """Run gentool in-process: cli("tokenize", "train", ...) -> Result with exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from gentool.cli import app

    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return run


COMEDIES = "builtin:shakespeare/comedies"


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A SentencePiece tokenizer artifact (BPE, vocab 400) of the bundled comedies, shared by the whole session:
    tests read it and never write into it."""
    from gentool.tokenize import train_tokenizer

    out = tmp_path_factory.mktemp("shared") / "tok"
    train_tokenizer([COMEDIES], out, vocab_size=400)
    return out


@pytest.fixture(scope="session")
def tiny_tokens(tiny_tokenizer, tmp_path_factory):
    """Token shards (train + val) of the comedies made with `tiny_tokenizer`; read only, like it."""
    from gentool.tokenize import encode_corpus

    out = tmp_path_factory.mktemp("shared") / "tokens"
    encode_corpus([COMEDIES], tiny_tokenizer, out, workers=1)
    return out
