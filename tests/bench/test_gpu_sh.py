"""bench/gpu.sh: its CPU dry run (--device cpu --smoke) runs the benches with tiny shapes and appends a report; every
bench with a GPU table is in its list."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu.sh"
CPU_ONLY = {"_common", "scale_fit", "tokenize_bench", "gguf_import", "forecast", "forecast_synth", "cpu", "trackers",
            "post_training",  # CPU batches against TRL on the CPU; no --device
            "bench_suite"}  # bench_suite: quantize.py --suite runs it


def _run(*args, results):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--smoke", "--results", str(results), *args],
                          capture_output=True, text=True, env=env, timeout=1900, check=False)


def test_every_gpu_bench_is_listed():
    listed = set(re.findall(r'^  "(\w+)\|', SCRIPT.read_text(), flags=re.M))
    benches = {p.stem for p in (ROOT / "bench").glob("*.py")} - CPU_ONLY
    assert listed == benches


def test_smoke_run_appends_a_report(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    proc = _run("--only", "train_optim", results=results)
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert text.startswith("# results\n") and "## GPU tables (bench/gpu.sh)" in text and "SMOKE RUN" in text
    assert re.search(r"### train_optim — \d+s", text) and "| optimizer" in text and "| normuon" in text
    assert "### sample" not in text
    bad = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "unknown option --frobnicate" in bad.stderr


@pytest.mark.slow
def test_full_smoke_run_every_bench(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = _run(results=results)
    text = results.read_text()
    assert proc.returncode == 0, text[-4000:]
    for name in re.findall(r'^  "(\w+)\|', SCRIPT.read_text(), flags=re.M):
        assert re.search(rf"### {name} — \d+s\n", text), (name, text[-3000:])
    assert "FAILED" not in text and "TIMED OUT" not in text
