"""`benchmarks/bench_compile.py` on a tiny model: both models compiled, the rounds interleaved, the table."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import bench_compile
from tests.testing_utils import make_tiny_pipeline


def test_rounds_compare_eager_and_compiled_calls_of_the_same_pipeline():
    pipe = make_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    args = argparse.Namespace(
        batch_size=2, num_inference_steps=4, num_diffusion_steps=3, guidance_scale=2.0, repeats=3, backend="eager",
        mode=None,
    )  # fmt: skip
    result = bench_compile.run(args, pipe)
    # Dynamo compiled both models (the head: its sampler methods); the "eager" backend runs the traced graphs as is.
    assert result["graphs"]["transformer"] >= 1 and result["graphs"]["diffusion_head"] >= 1
    assert result["max_abs_diff"] == 0
    assert result["eager"]["runs"] == result["compiled"]["runs"] == result["speedup"]["runs"] == 3
    assert result["speedup"]["min"] <= result["speedup"]["median"] <= result["speedup"]["max"]
    table = bench_compile.table(result)
    assert f"| {result['graphs']['transformer']} / {result['graphs']['diffusion_head']} |" in table


def test_fewer_than_three_repeats_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_compile.parse_args(["--repeats", "2"])
    assert "--repeats must be >= 3" in capsys.readouterr().err
    assert bench_compile.parse_args(["--model", "mar-base"]).num_diffusion_steps == 25
