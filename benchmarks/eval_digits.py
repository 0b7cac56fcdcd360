"""Quality benchmark of a class-conditional MAR trained on scikit-learn's 8x8 handwritten digits.

Generates `--num-per-class` images of each of the 10 digits for every combination of `--guidance-scales`,
`--num-inference-steps` and `--num-diffusion-steps`, and compares them with the real digits (1,797 images, no
download):

- **accuracy**: the fraction of generated images that a classifier trained on real digits assigns to the requested
  label. The classifier is scikit-learn's `MLPClassifier` (one hidden layer of 64 ReLU units, `random_state=0`) on
  pixels / 16, fitted on a fixed stratified half of the real digits (`train_test_split(..., test_size=0.5,
  random_state=0)`, "half A"); its accuracy on the other half ("half B") is printed.
- **Fréchet distance** (FD): between the Gaussians fitted to the classifier's hidden-layer activations (64-d) of the
  generated images and of half A (the classifier's training half), by `diffusers_mar.evaluation.metrics` (the code
  of `diffusers-mar evaluate`: float64, `scipy.linalg.sqrtm` as in FID). The floor is
  the FD of the held-out real half B against half A: what fresh real digits score (similar sample sizes: 899 vs
  898 real, 10 x N generated).
- **diversity**: per class, the mean pairwise L2 distance between images in pixel space (values 0..16), generated
  over real (all real digits of the class); 1.0 = as diverse as the real data.
- **near-copies**: the fraction of generated images whose nearest real digit (pixel L2 on the 0..16 scale, over all
  1,797 digits, the training set of the digits model) is closer than a threshold: the 1st percentile of the real
  digits' own nearest-neighbour distances (each digit against the other 1,796). Fresh real-like samples would
  score about 1%.

Generated images (`output_type="np"`, values in [0, 1]) are mapped to the digits' 0..16 scale (x 16); images
larger than 8x8 are block-averaged to 8x8 and colour images averaged to grey. Time and img/s cover generation
only (no model loading), with `torch.set_num_threads(--threads)` (1 by default: the one-core figure).

Usage (from the repository root):

    python benchmarks/eval_digits.py --model diffusers_mar/default_model --num-per-class 100 --write-docs
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/eval_digits.py` imports `benchmarks`

from benchmarks.bench_sampling import public_argv  # noqa: E402
from diffusers_mar import DEFAULT_MODEL, MARPipeline  # noqa: E402
from diffusers_mar.atomic_files import atomic_write  # noqa: E402
from diffusers_mar.evaluation.metrics import (
    frechet_distance_of_features,
    mean_pairwise_distance,
    nearest_neighbour_distances,
)

NUM_CLASSES = 10
DIGIT_SIZE = 8
DIGIT_MAX = 16.0
SCHEDULERS = ("ddpm", "ddim", "dpm")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_SECTION = "Digits quality (benchmarks/eval_digits.py)"


# ----------------------------------------------------------------------------------------------------------------
# Metrics: the package's (`diffusers_mar.evaluation.metrics`, the code of `diffusers-mar evaluate`) on (N, 64) arrays
# of 8x8 digits on the 0..16 scale, or on the classifier's features.


def to_digit_scale(images: np.ndarray) -> np.ndarray:
    """Pipeline `np` output `(N, H, W, C)` in [0, 1] -> `(N, 64)` 8x8 digits on the 0..16 scale."""
    if images.ndim != 4:
        raise ValueError(f"`images` must be a (N, H, W, C) array (output_type='np'); got shape {images.shape}.")
    n, height, width, _ = images.shape
    if height % DIGIT_SIZE or width % DIGIT_SIZE:
        raise ValueError(f"images must be 8x8 or a multiple of it to compare with the digits; got {height}x{width}.")
    grey = images.mean(axis=-1)  # (N, H, W)
    blocks = grey.reshape(n, DIGIT_SIZE, height // DIGIT_SIZE, DIGIT_SIZE, width // DIGIT_SIZE).mean(axis=(2, 4))
    return blocks.reshape(n, DIGIT_SIZE * DIGIT_SIZE).astype(np.float64) * DIGIT_MAX


# ----------------------------------------------------------------------------------------------------------------
# The reference: the real digits, the classifier and the real-data baselines.


@dataclass
class DigitsEvaluator:
    """The real digits, a classifier trained on half A of them, and every real-data baseline of the metrics.

    Build once (about a second), then `evaluate(images, labels)` as often as needed.
    """

    seed: int = 0
    near_copy_percentile: float = 1.0
    images: np.ndarray = field(init=False, repr=False)  # (1797, 64) on the 0..16 scale
    labels: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.images, self.labels = load_digits(return_X_y=True)
        self.images = self.images.astype(np.float64)
        indices = np.arange(len(self.labels))
        self.half_a, self.half_b = train_test_split(
            indices, test_size=0.5, stratify=self.labels, random_state=self.seed
        )
        self.classifier = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=self.seed)
        self.classifier.fit(self.images[self.half_a] / DIGIT_MAX, self.labels[self.half_a])
        self.heldout_accuracy = float(
            self.classifier.score(self.images[self.half_b] / DIGIT_MAX, self.labels[self.half_b])
        )
        self.reference_features = self.features(self.images[self.half_a])
        self.frechet_floor = frechet_distance_of_features(
            self.features(self.images[self.half_b]), self.reference_features
        )
        real_nn = nearest_neighbour_distances(self.images, self.images, exclude_self=True)
        self.near_copy_threshold = float(np.percentile(real_nn, self.near_copy_percentile))
        self.real_diversity = {c: mean_pairwise_distance(self.images[self.labels == c]) for c in range(NUM_CLASSES)}

    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's hidden-layer (ReLU) activations `(N, 64)` of digits on the 0..16 scale."""
        hidden = images / DIGIT_MAX @ self.classifier.coefs_[0] + self.classifier.intercepts_[0]
        return np.maximum(hidden, 0.0)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The classifier's output-layer logits `(N, 10)` of digits on the 0..16 scale."""
        return self.features(images) @ self.classifier.coefs_[1] + self.classifier.intercepts_[1]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.predict(images / DIGIT_MAX)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """All metrics of generated digits `(N, 64)` (0..16 scale) requested with class `labels` `(N,)`."""
        labels = np.asarray(labels)
        if images.ndim != 2 or images.shape[1] != DIGIT_SIZE * DIGIT_SIZE or len(images) != len(labels):
            raise ValueError(f"`images` must be (N, 64) with N = len(labels); got {images.shape}, {labels.shape}.")
        correct = self.predict(images) == labels
        diversity = {}
        for c in np.unique(labels).tolist():
            if (labels == c).sum() >= 2:
                diversity[c] = mean_pairwise_distance(images[labels == c]) / self.real_diversity[c]
        nearest = nearest_neighbour_distances(images, self.images)
        frechet = (
            frechet_distance_of_features(self.features(images), self.reference_features) if len(images) > 1 else None
        )
        return {
            "accuracy": float(correct.mean()),
            "accuracy_per_class": {c: float(correct[labels == c].mean()) for c in np.unique(labels).tolist()},
            "frechet_distance": frechet,
            "frechet_ratio": frechet / self.frechet_floor if frechet is not None else None,
            "diversity_ratio": float(np.mean(list(diversity.values()))) if diversity else None,
            "diversity_ratio_per_class": diversity,
            "near_copy_fraction": float((nearest < self.near_copy_threshold).mean()),
        }

    def baselines(self) -> dict:
        return {
            "classifier_heldout_accuracy": self.heldout_accuracy,
            "frechet_floor": self.frechet_floor,
            "near_copy_threshold": self.near_copy_threshold,
            "near_copy_percentile": self.near_copy_percentile,
            "real_diversity_per_class": self.real_diversity,
            "num_real": len(self.labels),
        }


def digits_feature_extractor(device: str | torch.device = "cpu"):
    """A feature extractor for `diffusers-mar evaluate --feature-extractor benchmarks.eval_digits:digits_feature_extractor`:
    uint8 images `(N, 3, H, W)` -> the classifier's hidden features (`features`, 64-d) and logits (`logits`)."""
    evaluator = DigitsEvaluator()

    def extractor(images: torch.Tensor) -> dict[str, torch.Tensor]:
        digits = to_digit_scale(images.permute(0, 2, 3, 1).double().cpu().numpy() / 255.0)  # (N, 64) on 0..16
        return {
            "features": torch.from_numpy(evaluator.features(digits)),
            "logits": torch.from_numpy(evaluator.logits(digits)),
        }

    return extractor


# ----------------------------------------------------------------------------------------------------------------
# Generation.


def head_scheduler(config, name: str, timestep_spacing: str | None = None) -> SchedulerMixin:
    """The head's scheduler `name` built from a MARDDPMScheduler `config`.

    `ddpm`: MARDDPMScheduler (the model's own); `ddim`, `dpm`: diffusers' DDIMScheduler and
    DPMSolverMultistepScheduler (DPM-Solver++, which starts at t = 995 through the config's `lambda_min_clipped`).
    `timestep_spacing` overrides the config's (`linspace`).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    from diffusers_mar import MARDDPMScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {SCHEDULERS}; got {name!r}.")
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"`timestep_spacing` must be one of {TIMESTEP_SPACINGS}; got {timestep_spacing!r}.")
    cls = {"ddpm": MARDDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    overrides = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    return cls.from_config(config, **overrides)


def set_head_scheduler(pipe: MARPipeline, name: str, timestep_spacing: str | None = None) -> None:
    """Replace `pipe.scheduler` by `head_scheduler(pipe.scheduler.config, name, timestep_spacing)`."""
    pipe.scheduler = head_scheduler(pipe.scheduler.config, name, timestep_spacing)


def generate_digits(
    pipe: MARPipeline, num_per_class: int, seed: int = 0, batch_size: int = 1000, **sampling
) -> tuple[np.ndarray, np.ndarray, float]:
    """`num_per_class` images of each digit: `(images (N, 64) on 0..16, labels (N,), seconds of generation)`."""
    labels = np.repeat(np.arange(NUM_CLASSES), num_per_class)
    generator = torch.Generator().manual_seed(seed)
    images = []
    start = time.perf_counter()
    for first in range(0, len(labels), batch_size):
        batch = labels[first : first + batch_size].tolist()
        images.append(pipe(class_labels=batch, generator=generator, output_type="np", **sampling).images)
    seconds = time.perf_counter() - start
    return to_digit_scale(np.concatenate(images)), labels, seconds


# ----------------------------------------------------------------------------------------------------------------
# Report.


def machine_description(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, torch threads {threads}"


def markdown_report(results: list[dict], baselines: dict, context: dict) -> str:
    """The results table with the real-data baselines, the machine and the command."""
    real_diversity = np.mean(list(baselines["real_diversity_per_class"].values()))
    lines = [
        f"Model: `{context['model']}` ({context['num_parameters']:,} parameters). Machine: {context['machine']}.",
        "",
        f"Command: `{context['command']}`",
        "",
        f"Real-data baselines: classifier held-out accuracy {baselines['classifier_heldout_accuracy']:.3f}; "
        f"Fréchet floor (real half B vs half A) {baselines['frechet_floor']:.3f}; mean real per-class pairwise "
        f"distance {real_diversity:.2f}; near-copy threshold {baselines['near_copy_threshold']:.2f} (percentile "
        f"{baselines['near_copy_percentile']:g} of the real digits' nearest-neighbour distances, 0..16 scale).",
        "",
        "| scheduler | guidance | temperature | steps | diffusion steps | images | accuracy | Fréchet (x floor) "
        "| diversity (gen/real) | near-copies | time (s) | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['scheduler']} | {r['guidance_scale']:g} | {r['temperature']:g} | {r['num_inference_steps']} "
            f"| {r['num_diffusion_steps']} | {r['num_images']} | {r['accuracy']:.3f} "
            f"| {r['frechet_distance']:.3f} ({r['frechet_ratio']:.2f}x) | {r['diversity_ratio']:.3f} "
            f"| {r['near_copy_fraction']:.3f} | {r['seconds']:.1f} | {r['images_per_second']:.1f} |"
        )
    lines += [
        "",
        "Targets for the shipped model: accuracy >= 0.95 with guidance, >= 0.85 without; Fréchet <= 2x floor; "
        "diversity within 20% of the real data (0.8..1.2); near-copies < 0.05. Metric definitions: the docstring "
        "of `benchmarks/eval_digits.py`.",
    ]
    return "\n".join(lines)


def update_docs_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section `title` of `path` between markers, keeping every other section intact."""
    start, end = f"<!-- eval_digits: {title} -->", f"<!-- /eval_digits: {title} -->"
    block = f"{start}\n## {title}\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section names its machine and command.\n"
    if start in text and end in text and text.index(start) < text.index(end):
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: file.write(text.encode()))


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def add_common_arguments(parser: argparse.ArgumentParser, default_section: str) -> None:
    """Options every digits benchmark takes: the model, the image count, threads and where the results go."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a MARPipeline folder or Hub id (default: shipped)")
    parser.add_argument("--num-per-class", type=int, default=100, help="generated images per digit (default 100)")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per pipeline call")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: one core)")
    parser.add_argument("--output-json", help="write all results to this JSON file")
    parser.add_argument("--write-docs", action="store_true", help=f"update a section of {DOCS_PATH.name}")
    parser.add_argument("--docs-section", default=default_section, help="the section title to replace or append")
    parser.add_argument("--docs-path", default=str(DOCS_PATH), help="the markdown file for --write-docs")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error naming the option when a common option is out of range."""
    for name in ("batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1; got {getattr(args, name)}")
    if args.num_per_class < 2:
        parser.error("argument --num-per-class: must be >= 2 (diversity needs pairs)")


def reports_cli_errors(prog: str):
    """Decorate a script's `main`: a `CLIError` (e.g. from `load_digits_pipeline`) prints as `prog: error: ...` and
    `main` returns its exit code, as the command line does."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            from diffusers_mar.cli import CLIError

            try:
                return main(argv)
            except CLIError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                return error.exit_code

        return run

    return decorate


def load_digits_pipeline(model: str) -> MARPipeline:
    """Load `model` with the CLI's error messages; raises `CLIError` (exit 2) unless it has the 10 digit classes."""
    from diffusers_mar.cli import CLIError, load_pipeline

    pipe = load_pipeline(model)
    if pipe.transformer.config.num_classes != NUM_CLASSES:
        raise CLIError(f"the model has {pipe.transformer.config.num_classes} classes, not {NUM_CLASSES}", "--model")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_outputs(args: argparse.Namespace, report: str, results: dict) -> None:
    """Print the markdown report; write `results` to `--output-json` and the report into `--docs-path` if asked."""
    print(report)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    if args.write_docs:
        update_docs_section(Path(args.docs_path), args.docs_section, report)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULT_SECTION)
    parser.add_argument(
        "--guidance-scales", type=float, nargs="+", help="default: 1.0 and the model's recommended scale"
    )
    parser.add_argument(
        "--num-inference-steps", type=int, nargs="+", help="default: the recommended value, its half and quarter"
    )
    parser.add_argument("--num-diffusion-steps", type=int, nargs="+", help="default: the recommended value")
    parser.add_argument("--temperature", type=float, help="default: the recommended value")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="ddpm", help="the diffusion head's scheduler")
    parser.add_argument(
        "--timestep-spacing", choices=TIMESTEP_SPACINGS, help="the head scheduler's (default: the model's, linspace)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generation seed (the classifier always uses 0)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    return args


@reports_cli_errors("eval_digits")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_digits_pipeline(args.model)
    set_head_scheduler(pipe, args.scheduler, args.timestep_spacing)
    recommended = pipe.sampling_defaults
    steps = recommended["num_inference_steps"]
    guidance_scales = args.guidance_scales or sorted({1.0, float(recommended["guidance_scale"])})
    inference_steps = args.num_inference_steps or sorted({max(1, steps // 4), max(1, steps // 2), steps})
    diffusion_steps = args.num_diffusion_steps or [recommended["num_diffusion_steps"]]
    temperature = args.temperature if args.temperature is not None else recommended["temperature"]

    evaluator = DigitsEvaluator()
    baselines = evaluator.baselines()
    print(
        f"classifier held-out accuracy {evaluator.heldout_accuracy:.3f}, Fréchet floor {evaluator.frechet_floor:.3f}, "
        f"near-copy threshold {evaluator.near_copy_threshold:.2f}",
        file=sys.stderr,
    )
    results = []
    for guidance_scale, num_inference_steps, num_diffusion_steps in itertools.product(
        guidance_scales, inference_steps, diffusion_steps
    ):
        sampling = {
            "guidance_scale": guidance_scale,
            "guidance_schedule": recommended["guidance_schedule"],
            "temperature": temperature,
            "num_inference_steps": num_inference_steps,
            "num_diffusion_steps": num_diffusion_steps,
        }
        images, labels, seconds = generate_digits(pipe, args.num_per_class, args.seed, args.batch_size, **sampling)
        metrics = evaluator.evaluate(images, labels)
        scheduler = args.scheduler if args.timestep_spacing is None else f"{args.scheduler} ({args.timestep_spacing})"
        result = {"scheduler": scheduler, **sampling, "num_images": len(images), "seconds": seconds}
        result.update(images_per_second=len(images) / seconds, **metrics)
        results.append(result)
        print(
            f"guidance {guidance_scale:g} steps {num_inference_steps} x {num_diffusion_steps}: accuracy "
            f"{metrics['accuracy']:.3f}, Fréchet {metrics['frechet_distance']:.3f} ({metrics['frechet_ratio']:.2f}x), "
            f"diversity {metrics['diversity_ratio']:.3f}, near-copies {metrics['near_copy_fraction']:.3f}, "
            f"{len(images)} images in {seconds:.1f} s ({len(images) / seconds:.1f} img/s)",
            file=sys.stderr,
        )

    context = {
        "model": public_argv([args.model])[0] if args.model != DEFAULT_MODEL else "diffusers_mar.DEFAULT_MODEL",
        "num_parameters": sum(p.numel() for p in pipe.transformer.parameters())
        + sum(p.numel() for p in pipe.diffusion_head.parameters()),
        "machine": machine_description(args.threads),
        "command": shlex.join(
            ["python", "benchmarks/eval_digits.py", *public_argv(sys.argv[1:] if argv is None else argv)]
        ),
    }
    report = markdown_report(results, baselines, context)
    write_outputs(args, report, {**context, "baselines": baselines, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
