"""The browser tests skip without a browser, with the reason, and fail instead under `CI=true`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.testing_utils import REPO_ROOT


def run_browser_tests(ci: bool, tmp_path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env.update({"DEMO_CHROMIUM": str(tmp_path / "no-chromium"), "PYTHONPATH": str(REPO_ROOT)})
    if ci:
        env["CI"] = "true"
    command = [sys.executable, "-m", "pytest", "-m", "slow", "-n", "0", "-p", "no:cacheprovider", "-rs"]
    command += ["tests/demo/test_browser.py::test_bad_input_shows_our_message_not_a_traceback"]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=300)


@pytest.mark.parametrize("ci", [False, True], ids=["outside-ci", "ci"])
def test_a_missing_browser_skips_outside_ci_and_fails_in_ci(ci, tmp_path):
    result = run_browser_tests(ci, tmp_path)
    output = result.stdout + result.stderr
    if ci:
        assert result.returncode == 1, output
        assert "the browser tests must not skip in CI (.ci/run installs chromium)" in output
        assert "1 error" in output
    else:
        assert result.returncode == 0, output
        assert f"no chromium at {tmp_path / 'no-chromium'}" in output and "1 skipped" in output
