import pytest
import torch

from gentool.devices import dtype_name, resolve_device, resolve_dtype, torch_dtype
from gentool.errors import UsageProblem


def test_dtype_names_and_defaults():
    assert torch_dtype("bf16") is torch.bfloat16 and torch_dtype("float16") is torch.float16
    assert resolve_dtype(None, "cpu") is torch.float32 and resolve_dtype(None, "cuda:0") is torch.bfloat16
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(UsageProblem, match="unknown --dtype 'int8'"):
        resolve_dtype("int8", "cpu")


def test_devices():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageProblem, match="no CUDA GPU"):
            resolve_device("cuda:1")
