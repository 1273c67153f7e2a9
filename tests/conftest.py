import os

import pytest


def pytest_configure(config):
    os.environ.setdefault("NO_COLOR", "1")


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


@pytest.fixture
def cli():
    """Run gentool in-process: cli("tokenize", "train", ...) -> Result with exit_code, stdout, stderr."""
    from typer.testing import CliRunner

    from gentool.cli import app

    runner = CliRunner()

    def run(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return run
