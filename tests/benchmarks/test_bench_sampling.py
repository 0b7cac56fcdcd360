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
    # the float32 weights freed by the quantization make the resident set's peak meaningless: not reported
    assert (
        result["peak_memory_mb"] is None and "peak_memory_mb" not in bench_sampling.summarise_runs([result])["spread"]
    )
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
    args = bench_sampling.parse_args(
        ["--ours-preset", "fast", "--ours-guidance-cache-interval", "2", "--guidance-scale", "2"]
    )
    cached = ours_call(args, pipe, Timer("cpu"), 2, 16, 10)()
    assert torch.equal(cached.images, sample(sampling_preset="fast", guidance_cache_interval=2))
    assert not torch.equal(cached.images, timed.images)
    args = bench_sampling.parse_args(["--ours-feature-cache-interval", "3", "--ours-guidance-cache-interval", "2"])
    assert bench_sampling.ours_cache_arguments(args) == {"guidance_cache_interval": 2, "feature_cache_interval": 3}


def test_cache_intervals_below_one_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench_sampling.parse_args(["--ours-feature-cache-interval", "0"])
    assert "--ours-feature-cache-interval must be >= 1" in capsys.readouterr().err


def test_in_process_harness_warms_up_once_then_alternates_the_order(monkeypatch, tmp_path):
    """One untimed call of each, then rounds official-ours, ours-official, ...; the official time split into encoder
    and decoder, a run per call, and the speed-up of the table taken pair by pair."""
    argv = ["--device", "cpu", "--original-repo", str(tmp_path), "--repeats", "3", "--harness", "in-process"]
    args = bench_sampling.parse_args(argv)
    args.weights = tmp_path / "weights.safetensors"
    calls = []

    def fake_call(name, timer, seconds, sections):
        def call():
            calls.append(name)
            for section in sections:
                timer.start(section)
            time.sleep(seconds)
            for section in sections:
                timer.stop(section)

        return call

    monkeypatch.setattr(bench_sampling, "load_timed_official", lambda args, steps: "official model")
    monkeypatch.setattr(bench_sampling, "load_timed_ours", lambda args: "ours pipeline")
    monkeypatch.setattr(
        bench_sampling, "official_call", lambda a, model, timer, b, s: fake_call("official", timer, 0.04, ["encoder"])
    )
    monkeypatch.setattr(
        bench_sampling, "ours_call", lambda a, pipe, timer, b, s, d: fake_call("ours", timer, 0.02, ["transformer"])
    )
    runs = bench_sampling.measure_setting(args, 2, 4, 5)
    assert calls == ["official", "ours"] + ["official", "ours", "ours", "official", "official", "ours"]
    assert [name for name, _ in runs["sequence"]] == calls[2:]
    assert len(runs["ours"]) == len(runs["official"]) == 3
    official, ours = runs["official"][0], runs["ours"][0]
    assert official["encoder_seconds"] >= 0.04 and official["decoder_seconds"] < 0.01
    assert ours["decoder_seconds"] >= 0.02 and ours["head_seconds"] < 0.01
    assert "peak_memory_mb" not in ours and 30 < ours["images_per_second"] < 100
    summary = bench_sampling.summarise_runs(runs["ours"])
    assert "peak_memory_mb" not in summary["spread"]

    calls.clear()
    args = bench_sampling.parse_args(["--original-repo", str(tmp_path), "--harness", "in-process", "--no-warmup"])
    args.repeats, args.weights = 1, tmp_path / "weights.safetensors"
    bench_sampling.measure_setting(args, 1, 2, 3)
    assert calls == ["official", "ours"]


def test_in_process_table_has_no_memory(monkeypatch):
    stats = spread([1.0, 2.0, 3.0])
    side = {"spread": {"images_per_second": stats}, "encoder_seconds": 1.0, "decoder_seconds": 2.0, "head_seconds": 3}
    row = {"batch_size": 1, "steps": 16, "diffusion_steps": 25, "ours": side, "official": side, "speedup": stats}
    line = bench_sampling._table([row], have_official=True).splitlines()[-1]
    assert line.count("n/a") == 3 and "2.00 (1.00-3.00)x" in line


def test_in_process_harness_needs_the_official_code_and_no_profile(capsys):
    import pytest

    for extra in ([], ["--original-repo", "x", "--profile-step", "1"]):
        with pytest.raises(SystemExit):
            bench_sampling.parse_args(["--harness", "in-process", *extra])
    err = capsys.readouterr().err
    assert "--harness in-process times ours against the official code" in err and "--profile-step profiles" in err


def test_main_reports_int8_fresh_runs_without_memory_and_keeps_the_in_process_sequence(monkeypatch, tmp_path, capsys):
    """The rows `main` builds: fresh int8 runs have no peak memory (no memory ratio, no call sequence); in-process
    runs keep their call sequence."""
    import json

    def fake_runs(args, batch_size, steps, diffusion_steps, profile=False):
        run = {"images_per_second": 2.0, "encoder_seconds": 1.0, "decoder_seconds": 1.0, "head_seconds": 1.0}
        official = {**run, "images_per_second": 1.0, "peak_memory_mb": 50.0}
        ours = {**run, "peak_memory_mb": None} if args.dtype == "int8" else {**run, "peak_memory_mb": 40.0}
        runs = {"ours": [ours] * args.repeats, "official": [official] * args.repeats}
        return runs | ({"sequence": [["official", 1.0], ["ours", 0.5]]} if args.harness == "in-process" else {})

    monkeypatch.setattr(bench_sampling, "make_original_weights", lambda args, path: None)
    monkeypatch.setattr(bench_sampling, "measure_setting", fake_runs)
    common = ["--original-repo", str(tmp_path), "--device", "cpu", "--batch-sizes", "1", "--repeats", "2"]
    assert bench_sampling.main([*common, "--dtype", "int8", "--output-json", str(tmp_path / "a.json")]) == 0
    (row,) = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert "memory_ratio" not in row and "sequence" not in row and row["speedup"]["median"] == 2.0
    assert "| 1 | 16 x 25 | 2.000 (2.000-2.000) | n/a |" in capsys.readouterr().out
    argv = [*common, "--harness", "in-process", "--output-json", str(tmp_path / "b.json")]
    assert bench_sampling.main(argv) == 0
    (row,) = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["sequence"] == [["official", 1.0], ["ours", 0.5]] and "memory_ratio" not in row
