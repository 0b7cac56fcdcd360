"""The `diffusers-mar` command line against a tiny random pixel-space pipeline saved to a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_mar import MARDDPMScheduler, MARDiffusionHead, MARPipeline, MARTransformer2DModel, cli, threads
from diffusers_mar.cli import model as cli_model
from diffusers_mar.cli.model import auto_dtype, cpu_flags
from diffusers_mar.quantization import quantize_int8
from diffusers_mar.threads import resolve_num_threads
from tests.testing_utils import REPO_ROOT, make_tiny_pipeline

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# Sampling settings the tiny model's folder recommends: few steps, so that every command runs in a fraction of a second.
CARD_SAMPLING = {"guidance_scale": 2.0, "num_inference_steps": 4, "num_diffusion_steps": 5}


def write_sampling(folder, sampling) -> None:
    """Store `sampling` in the folder's model_index.json, as a converter or a training run would (unchecked)."""
    index = json.loads((folder / "model_index.json").read_text())
    index["sampling"] = sampling
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pipe = make_tiny_pipeline()
    pipe = MARPipeline(**pipe.components, id2label=dict(enumerate(NAMES)), sampling=CARD_SAMPLING)
    folder = tmp_path_factory.mktemp("tiny_model")
    pipe.save_pretrained(folder)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "diffusers_mar.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def grid_cells(grid: Image.Image, rows: int, columns: int, cell: int) -> list[list[np.ndarray]]:
    """Cut the image cells out of a grid made by `make_grid` (label column on the left, gap 4, margin 6)."""
    gap, margin = 4, 6
    label_width = grid.width - (columns * (cell + gap) - gap + margin)
    array = np.asarray(grid)
    return [
        [
            array[margin + r * (cell + gap) : margin + r * (cell + gap) + cell][
                :, label_width + c * (cell + gap) : label_width + c * (cell + gap) + cell
            ]
            for c in range(columns)
        ]
        for r in range(rows)
    ]


# ----------------------------------------------------------------------------------------------------------------
# End to end, in a subprocess (as the console script runs).


def test_generate_subprocess_writes_grid_and_single_files(tiny_model, tmp_path):
    result = run_cli(
        "generate", "--model", str(tiny_model), "--class-labels", "0", "one", "9", "--num-images-per-label", "3",
        "--output", str(tmp_path / "grid.png"), "--output-dir", str(tmp_path / "singles"), "--seed", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    grid = Image.open(tmp_path / "grid.png")
    grid.load()
    assert grid.format == "PNG" and grid.mode == "RGB"
    assert grid.height == 6 + 3 * (64 + 4) - 4 + 6  # 3 rows of 8x8 images upscaled 8x (automatic --scale)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "grid.png").stat().st_mode) == 0o666 & ~umask  # not the temporary file's 0600
    singles = sorted(path.name for path in (tmp_path / "singles").iterdir())
    assert singles == [f"label-{label}-{k}.png" for label in (0, 1, 9) for k in range(3)]
    cells = grid_cells(grid, rows=3, columns=3, cell=64)
    for r, label in enumerate((0, 1, 9)):
        for k in range(3):
            single = Image.open(tmp_path / "singles" / f"label-{label}-{k}.png")
            assert single.size == (8, 8) and single.mode == "L"
            upscaled = np.asarray(single.convert("RGB").resize((64, 64), Image.Resampling.NEAREST))
            np.testing.assert_array_equal(cells[r][k], upscaled)
    # The card's settings were used, and the output paths were printed for scripts.
    assert "num_inference_steps=4" in result.stderr and "recommended settings" in result.stderr
    assert str(tmp_path / "grid.png") in result.stdout


def test_info_subprocess(tiny_model):
    result = run_cli("info", "--model", str(tiny_model))
    assert result.returncode == 0, result.stderr
    pipe = MARPipeline.from_pretrained(tiny_model)
    for name, module in (("transformer", pipe.transformer), ("diffusion_head", pipe.diffusion_head)):
        count = sum(p.numel() for p in module.parameters())
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(name))
        assert type(module).__name__ in line and f"{count:,}" in line
    assert "MARDDPMScheduler" in result.stdout
    assert "10 (ids 0..9; 10 = unconditional)" in result.stdout
    assert "3: three" in result.stdout
    assert "4x4 = 16 tokens of 4 values (patch size 2" in result.stdout and "pixel space" in result.stdout
    assert "num_inference_steps: 4" in result.stdout and "guidance_scale: 2.0" in result.stdout


def test_bad_input_subprocess_exit_code(tiny_model, tmp_path):
    result = run_cli(
        "generate", "--model", str(tiny_model), "--class-labels", "12", "--output", str(tmp_path / "grid.png")
    )
    assert result.returncode == 2
    assert "argument --class-labels" in result.stderr and "12" in result.stderr
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------------------
# In process: `main(argv)` returns the exit code.


def generate(tiny_model, output, *extra) -> int:
    return cli.main(
        ["generate", "--model", str(tiny_model), "--class-labels", "0", "1", "--quiet", "-o", str(output), *extra]
    )


def test_help_lists_exit_codes(capsys):
    for argv in (["--help"], ["generate", "--help"], ["info", "--help"]):
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "exit codes" in out and "bad input" in out
    assert cli.main([]) == 2


def test_same_seed_same_file_other_seed_other_images(tiny_model, tmp_path):
    assert generate(tiny_model, tmp_path / "a.png", "--seed", "3") == 0
    assert generate(tiny_model, tmp_path / "b.png", "--seed", "3") == 0
    assert generate(tiny_model, tmp_path / "c.png", "--seed", "4") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "c.png")))


def test_images_do_not_depend_on_batch_size(tiny_model, tmp_path):
    assert generate(tiny_model, tmp_path / "a.png", "--num-images-per-label", "3") == 0
    assert generate(tiny_model, tmp_path / "b.png", "--num-images-per-label", "3", "--batch-size", "2") == 0
    a = np.asarray(Image.open(tmp_path / "a.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # per-image generators; batched float32 math may move a pixel by one level


def test_options_override_the_card_and_scale(tiny_model, tmp_path, capsys):
    code = generate(
        tiny_model, tmp_path / "grid.jpg", "--num-inference-steps", "2", "--guidance-scale", "1", "--scale", "2",
        "--num-images-per-label", "5", "--guidance-schedule", "constant", "--temperature", "0.9",
    )  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "num_inference_steps=2" in err and "guidance_scale=1.0" in err and "temperature=0.9" in err
    grid = Image.open(tmp_path / "grid.jpg")
    assert grid.format == "JPEG" and grid.height == 6 + 2 * (16 + 4) - 4 + 6


@pytest.fixture(scope="module")
def clipped_model(tmp_path_factory):
    """The tiny model with `clip_sample=True`: its images are not saturated, so a change of dtype shows in pixels."""
    pipe = make_tiny_pipeline(clip_sample=True)
    pipe = MARPipeline(**pipe.components, sampling=CARD_SAMPLING)
    folder = tmp_path_factory.mktemp("clipped_model")
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype(clipped_model, tmp_path, dtype):
    # Issue 29: the grid's size alone would pass with --dtype ignored. Each image must be the pipeline's in that dtype
    # (image i: seed i) and differ from the float32 one.
    for name in (dtype, "float32"):
        argv = ["--num-images-per-label", "1", "--output-dir", str(tmp_path / name), "--dtype", name]
        assert generate(clipped_model, tmp_path / f"{name}.png", *argv) == 0
    assert Image.open(tmp_path / f"{dtype}.png").size[1] == 6 + 2 * (64 + 4) - 4 + 6
    pipe = MARPipeline.from_pretrained(clipped_model).to(dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    expected = [np.asarray(image) for image in pipe([0, 1], generator=generators, output_type="pil").images]
    actual = [np.asarray(Image.open(tmp_path / dtype / f"label-{label}-0.png")) for label in (0, 1)]
    in_float32 = [np.asarray(Image.open(tmp_path / "float32" / f"label-{label}-0.png")) for label in (0, 1)]
    assert all(np.array_equal(a, e) for a, e in zip(actual, expected))
    assert not all(np.array_equal(a, f) for a, f in zip(actual, in_float32))


def test_dtype_int8_generates_with_the_quantized_pipeline(clipped_model, tmp_path):
    for name in ("int8", "float32"):
        argv = ["--num-images-per-label", "1", "--output-dir", str(tmp_path / name), "--dtype", name]
        assert generate(clipped_model, tmp_path / f"{name}.png", *argv) == 0
    pipe = quantize_int8(MARPipeline.from_pretrained(clipped_model))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    expected = [np.asarray(image) for image in pipe([0, 1], generator=generators, output_type="pil").images]
    actual = [np.asarray(Image.open(tmp_path / "int8" / f"label-{label}-0.png")) for label in (0, 1)]
    in_float32 = [np.asarray(Image.open(tmp_path / "float32" / f"label-{label}-0.png")) for label in (0, 1)]
    assert all(np.array_equal(a, e) for a, e in zip(actual, expected))
    assert not all(np.array_equal(a, f) for a, f in zip(actual, in_float32))


def test_dtype_int8_is_refused_off_the_cpu(tiny_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # evaluate's device: cuda when there is one
    argv = ["evaluate", "--model", str(tiny_model), "--output-dir", str(tmp_path / "out"), "--dtype", "int8"]
    assert cli.main(argv) == 2
    assert "--dtype int8 runs on the CPU only (got device cuda)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_auto_dtype_picks_bfloat16_only_with_native_instructions(tmp_path):
    assert auto_dtype("cpu", {"avx2", "avx512_bf16"}) == (
        "bfloat16",
        "the CPU has native bfloat16 instructions (avx512_bf16)",
    )
    assert auto_dtype("cpu", {"amx_bf16", "avx512_bf16"})[1].endswith("(amx_bf16, avx512_bf16)")
    dtype, why = auto_dtype("cpu", {"avx2", "avx512f"})
    assert dtype == "int8" and why.startswith("the CPU has no native bfloat16 instructions (none of amx_bf16")
    assert why.endswith("int8 linear layers run there (AVX2), faster than float32")
    dtype, why = auto_dtype("cpu", {"sse4_2"})
    assert dtype == "float32" and why.startswith("the CPU has no native bfloat16 instructions (none of amx_bf16")
    assert auto_dtype("mps", set())[0] == "float32"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\nbugs\t: none\n")
    assert cpu_flags(str(cpuinfo)) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


@pytest.mark.parametrize(
    "flags, expected", [({"avx512_bf16"}, "bfloat16"), ({"avx2"}, "int8"), ({"sse4_2"}, "float32")]
)
def test_dtype_auto_generates_in_the_dtype_it_names(clipped_model, tmp_path, monkeypatch, capsys, flags, expected):
    monkeypatch.setattr(cli_model, "cpu_flags", lambda: flags)
    argv = ["--num-images-per-label", "1", "--output-dir", str(tmp_path / "auto"), "--dtype", "auto"]
    assert generate(clipped_model, tmp_path / "auto.png", *argv) == 0
    assert f"--dtype auto: {expected} on cpu (the CPU has" in capsys.readouterr().err
    pipe = MARPipeline.from_pretrained(clipped_model)
    pipe = quantize_int8(pipe) if expected == "int8" else pipe.to(dtype=getattr(torch, expected))
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    wanted = [np.asarray(image) for image in pipe([0, 1], generator=generators, output_type="pil").images]
    made = [np.asarray(Image.open(tmp_path / "auto" / f"label-{label}-0.png")) for label in (0, 1)]
    assert all(np.array_equal(a, e) for a, e in zip(made, wanted))


def test_info_says_what_dtype_auto_picks_here(tiny_model, capsys, monkeypatch):
    monkeypatch.setattr(cli_model, "cpu_flags", lambda: {"amx_bf16"})
    assert cli.main(["info", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    assert "--dtype auto on this machine" in out
    assert "  cpu: bfloat16 (the CPU has native bfloat16 instructions (amx_bf16))" in out


BAD_INPUTS = [
    # (arguments, the option the message must name, exit code)
    (["--model", "{tmp}/no_such_model"], "--model", 2),
    (["--model", "{tmp}"], "--model", 2),  # a folder without model_index.json
    (["--model", "diffusers-mar-tests/no-such-model"], "--model", 2),  # a Hub id that cannot be reached or found
    (["--class-labels", "10", "11"], "--class-labels", 2),
    (["--class-labels", "-1"], "--class-labels", 2),
    (["--class-labels", "dog"], "--class-labels", 2),
    (["--output", "{tmp}/a_file.txt/grid.png"], "--output", 2),  # a parent that is a file
    (["--output", "{tmp}/grid.unknown"], "--output", 2),
    (["--output", "{tmp}"], "--output", 2),
    (["--output-dir", "{tmp}/a_file.txt"], "--output-dir", 2),
    (["--dtype", "float64"], "--dtype", 2),
    (["--device", "tpu"], "--device", 2),
    (["--num-inference-steps", "17"], "--num-inference-steps", 2),  # the tiny model has 16 tokens
    (["--num-inference-steps", "0"], "--num-inference-steps", 2),
    (["--num-diffusion-steps", "1001"], "--num-diffusion-steps", 2),
    (["--guidance-scale", "-1"], "--guidance-scale", 2),
    (["--temperature", "0"], "--temperature", 2),
    (["--num-images-per-label", "0"], "--num-images-per-label", 2),
    (["--scale", "0"], "--scale", 2),
    (["--guidance-schedule", "cosine"], "--guidance-schedule", 2),
]


@pytest.mark.parametrize("extra, option, exit_code", BAD_INPUTS, ids=[" ".join(case[0]) for case in BAD_INPUTS])
def test_bad_inputs(tiny_model, tmp_path, capsys, extra, option, exit_code):
    (tmp_path / "a_file.txt").write_text("not a folder")
    argv = [
        "generate",
        "--model",
        str(tiny_model),
        "--class-labels",
        "0",
        "--quiet",
        "--output",
        str(tmp_path / "g.png"),
    ]
    assert cli.main(argv + [arg.replace("{tmp}", str(tmp_path)) for arg in extra]) == exit_code
    assert f"argument {option}" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file.txt"]  # nothing written


def test_cuda_requested_without_cuda(tiny_model, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert generate(tiny_model, tmp_path / "grid.png", "--device", "cuda") == 2
    assert "argument --device" in capsys.readouterr().err and not (tmp_path / "grid.png").exists()


def test_missing_output_option(tiny_model, capsys):
    assert cli.main(["generate", "--model", str(tiny_model), "--class-labels", "0"]) == 2
    assert "--output-dir" in capsys.readouterr().err


def test_missing_default_model_is_a_runtime_failure(tmp_path, monkeypatch, capsys):
    for module in (cli.model, cli.parser):  # the comparison in load_pipeline and the default of --model
        monkeypatch.setattr(module, "DEFAULT_MODEL", str(tmp_path / "default_model"))
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "argument --model" in err and "default model is not installed" in err


def test_bad_stored_setting_is_a_runtime_failure(tiny_model, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    write_sampling(folder, {"num_inference_steps": 64})  # more steps than the model's 16 tokens
    assert generate(folder, tmp_path / "grid.png") == 1
    err = capsys.readouterr().err
    assert "sampling['num_inference_steps']" in err and "[1, 16]" in err and "64" in err
    assert not (tmp_path / "grid.png").exists()


def test_output_folders_are_created(tiny_model, tmp_path):
    assert generate(tiny_model, tmp_path / "new" / "grid.png", "--output-dir", str(tmp_path / "new" / "singles")) == 0
    assert (tmp_path / "new" / "grid.png").is_file() and len(list((tmp_path / "new" / "singles").iterdir())) == 8
    assert [path.name for path in (tmp_path / "new").iterdir() if path.name.startswith(".")] == []  # no temp files


def test_info_json(tiny_model, capsys):
    assert cli.main(["info", "--model", str(tiny_model), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    pipe = MARPipeline.from_pretrained(tiny_model)
    assert summary["components"]["transformer"]["parameters"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert summary["components"]["scheduler"] == {"class": "MARDDPMScheduler"}
    assert summary["space"] == "pixel" and summary["image_size"] == [8, 8] and summary["num_tokens"] == 16
    assert summary["num_classes"] == 10 and summary["id2label"]["3"] == "three"
    assert summary["recommended_sampling"] == {"guidance_schedule": "linear", "temperature": 1.0, **CARD_SAMPLING}


# ----------------------------------------------------------------------------------------------------------------
# Helpers.


def test_recommended_sampling_without_stored_settings_caps_steps_at_the_token_count():
    settings, source = cli.recommended_sampling(make_tiny_pipeline())
    assert settings["num_inference_steps"] == 16 and settings["guidance_scale"] == 3.0
    assert "paper's settings" in source


def test_parse_class_labels_ids_and_names():
    pipe = MARPipeline(**make_tiny_pipeline().components, id2label={0: "zero, nought", 1: "golden retriever"})
    assert cli.parse_class_labels(pipe, ["1", "nought", "golden retriever", "10", "zero"]) == [1, 0, 1, 10, 0]
    assert cli.label_text(pipe, 1) == "1 golden retriever" and cli.label_text(pipe, 10) == "uncond."


# ----------------------------------------------------------------------------------------------------------------
# Nothing replaced without --overwrite (issue 14), checked before generating.


@pytest.fixture
def no_sampling(monkeypatch):
    """Make any pipeline call fail, to show that a command stopped before generating."""

    def fail(*args, **kwargs):
        raise AssertionError("the pipeline was called")

    monkeypatch.setattr(MARPipeline, "__call__", fail)


def test_existing_grid_is_not_replaced_without_overwrite(tiny_model, tmp_path, capsys, no_sampling):
    (tmp_path / "grid.png").write_bytes(b"my own file")
    assert generate(tiny_model, tmp_path / "grid.png", "--output-dir", str(tmp_path / "singles")) == 2
    err = capsys.readouterr().err
    assert "argument --output" in err and "exists" in err and "--overwrite" in err
    assert (tmp_path / "grid.png").read_bytes() == b"my own file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid.png"]


def test_existing_single_files_are_not_replaced_without_overwrite(tiny_model, tmp_path, capsys, no_sampling):
    singles = tmp_path / "singles"
    singles.mkdir()
    (singles / "label-1-3.png").write_bytes(b"my own file")
    (singles / "unrelated.png").write_bytes(b"other")  # a file the command would not write does not matter
    assert generate(tiny_model, tmp_path / "grid.png", "--output-dir", str(singles)) == 2
    err = capsys.readouterr().err
    assert "argument --output-dir" in err and "label-1-3.png" in err and "--overwrite" in err
    assert (singles / "label-1-3.png").read_bytes() == b"my own file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["singles"]  # no grid either
    assert sorted(path.name for path in singles.iterdir()) == ["label-1-3.png", "unrelated.png"]


def test_overwrite_replaces_the_files(tiny_model, tmp_path):
    singles = tmp_path / "singles"
    singles.mkdir()
    (singles / "label-1-3.png").write_bytes(b"my own file")
    (tmp_path / "grid.png").write_bytes(b"my own file")
    assert generate(tiny_model, tmp_path / "grid.png", "--output-dir", str(singles), "--overwrite") == 0
    assert Image.open(tmp_path / "grid.png").size[1] == 6 + 2 * (64 + 4) - 4 + 6
    assert Image.open(singles / "label-1-3.png").size == (8, 8)
    assert (singles / "unrelated.png").exists() is False and len(list(singles.iterdir())) == 8


def test_a_label_given_twice_writes_distinct_single_files(tiny_model, tmp_path):
    argv = ["generate", "--model", str(tiny_model), "--class-labels", "2", "5", "2", "--quiet"]
    assert cli.main([*argv, "--num-images-per-label", "2", "--output-dir", str(tmp_path)]) == 0
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == [
        "label-2-0.png",
        "label-2-1.png",
        "label-2-2.png",
        "label-2-3.png",
        "label-5-0.png",
        "label-5-1.png",
    ]
    # images 4 and 5 (the second row of label 2) use seeds 4 and 5: not the first row's images again
    first, again = (np.asarray(Image.open(tmp_path / f"label-2-{k}.png")) for k in (0, 2))
    assert not np.array_equal(first, again)


# ----------------------------------------------------------------------------------------------------------------
# A latent-space model without a VAE (issue 14): refused by generate, described as such by info.


@pytest.fixture(scope="module")
def latent_model_without_vae(tmp_path_factory):
    pipe = MARPipeline(**make_tiny_pipeline().components, token_space="latent", sampling=CARD_SAMPLING)
    folder = tmp_path_factory.mktemp("latent_model")
    pipe.save_pretrained(folder)
    return folder


def test_generate_refuses_a_latent_model_without_vae(latent_model_without_vae, tmp_path, capsys, no_sampling):
    code = generate(latent_model_without_vae, tmp_path / "grid.png", "--output-dir", str(tmp_path / "singles"))
    assert code == 2
    err = capsys.readouterr().err
    assert "argument --model" in err and "latent-space model without a decoder" in err and "--vae_path" in err
    assert list(tmp_path.iterdir()) == []


def test_info_on_a_latent_model_without_vae(latent_model_without_vae, capsys):
    assert cli.main(["info", "--model", str(latent_model_without_vae)]) == 0
    out = capsys.readouterr().out
    assert "latent space without a decoder" in out and "pixel space" not in out
    assert "images:       none" in out and "1 channel(s)" in out  # the token grid's channels, not image channels
    assert cli.main(["info", "--model", str(latent_model_without_vae), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["space"] == "latent" and summary["decoder"] is None
    assert summary["image_size"] is None and summary["image_channels"] is None


@pytest.fixture(scope="module")
def latent_model_without_token_space(tmp_path_factory):
    """A folder as converters wrote before folders recorded `token_space`: 16-channel latents taken for pixels."""
    from tests.testing_utils import FIXTURE_HEAD_CONFIG, FIXTURE_TRANSFORMER_CONFIG

    transformer = MARTransformer2DModel(**FIXTURE_TRANSFORMER_CONFIG).eval()
    head = MARDiffusionHead(**FIXTURE_HEAD_CONFIG).eval()
    pipe = MARPipeline(transformer, head, MARDDPMScheduler(), sampling=CARD_SAMPLING)
    folder = tmp_path_factory.mktemp("old_latent_model")
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    del index["token_space"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_generate_refuses_pixel_tokens_that_are_no_image(
    latent_model_without_token_space, tmp_path, capsys, no_sampling
):
    assert generate(latent_model_without_token_space, tmp_path / "grid.png") == 2
    err = capsys.readouterr().err
    assert "argument --model" in err and "16 channels" in err and "token_space" in err
    assert list(tmp_path.iterdir()) == []


def test_info_does_not_call_16_channels_an_image(latent_model_without_token_space, capsys):
    assert cli.main(["info", "--model", str(latent_model_without_token_space)]) == 0
    out = capsys.readouterr().out
    assert (
        "16 channels are no image" in out
        and "images:       none" in out
        and "16 channel(s)" in out.split("token grid")[1]
    )


def test_info_on_a_latent_model_with_vae(tmp_path, capsys):
    from tests.testing_utils import make_tiny_vae

    pipe = make_tiny_pipeline(vae=make_tiny_vae())
    pipe.save_pretrained(tmp_path)
    assert cli.main(["info", "--model", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["space"] == "latent" and summary["decoder"] == "AutoencoderKL"
    assert summary["image_size"] == [16, 16] and summary["image_channels"] == 3  # 8x8 latents, VAE factor 2


# ----------------------------------------------------------------------------------------------------------------
# --num-threads (issue 14).


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_num_threads_option(tiny_model, tmp_path, capsys, monkeypatch, restore_threads):
    torch.set_num_threads(2)
    seen = []
    real_call = MARPipeline.__call__

    def call(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(MARPipeline, "__call__", call)
    assert generate(tiny_model, tmp_path / "a.png", "--num-threads", "3") == 0
    assert seen == [3] and "3 CPU thread(s)" in capsys.readouterr().err
    assert generate(tiny_model, tmp_path / "b.png") == 0  # auto: the tiny model runs on one thread
    assert seen == [3, 1] and "1 CPU thread(s)" in capsys.readouterr().err
    assert torch.get_num_threads() == 2  # restored: main() may run in a process that goes on
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # threads do not change images


@pytest.mark.parametrize("value", ["0", "-2", "many", "1.5"])
def test_bad_num_threads(tiny_model, tmp_path, capsys, value):
    assert generate(tiny_model, tmp_path / "a.png", "--num-threads", value) == 2
    err = capsys.readouterr().err
    assert "argument --num-threads" in err and "auto" in err
    assert list(tmp_path.iterdir()) == []


def test_auto_threads_keep_the_default_for_large_models(monkeypatch, restore_threads):
    pipe = make_tiny_pipeline()
    torch.set_num_threads(2)
    assert resolve_num_threads("auto", pipe, "cpu") == 1
    assert resolve_num_threads(4, pipe, "cpu") == 4
    monkeypatch.setattr(threads, "SMALL_MODEL_PARAMETERS", 1000)  # the tiny model counts as large
    assert resolve_num_threads("auto", pipe, "cpu") == 2


def test_a_model_whose_config_does_not_match_its_weights_fails_with_the_key_names(tiny_model, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "transformer" / "config.json").read_text())
    del config["num_layers"]
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    assert generate(folder, tmp_path / "grid.png") == 1
    err = capsys.readouterr().err
    assert "argument --model" in err and "do not match its config.json" in err and "encoder_blocks.1-11.*" in err
    assert "meta" not in err and not (tmp_path / "grid.png").exists()


def test_generate_with_a_sampling_preset_equals_the_pipeline_call(tiny_model, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_model), "--class-labels", "1", "2", "--num-images-per-label", "1"]
    argv += ["--seed", "4", "--quiet"]
    assert cli.main([*argv, "--sampling-preset", "fast", "--output-dir", str(tmp_path / "fast")]) == 0
    assert "num_inference_steps=4, num_diffusion_steps=8" in capsys.readouterr().err  # 16 tokens, 4 per step
    assert cli.main([*argv, "--sampling-preset", "fast-ddpm", "--num-inference-steps", "3", "--output-dir",
                     str(tmp_path / "ddpm")]) == 0  # fmt: skip
    assert "num_inference_steps=3, num_diffusion_steps=linear-25-5" in capsys.readouterr().err
    pipe = MARPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    for folder, kwargs in (("fast", {}), ("ddpm", {"num_inference_steps": 3})):
        preset = "fast" if folder == "fast" else "fast-ddpm"
        generators = [torch.Generator().manual_seed(4 + i) for i in range(2)]
        images = pipe([1, 2], generator=generators, sampling_preset=preset, **kwargs).images
        for label, image in zip([1, 2], images):
            actual = np.asarray(Image.open(tmp_path / folder / f"label-{label}-0.png"))
            assert np.array_equal(actual, np.asarray(image))
    code = cli.main([*argv, "--sampling-preset", "fast", "--temperature", "0.5", "--output", str(tmp_path / "g.png")])
    assert code == 2 and "temperature=1.0" in capsys.readouterr().err and not (tmp_path / "g.png").exists()
    assert cli.main([*argv, "--sampling-preset", "turbo", "--output", str(tmp_path / "g.png")]) == 2
    assert "'fast', 'fast-ddpm'" in capsys.readouterr().err
