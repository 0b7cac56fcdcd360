"""benchmarks/bench_commits.py: its argument checks, and a real run of two commits on a tiny setting (slow)."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_commits


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--before", "no-such-revision-xyz"], "--before: 'no-such-revision-xyz' is not a commit"),
        (["--before", "HEAD", "--after", "no-such-revision-xyz"], "--after: 'no-such-revision-xyz' is not a commit"),
        (["--before", "HEAD", "--repeats", "2"], "--repeats must be >= 3"),
        (["--before", "HEAD", "--calls", "0"], "--calls >= 1"),
        (["--before", "HEAD", "--model", "no/such/folder"], "--model must be one of"),
    ],
)
def test_bad_arguments_exit_2_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_commits.parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_working_tree_against_head_on_the_shipped_model(tmp_path):
    output = tmp_path / "result.json"
    argv = ["--before", "HEAD", "--model", "shipped", "--batch-size", "2", "--num-inference-steps", "2"]
    argv += ["--num-diffusion-steps", "2", "--warmup", "0", "--threads", "1", "--output-json", str(output)]
    assert bench_commits.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["revisions"] == {"before": "HEAD", "after": "."}
    assert [len(result["seconds"][side]) for side in ("before", "after")] == [3, 3]
    assert all(t > 0 for side in ("before", "after") for t in result["seconds"][side])
    expected = [a / b for b, a in zip(result["seconds"]["before"], result["seconds"]["after"])]
    assert result["ratios"] == pytest.approx(expected)
