"""`diffusers-mar evaluate` on a tiny random pixel-space model, with a cheap feature extractor
(`tests.evaluation.stub_extractor:make`) in place of Inception-v3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_mar import MARPipeline, cli
from diffusers_mar.cli import evaluate as cli_evaluate
from tests.evaluation.independent_metrics import inception_score_by_definition
from tests.testing_utils import REPO_ROOT, make_tiny_pipeline
from tests.training.test_train_mar import run_two_processes

STUB = "tests.evaluation.stub_extractor:make"
SAMPLING = {"guidance_scale": 2.0, "num_inference_steps": 2, "num_diffusion_steps": 3}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    pipe = make_tiny_pipeline()
    pipe = MARPipeline(**pipe.components, sampling=SAMPLING)
    folder = tmp_path_factory.mktemp("tiny_model")
    pipe.save_pretrained(folder)
    (folder / "README.md").write_text("# tiny\n")
    return folder


def evaluate(model, output_dir, *extra: str) -> int:
    args = ["evaluate", "--model", str(model), "--output-dir", str(output_dir), "--images-per-class", "2"]
    return cli.main([*args, "--batch-size", "4", "--feature-extractor", STUB, "--cpu", "-q", *extra])


def test_evaluate_against_a_reference_computed_from_the_same_images(tiny_model, tmp_path, capsys):
    assert evaluate(tiny_model, tmp_path / "run") == 0
    reference = tmp_path / "ref.npz"
    code = cli.main(
        ["evaluate", "--compute-reference", "--data", str(tmp_path / "run"), "--resolution", "8",
         "--output", str(reference), "--feature-extractor", STUB]
    )  # fmt: skip
    assert code == 0
    with np.load(reference) as data:
        assert data["features"].shape == (20, 64) and int(data["num_images"]) == 20
    assert evaluate(tiny_model, tmp_path / "run", "--reference", str(reference), "--update-model-card") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-6)  # the same images: the same Gaussian
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert results["num_images"] == 20 and results["settings"]["num_inference_steps"] == 2
    assert results["settings"]["guidance_scale"] == 2.0  # from the folder's recommended settings
    assert len(results["model_hash"]) == 64 and results["seconds"]["sampling"] >= 0
    with np.load(tmp_path / "run" / "samples.npz") as data:
        samples = data["arr_0"]
    assert samples.shape == (20, 8, 8, 1) and samples.dtype == np.uint8
    # The stub's logits are 4x the first 10 pixels (0..1): the IS of the images, 10 splits of 2, computed here.
    logits = 4.0 * samples[..., 0].reshape(20, -1)[:, :10] / 255.0
    expected_mean, expected_std = inception_score_by_definition(logits, splits=10)
    assert expected_std > 0  # the splits differ, so a wrong split or shuffle shows
    assert metrics["inception_score"] == pytest.approx(expected_mean, rel=1e-12)
    assert metrics["inception_score_std"] == pytest.approx(expected_std, rel=1e-9)
    # 20 images, IS splits of 2 for a 10-class classifier: said on stderr and in results.json (issue 23a).
    err = capsys.readouterr().err
    assert results["warnings"] == [
        "metrics of 20 images are not comparable with published numbers or with runs of another size: FID / FD, IS "
        "and precision / recall depend on the number of images (the digits model scored FD 2.32 on 50 images and "
        "0.254 on 1,000); use at least 1,000 images, and 50,000 to compare with the paper.",
        "the Inception Score's 10 splits hold 2 images each, fewer than the classifier's 10 classes, so no split can "
        "score above 2: the IS is not comparable with runs of another size.",
    ]
    for message in results["warnings"]:
        assert f"diffusers-mar evaluate: warning: {message}\n" in err
    np.testing.assert_array_equal(samples[7, ..., 0], np.asarray(Image.open(tmp_path / "run" / "000007.png")))
    card = (tiny_model / "README.md").read_text()
    assert "## Evaluation results" in card and "FID 0" in card and "20 images (2 per class)" in card


def test_options_override_the_folder_settings_and_a_changed_setting_is_another_run(tiny_model, tmp_path, capsys):
    assert evaluate(tiny_model, tmp_path / "run", "--skip-metrics") == 0
    assert evaluate(tiny_model, tmp_path / "run", "--skip-metrics", "--guidance-scale", "1") == 2
    assert "holds the images of another run" in capsys.readouterr().err
    assert evaluate(tiny_model, tmp_path / "other", "--skip-metrics", "--guidance-scale", "1") == 0
    results = json.loads((tmp_path / "other" / "results.json").read_text())
    assert results["settings"]["guidance_scale"] == 1.0 and results["metrics"] == {}
    assert results["warnings"] == [] and "warning" not in capsys.readouterr().err  # no metrics, nothing to compare


def test_a_sampling_preset_is_part_of_the_run_and_equals_the_pipeline_call(tiny_model, tmp_path, capsys):
    assert evaluate(tiny_model, tmp_path / "run", "--skip-metrics", "--sampling-preset", "fast") == 0
    err = capsys.readouterr().err
    assert "num_inference_steps=4, num_diffusion_steps=8" in err and "sampling_preset=fast" in err  # 16 tokens
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["sampling_preset"] == "fast" and results["settings"]["num_diffusion_steps"] == 8
    pipe = MARPipeline.from_pretrained(tiny_model)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in (0, 1, 2)]  # images 0-2: class 0 twice, class 1
    expected = pipe([0, 0, 1], generator=generators, sampling_preset="fast", output_type="np").images
    for index in range(3):
        actual = np.asarray(Image.open(tmp_path / "run" / f"{index:06d}.png"))
        np.testing.assert_array_equal(actual, np.round(expected[index, ..., 0] * 255).astype(np.uint8))
    # Another preset (or none) is another run: the folder is not mixed.
    assert evaluate(tiny_model, tmp_path / "run", "--skip-metrics", "--sampling-preset", "fast-ddpm") == 2
    assert "holds the images of another run" in capsys.readouterr().err
    assert evaluate(tiny_model, tmp_path / "run", "--skip-metrics") == 2
    # What the pipeline refuses fails before any image is written, naming the settings.
    code = evaluate(tiny_model, tmp_path / "t", "--skip-metrics", "--sampling-preset", "fast", "--temperature", "0.5")
    assert code == 2 and "temperature=1.0" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()  # no folder claiming a run it does not hold
    (tmp_path / "mine").mkdir()
    code = evaluate(tiny_model, tmp_path / "mine", "--skip-metrics", "--sampling-preset", "fast", "--temperature", "2")
    assert code == 2 and (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())  # kept, empty
    assert evaluate(tiny_model, tmp_path / "mine", "--skip-metrics", "--sampling-preset", "fast") == 0


def test_the_model_card_line_names_the_preset(tmp_path):
    results = {
        "metrics": {"fid": 3.5},
        "reference": "ref.npz",
        "num_images": 50000,
        "date": "2026-11-30",
        "settings": {
            "images_per_class": 50,
            "guidance_scale": 3.0,
            "guidance_schedule": "linear",
            "num_inference_steps": 8,
            "num_diffusion_steps": 8,
            "temperature": 1.0,
            "seed": 0,
            "sampling_preset": "fast",
        },
    }
    line = cli_evaluate._card_line(results)
    assert "8 x 8 steps, temperature 1, sampling preset `fast`, seed 0" in line
    del results["settings"]["sampling_preset"]
    assert "preset" not in cli_evaluate._card_line(results)


@pytest.mark.parametrize(
    ("extra", "option", "message"),
    [
        (["--num-classes", "1000"], "--num-classes", "the model has 10 classes"),
        (["--reference", "missing.npz"], "--reference", "does not exist"),
        (["--feature-extractor", "no_such_module:make"], "--feature-extractor", "cannot import"),
        (
            ["--feature-extractor", "inception", "--inception-weights", "missing.pth"],
            "--inception-weights",
            "not found",
        ),
        (["--data", "x"], "--data", "only used with --compute-reference"),
    ],
)
def test_bad_inputs(tiny_model, tmp_path, capsys, extra, option, message):
    extra = [str(tmp_path / value) if value.endswith((".npz", ".pth")) else value for value in extra]
    assert evaluate(tiny_model, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert f"argument {option}: " in err and message in err
    assert not list((tmp_path / "run").glob("*.png"))


def test_malformed_reference_files(tiny_model, tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "keys.npz", mean=np.zeros(3))
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(3), sigma=np.eye(2))
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    for name, message in [
        ("junk.npz", "not an .npz file"),
        ("keys.npz", "needs 'mu' and 'sigma'"),
        ("shapes.npz", "'sigma' (D, D)"),
        ("nan.npz", "NaN"),
    ]:
        assert evaluate(tiny_model, tmp_path / "run", "--reference", str(tmp_path / name)) == 2
        assert message in capsys.readouterr().err
    # Statistics of another feature space: refused after sampling, with both sizes named.
    np.savez(tmp_path / "dim.npz", mu=np.zeros(3), sigma=np.eye(3))
    assert evaluate(tiny_model, tmp_path / "run", "--reference", str(tmp_path / "dim.npz")) == 1
    assert "3-d statistics but the feature extractor gives 64-d" in capsys.readouterr().err


def test_a_png_given_for_the_weights_or_the_reference_is_named_as_such(tiny_model, tmp_path, capsys):
    # Issue 23c: torch advised weights_only=False for a PNG as --inception-weights, NumPy spoke of pickled data.
    png = tmp_path / "000000.png"
    Image.new("RGB", (8, 8)).save(png)
    assert (
        evaluate(tiny_model, tmp_path / "run", "--feature-extractor", "inception", "--inception-weights", str(png))
        == 2
    )
    err = capsys.readouterr().err
    assert f"argument --inception-weights: `inception_weights` {str(png)!r} is a PNG image, not a state dict" in err
    assert "as a .pth or .safetensors state dict" in err and "weights_only" not in err
    assert evaluate(tiny_model, tmp_path / "run", "--reference", str(png)) == 2
    err = capsys.readouterr().err
    assert f"argument --reference: `reference` {str(png)!r} is a PNG image, not an .npz file" in err
    assert "an .npz of reference statistics with 'mu' and 'sigma'" in err and "pickled" not in err
    assert not (tmp_path / "run").exists()


def test_the_documented_digits_feature_extractor_imports_from_the_repository_root(tmp_path):
    """docs/benchmarks.md's `--feature-extractor benchmarks.benchmarking_utils:...` with the `diffusers-mar` script, run
    from the repository root with no PYTHONPATH to it (issue 23b): the module is found in the current directory."""
    option = "--feature-extractor benchmarks.benchmarking_utils:digits_feature_extractor"
    assert option in (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    site = tmp_path / "site"  # the package alone, as an installation provides it; `benchmarks` is not in it
    site.mkdir()
    (site / "diffusers_mar").symlink_to(REPO_ROOT / "diffusers_mar")
    script = Path(sys.executable).with_name("diffusers-mar")  # the console script: sys.path[0] is its folder
    if not script.is_file():
        script = tmp_path / "bin" / "diffusers-mar"
        script.parent.mkdir()
        script.write_text("import sys\nfrom diffusers_mar.cli import main\nsys.exit(main())\n")
    (tmp_path / "real").mkdir()
    for index in range(4):
        Image.new("L", (8, 8), color=60 * index).save(tmp_path / "real" / f"{index}.png")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")

    def run(cwd, output: str) -> subprocess.CompletedProcess:
        argv = ["evaluate", "--compute-reference", "--data", str(tmp_path / "real"), "--resolution", "8"]
        argv += ["--output", str(tmp_path / output), *option.split()]
        command = [sys.executable, str(script), *argv]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)

    result = run(REPO_ROOT, "ref.npz")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "ref.npz") as data:
        assert data["features"].shape == (4, 64)
    # From another folder the module is not found: only the current directory made the difference.
    result = run(tmp_path, "other.npz")
    assert result.returncode == 2 and "cannot import 'benchmarks.benchmarking_utils'" in result.stderr
    assert not (tmp_path / "other.npz").exists()


def test_compute_reference_needs_its_options(tmp_path, capsys):
    assert cli.main(["evaluate", "--compute-reference", "--data", str(tmp_path), "--output", "r.npz"]) == 2
    assert "argument --resolution: is required" in capsys.readouterr().err
    code = cli.main(
        ["evaluate", "--compute-reference", "--data", str(tmp_path), "--resolution", "8",
         "--output", str(tmp_path / "r.npz"), "--feature-extractor", STUB]
    )  # fmt: skip
    assert code == 2 and "holds no images" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()
    (tmp_path / "r.npz").write_bytes(b"keep")
    code = cli.main(
        ["evaluate", "--compute-reference", "--data", str(tmp_path), "--resolution", "8", "--output",
         str(tmp_path / "r.npz")]
    )  # fmt: skip
    assert code == 2 and "argument --output: " in capsys.readouterr().err
    assert (tmp_path / "r.npz").read_bytes() == b"keep"


@pytest.mark.slow
def test_two_launched_processes_write_the_same_images_as_one(tiny_model, tmp_path):
    assert evaluate(tiny_model, tmp_path / "one", "--skip-metrics") == 0
    command = [
        "-m", "diffusers_mar.cli", "evaluate", "--model", str(tiny_model),
        "--output-dir", str(tmp_path / "two"), "--images-per-class", "2", "--batch-size", "4", "--skip-metrics",
    ]  # fmt: skip
    result = run_two_processes(command, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "on 2 process(es)" in result.stderr
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert len(names) == 20 and names == sorted(p.name for p in (tmp_path / "two").glob("*.png"))
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
    assert (tmp_path / "one" / "samples.npz").read_bytes() == (tmp_path / "two" / "samples.npz").read_bytes()
    assert json.loads((tmp_path / "two" / "results.json").read_text())["num_processes"] == 2


def test_an_adm_reference_batch_gives_precision_recall_from_its_images(tiny_model, tmp_path):
    assert evaluate(tiny_model, tmp_path / "run", "--skip-metrics") == 0
    with np.load(tmp_path / "run" / "samples.npz") as data:
        images = data["arr_0"]  # (20, 8, 8, 1)
    features = images[..., 0].reshape(len(images), -1).astype(np.float64) / 255.0  # the stub's features
    # ADM's reference batches hold the images (arr_0), FID statistics (mu, sigma) and sFID ones (mu_s, sigma_s).
    np.savez(
        tmp_path / "adm.npz",
        arr_0=np.repeat(images, 3, axis=-1),
        mu=features.mean(axis=0),
        sigma=np.cov(features, rowvar=False),
        mu_s=np.zeros(2),
        sigma_s=np.eye(2),
    )
    assert evaluate(tiny_model, tmp_path / "run", "--reference", str(tmp_path / "adm.npz")) == 0
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-6)
    assert (metrics["precision"], metrics["recall"]) == (1.0, 1.0)
    # Plain mu / sigma only: FID, no precision / recall.
    np.savez(tmp_path / "plain.npz", mu=features.mean(axis=0) + 0.1, sigma=np.cov(features, rowvar=False))
    assert evaluate(tiny_model, tmp_path / "run", "--reference", str(tmp_path / "plain.npz")) == 0
    metrics = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert metrics["fid"] == pytest.approx(0.01 * 64, rel=1e-6) and "precision" not in metrics


def test_progress_bar_shows_images_per_second_and_time_left(tiny_model, tmp_path, capsys):
    args = ["evaluate", "--model", str(tiny_model), "--output-dir", str(tmp_path), "--images-per-class", "2"]
    assert cli.main([*args, "--skip-metrics", "--cpu"]) == 0
    err = capsys.readouterr().err
    assert "20/20" in err and "img/s" in err and "<00:00" in err  # done / total, rate, time left


def test_update_model_card_keeps_later_sections(tmp_path):
    from diffusers_mar.cli.evaluate import update_model_card

    (tmp_path / "README.md").write_text("# card\n\n## Evaluation results\n\n- first\n\n## License\n\nMIT\n")
    update_model_card(str(tmp_path), "- second")
    assert (tmp_path / "README.md").read_text() == (
        "# card\n\n## Evaluation results\n\n- first\n- second\n\n## License\n\nMIT\n"
    )
    (tmp_path / "README.md").unlink()
    update_model_card(str(tmp_path), "- only")
    assert (
        (tmp_path / "README.md")
        .read_text()
        .endswith("## Evaluation results\n\nMeasured with `diffusers-mar evaluate` (docs/evaluation.md).\n- only\n")
    )


def test_latent_model_with_inception_features(tmp_path):
    """RGB images through a VAE, features from FID's Inception-v3 (random weights saved as torch-fidelity's file)."""
    import torch

    from diffusers_mar.evaluation.inception import InceptionV3Features
    from tests.testing_utils import make_tiny_vae

    pipe = make_tiny_pipeline(vae=make_tiny_vae())
    pipe = MARPipeline(**pipe.components, sampling=SAMPLING)
    pipe.save_pretrained(tmp_path / "model")
    torch.manual_seed(0)
    torch.save(InceptionV3Features().state_dict(), tmp_path / "inception.pth")
    args = ["evaluate", "--model", str(tmp_path / "model"), "--output-dir", str(tmp_path / "run"), "--cpu", "-q"]
    args += ["--images-per-class", "1", "--batch-size", "5", "--inception-weights", str(tmp_path / "inception.pth")]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # 10 images in the IS's 10 splits: each split is one image, whose p(y|x) is its own marginal, so each scores
    # exactly exp(KL(p || p)) = 1 whatever the (random) Inception weights.
    assert results["feature_extractor"] == "inception"
    assert results["metrics"]["inception_score"] == pytest.approx(1.0, abs=1e-12)
    assert results["metrics"]["inception_score_std"] == pytest.approx(0.0, abs=1e-12)
    with np.load(tmp_path / "run" / "samples.npz") as data:
        assert data["arr_0"].shape == (10, 16, 16, 3) and data["arr_0"].dtype == np.uint8
    assert Image.open(tmp_path / "run" / "000003.png").mode == "RGB"


def test_evaluate_an_ar_folder(tmp_path, capsys):
    pipe = make_tiny_pipeline(ar=True)
    pipe.set_sampling_defaults(num_diffusion_steps=3, guidance_scale=2.0)
    pipe.save_pretrained(tmp_path / "ar")
    (tmp_path / "ar" / "README.md").write_text("# tiny AR\n")
    assert evaluate(tmp_path / "ar", tmp_path / "run") == 0
    reference = tmp_path / "ref.npz"
    argv = ["evaluate", "--compute-reference", "--data", str(tmp_path / "run"), "--resolution", "8"]
    assert cli.main([*argv, "--output", str(reference), "--feature-extractor", STUB]) == 0
    assert evaluate(tmp_path / "ar", tmp_path / "run", "--reference", str(reference), "--update-model-card") == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["num_images"] == 20 and "num_inference_steps" not in results["settings"]
    assert results["metrics"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert "one token per step x 3 diffusion steps" in (tmp_path / "ar" / "README.md").read_text()
    assert evaluate(tmp_path / "ar", tmp_path / "other", "--num-inference-steps", "2") == 2
    assert "--num-inference-steps" in capsys.readouterr().err
