"""`benchmarks/bench_sampling.py`: which call is timed and which one measured for memory (the warm-up)."""

import time

from benchmarks import bench_sampling
from benchmarks.bench_sampling import Timer, _timed_calls


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
