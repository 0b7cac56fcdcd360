"""`benchmarks/eval_fast_orders_digits.py`: its candidate grammar, and its command line on a tiny random model."""

import json

import pytest

from benchmarks import eval_digits, eval_fast_orders_digits
from benchmarks.eval_fast_orders_digits import parse_candidate
from diffusers_mar import MARTransformer2DModel
from tests.testing_utils import make_tiny_pipeline


def test_a_candidate_maps_to_pipeline_arguments_and_a_head_scheduler():
    setting = parse_candidate(
        "steps=8,diffusion=linear-25-5,order=checkerboard,outer=skeleton,gcache=2,scheduler=dpm-leading"
    )
    assert setting["arguments"] == {
        "num_inference_steps": 8,
        "num_diffusion_steps": "linear-25-5",
        "order": "checkerboard",
        "outer_schedule": "skeleton",
        "guidance_cache_interval": 2,
    }
    assert setting["scheduler"] == ("dpm", "leading")
    assert parse_candidate("diffusion=15,preset=fast")["arguments"] == {
        "num_diffusion_steps": 15,
        "sampling_preset": "fast",
    }


def test_dtype_int8_runs_the_setting_on_a_quantized_copy(tmp_path, monkeypatch):
    assert parse_candidate("preset=fast,dtype=int8") == {
        "name": "preset=fast,dtype=int8",
        "arguments": {"sampling_preset": "fast"},
        "scheduler": ("ddpm", None),
        "int8": True,
    }
    assert not parse_candidate("preset=fast,dtype=float32")["int8"]
    folder = tmp_path / "model"
    make_tiny_pipeline(clip_sample=True).save_pretrained(folder)
    seen = []
    real = eval_fast_orders_digits.run_setting

    def spy(pipe, base_config, timer, setting, seed, args):
        seen.append((setting["name"], getattr(pipe.transformer, "int8_quantized", False)))
        return real(pipe, base_config, timer, setting, seed, args)

    monkeypatch.setattr(eval_fast_orders_digits, "run_setting", spy)
    argv = [
        "--model", str(folder), "--num-per-class", "2", "--seeds", "0",
        "--candidates", "steps=2,diffusion=2", "steps=2,diffusion=2,dtype=int8",
    ]  # fmt: skip
    assert eval_fast_orders_digits.main(argv) == 0
    assert seen == [("default", False), ("steps=2,diffusion=2", False), ("steps=2,diffusion=2,dtype=int8", True)]


@pytest.mark.parametrize("text", ["steps", "speed=2", "scheduler=euler", "scheduler=dpm-sideways", "dtype=int4"])
def test_bad_candidates_are_refused(text):
    with pytest.raises(ValueError, match="KEY=VALUE|scheduler must be one of|dtype must be one of"):
        parse_candidate(text)


def test_bad_arguments_exit_with_the_argument_name(capsys):
    for argv, name in (
        (["--candidates", "steps"], "--candidates"),
        (["--candidates", "steps=2", "--min-speedup", "0"], "--min-speedup"),
        (["--candidates", "steps=2", "--threads", "0"], "--threads"),
    ):
        with pytest.raises(SystemExit) as error:
            eval_fast_orders_digits.parse_args(argv)
        assert error.value.code == 2 and name in capsys.readouterr().err


def test_command_line_on_a_tiny_random_model(tmp_path, capsys):
    folder = tmp_path / "model"
    make_tiny_pipeline().save_pretrained(folder)
    argv = [
        "--model", str(folder), "--num-per-class", "2", "--seeds", "0", "--min-speedup", "3",
        "--candidates", "scheduler=dpm-leading,diffusion=3,steps=2", "scheduler=ddim-leading,diffusion=2,steps=1",
        "--output-json", str(tmp_path / "results.json"), "--write-docs", "--docs-path", str(tmp_path / "bench.md"),
    ]  # fmt: skip
    assert eval_fast_orders_digits.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == [
        "default",
        *argv[argv.index("--candidates") + 1 : argv.index("--output-json")],
    ]
    reference = results[0]
    for result in results[1:]:
        assert result["kept"] == (not result["misses"]) and result["images_per_second"] > 0
        too_slow = result["images_per_second"] < 3 * reference["images_per_second"]
        assert ("speed" in result["misses"]) == too_slow
    docs = (tmp_path / "bench.md").read_text()
    assert "## Orders, step schedules and caches" in docs and "fast setting? |" in docs
    assert "| `scheduler=dpm-leading,diffusion=3,steps=2` | dpm-leading |" in docs
    assert "a fast setting also needs >= 3x its img/s" in capsys.readouterr().out


def test_arguments_the_pipeline_refuses_exit_2_naming_the_setting(tmp_path, capsys):
    folder = tmp_path / "model"
    make_tiny_pipeline().save_pretrained(folder)
    argv = ["--model", str(folder), "--num-per-class", "2", "--seeds", "0", "--candidates", "steps=17"]  # 16 tokens
    assert eval_fast_orders_digits.main(argv) == 2
    assert "eval_fast_orders_digits: error: steps=17:" in capsys.readouterr().err


@pytest.mark.parametrize("script", [eval_fast_orders_digits, eval_digits])
def test_a_model_without_ten_classes_is_refused(script, tmp_path, capsys):
    pipe = make_tiny_pipeline()
    config = {**pipe.transformer.config, "num_classes": 5}
    pipe.transformer = MARTransformer2DModel.from_config(config)
    pipe.save_pretrained(tmp_path / "model")
    argv = ["--model", str(tmp_path / "model")] + (
        ["--candidates", "steps=2"] if script is eval_fast_orders_digits else []
    )
    assert script.main(argv) == 2
    assert "argument --model: the model has 5 classes, not 10" in capsys.readouterr().err
