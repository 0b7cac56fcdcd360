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


def test_int8_quantizes_ours_only_on_the_cpu(monkeypatch, capsys):
    import pytest
    import torch

    from tests.testing_utils import make_tiny_pipeline

    tiny, asked = make_tiny_pipeline(clip_sample=True), []
    monkeypatch.setattr(bench_sampling, "load_ours", lambda args, device, dtype: asked.append(dtype) or tiny)
    args = bench_sampling.parse_args(["--device", "cpu", "--dtype", "int8", "--no-warmup"])
    result = bench_sampling.run_ours(args, 1, 2, 2)
    assert asked == [torch.float32] and tiny.transformer.int8_quantized and tiny.diffusion_head.int8_quantized
    assert result["images_per_second"] > 0
    with pytest.raises(SystemExit):
        bench_sampling.parse_args(["--device", "cuda", "--dtype", "int8"])
    assert "--dtype int8 runs on the CPU only" in capsys.readouterr().err


def test_ours_preset_replaces_ours_steps_only():
    import argparse

    import torch

    from benchmarks.benchmarking_utils import ours_call
    from tests.testing_utils import make_tiny_pipeline

    pipe = make_tiny_pipeline(clip_sample=True)

    def sample(**settings):
        generator = torch.Generator().manual_seed(0)
        return pipe([0, 1], generator=generator, guidance_scale=2.0, output_type="latent", **settings).images

    timed = ours_call(argparse.Namespace(guidance_scale=2.0, ours_preset="fast"), pipe, Timer("cpu"), 2, 16, 10)()
    assert torch.equal(timed.images, sample(sampling_preset="fast"))
    exact = ours_call(argparse.Namespace(guidance_scale=2.0, ours_preset=None), pipe, Timer("cpu"), 2, 16, 10)()
    assert torch.equal(exact.images, sample(num_inference_steps=16, num_diffusion_steps=10))
    assert not torch.equal(timed.images, exact.images)
