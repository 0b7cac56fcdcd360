"""`benchmarks/bench_fast_sampling.py` on a tiny model: the settings it times and how it reports them."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import bench_fast_sampling
from benchmarks.benchmarking_utils import load_preset_or_folder
from diffusers_mar import quantization
from diffusers_mar.pipelines.sampling_settings import PAPER_SAMPLING
from tests.testing_utils import make_tiny_pipeline


def test_settings_are_the_pipeline_defaults_or_a_preset():
    exact = bench_fast_sampling.setting_arguments("exact", PAPER_SAMPLING, 3.0)
    assert exact == {**PAPER_SAMPLING, "guidance_scale": 3.0} and exact["num_inference_steps"] == 64
    fast = bench_fast_sampling.setting_arguments("fast", PAPER_SAMPLING, 2.0)
    assert fast == {"guidance_scale": 2.0, "sampling_preset": "fast"}


def test_unknown_settings_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_fast_sampling.parse_args(["--settings", "exact", "turbo"])
    assert "--settings must be `exact` or among ['fast', 'fast-ddpm'], each optionally with `+int8`" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        bench_fast_sampling.parse_args(["--settings", "exact", "fast+int4"])
    assert bench_fast_sampling.parse_args(["--settings", "fast", "fast+int8", "exact+int8"]).settings[1] == "fast+int8"


def test_rounds_time_every_setting_and_split_the_time():
    pipe = make_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    args = argparse.Namespace(settings=["exact", "fast"], batch_size=2, repeats=2, guidance_scale=2.0)
    with torch.no_grad():
        rounds = bench_fast_sampling.run(args, pipe)
    assert len(rounds) == 2 and all(set(r) == {"exact", "fast"} for r in rounds)
    for result in (r[name] for r in rounds for name in r):
        parts = result["transformer_seconds"] + result["head_seconds"] + result["rest_seconds"]
        assert result["transformer_seconds"] > 0 and result["head_seconds"] > 0
        assert parts == pytest.approx(result["seconds"])
    rows = bench_fast_sampling.summarise(args, rounds, pipe.sampling_defaults)
    assert rows[0]["speedup"]["median"] == 1.0 and rows[1]["speedup"]["runs"] == 2
    table = bench_fast_sampling.table(rows)
    assert "| exact |" in table and "sampling_preset='fast'" in table


def test_models_are_presets_or_pipeline_folders(tmp_path, capsys):
    assert bench_fast_sampling.parse_args(["--model", "mar-base"]).guidance_scale == 3.0
    args = bench_fast_sampling.parse_args(["--model", "shipped", "--settings", "exact", "fast", "fast-ddpm"])
    assert args.guidance_scale is None  # the folder's
    assert bench_fast_sampling.setting_arguments("fast", PAPER_SAMPLING, None) == {"sampling_preset": "fast"}
    pipe = load_preset_or_folder(args.model)
    assert pipe.transformer.num_tokens == 16 and pipe.sampling_defaults["num_inference_steps"] == 16
    with pytest.raises(SystemExit):
        bench_fast_sampling.parse_args(["--model", str(tmp_path / "missing")])
    presets = "('mar-base', 'mar-large', 'mar-huge', 'ar-base', 'ar-large', 'ar-huge')"
    assert f"--model must be one of {presets}, `shipped` or a pipeline folder" in capsys.readouterr().err


def test_int8_settings_run_on_a_quantized_copy():
    pipe = make_tiny_pipeline(clip_sample=True)
    pipe.set_progress_bar_config(disable=True)
    args = argparse.Namespace(settings=["fast", "fast+int8"], batch_size=2, repeats=1, guidance_scale=2.0)
    assert bench_fast_sampling.setting_arguments("fast+int8", PAPER_SAMPLING, 2.0) == {
        "guidance_scale": 2.0,
        "sampling_preset": "fast",
    }
    calls = []
    original = quantization.quantize_int8
    quantization.quantize_int8 = lambda copy: calls.append(copy) or original(copy)
    try:
        with torch.no_grad():
            rounds = bench_fast_sampling.run(args, pipe)
    finally:
        quantization.quantize_int8 = original
    assert len(calls) == 1 and calls[0] is not pipe and calls[0].transformer.int8_quantized
    assert not getattr(pipe.transformer, "int8_quantized", False)  # the float32 settings keep float32
    for name in ("fast", "fast+int8"):
        assert rounds[0][name]["head_seconds"] > 0 and rounds[0][name]["transformer_seconds"] > 0


def test_ar_presets_time_the_exact_setting_in_float32_and_int8(monkeypatch, capsys):
    """`--model ar-base`: an `ARPipeline` with random weights (its head perturbed off its zero initialisation), timed
    exact and exact+int8 only; a preset setting is refused, since the AR pipeline has none."""
    from benchmarks import benchmarking_utils
    from diffusers_mar import ARPipeline
    from tests.testing_utils import TINY_AR_TRANSFORMER_CONFIG, TINY_PIXEL_HEAD_CONFIG

    argv = ["--model", "ar-base", "--settings", "exact", "exact+int8", "--num-diffusion-steps", "2"]
    args = bench_fast_sampling.parse_args(argv)
    assert args.guidance_scale is None and args.num_diffusion_steps == 2  # the preset pipeline's own guidance
    with pytest.raises(SystemExit):
        bench_fast_sampling.parse_args(["--model", "ar-base", "--settings", "exact", "fast"])
    assert "--settings for an AR preset: `exact` and `exact+int8`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_fast_sampling.parse_args(["--num-diffusion-steps", "0"])
    assert "--num-diffusion-steps must be >= 1" in capsys.readouterr().err

    tiny = {"transformer": TINY_AR_TRANSFORMER_CONFIG, "diffusion_head": TINY_PIXEL_HEAD_CONFIG}
    monkeypatch.setattr(benchmarking_utils, "get_preset_config", lambda name: tiny if name == "ar-base" else None)
    pipe = load_preset_or_folder("ar-base")
    assert isinstance(pipe, ARPipeline) and pipe.config.token_space == "latent"
    assert pipe.diffusion_head.proj_out.weight.abs().min() > 0  # zero-initialised in the model, perturbed here
    args.batch_size, args.repeats = 1, 1
    pipe.set_sampling_defaults(num_diffusion_steps=2)
    with torch.no_grad():
        (round_,) = bench_fast_sampling.run(args, pipe)
    assert round_["exact"]["head_seconds"] > 0 and round_["exact+int8"]["transformer_seconds"] > 0
