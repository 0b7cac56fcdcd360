"""Digits quality of a pipeline of any family (MAR, causal AR, VAR) in other precisions against its float32 self.

Loads a digits pipeline folder (the class its `model_index.json` names), makes a copy per precision with the same
weights (`int8`: `diffusers_mar.quantization.quantize_int8`, CPU; `bfloat16`: the models cast to bfloat16), and for
every seed generates `--num-per-class` images of each digit with every precision in turn, from the same generator
seed and the folder's sampling settings (or those given). Reports accuracy, Fréchet distance and diversity
(`DigitsEvaluator`, as `eval_digits.py`), means over the seeds, and whether each precision keeps the quality of the
first one (float32): accuracy at most `--max-accuracy-drop` (0.01) lower, Fréchet distance at most
`--max-frechet-increase` (10%) higher, the rule of `eval_fast_orders_digits.py`. img/s is the median over the seeds.

Usage (from the repository root):

    python benchmarks/eval_dtype_digits.py --model path/to/ar-digits --dtypes float32 int8 --seeds 0 1 \\
        --num-per-class 30 --num-diffusion-steps 50
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmarking_utils import (  # noqa: E402
    DigitsEvaluator,
    add_common_arguments,
    check_common_arguments,
    generate_digits,
    load_digits_pipeline,
    machine_description,
    quality_misses,
    recorded_command,
    reports_cli_errors,
    write_outputs,
)

DTYPES = ("float32", "int8", "bfloat16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, "Precision and digits quality")
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "int8"], choices=DTYPES, help="the first is the reference"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="generation seeds (default 0 1)")
    parser.add_argument("--guidance-scale", type=float, help="default: the folder's")
    parser.add_argument("--num-diffusion-steps", type=int, help="head steps (MAR, AR; default: the folder's)")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--max-frechet-increase", type=float, default=0.10)
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if len(set(args.dtypes)) != len(args.dtypes):
        parser.error(f"argument --dtypes: each precision once; got {args.dtypes}")
    if args.num_diffusion_steps is not None and args.num_diffusion_steps < 1:
        parser.error(f"argument --num-diffusion-steps: must be >= 1; got {args.num_diffusion_steps}")
    return args


def precision_copies(pipe, dtypes: list[str]) -> dict:
    """`{dtype: pipeline}`: `pipe` itself for float32, otherwise a copy with the same weights in that precision."""
    from diffusers_mar.quantization import quantize_int8

    copies = {}
    for dtype in dtypes:
        if dtype == "float32":
            copies[dtype] = pipe
        elif dtype == "int8":
            copies[dtype] = quantize_int8(copy.deepcopy(pipe))
        else:
            copies[dtype] = copy.deepcopy(pipe).to(dtype=torch.bfloat16)
    return copies


def sampling_arguments(pipe, args: argparse.Namespace) -> dict:
    """The call's arguments: the given guidance, and head steps for the families with a diffusion head."""
    sampling = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    if args.num_diffusion_steps is not None:
        if getattr(pipe, "diffusion_head", None) is None:
            raise ValueError(f"--num-diffusion-steps: {type(pipe).__name__} has no diffusion head.")
        sampling["num_diffusion_steps"] = args.num_diffusion_steps
    return sampling


def evaluate(pipes: dict, args: argparse.Namespace, evaluator: DigitsEvaluator) -> dict[str, list[dict]]:
    """`{dtype: [metrics per seed]}`; per seed the precisions run in turn from the same generator seed."""
    sampling = sampling_arguments(next(iter(pipes.values())), args)
    runs: dict[str, list[dict]] = {dtype: [] for dtype in pipes}
    for seed in args.seeds:
        for dtype, pipe in pipes.items():
            images, labels, seconds = generate_digits(pipe, args.num_per_class, seed, args.batch_size, **sampling)
            metrics = evaluator.evaluate(images, labels)
            runs[dtype].append({k: v for k, v in metrics.items() if not k.endswith("per_class")})
            runs[dtype][-1]["images_per_second"] = len(labels) / seconds
            print(f"seed {seed} {dtype}: {runs[dtype][-1]}", file=sys.stderr, flush=True)
    return runs


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> list[dict]:
    """Means over the seeds (img/s: median), and the rule against the first precision."""
    rows = []
    for dtype, seeds in runs.items():
        row = {"dtype": dtype, "images_per_second": float(np.median([r["images_per_second"] for r in seeds]))}
        for key in ("accuracy", "frechet_distance", "frechet_ratio", "diversity_ratio", "near_copy_fraction"):
            row[key] = float(np.mean([r[key] for r in seeds]))
        rows.append(row)
    reference = rows[0]
    for row in rows[1:]:
        row["failed"] = quality_misses(row, reference, args.max_accuracy_drop, args.max_frechet_increase)
        row["quality_kept"] = not row["failed"]
    return rows


def report(rows: list[dict], args: argparse.Namespace, argv: list[str] | None, pipe) -> str:
    lines = [
        f"## {args.docs_section}\n",
        f"Model: `{Path(args.model).name}` ({type(pipe).__name__}). Machine: {machine_description()}. "
        f"{args.num_per_class} images per digit and seed, seeds {', '.join(map(str, args.seeds))}; metrics are means "
        f"over the seeds, img/s the median. Quality kept: accuracy at most {args.max_accuracy_drop:g} below "
        f"{rows[0]['dtype']}'s, Fréchet at most {args.max_frechet_increase:.0%} above.\n",
        f"Command: `{recorded_command(__file__, argv)}`\n",
        "| precision | img/s | accuracy | Fréchet (x floor) | diversity | quality kept? |",
        "|---|---:|---:|---|---:|---|",
    ]
    for row in rows:
        kept = (
            "reference"
            if row is rows[0]
            else ("**yes**" if row["quality_kept"] else "no: " + ", ".join(row["failed"]))
        )
        lines.append(
            f"| {row['dtype']} | {row['images_per_second']:.1f} | {row['accuracy']:.3f} | "
            f"{row['frechet_distance']:.3f} ({row['frechet_ratio']:.2f}x) | {row['diversity_ratio']:.3f} | {kept} |"
        )
    return "\n".join(lines) + "\n"


@reports_cli_errors("eval_dtype_digits.py")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_digits_pipeline(args.model)
    evaluator = DigitsEvaluator()
    rows = summarise(evaluate(precision_copies(pipe, args.dtypes), args, evaluator), args)
    write_outputs(args, report(rows, args, argv, pipe), {"rows": rows, "machine": machine_description()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
