import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_scaling_synth", Path(__file__).with_name("_synth.py"))
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)


@pytest.fixture
def csv_file(tmp_path):
    return lambda name, rows: synth.write_csv(tmp_path / name, rows)
