"""The base install (`pip install -e .`): every module of the package imports without the packages that only the
extras bring (`transformers`, `datasets`, `scipy`, ...), and the command line starts quietly, printing only our own
output. Each check runs in a fresh interpreter where the packages are hidden (`sys.modules[name] = None`, which makes
`import name` fail and `importlib.util.find_spec(name)` return None, as when they are not installed)."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys

import pytest

import diffusers_mar
from tests.testing_utils import REPO_ROOT

# `__main__` modules run the command line when imported; the command line is checked below instead.
PUBLIC_MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(diffusers_mar.__path__, "diffusers_mar.")
    if not name.endswith("__main__")
)
EXTRAS_ONLY = ("transformers", "datasets", "scipy", "sklearn", "torchsde", "tensorboard", "torchvision", "gradio")


def run_hidden(hidden: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with `hidden` packages unimportable."""
    preamble = f"import sys\nsys.modules.update(dict.fromkeys({list(hidden)!r}))\n"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "PYTHONWARNINGS"))}
    env.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return subprocess.run(
        [sys.executable, "-c", preamble + code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT
    )


def test_the_package_has_the_modules_this_test_imports():
    assert len(PUBLIC_MODULES) > 30
    assert {"diffusers_mar.cli.commands", "diffusers_mar.pipelines.pipeline_mar_inpaint"} <= set(PUBLIC_MODULES)
    assert "diffusers_mar.evaluation.metrics" in PUBLIC_MODULES


@pytest.mark.parametrize("hidden", [("transformers",), EXTRAS_ONLY], ids=["no-transformers", "no-extras"])
def test_every_public_module_imports_without_the_extras(hidden):
    code = f"import importlib\nfor name in {PUBLIC_MODULES!r}:\n    importlib.import_module(name)\nprint('imported')"
    result = run_hidden(hidden, code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "imported\n"
    assert result.stderr == ""
    # The check itself works: a hidden package really is unimportable there.
    result = run_hidden(hidden, f"import {hidden[0]}")
    assert result.returncode == 1 and f"import of {hidden[0]} halted" in result.stderr


def cli(*argv: str) -> str:
    return f"from diffusers_mar.cli import main\nsys.exit(main({list(argv)!r}))"


@pytest.mark.parametrize(
    ("argv", "stdout_start"),
    [
        (["--help"], "usage: diffusers-mar [-h]"),
        (["generate", "--help"], "usage: diffusers-mar generate"),
        (["info"], "model:"),
        (["evaluate", "--help"], "usage: diffusers-mar evaluate"),
    ],
)
def test_the_command_line_starts_quietly_without_the_extras(argv, stdout_start):
    result = run_hidden(EXTRAS_ONLY, cli(*argv))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(stdout_start)
    assert result.stderr == ""


def test_generate_with_the_shipped_model_prints_only_our_lines(tmp_path):
    output = tmp_path / "digits.png"
    argv = ["generate", "--class-labels", "0", "1", "--num-inference-steps", "2", "--num-diffusion-steps", "3"]
    result = run_hidden(EXTRAS_ONLY, cli(*argv, "--output", str(output), "--quiet"))
    assert result.returncode == 0, result.stderr[-3000:]
    # Our two progress lines on stderr (the image paths alone on stdout), nothing from the libraries.
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith("Sampling with num_inference_steps=2, num_diffusion_steps=3")
    assert lines[1].startswith("Generated 8 images in ")
    assert result.stdout == f"{output}\n" and output.stat().st_size > 0


def test_evaluate_prints_only_our_lines(tmp_path):
    # scipy stays: the metrics need it (the `[eval]` extra); the other extras are hidden.
    argv = ["evaluate", "--output-dir", str(tmp_path / "run"), "--images-per-class", "2", "--num-inference-steps", "2"]
    argv += [
        "--num-diffusion-steps",
        "2",
        "--feature-extractor",
        "tests.evaluation.stub_extractor:make",
        "--cpu",
        "-q",
    ]
    hidden = tuple(name for name in EXTRAS_ONLY if name != "scipy")
    result = run_hidden(hidden, cli(*argv))
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Sampling 20 images (2 per class, 10 classes) on 1 process(es)")
    # Our two warnings (too few images to compare; IS splits smaller than the class count), then the metrics.
    assert len(lines) == 4, result.stderr
    assert all(line.startswith("diffusers-mar evaluate: warning: ") for line in lines[1:3])
    assert lines[3].startswith("inception_score ")
    assert result.stdout == f"{tmp_path / 'run' / 'results.json'}\n"
