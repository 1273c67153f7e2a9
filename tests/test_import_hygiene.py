import subprocess
import sys


def test_cli_import_does_not_import_torch():
    code = "import sys, gentool.cli; assert 'torch' not in sys.modules, 'torch imported'; " \
           "assert 'numpy' not in sys.modules, 'numpy imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "gentool", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("gentool ")
