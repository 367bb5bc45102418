"""The malloc settings the `ssl-sec` command applies at start-up (ssl_sec/cpu_memory.py)."""

import subprocess
import sys
from pathlib import Path

import pytest

from ssl_sec import cpu_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings: Linux only")
def test_applied_on_glibc_and_opt_out(monkeypatch):
    monkeypatch.delenv(cpu_memory.ENV_VAR, raising=False)
    assert cpu_memory.keep_freed_memory() is True  # this image runs glibc
    monkeypatch.setenv(cpu_memory.ENV_VAR, "0")
    assert cpu_memory.keep_freed_memory() is False


def test_cli_applies_it_before_running_a_command():
    """`ssl-sec` calls keep_freed_memory() first; checked in a fresh process."""
    code = (
        "import ssl_sec.cli as cli\n"
        "calls = []\n"
        "cli.keep_freed_memory = lambda: calls.append(1) or True\n"
        "try:\n"
        "    cli.main(['config', 'recipes/quickstart.yaml'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(len(calls))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert out.stdout.strip().splitlines()[-1] == "1", out.stderr
