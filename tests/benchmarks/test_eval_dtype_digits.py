"""`benchmarks/eval_dtype_digits.py`: precision copies of any family, the quality rule, and its command line."""

import json

import pytest
import torch

from benchmarks import eval_dtype_digits
from tests.testing_utils import make_tiny_pipeline, make_tiny_var_pipeline


def test_precision_copies_keep_the_float32_pipeline_and_its_weights():
    pipe = make_tiny_pipeline(ar=True, clip_sample=True)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    copies = eval_dtype_digits.precision_copies(pipe, ["float32", "int8", "bfloat16"])
    assert copies["float32"] is pipe and not getattr(pipe.transformer, "int8_quantized", False)
    assert copies["int8"].transformer.int8_quantized and copies["int8"].diffusion_head.int8_quantized
    assert copies["bfloat16"].transformer.dtype == torch.bfloat16 and pipe.transformer.dtype == torch.float32
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())


def test_the_rule_compares_each_precision_with_the_first():
    args = eval_dtype_digits.parse_args(["--dtypes", "float32", "int8", "bfloat16"])

    def run(accuracy, frechet):
        return {"accuracy": accuracy, "frechet_distance": frechet, "frechet_ratio": frechet / 0.2,
                "diversity_ratio": 0.9, "near_copy_fraction": 0.0, "images_per_second": 10.0}  # fmt: skip

    runs = {
        "float32": [run(0.97, 0.50), run(0.99, 0.50)],  # means 0.98, 0.50
        "int8": [run(0.97, 0.54), run(0.97, 0.56)],  # 0.97 (0.01 lower: kept), 0.55 (10% higher: kept)
        "bfloat16": [run(0.96, 0.56), run(0.97, 0.56)],  # 0.965: accuracy fails; 0.56 > 0.55: Fréchet fails
    }
    reference, int8, bfloat16 = eval_dtype_digits.summarise(runs, args)
    assert reference["accuracy"] == pytest.approx(0.98) and "quality_kept" not in reference
    assert int8["quality_kept"] and int8["failed"] == []
    assert not bfloat16["quality_kept"] and bfloat16["failed"] == ["accuracy", "Fréchet"]


def test_head_steps_only_for_families_with_a_head_and_bad_options_are_refused(capsys):
    args = eval_dtype_digits.parse_args(["--num-diffusion-steps", "3", "--guidance-scale", "2"])
    assert eval_dtype_digits.sampling_arguments(make_tiny_pipeline(), args) == {
        "guidance_scale": 2.0,
        "num_diffusion_steps": 3,
    }
    with pytest.raises(ValueError, match="--num-diffusion-steps: VARPipeline has no diffusion head"):
        eval_dtype_digits.sampling_arguments(make_tiny_var_pipeline(), args)
    for argv in (["--dtypes", "int8", "int8"], ["--num-diffusion-steps", "0"], ["--dtypes", "float16"]):
        with pytest.raises(SystemExit):
            eval_dtype_digits.parse_args(argv)
    err = capsys.readouterr().err
    assert "each precision once" in err and "--num-diffusion-steps: must be >= 1" in err and "float16" in err


@pytest.mark.parametrize("family", ["ar", "mar"])  # (the tiny VAR makes 6x6 images, not digits)
def test_the_command_line_evaluates_a_folder_in_each_precision(tmp_path, family):
    folder = tmp_path / family
    make_tiny_pipeline(ar=family == "ar", clip_sample=True).save_pretrained(folder)
    argv = [
        "--model",
        str(folder),
        "--num-per-class",
        "2",
        "--seeds",
        "0",
        "1",
        "--output-json",
        str(tmp_path / "r.json"),
    ]
    argv += ["--num-diffusion-steps", "2"]
    assert eval_dtype_digits.main(argv) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [row["dtype"] for row in rows] == ["float32", "int8"]
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["frechet_distance"] > 0 for row in rows)
    assert isinstance(rows[1]["quality_kept"], bool)
