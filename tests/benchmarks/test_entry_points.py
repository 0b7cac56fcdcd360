"""The benchmark scripts run as `benchmarks/README.md` says: `python benchmarks/<script>.py` from the repository root
(issue 14: `ModuleNotFoundError: No module named 'benchmarks'`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.testing_utils import REPO_ROOT

# Every script (the shared module is not one).
SCRIPTS = sorted(
    path.name
    for path in (REPO_ROOT / "benchmarks").glob("*.py")
    if path.name not in ("__init__.py", "benchmarking_utils.py")
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_help_runs_from_the_repository_root(script):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # as a user types it
    result = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--help"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "--help" in result.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_cuda_refuses_to_run_without_a_gpu():
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_cuda.py"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
