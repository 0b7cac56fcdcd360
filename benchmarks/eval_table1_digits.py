"""The paper's design space in miniature on scikit-learn's 8x8 digits (issues 15 and 26): causal AR (raster, random,
RAR-annealed orders) against MAR (one token per step, and few steps), all with the Diffusion Loss, and VAR (next-scale
prediction on a VQ tokenizer), with several training seeds and validation curves.

For each token layout (`--patch-sizes`: 2 = the shipped model's 16 tokens of 2x2 pixels, 1 = 64 tokens of one
pixel, where the order can matter more) and each training seed it trains, with `training/train_mar.py`, the same
data (a fixed held-out tenth for the validation loss), steps, batch, learning rate and EMA:

1. AR, raster order (`--model_family ar --order raster`);
2. AR, random orders (`--order random`);
3. AR, RAR's annealing from random to raster between 25% and 75% of training (`--order anneal`);
4. MAR (one model), sampled with one token per step (`num_inference_steps = L`)
5. and with few steps (`L / 4`, the paper's ratio of 64 steps for 256 tokens);
6. VAR (`--model_family var`) on a tokenizer trained once per layout with `training/train_vqvae.py` (seed 0):
   `vqvae-digits` (8x8 -> 4x4 latent, scales 1, 2, 3, 4: a last scale of 16 tokens) for 16 tokens, and the same
   without its halving (8x8 latent, scales 1, 2, 4, 6, 8: a last scale of 64 tokens) for 64.

AR raster and AR anneal (which ends its training on raster) sample in raster order, AR random in random orders.
The AR transformer (`training/configs/ar-digits.json`: 4 causal blocks), MAR's (`mar-digits.json`: 2 encoder + 2
decoder blocks) and VAR's (`var-digits.json` with 7 blocks instead of 4, for about the same parameter count) have
the same width; AR and MAR share the head. Each model is
evaluated with `eval_digits.py`'s metrics (accuracy, Fréchet distance to the real digits, diversity), without and
with guidance, and timed (img/s, one thread). Every trained folder keeps its `validation_loss.json`; the learning
curves are drawn with `--curves PNG`.

    python benchmarks/eval_table1_digits.py --output-root table1-digits --seeds 0 1 2 --steps 2000 --jobs 2 \
        --write-docs --curves docs/images/table1_curves.png

The script can be stopped and started again with the same `--output-root`: finished trainings (a folder with
`model_index.json`) and evaluations (`results.json`) are reused. `--results-from FILE` adds the rows of an earlier
run for the models the output root lacks (neither trained nor evaluated again): `benchmarks/results/table1_digits.json`
holds the rows of the table in `docs/benchmarks.md`, so that a partial rerun (another seed, one layout) reports the
whole table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import (  # noqa: E402
    DOCS_PATH,
    DigitsEvaluator,
    format_spread,
    generate_digits,
    interleaved,
    machine_description,
    recorded_command,
    spread,
    update_titled_section,
)
from diffusers_mar.cli import load_pipeline  # noqa: E402

SECTION = "Table 1 in miniature: causal AR, MAR and VAR on digits (benchmarks/eval_table1_digits.py)"
# The speed table has its own section: a report of saved results (`--report-only`, `--results-from`) without
# `--speed-repeats` leaves it as it is.
SPEED_SECTION = "Table 1 in miniature: sampling speed of the models on a quiet machine"
TRAININGS = {
    "ar-raster": ["--model_family=ar", "--order=raster"],
    "ar-random": ["--model_family=ar", "--order=random"],
    "ar-anneal": ["--model_family=ar", "--order=anneal", "--anneal_start=0.25", "--anneal_end=0.75"],
    "mar": ["--model_family=mar"],
    "var": ["--model_family=var"],
}
# The tokenizer of each layout (patch size): overrides of training/configs/vqvae-digits.json.
TOKENIZERS = {2: [], 1: ["--override=ch_mult=[1]", "--override=patch_nums=[1,2,4,6,8]"]}
VARIANTS = ["ar-raster", "ar-random", "ar-anneal", "mar-1-per-step", "mar-few", "var"]


def earlier_rows(path: Path | None, rows: list[dict]) -> list[dict]:
    """The rows of `path` (a results.json) for the (tokens, seed, trained model) that `rows` do not have."""
    if path is None:
        return []
    if not path.is_file():
        raise SystemExit(f"--results-from: no such file: {path}")
    have = {(row["tokens"], row["seed"], row["trained"]) for row in rows}
    return [row for row in json.loads(path.read_text()) if (row["tokens"], row["seed"], row["trained"]) not in have]


def run_logged(command: list[str], log: Path, threads: int) -> None:
    """Run a training command on `threads` threads, its output in `log`; a failure names the log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "w") as file:
        result = subprocess.run(command, env=env, stdout=file, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"{command[1]} failed (exit {result.returncode}); see {log}")


def train_tokenizer(patch_size: int, args: argparse.Namespace) -> Path:
    """VAR's tokenizer for one layout (trained once, seed 0, reused when its folder is complete)."""
    output_dir = Path(args.output_root) / f"p{patch_size}-vqvae"
    if (output_dir / "config.json").exists():
        return output_dir
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "train_vqvae.py"),
        "--dataset_name=digits",
        "--model_config=vqvae-digits",
        *TOKENIZERS[patch_size],
        f"--output_dir={output_dir}",
        "--overwrite_output_dir",
        "--train_batch_size=64",
        f"--max_train_steps={args.tokenizer_steps}",
        "--learning_rate=2e-3",
        "--lr_warmup_steps=50",
        "--restart_dead_codes_every=100",
        "--report_to=none",
        f"--checkpointing_steps={args.tokenizer_steps}",
        "--checkpoints_total_limit=1",
        "--seed=0",
    ]
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    run_logged(command, output_dir.parent / f"{output_dir.name}.log", args.threads)
    return output_dir


def train(name: str, patch_size: int, seed: int, args: argparse.Namespace) -> tuple[Path, float]:
    """One training run (reused when its folder is complete); its folder and seconds."""
    output_dir = Path(args.output_root) / f"p{patch_size}-s{seed}-{name}"
    seconds_file = output_dir / "train_seconds.txt"
    if (output_dir / "model_index.json").exists() and seconds_file.exists():
        return output_dir, float(seconds_file.read_text())
    family = TRAININGS[name]
    if name == "var":
        # 7 blocks instead of var-digits' 4: about the parameters of AR and MAR with their head (550K)
        family = [
            *family,
            f"--pretrained_vqvae={train_tokenizer(patch_size, args)}",
            "--override=transformer.num_layers=7",
        ]
    else:
        family = [
            *family,
            f"--override=transformer.patch_size={patch_size}",
            f"--diffusion_batch_mul={args.diffusion_batch_mul}",
        ]
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "train_mar.py"),
        "--dataset_name=digits",
        f"--output_dir={output_dir}",
        "--overwrite_output_dir",
        *family,
        f"--train_batch_size={args.batch_size}",
        f"--max_train_steps={args.steps}",
        "--learning_rate=1e-3",
        f"--lr_warmup_steps={max(1, args.steps // 10)}",
        "--ema_decay=0.999",
        "--ema_warmup",
        f"--validation_fraction={args.validation_fraction}",
        f"--validation_steps={max(1, args.steps // args.validation_points)}",
        f"--seed={seed}",
        "--report_to=none",
        "--sample_steps=0",
        "--num_sample_images=1",
        f"--checkpointing_steps={args.steps}",
        "--checkpoints_total_limit=1",
    ]
    if name != "var":
        command.append("--sample_num_diffusion_steps=2")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run_logged(command, output_dir.parent / f"{output_dir.name}.log", args.threads)
    seconds = time.perf_counter() - start
    seconds_file.write_text(f"{seconds:.1f}")
    return output_dir, seconds


def samplers(name: str, num_tokens: int) -> dict[str, dict]:
    """The sampling settings of each table row a trained folder gives."""
    if name == "mar":
        few = max(1, num_tokens // 4)  # the paper's ratio: 64 steps for 256 tokens
        return {"mar-1-per-step": {"num_inference_steps": num_tokens}, "mar-few": {"num_inference_steps": few}}
    if name == "var":
        return {"var": {}}
    # AR raster and AR anneal (trained to end on raster) sample in raster order, AR random in random orders.
    return {name: {"order": "random" if name == "ar-random" else "raster"}}


def folder_samplers(name: str, pipe, num_diffusion_steps: int) -> dict[str, dict]:
    """`samplers` for a loaded folder: AR and MAR rows also get the diffusion head's step count (VAR has no head)."""
    if name == "var":
        return samplers(name, 0)
    rows = samplers(name, pipe.transformer.num_tokens)
    return {label: {**sampling, "num_diffusion_steps": num_diffusion_steps} for label, sampling in rows.items()}


def evaluate(folder: Path, name: str, evaluator: DigitsEvaluator, args: argparse.Namespace) -> list[dict]:
    pipe = load_pipeline(str(folder))  # the class its model_index.json names
    pipe.set_progress_bar_config(disable=True)
    networks = [pipe.transformer, getattr(pipe, "diffusion_head", None)]
    parameters = sum(p.numel() for m in networks if m is not None for p in m.parameters())
    curve = json.loads((folder / "validation_loss.json").read_text())
    results = []
    for label, sampling in folder_samplers(name, pipe, args.num_diffusion_steps).items():
        for guidance in args.guidance_scales:
            images, labels, seconds = generate_digits(
                pipe, args.num_per_class, seed=0, guidance_scale=guidance, **sampling
            )
            metrics = evaluator.evaluate(images, labels)
            results.append(
                {
                    "variant": label,
                    "guidance": guidance,
                    "seconds": seconds,
                    "images_per_second": len(labels) / seconds,
                    "parameters": parameters,
                    "validation_loss": curve[-1]["loss"],
                    "best_validation_loss": min(entry["loss"] for entry in curve),
                    "best_step": min(curve, key=lambda entry: entry["loss"])["step"],
                }
                | {k: v for k, v in metrics.items() if not k.endswith("per_class")}
            )
            print(json.dumps(results[-1]), flush=True)
    return results


def measure_speed(root: Path, patch_sizes: list[int], seed: int, args: argparse.Namespace) -> dict[tuple, dict]:
    """Sampling speed on a quiet machine, apart from the quality runs (which share the CPU with trainings): each
    variant's model of training seed `seed` makes the same 100 digits (guidance 1.5) in `--speed-repeats` rounds,
    interleaved across the variants; `{(tokens, variant): spread of img/s}`."""
    calls = {}
    for patch_size in patch_sizes:
        for name in TRAININGS:
            folder = root / f"p{patch_size}-s{seed}-{name}"
            if not (folder / "model_index.json").exists():
                continue
            pipe = load_pipeline(str(folder))
            pipe.set_progress_bar_config(disable=True)
            tokens = (8 // patch_size) ** 2
            for label, sampling in folder_samplers(name, pipe, args.num_diffusion_steps).items():
                labels = [i % 10 for i in range(100)]

                def call(pipe=pipe, sampling=sampling, labels=labels):
                    generator = torch.Generator().manual_seed(0)
                    return pipe(labels, generator=generator, guidance_scale=1.5, output_type="np", **sampling)

                calls[(tokens, label)] = call
    for call in calls.values():  # warm-up
        call()
    rates: dict[tuple, list[float]] = {key: [] for key in calls}
    for round_ in interleaved(calls, args.speed_repeats):
        for key, (totals, _) in round_.items():
            rates[key].append(100 / totals["total"])
    return {key: spread(values) for key, values in rates.items()}


def summary(rows: list[dict]) -> list[dict]:
    """One line per (tokens, variant, guidance): mean and min-max over the training seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["tokens"], VARIANTS.index(row["variant"]), row["guidance"]), []).append(row)
    lines = []
    for (tokens, _, guidance), group in sorted(groups.items()):
        line = {"tokens": tokens, "variant": group[0]["variant"], "guidance": guidance, "seeds": len(group)}
        for key in ("accuracy", "frechet_distance", "diversity_ratio", "images_per_second", "validation_loss"):
            values = [row[key] for row in group]
            line[key] = (float(np.mean(values)), min(values), max(values))
        line["parameters"] = group[0]["parameters"]
        line["train_seconds"] = float(np.mean([row["train_seconds"] for row in group]))
        lines.append(line)
    return lines


def format_stat(stat: tuple[float, float, float], digits: int = 3) -> str:
    mean, low, high = stat
    return f"{mean:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def report(rows: list[dict], args: argparse.Namespace, argv: list[str] | None, evaluator: DigitsEvaluator) -> str:
    lines = [
        f"Machine: {machine_description(threads=args.threads)}. Each model: {args.steps} steps, batch "
        f"{args.batch_size}, lr 1e-3 (warm-up {max(1, args.steps // 10)} steps), EMA 0.999 with warm-up, "
        f"`diffusion_batch_mul` {args.diffusion_batch_mul} (AR, MAR), {args.validation_fraction:.0%} of the digits "
        f"held out for the validation loss; training seeds {args.seeds}. Sampling: {args.num_per_class} images per "
        f"digit, {args.num_diffusion_steps} diffusion steps (AR, MAR), sampling seed 0, one thread; img/s (shared) is "
        f"timed beside the trainings, the speed table below on a quiet machine. Fréchet floor (real vs real) "
        f"{evaluator.frechet_floor:.3f}. Each cell: mean over the seeds (min-max).",
        "",
        f"Command: `{recorded_command(__file__, argv)}`",
        "",
        "| tokens | variant | seeds | parameters | guidance | accuracy | Fréchet | diversity | img/s (shared) | "
        "final val. loss | train s |",
        "|---:|---|---:|---:|---:|---|---|---|---|---|---:|",
    ]
    for line in summary(rows):
        lines.append(
            f"| {line['tokens']} | {line['variant']} | {line['seeds']} | {line['parameters']:,} | "
            f"{line['guidance']:g} | {format_stat(line['accuracy'])} | {format_stat(line['frechet_distance'])} | "
            f"{format_stat(line['diversity_ratio'])} | {format_stat(line['images_per_second'], 0)} | "
            f"{format_stat(line['validation_loss'])} | {line['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def speed_table(speeds: dict[tuple, dict], args: argparse.Namespace) -> str:
    lines = [
        f"Sampling speed on a quiet machine (one thread, the models of training seed {args.seeds[0]}, 100 digits at "
        f"guidance 1.5, {args.speed_repeats} interleaved rounds after a warm-up, median (min-max)):",
        "",
        "| tokens | variant | img/s |",
        "|---:|---|---|",
    ]
    for (tokens, variant), stats in sorted(speeds.items(), key=lambda item: (item[0][0], VARIANTS.index(item[0][1]))):
        lines.append(f"| {tokens} | {variant} | {format_spread(stats, 0)} |")
    return "\n".join(lines) + "\n"


def draw_curves(root: Path, patch_sizes: list[int], seeds: list[int], path: Path) -> None:
    """The validation curves: a panel per (layout, trained model), one line per seed, each panel on its own scale
    (the families' losses differ: diffusion loss for AR and MAR, cross-entropy for VAR)."""
    from PIL import Image, ImageDraw

    width, height, margin = 220, 150, 30
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    canvas = Image.new("RGB", (width * len(TRAININGS), (height + margin) * len(patch_sizes)), "white")
    draw = ImageDraw.Draw(canvas)
    for row, patch_size in enumerate(patch_sizes):
        for column, name in enumerate(TRAININGS):
            left, top = column * width, row * (height + margin)
            curves = []
            for seed in seeds:
                folder = root / f"p{patch_size}-s{seed}-{name}"
                file = folder / "validation_loss.json"
                if file.exists() and (folder / "model_index.json").exists():  # finished runs only
                    curves.append(json.loads(file.read_text()))
            draw.text((left + 5, top + 2), f"{(8 // patch_size) ** 2} tokens, {name}", fill="black")
            if not curves:
                continue
            losses = [entry["loss"] for curve in curves for entry in curve]
            steps = [entry["step"] for curve in curves for entry in curve]
            low, high, last = min(losses), max(losses), max(steps)
            box = (left + 35, top + 18, left + width - 8, top + height - 5)
            draw.rectangle(box, outline=(180, 180, 180))
            draw.text((left + 2, box[1]), f"{high:.2f}", fill="black")
            draw.text((left + 2, box[3] - 10), f"{low:.2f}", fill="black")
            draw.text((box[2] - 40, box[3] + 2), f"{last} steps", fill="black")

            def point(entry, box=box, low=low, high=high, last=last):
                x = box[0] + (box[2] - box[0]) * entry["step"] / last
                y = box[3] - (box[3] - box[1]) * (entry["loss"] - low) / max(high - low, 1e-12)
                return x, y

            for index, curve in enumerate(curves):
                draw.line([point(entry) for entry in curve], fill=colours[index % len(colours)], width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", default="table1-digits", help="folder for the trained pipelines")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[2, 1], choices=[1, 2])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(TRAININGS), choices=list(TRAININGS))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--tokenizer-steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--diffusion-batch-mul", type=int, default=2)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--validation-points", type=int, default=20, help="validation losses per run")
    parser.add_argument("--num-per-class", type=int, default=30)
    parser.add_argument("--num-diffusion-steps", type=int, default=50)
    parser.add_argument("--guidance-scales", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--threads", type=int, default=1, help="threads of each training and of the evaluation")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (the evaluation runs beside them)")
    parser.add_argument("--curves", help="write the validation curves to this PNG")
    parser.add_argument(
        "--speed-repeats", type=int, default=0, help="then time sampling on a quiet machine in N interleaved rounds"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="train and evaluate nothing: report the results.json there is"
    )
    parser.add_argument(
        "--results-from",
        type=Path,
        help="rows of an earlier run (its results.json, e.g. benchmarks/results/table1_digits.json) for the models "
        "the output root has not evaluated: they are not trained again, and they are reported",
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    for flag in ("steps", "tokenizer_steps", "batch_size", "num_per_class", "jobs", "threads", "validation_points"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 < args.validation_fraction <= 0.5:
        parser.error("--validation-fraction must be in (0, 0.5]")
    torch.set_num_threads(args.threads)
    root = Path(args.output_root)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    rows += earlier_rows(args.results_from, rows)
    done = {(row["tokens"], row["seed"], row["trained"]) for row in rows}
    evaluator = DigitsEvaluator()

    runs = [(p, s, name) for p in args.patch_sizes for s in args.seeds for name in args.variants]
    runs = [run for run in runs if ((8 // run[0]) ** 2, run[1], run[2]) not in done and not args.report_only]
    for patch_size in {p for p, _, name in runs if name == "var"}:  # before the VAR runs that need it
        train_tokenizer(patch_size, args)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train, name, p, s, args): (p, s, name) for p, s, name in runs}
        for future in concurrent.futures.as_completed(futures):
            patch_size, seed, name = futures[future]
            folder, seconds = future.result()
            for result in evaluate(folder, name, evaluator, args):
                tokens = (8 // patch_size) ** 2
                rows.append({"tokens": tokens, "seed": seed, "trained": name, "train_seconds": seconds, **result})
            results_path.write_text(json.dumps(rows, indent=1, default=str))  # after each model: resumable

    text, speed_text = report(rows, args, argv, evaluator), None
    if args.speed_repeats:
        speeds = measure_speed(root, args.patch_sizes, args.seeds[0], args)
        (root / "speed.json").write_text(json.dumps({f"{k[0]} {k[1]}": v for k, v in speeds.items()}, indent=1))
        speed_text = f"Machine: {machine_description(threads=1)}. Command: `{recorded_command(__file__, argv)}`\n\n"
        speed_text += speed_table(speeds, args)
    print(text + (f"\n{speed_text}" if speed_text else ""))
    if args.curves:
        draw_curves(root, args.patch_sizes, args.seeds, Path(args.curves))
    if args.write_docs:
        update_titled_section(DOCS_PATH, SECTION, text)
        if speed_text:
            update_titled_section(DOCS_PATH, SPEED_SECTION, speed_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
