"""benchmarks/bench_var.py: VARPipeline against the official VAR sampler, side by side."""

import json
import os
import subprocess
import sys

import pytest

from tests.testing_utils import REPO_ROOT


def test_it_refuses_a_folder_that_is_not_a_var_checkout(tmp_path):
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_var.py", "--original-repo", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "is not a FoundationVision/VAR checkout" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    "VAR_ORIGINAL_REPO" not in os.environ, reason="set VAR_ORIGINAL_REPO to a FoundationVision/VAR checkout"
)
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_tiny_run_times_both_and_their_images_agree(tmp_path, dtype):
    """float32: the same images; int8: ours quantized (the official float32), its images within int8's error (the
    tiny random model's sampled tokens do not change, so they stay close)."""
    command = [sys.executable, "benchmarks/bench_var.py", "--original-repo", os.environ["VAR_ORIGINAL_REPO"], "--tiny"]
    command += ["--batch-sizes", "2", "--repeats", "1", "--output-json", str(tmp_path / "r.json"), "--dtype", dtype]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())
    (row,) = results["rows"]
    assert row["batch_size"] == 2 and dtype in results["machine"]
    assert row["ours_int8"] == (dtype == "int8")
    assert row["max_image_difference"] < (1e-4 if dtype == "float32" else 0.5)
    assert ("in int8 against" in result.stdout) == (dtype == "int8")
    assert row["ours_images_per_second"]["runs"] == row["official_images_per_second"]["runs"] == 1
    assert "path/to/VAR" in result.stdout and os.environ["VAR_ORIGINAL_REPO"] not in result.stdout
