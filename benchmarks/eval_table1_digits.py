"""The paper's Table 1 in miniature on scikit-learn's 8x8 digits: causal AR (raster, random, RAR-annealed orders)
against MAR (one token per step, and few steps), all with the Diffusion Loss (issue 15).

For each token layout (`--patch-sizes`: 2 = the shipped model's 16 tokens of 2x2 pixels, 1 = 64 tokens of one
pixel, where the order can matter more) it trains, with `training/train_mar.py` and the same data, steps, batch, seed
and optimiser:

1. AR, raster order (`--model_family ar --order raster`);
2. AR, random orders (`--order random`);
3. AR, RAR's annealing from random to raster between 25% and 75% of training (`--order anneal`);
4. MAR (one model), sampled with one token per step (`num_inference_steps = L`)
5. and with few steps (`L / 4`, the paper's ratio of 64 steps for 256 tokens).

AR raster and AR anneal (which ends its training on raster) sample in raster order, AR random in random orders.

The AR transformer (`training/configs/ar-digits.json`: 4 causal blocks) and MAR's (`mar-digits.json`: 2 encoder + 2
decoder blocks) have the same width and head, so about the same parameters. Each model is evaluated with
`eval_digits.py`'s metrics (accuracy, Fréchet distance to the real digits, diversity), without and with guidance.

    python benchmarks/eval_table1_digits.py --output-root /tmp/table1 --write-docs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import (  # noqa: E402
    DOCS_PATH,
    DigitsEvaluator,
    generate_digits,
    machine_description,
    recorded_command,
    update_titled_section,
)
from diffusers_mar import ARPipeline, MARPipeline  # noqa: E402

SECTION = "Table 1 in miniature: causal AR vs MAR on digits (benchmarks/eval_table1_digits.py)"
TRAININGS = {
    "ar-raster": ["--model_family=ar", "--order=raster"],
    "ar-random": ["--model_family=ar", "--order=random"],
    "ar-anneal": ["--model_family=ar", "--order=anneal", "--anneal_start=0.25", "--anneal_end=0.75"],
    "mar": ["--model_family=mar"],
}


def train(name: str, patch_size: int, seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    output_dir = Path(args.output_root) / f"p{patch_size}-s{seed}-{name}"
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "train_mar.py"),
        "--dataset_name=digits",
        f"--output_dir={output_dir}",
        "--overwrite_output_dir",
        *TRAININGS[name],
        f"--override=transformer.patch_size={patch_size}",
        f"--train_batch_size={args.batch_size}",
        f"--max_train_steps={args.steps}",
        f"--diffusion_batch_mul={args.diffusion_batch_mul}",
        "--learning_rate=1e-3",
        f"--lr_warmup_steps={max(1, args.steps // 10)}",
        "--ema_decay=0.999",
        "--ema_warmup",
        f"--seed={seed}",
        "--report_to=none",
        "--sample_steps=0",
        "--num_sample_images=1",
        "--sample_num_diffusion_steps=2",
        f"--checkpointing_steps={args.steps}",
        "--checkpoints_total_limit=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO_ROOT)}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return output_dir, time.perf_counter() - start


def evaluate(folder: Path, name: str, evaluator: DigitsEvaluator, args: argparse.Namespace) -> list[dict]:
    pipe = (ARPipeline if name.startswith("ar") else MARPipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    num_tokens = pipe.transformer.num_tokens
    parameters = sum(p.numel() for m in (pipe.transformer, pipe.diffusion_head) for p in m.parameters())
    samplers = {name: {"order": "raster"} if name == "ar-raster" else {"order": "random"}}
    if name == "mar":
        few = max(1, num_tokens // 4)  # the paper's ratio: 64 steps for 256 tokens
        samplers = {"mar-1-per-step": {"num_inference_steps": num_tokens}, "mar-few": {"num_inference_steps": few}}
    if name == "ar-anneal":  # trained to end on raster: sample it in raster order
        samplers = {name: {"order": "raster"}}
    results = []
    for label, sampling in samplers.items():
        for guidance in args.guidance_scales:
            images, labels, seconds = generate_digits(
                pipe,
                args.num_per_class,
                seed=0,
                guidance_scale=guidance,
                num_diffusion_steps=args.num_diffusion_steps,
                **sampling,
            )
            metrics = evaluator.evaluate(images, labels)
            results.append(
                {"variant": label, "guidance": guidance, "seconds": seconds, "parameters": parameters, **sampling}
                | metrics
            )
            print(json.dumps({k: v for k, v in results[-1].items() if not k.endswith("per_class")}), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", default="table1-digits", help="folder for the trained pipelines")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--diffusion-batch-mul", type=int, default=2)
    parser.add_argument("--num-per-class", type=int, default=30)
    parser.add_argument("--num-diffusion-steps", type=int, default=50)
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    evaluator = DigitsEvaluator()

    rows = []
    for patch_size in args.patch_sizes:
        for seed in args.seeds:
            for name in TRAININGS:
                folder, seconds = train(name, patch_size, seed, args)
                for result in evaluate(folder, name, evaluator, args):
                    rows.append({"tokens": (8 // patch_size) ** 2, "seed": seed, "train_seconds": seconds, **result})

    lines = [
        f"Machine: {machine_description(threads=args.threads)}. Each model: {args.steps} steps, batch {args.batch_size}, "
        f"`diffusion_batch_mul` {args.diffusion_batch_mul}, lr 1e-3, EMA 0.999 with warm-up, seeds {args.seeds}. "
        f"Sampling: {args.num_per_class} images per digit, {args.num_diffusion_steps} diffusion steps, DDPM. "
        f"Fréchet floor (real vs real) {evaluator.frechet_floor:.3f}.",
        "",
        f"Command: `{recorded_command(__file__, argv)}`",
        "",
        "| tokens | variant | seed | parameters | guidance | accuracy | Fréchet | diversity | train s | sampling s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['variant']} | {row['seed']} | {row['parameters']:,} | {row['guidance']:g} | "
            f"{row['accuracy']:.3f} | {row['frechet_distance']:.3f} | {row['diversity_ratio']:.3f} | "
            f"{row['train_seconds']:.0f} | {row['seconds']:.1f} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    (Path(args.output_root) / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    if args.write_docs:
        update_titled_section(DOCS_PATH, SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
