"""`requires_fixtures` (issue 12): parity tests skip without the LTH14/mar fixtures, except under CI, where they fail."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.testing_utils import REPO_ROOT

PARITY_TEST = "tests/models/test_models_diffusion_head_mar.py::test_head_output_matches_original"


def run_parity_test(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["MAR_FIXTURES_DIR"] = str(tmp_path / "no_fixtures")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", PARITY_TEST],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("ci", ["true", "1"])
def test_missing_fixtures_fail_under_ci(tmp_path, ci):
    result = run_parity_test(tmp_path, ci)
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "1 failed" in result.stdout and "fixtures not found" in result.stdout and "MAR_FIXTURES_DIR" in result.stdout
    )


def test_missing_fixtures_skip_outside_ci(tmp_path):
    result = run_parity_test(tmp_path, None)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout


def test_fixture_tests_carry_the_parity_marker():
    def collect(marker: str) -> str:
        command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
        command += ["-m", marker, PARITY_TEST.split("::")[0]]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout

    assert PARITY_TEST in collect("parity")
    assert PARITY_TEST not in collect("not parity")
