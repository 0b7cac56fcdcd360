"""`requires_fixtures` (issues 12, 29): parity tests skip without the LTH14/mar fixtures, except under CI, where they
fail; so do the tests whose pytest fixture reads the fixture files (`converted_fixture`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.testing_utils import FIXTURE_FILES, REPO_ROOT, missing_fixture_files

PARITY_TEST = "tests/models/test_models_diffusion_head_mar.py::test_head_output_matches_original"
CONVERSION_TESTS = "tests/conversion/test_convert_mar_to_diffusers.py"


def run_parity_test(
    tmp_path, ci: str | None, *tests: str, fixtures: str = "no_fixtures"
) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env["MAR_FIXTURES_DIR"] = str(tmp_path / fixtures)
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider", "-p", "no:xdist"]
    return subprocess.run(
        [*command, *(tests or [PARITY_TEST])],
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


def test_every_file_the_tests_read_must_be_there(tmp_path):
    assert missing_fixture_files(tmp_path) == ["io.safetensors", "checkpoint-last.pth", "vae_tiny.ckpt"]
    (tmp_path / "io.safetensors").write_bytes(b"")  # was enough before issue 29
    assert missing_fixture_files(tmp_path) == ["checkpoint-last.pth", "vae_tiny.ckpt"]
    (tmp_path / "checkpoint-last.pth").mkdir()  # a folder is not the file
    assert missing_fixture_files(tmp_path) == ["checkpoint-last.pth", "vae_tiny.ckpt"]
    # Every file the tests open as `FIXTURES_DIR / "name"` is checked (original_config.json is not read today).
    read = {
        match
        for path in (REPO_ROOT / "tests").rglob("*.py")
        if path.name != "test_testing_utils.py"
        for match in re.findall(r'(?<![A-Z_])FIXTURES_DIR / "([^"]+)"', path.read_text())  # not VAR_FIXTURES_DIR
    }
    assert read == set(FIXTURE_FILES)


def test_a_partial_fixture_folder_fails_under_ci_and_names_what_is_missing(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "io.safetensors").write_bytes(b"")
    result = run_parity_test(tmp_path, "true", fixtures="partial")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    assert (
        f"fixtures not found in {tmp_path / 'partial'} (missing: checkpoint-last.pth, vae_tiny.ckpt)" in result.stdout
    )


def test_tests_whose_pytest_fixture_reads_the_files_fail_under_ci(tmp_path):
    # The parity tests of the converter, six of them through `converted_fixture`, whose skip came first (issue 29).
    result = run_parity_test(tmp_path, "true", "-m", "parity", CONVERSION_TESTS)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "failed" in summary and "skipped" not in summary and "error" not in summary and "passed" not in summary
    for name in (
        "test_converted_transformer_and_head_reproduce_original_outputs",
        "test_folder_layout_and_model_card_metadata",
    ):
        assert (
            f"FAILED {CONVERSION_TESTS}::{name} - Failed: LTH14/mar fixtures not found in {tmp_path / 'no_fixtures'}"
            in result.stdout
        )
    result = run_parity_test(tmp_path, None, "-m", "parity", CONVERSION_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "skipped" in summary and "failed" not in summary and "passed" not in summary
    assert f"fixtures not found in {tmp_path / 'no_fixtures'}" in result.stdout  # -rs: the reason names the folder
