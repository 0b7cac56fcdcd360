"""The digits evaluator (`benchmarks/benchmarking_utils.py`) on real and synthetic digits, `eval_digits.py`'s command line on a tiny model (the metric
functions it calls, `diffusers_mar.evaluation.metrics`, are tested in tests/evaluation/test_metrics.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import eval_digits
from benchmarks.benchmarking_utils import DigitsEvaluator, digits_feature_extractor, head_scheduler, to_digit_scale
from tests.testing_utils import make_tiny_pipeline


@pytest.fixture(scope="module")
def evaluator():
    return DigitsEvaluator()


def test_to_digit_scale_maps_unit_range_to_0_16_and_block_averages():
    images = np.zeros((2, 16, 16, 3))
    images[0, :2, :2] = 1.0  # the top-left 2x2 block of a 16x16 image becomes the top-left digit pixel
    images[1] = 0.5
    digits = to_digit_scale(images)
    assert digits.shape == (2, 64)
    assert digits[0, 0] == 16.0 and digits[0, 1:].sum() == 0.0
    np.testing.assert_allclose(digits[1], 8.0)
    with pytest.raises(ValueError, match="8x8"):
        to_digit_scale(np.zeros((1, 12, 12, 1)))
    with pytest.raises(ValueError, match="output_type='np'"):
        to_digit_scale(np.zeros((1, 8, 8)))


def test_real_digits_score_as_the_real_data(evaluator):
    assert evaluator.heldout_accuracy > 0.9
    real = evaluator.images[evaluator.half_b]
    metrics = evaluator.evaluate(real, evaluator.labels[evaluator.half_b])
    assert metrics["accuracy"] == pytest.approx(evaluator.heldout_accuracy) and metrics["accuracy"] > 0.9
    assert metrics["frechet_ratio"] == pytest.approx(1.0)  # half B is the floor by definition
    assert 0.9 < metrics["diversity_ratio"] < 1.1
    assert metrics["near_copy_fraction"] == 1.0  # half B is part of the reference: exact copies are flagged


def test_near_copies_flagged_and_fresh_digits_not(evaluator):
    rng = np.random.default_rng(0)
    copies = evaluator.images[:200] + rng.normal(0, 0.1, size=(200, 64))  # near-exact copies
    assert evaluator.evaluate(copies, evaluator.labels[:200])["near_copy_fraction"] == 1.0
    # A real digit is a near-copy of another real digit only at the threshold's percentile (1%).
    assert evaluator.near_copy_threshold > 0
    mixed = np.clip(0.5 * evaluator.images[:200] + 0.5 * evaluator.images[200:400], 0, 16)
    assert evaluator.evaluate(mixed, evaluator.labels[:200])["near_copy_fraction"] < 0.05


def test_noise_scores_badly(evaluator):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    noise = rng.uniform(0, 16, size=(300, 64))
    metrics = evaluator.evaluate(noise, labels)
    assert metrics["accuracy"] < 0.3
    assert metrics["frechet_ratio"] > 10
    assert metrics["near_copy_fraction"] == 0.0
    assert set(metrics["diversity_ratio_per_class"]) == set(range(10))


def test_command_line_on_a_tiny_random_model(tmp_path, capsys):
    folder = tmp_path / "model"
    make_tiny_pipeline().save_pretrained(folder)
    argv = [
        "--model", str(folder), "--num-per-class", "3", "--guidance-scales", "1", "2", "--num-inference-steps", "2",
        "--num-diffusion-steps", "3", "--output-json", str(tmp_path / "results.json"), "--write-docs",
        "--docs-path", str(tmp_path / "benchmarks.md"),
    ]  # fmt: skip
    assert eval_digits.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["guidance_scale"] for r in results["results"]] == [1.0, 2.0]
    for result in results["results"]:
        assert result["num_images"] == 30 and result["num_inference_steps"] == 2
        assert 0.0 <= result["accuracy"] <= 0.5  # a random model is near chance (0.1)
        assert result["images_per_second"] > 0
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "| ddpm | 2 |" in docs and "benchmarks/eval_digits.py --model" in docs
    assert "| ddpm | 1 |" in capsys.readouterr().out


def test_head_scheduler_builds_each_scheduler_from_the_model_config():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from diffusers_mar import MARDDPMScheduler

    config = MARDDPMScheduler(clip_sample=True).config
    ddpm = head_scheduler(config, "ddpm")
    assert type(ddpm) is MARDDPMScheduler and ddpm.config.clip_sample
    dpm = head_scheduler(config, "dpm", "leading")
    assert type(dpm) is DPMSolverMultistepScheduler and dpm.config.timestep_spacing == "leading"
    dpm.set_timesteps(20)
    # `leading` starts at t = 1000 // 21 * 20 = 940, not at t = 999 where x0_hat is x_t divided by ~5e-5.
    assert dpm.timesteps[0] == 940
    assert type(head_scheduler(config, "ddim")) is DDIMScheduler
    with pytest.raises(ValueError, match="`scheduler` must be one of"):
        head_scheduler(config, "euler")
    with pytest.raises(ValueError, match="`timestep_spacing` must be one of"):
        head_scheduler(config, "dpm", "sideways")


def test_digits_feature_extractor_gives_the_evaluators_features_and_logits(evaluator):
    real = evaluator.images[:20]  # (20, 64) on 0..16
    images = torch.from_numpy(np.round(real / 16 * 255).astype(np.uint8).reshape(20, 1, 8, 8)).expand(-1, 3, -1, -1)
    outputs = digits_feature_extractor()(images)
    rounded = np.round(real / 16 * 255) / 255 * 16  # the uint8 rounding of the images
    np.testing.assert_allclose(outputs["features"].numpy(), evaluator.features(rounded), rtol=1e-10)
    assert (outputs["logits"].numpy().argmax(axis=1) == evaluator.predict(rounded)).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_the_dtype_option_sets_the_networks_the_script_evaluates(tmp_path, monkeypatch, dtype):
    # The pipeline the script evaluates is the one loaded in --dtype (int8: quantized after counting the parameters,
    # whose packed int8 weights are not parameters); the report names the dtype.
    folder = tmp_path / "model"
    tiny = make_tiny_pipeline()
    tiny.save_pretrained(folder)
    expected = sum(p.numel() for m in (tiny.transformer, tiny.diffusion_head) for p in m.parameters())
    seen = []
    real = eval_digits.generate_digits

    def spy(pipe, *args, **kwargs):
        if dtype == "int8":
            seen.append((pipe.transformer.int8_quantized, pipe.diffusion_head.int8_quantized))
        else:
            seen.append((pipe.transformer.dtype, pipe.diffusion_head.dtype))
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(eval_digits, "generate_digits", spy)
    argv = [
        "--model", str(folder), "--num-per-class", "2", "--guidance-scales", "1", "--num-inference-steps", "2",
        "--num-diffusion-steps", "2", "--dtype", dtype, "--output-json", str(tmp_path / "results.json"),
    ]  # fmt: skip
    assert eval_digits.main(argv) == 0
    assert seen == [(True, True) if dtype == "int8" else (torch.bfloat16, torch.bfloat16)]
    results = json.loads((tmp_path / "results.json").read_text())
    assert dtype in results["machine"] and results["num_parameters"] == expected
