"""`benchmarks/fast_sampling_digits.py`: candidate parsing and its command line on a tiny random model."""

import json

import pytest

from benchmarks import eval_digits, fast_sampling_digits
from benchmarks.fast_sampling_digits import parse_candidate
from diffusers_mar import MARTransformer2DModel
from tests.testing_utils import make_tiny_pipeline


def test_parse_candidate():
    assert parse_candidate("dpm-leading/15/8") == {
        "name": "dpm-leading/15/8",
        "scheduler": "dpm",
        "timestep_spacing": "leading",
        "num_diffusion_steps": 15,
        "num_inference_steps": 8,
    }
    assert parse_candidate("ddpm/100/16")["timestep_spacing"] is None
    for bad in ("dpm/15", "euler/15/8", "dpm-sideways/15/8", "dpm/0/8", "dpm/15/x", "dpm/15/8/2"):
        with pytest.raises(ValueError, match="SCHEDULER\\[-SPACING\\]/DIFFUSION_STEPS/INFERENCE_STEPS"):
            parse_candidate(bad)


def test_bad_arguments_exit_with_the_argument_name(capsys):
    with pytest.raises(SystemExit) as error:
        fast_sampling_digits.parse_args(["--candidates", "dpm/15"])
    assert error.value.code == 2 and "--candidates" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fast_sampling_digits.parse_args(["--threads", "0"])


def test_command_line_on_a_tiny_random_model(tmp_path, capsys):
    folder = tmp_path / "model"
    make_tiny_pipeline().save_pretrained(folder)
    argv = [
        "--model", str(folder), "--num-per-class", "2", "--seeds", "0", "--candidates", "dpm-leading/3/2", "ddim-leading/2/1",
        "--output-json", str(tmp_path / "results.json"), "--write-docs", "--docs-path", str(tmp_path / "bench.md"),
    ]  # fmt: skip
    assert fast_sampling_digits.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["reference"]["num_diffusion_steps"] == 100 and results["reference"]["num_images"] == 20
    assert [r["name"] for r in results["results"]] == ["dpm-leading/3/2", "ddim-leading/2/1"]
    for result in results["results"]:
        assert result["fast"] == (not result["misses"]) and result["images_per_second"] > 0
    docs = (tmp_path / "bench.md").read_text()
    assert "## Fast setting" in docs and "| `dpm-leading/3/2` | DPM-Solver++ (`leading`) | 3 | 2 |" in docs
    assert "| `ddpm/100/16` | MARDDPMScheduler | 100 | 16 |" in capsys.readouterr().out
    assert fast_sampling_digits.main(["--model", str(folder), "--candidates", "ddim/2/17"]) == 2  # 16 tokens


@pytest.mark.parametrize("script", [fast_sampling_digits, eval_digits])
def test_a_model_without_ten_classes_is_refused(script, tmp_path, capsys):
    pipe = make_tiny_pipeline()
    config = {**pipe.transformer.config, "num_classes": 5}
    pipe.transformer = MARTransformer2DModel.from_config(config)
    pipe.save_pretrained(tmp_path / "model")
    assert script.main(["--model", str(tmp_path / "model")]) == 2
    assert "argument --model: the model has 5 classes, not 10" in capsys.readouterr().err
