"""`benchmarks/bench_gpu.py`: the one-shot GPU table runs to completion on the CPU with `--dry-run`, plans its rows
within the time budget, and refuses what it cannot run."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import bench_gpu


def test_the_dry_run_writes_the_whole_table(tmp_path):
    json_path, md_path = tmp_path / "gpu.json", tmp_path / "gpu.md"
    assert bench_gpu.main(["--dry-run", f"--output-json={json_path}", f"--output-md={md_path}"]) == 0
    rows = json.loads(json_path.read_text())["rows"]
    assert [(row["dtype"], row["batch_size"], row["steps"], row["ran"]) for row in rows] == [
        ("float32", 2, 2, True),
        ("bfloat16", 2, 2, True),
    ]
    for row in rows:
        assert row["ours"]["images_per_second"]["runs"] == 2 and row["ours_graphs"]["seconds"]["runs"] == 2
        assert row["graphs_vs_eager"] == 0.0  # the eager backend: the compiled copy computes the same tokens
        assert "official" not in row  # no checkout in a dry run
    assert 0 < rows[1]["bf16_vs_fp32"] < float("inf") and "bf16_vs_fp32" not in rows[0]
    table = md_path.read_text()
    assert "| 2 x 2 | 2 | bfloat16 |" in table and "backend 'eager'" in table


def test_rows_are_predicted_from_the_measured_ones_and_skipped_past_the_budget():
    args = bench_gpu.parse_args(["--dry-run"])
    seconds = {"median": 2.0, "min": 2.0, "max": 2.0, "runs": 2}
    measured = {"ran": True, "batch_size": 4, "steps": 2, "diffusion_steps": 6, "ours": {"seconds": seconds}}
    # 2 s per round for 4 x 2 x (6 + 4) units of work; a row of 8 x 4 x (21 + 4) units, 2 rounds + the warm-up share
    expected = 2.0 / 80 * (8 * 4 * 25) * (2 + 0.2)
    assert bench_gpu.predicted_seconds([measured], 8, 4, 21, args) == pytest.approx(expected)
    assert bench_gpu.predicted_seconds([], 8, 4, 21, args) is None
    skipped = {"ran": False, "dtype": "bfloat16", "batch_size": 256, "steps": 64, "diffusion_steps": 100}
    line = bench_gpu.table([{**skipped, "skipped": "skipped: predicted 900 s, 100 s of the budget left"}])
    assert line.splitlines()[-1].startswith("| 64 x 100 | 256 | bfloat16 | skipped: predicted 900 s")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_it_asks_for_one_or_a_dry_run(capsys):
    with pytest.raises(SystemExit) as error:
        bench_gpu.parse_args(["--original-repo", "somewhere"])
    assert error.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dry-run", "--settings", "64-100"], "--settings: each must be OUTERxDIFFUSION"),
        (["--dry-run", "--repeats", "0"], "--repeats must be >= 1"),
        (["--dry-run", "--original-repo", "x"], "drop --original-repo"),
    ],
)
def test_bad_arguments_are_refused_with_the_option_named(argv, message, capsys):
    with pytest.raises(SystemExit) as error:
        bench_gpu.parse_args(argv)
    assert error.value.code == 2 and message in capsys.readouterr().err
