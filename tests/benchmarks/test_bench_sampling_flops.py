"""`benchmarks/bench_sampling_flops.py`: the counts by part and the CPU attention formula it adds."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench_sampling_flops
from benchmarks.benchmarking_utils import ours_call
from tests.testing_utils import make_tiny_pipeline


def test_cpu_attention_is_counted_as_attention():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 5 * 7 * 4)  # q @ k^T and attention @ v


def test_parts_add_up_to_the_call_and_the_transformer_is_its_own_count():
    pipe = make_tiny_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    args = argparse.Namespace(guidance_scale=2.0)
    counts = bench_sampling_flops.count_call(lambda timer: ours_call(args, pipe, timer, 2, 3, 4))
    assert min(counts.values()) > 0
    assert counts["encoder"] + counts["decoder"] + counts["head"] == pytest.approx(counts["total"])

    # The transformer sections, counted alone: the same calls without the head must give the same GFLOP.
    transformer_flops = []
    forward = pipe.transformer.forward

    def counted_forward(*args, **kwargs):
        with FlopCounterMode(display=False) as inner:
            out = forward(*args, **kwargs)
        transformer_flops.append(inner.get_total_flops())
        return out

    pipe.transformer.forward = counted_forward
    pipe([0, 1], num_inference_steps=3, num_diffusion_steps=4, guidance_scale=2.0, output_type="latent")
    assert len(transformer_flops) == 3
    assert counts["encoder"] + counts["decoder"] == pytest.approx(sum(transformer_flops) / 1e9)


def test_table_gives_the_ratio_of_the_totals_and_of_each_part():
    row = {
        "batch_size": 8,
        "steps": 16,
        "diffusion_steps": 25,
        "ours_gflop": {"encoder": 100.0, "decoder": 200.0, "head": 100.0, "total": 400.0},
        "official_gflop": {"encoder": 100.0, "decoder": 220.0, "head": 120.0, "total": 440.0},
        "ceiling": 1.1,
    }
    line = bench_sampling_flops.table([row]).splitlines()[-1]
    assert "100 / 200 / 100 / 400" in line and "100 / 220 / 120 / 440" in line
    assert "**1.100x** (encoder 1.000, decoder 1.100, head 1.200)" in line


def test_non_positive_settings_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench_sampling_flops.parse_args(["--original-repo", "x", "--batch-sizes", "0"])
    assert "--batch-sizes must be positive" in capsys.readouterr().err
