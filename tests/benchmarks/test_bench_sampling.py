"""`benchmarks/bench_sampling.py`: which call is timed and which one measured for memory (the warm-up)."""

import time

from benchmarks import bench_sampling
from benchmarks.bench_sampling import _timed_calls
from benchmarks.benchmarking_utils import Timer, spread


def _sleepy_call(durations, timer):
    calls = []

    def call():
        timer.start("transformer")
        time.sleep(durations[len(calls)])
        timer.stop("transformer")
        calls.append(1)

    return call, calls


def test_warmup_times_the_second_call_and_measures_memory_on_the_first():
    args = bench_sampling.parse_args(["--device", "cpu"])
    assert args.warmup
    timer = Timer("cpu")
    call, calls = _sleepy_call([0.3, 0.01], timer)  # a slow first call (kernel generation) must not count
    result = _timed_calls(args, "cpu", timer, call)
    assert len(calls) == 2
    assert timer.totals["total"] < 0.2 and timer.totals["transformer"] < 0.2
    assert result["memory_kind"].startswith("peak resident set")


def test_no_warmup_times_the_first_call():
    args = bench_sampling.parse_args(["--device", "cpu", "--no-warmup"])
    assert not args.warmup
    timer = Timer("cpu")
    call, calls = _sleepy_call([0.3], timer)
    _timed_calls(args, "cpu", timer, call)
    assert len(calls) == 1
    assert timer.totals["total"] >= 0.3 and timer.totals["transformer"] >= 0.3


def test_repeats_are_summarised_by_median_and_spread():
    runs = [
        {"images_per_second": v, "peak_memory_mb": m, "seconds": 1 / v, "memory_kind": "rss"}
        for v, m in ((1.0, 100.0), (3.0, 90.0), (2.0, 120.0))
    ]
    summary = bench_sampling.summarise_runs(runs)
    assert summary["images_per_second"] == 2.0 and summary["peak_memory_mb"] == 100.0
    assert summary["spread"]["images_per_second"] == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}
    assert summary["memory_kind"] == "rss"
    row = {
        "batch_size": 1,
        "steps": 16,
        "diffusion_steps": 25,
        "ours": {**summary, "encoder_seconds": 1.0, "decoder_seconds": 2.0, "head_seconds": 3.0},
        "official": {**summary, "encoder_seconds": 1.0, "decoder_seconds": 2.0, "head_seconds": 3.0},
        "speedup": spread([1.1, 1.3, 1.2]),
        "memory_ratio": spread([1.0, 0.9, 1.1]),
    }
    line = bench_sampling._table([row], have_official=True).splitlines()[-1]
    assert "2.000 (1.000-3.000)" in line and "1.20 (1.10-1.30)x" in line and "1.00 (0.90-1.10)x" in line
