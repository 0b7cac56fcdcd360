"""`benchmarks/bench_fast_sampling.py` on a tiny model: the settings it times and how it reports them."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks import bench_fast_sampling
from benchmarks.benchmarking_utils import load_preset_or_folder
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
    assert "--settings must be `exact` or among ['fast', 'fast-ddpm']" in capsys.readouterr().err


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
    assert "--model must be one of ('mar-base', 'mar-large', 'mar-huge'), `shipped` or a pipeline folder" in (
        capsys.readouterr().err
    )
