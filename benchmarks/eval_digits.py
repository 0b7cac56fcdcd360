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
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/eval_digits.py` imports `benchmarks`

from benchmarks.benchmarking_utils import (  # noqa: E402
    SCHEDULERS,
    TIMESTEP_SPACINGS,
    DigitsEvaluator,
    add_common_arguments,
    check_common_arguments,
    generate_digits,
    load_digits_pipeline,
    machine_description,
    public_argv,
    recorded_command,
    reports_cli_errors,
    set_head_scheduler,
    write_outputs,
)
from diffusers_mar import DEFAULT_MODEL  # noqa: E402
from diffusers_mar.quantization import quantize_int8  # noqa: E402

DEFAULT_SECTION = "Digits quality (benchmarks/eval_digits.py)"


# ----------------------------------------------------------------------------------------------------------------
# Report.


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


# ----------------------------------------------------------------------------------------------------------------
# Command line.


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
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "int8"),
        default="float32",
        help="the networks' dtype (default float32); int8: float32 with dynamic int8 linear layers",
    )
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    return args


@reports_cli_errors("eval_digits")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_digits_pipeline(args.model, "float32" if args.dtype == "int8" else args.dtype)
    num_parameters = sum(p.numel() for m in (pipe.transformer, pipe.diffusion_head) for p in m.parameters())
    if args.dtype == "int8":  # after counting: the int8 layers' packed weights are not parameters
        quantize_int8(pipe)
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
        "num_parameters": num_parameters,
        "machine": machine_description(dtype=args.dtype, threads=args.threads),
        "command": recorded_command(__file__, argv),
    }
    report = markdown_report(results, baselines, context)
    write_outputs(args, report, {**context, "baselines": baselines, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
