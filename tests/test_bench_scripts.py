"""Every benchmark script still imports and parses its flags (`--help`): they are run by hand, so nothing else
would notice when a refactor moves a name they import (bench/batch_cli.py once imported a moved `loader_nice`)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py") if p.name != "benchenv.py"))
def test_bench_script_imports_and_parses_its_flags(script):
    r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120,
                       cwd=BENCH.parent, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage" in r.stdout.lower()
