"""Faster sampling settings of a digits MAR against its recommended one: images/s on one core against quality.

The reference is the pipeline folder's recommended settings (`pipe.sampling_defaults` (for the shipped model: MARDDPMScheduler, 100 head steps, 16
outer steps). Each candidate changes the head's scheduler (`ddpm`, `ddim`, `dpm` = DPM-Solver++, optionally with
another `timestep_spacing`), the number of head steps (`num_diffusion_steps`) and of outer steps
(`num_inference_steps`); guidance and temperature stay the card's. Every setting generates `--num-per-class` images of
each digit per seed in `--seeds` and is measured with `benchmarks/eval_digits.py`'s `DigitsEvaluator` (accuracy,
Fréchet distance, diversity, near-copies; metrics averaged over the seeds, img/s over all images), on
`torch.set_num_threads(--threads)`.

A candidate is a *fast setting* when it has at least `--min-speedup` (3) times the reference's img/s, an accuracy
within `--max-accuracy-drop` (0.01) of the reference's and a Fréchet distance at most `--max-frechet-increase` (10%)
above the reference's.

Candidates are written `SCHEDULER[-SPACING]/DIFFUSION_STEPS/INFERENCE_STEPS`, e.g. `dpm-leading/15/8`.

    python benchmarks/fast_sampling_digits.py --write-docs
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python benchmarks/<script>.py` from the repository root imports `benchmarks`

from benchmarks.eval_digits import (  # noqa: E402
    SCHEDULERS,
    TIMESTEP_SPACINGS,
    DigitsEvaluator,
    add_common_arguments,
    check_common_arguments,
    generate_digits,
    head_scheduler,
    load_digits_pipeline,
    machine_description,
    reports_cli_errors,
    write_outputs,
)
from diffusers_mar import DEFAULT_MODEL  # noqa: E402

DEFAULT_SECTION = "Fast setting (benchmarks/fast_sampling_digits.py)"
DEFAULT_CANDIDATES = (
    "ddpm/50/16",
    "ddpm/25/16",
    "ddpm/100/8",
    "ddpm/100/4",
    "ddim/25/16",
    "ddim/15/16",
    "ddim/10/16",
    "dpm/20/16",
    "dpm-leading/25/16",
    "dpm-leading/20/16",
    "dpm-leading/15/16",
    "dpm-leading/10/16",
    "dpm-leading/20/8",
    "dpm-leading/15/8",
    "dpm-leading/10/8",
    "dpm-leading/15/4",
    "dpm-leading/10/4",
)
METRICS = ("accuracy", "frechet_distance", "frechet_ratio", "diversity_ratio", "near_copy_fraction")


def parse_candidate(text: str) -> dict:
    """`SCHEDULER[-SPACING]/DIFFUSION_STEPS/INFERENCE_STEPS` -> setting dict (raises ValueError naming the format)."""
    parts = text.split("/")
    name, _, spacing = parts[0].partition("-")
    if (
        len(parts) != 3
        or name not in SCHEDULERS
        or (spacing and spacing not in TIMESTEP_SPACINGS)
        or not all(p.isdigit() and int(p) >= 1 for p in parts[1:])
    ):
        raise ValueError(
            f"a candidate is SCHEDULER[-SPACING]/DIFFUSION_STEPS/INFERENCE_STEPS with SCHEDULER in {SCHEDULERS}, "
            f"SPACING in {TIMESTEP_SPACINGS} and positive steps (e.g. dpm-leading/15/8); got {text!r}"
        )
    return {
        "name": text,
        "scheduler": name,
        "timestep_spacing": spacing or None,
        "num_diffusion_steps": int(parts[1]),
        "num_inference_steps": int(parts[2]),
    }


def measure(pipe, base_config, evaluator: DigitsEvaluator, setting: dict, sampling: dict, args) -> dict:
    """Metrics of one setting, averaged over `args.seeds`; img/s over all of its images."""
    pipe.scheduler = head_scheduler(base_config, setting["scheduler"], setting["timestep_spacing"])
    sampling = {
        **sampling,
        "num_diffusion_steps": setting["num_diffusion_steps"],
        "num_inference_steps": setting["num_inference_steps"],
    }
    runs, seconds, count = [], 0.0, 0
    for seed in args.seeds:
        images, labels, run_seconds = generate_digits(pipe, args.num_per_class, seed, args.batch_size, **sampling)
        runs.append(evaluator.evaluate(images, labels))
        seconds, count = seconds + run_seconds, count + len(images)
    result = {**setting, **{key: float(np.mean([run[key] for run in runs])) for key in METRICS}}
    result.update(num_images=count, seconds=seconds, images_per_second=count / seconds)
    return result


def markdown_report(reference: dict, results: list[dict], context: dict, args) -> str:
    lines = [
        f"Model: `{context['model']}`. Machine: {context['machine']}.",
        "",
        f"Command: `{context['command']}`",
        "",
        f"Guidance {context['sampling']['guidance_scale']:g} ({context['sampling']['guidance_schedule']}), temperature "
        f"{context['sampling']['temperature']:g} (the model card's) for every row; {args.num_per_class} images per "
        f"digit and seed, seeds {', '.join(map(str, args.seeds))}; metrics are means over the seeds, img/s over all "
        f"images. Fréchet floor (real vs real) {context['frechet_floor']:.3f}. A fast setting needs >= "
        f"{args.min_speedup:g}x the reference's img/s, accuracy at most {args.max_accuracy_drop:g} below it and a "
        f"Fréchet distance at most {args.max_frechet_increase:.0%} above it.",
        "",
        "| setting | head scheduler | head steps | outer steps | img/s | speed-up | accuracy | Fréchet (x floor) "
        "| diversity (gen/real) | near-copies | fast setting? |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [reference, *results]:
        scheduler = {"ddpm": "MARDDPMScheduler", "ddim": "DDIMScheduler", "dpm": "DPM-Solver++"}[r["scheduler"]]
        if r["timestep_spacing"]:
            scheduler += f" (`{r['timestep_spacing']}`)"
        verdict = "reference" if r is reference else ("**yes**" if r["fast"] else "no: " + ", ".join(r["misses"]))
        lines.append(
            f"| `{r['name']}` | {scheduler} | {r['num_diffusion_steps']} | {r['num_inference_steps']} "
            f"| {r['images_per_second']:.1f} | {r['images_per_second'] / reference['images_per_second']:.1f}x "
            f"| {r['accuracy']:.3f} | {r['frechet_distance']:.3f} ({r['frechet_ratio']:.2f}x) "
            f"| {r['diversity_ratio']:.3f} | {r['near_copy_fraction']:.3f} | {verdict} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULT_SECTION)
    parser.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), help="see the docstring")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="generation seeds (default 0 1)")
    parser.add_argument("--min-speedup", type=float, default=3.0)
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--max-frechet-increase", type=float, default=0.10)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    try:
        args.settings = [parse_candidate(text) for text in args.candidates]
    except ValueError as error:
        parser.error(f"argument --candidates: {error}")
    return args


@reports_cli_errors("fast_sampling_digits")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_digits_pipeline(args.model)
    base_config = pipe.scheduler.config
    recommended = pipe.sampling_defaults
    sampling = {key: recommended[key] for key in ("guidance_scale", "guidance_schedule", "temperature")}
    num_tokens = pipe.transformer.num_tokens
    for setting in args.settings:
        if setting["num_inference_steps"] > num_tokens:
            print(f"fast_sampling_digits: error: {setting['name']}: more outer steps than tokens", file=sys.stderr)
            return 2
    evaluator = DigitsEvaluator()

    reference_setting = {
        "name": "card",
        "scheduler": "ddpm",
        "timestep_spacing": None,
        "num_diffusion_steps": recommended["num_diffusion_steps"],
        "num_inference_steps": recommended["num_inference_steps"],
    }
    reference = measure(pipe, base_config, evaluator, reference_setting, sampling, args)
    reference["name"] = f"ddpm/{reference['num_diffusion_steps']}/{reference['num_inference_steps']}"
    print(f"reference {reference['name']}: {json.dumps({k: reference[k] for k in METRICS})}", file=sys.stderr)
    results = []
    for setting in args.settings:
        result = measure(pipe, base_config, evaluator, setting, sampling, args)
        misses = []
        if result["images_per_second"] < args.min_speedup * reference["images_per_second"]:
            misses.append("speed")
        if result["accuracy"] < reference["accuracy"] - args.max_accuracy_drop:
            misses.append("accuracy")
        if result["frechet_distance"] > (1 + args.max_frechet_increase) * reference["frechet_distance"]:
            misses.append("Fréchet")
        result.update(fast=not misses, misses=misses)
        results.append(result)
        print(
            f"{setting['name']}: {result['images_per_second']:.1f} img/s, accuracy {result['accuracy']:.3f}, "
            f"Fréchet {result['frechet_distance']:.3f}, {'fast' if not misses else 'misses ' + ', '.join(misses)}",
            file=sys.stderr,
        )

    context = {
        "model": args.model if args.model != DEFAULT_MODEL else "diffusers_mar.DEFAULT_MODEL",
        "machine": machine_description(args.threads),
        "command": shlex.join(
            ["python", "benchmarks/fast_sampling_digits.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "sampling": sampling,
        "frechet_floor": evaluator.frechet_floor,
    }
    report = markdown_report(reference, results, context, args)
    write_outputs(args, report, {**context, "reference": reference, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
