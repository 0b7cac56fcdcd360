"""Speed of `MARPipeline`'s sampling presets against its exact default, on a full-size MAR or a pipeline folder.

Quality is measured on the digits models (`benchmarks/eval_fast_orders_digits.py`); this script measures what the presets
buy on a model of the paper's size: images/s of each setting, and where the time goes (transformer, head and the
rest), in one process with the same weights. The settings alternate (exact, preset, exact, preset, ...) for
`--repeats` rounds, each call timed alone; a first call of every non-exact setting warms up PyTorch's per-shape
kernels and is not timed (the exact default's first-call costs are a small share of its minutes). Reported: median
(min-max) over the rounds, and the speed-up of each round's pair.

`--model` is a preset (`mar-base`, ...: random weights; `ar-base`, ...: a causal AR `ARPipeline` with random weights,
settings `exact` and `exact+int8` only) or a pipeline folder (`shipped`: the digits model inside the package);
`exact` is the folder's recommended settings, for a MAR preset the paper's 64 x 100 steps, DDPM, for an AR preset one
token per step with 100 head steps. Usage (from the repository root):

    python benchmarks/bench_fast_sampling.py --model mar-base --batch-size 8 --repeats 3 --settings exact fast
    python benchmarks/bench_fast_sampling.py --model shipped --batch-size 100 --threads 1 --repeats 5
    python benchmarks/bench_fast_sampling.py --model mar-base --batch-size 1 --settings fast fast+int8
    python benchmarks/bench_fast_sampling.py --model ar-base --batch-size 1 --settings exact exact+int8 \
        --num-diffusion-steps 25

A setting with `+int8` runs on a copy of the pipeline with its linear layers quantized to dynamic int8
(`diffusers_mar.quantization`), the same weights before quantization.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmarking_utils import (  # noqa: E402
    AR_PRESET_MODELS,
    PRESET_MODELS,
    check_preset_or_folder,
    format_spread,
    interleaved,
    load_preset_or_folder,
    machine_description,
    recorded_command,
    section_markers,
    spread,
    timed_pipelines,
    write_outputs,
)
from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS  # noqa: E402

INT8_SUFFIX = "+int8"  # a setting run on a copy of the pipeline quantized with `diffusers_mar.quantization`


def setting_arguments(name: str, sampling_defaults: dict, guidance_scale: float | None) -> dict:
    """`pipe(...)` arguments of a setting: `exact` (the pipeline's sampling defaults, the paper's for a folder without
    stored ones) or a `sampling_preset` name, both at `guidance_scale` (None: the pipeline's); a `+int8` suffix
    (run on the int8 copy) does not change them."""
    name = name.removesuffix(INT8_SUFFIX)
    guidance = {} if guidance_scale is None else {"guidance_scale": guidance_scale}
    if name == "exact":
        return {**sampling_defaults, **guidance}
    return {**guidance, "sampling_preset": name}


def split_seconds(totals: dict[str, float], num_images: int) -> dict:
    """A timed call's `Timer` totals -> its seconds, img/s and the transformer / head / rest split."""
    transformer, head = totals.get("transformer", 0.0), totals.get("head", 0.0)
    return {
        "seconds": totals["total"],
        "images_per_second": num_images / totals["total"],
        "transformer_seconds": transformer,
        "head_seconds": head,
        "rest_seconds": totals["total"] - transformer - head,
    }


def run(args: argparse.Namespace, pipe) -> list[dict]:
    # `+int8` settings run on a quantized copy with the same weights; one timer sees both pipelines' sections.
    pipes, timer = timed_pipelines(pipe, any(name.endswith(INT8_SUFFIX) for name in args.settings))
    labels = [i % pipe.transformer.config.num_classes for i in range(args.batch_size)]
    for name in args.settings:
        if name.removesuffix(INT8_SUFFIX) != "exact":
            arguments = setting_arguments(name, pipe.sampling_defaults, args.guidance_scale)
            pipes[name.endswith(INT8_SUFFIX)](labels, output_type="latent", **arguments)
    calls = {}  # the warm-up calls above are not timed
    for name in args.settings:
        arguments = setting_arguments(name, pipe.sampling_defaults, args.guidance_scale)
        setting_pipe = pipes[name.endswith(INT8_SUFFIX)]
        calls[name] = lambda arguments=arguments, each=setting_pipe: each(
            labels, generator=torch.Generator().manual_seed(0), output_type="latent", **arguments
        )
    rounds = []
    for repeat, timed in enumerate(interleaved(calls, args.repeats, timer)):
        result = {name: split_seconds(totals, len(labels)) for name, (totals, _) in timed.items()}
        for name in args.settings:
            print(json.dumps({"round": repeat, name: result[name]}), flush=True)
        rounds.append(result)
    return rounds


def summarise(args: argparse.Namespace, rounds: list[dict], sampling_defaults: dict) -> list[dict]:
    rows = []
    baseline = args.settings[0]
    for name in args.settings:
        row = {"setting": name, "arguments": setting_arguments(name, sampling_defaults, args.guidance_scale)}
        for key in ("images_per_second", "transformer_seconds", "head_seconds", "rest_seconds"):
            row[key] = spread([r[name][key] for r in rounds])
        row["speedup"] = spread([r[name]["images_per_second"] / r[baseline]["images_per_second"] for r in rounds])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | arguments | img/s | speed-up | transformer / head / rest (s, median) |",
        "|---|---|---:|---:|---|",
    ]
    for row in rows:
        ips, speedup = row["images_per_second"], row["speedup"]
        arguments = ", ".join(f"{k}={v!r}" for k, v in row["arguments"].items())
        split = " / ".join(f"{row[k]['median']:.1f}" for k in ("transformer_seconds", "head_seconds", "rest_seconds"))
        lines.append(
            f"| {row['setting']} | `{arguments}` | {format_spread(ips, 4)} | {format_spread(speedup, 2)}x | {split} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="mar-base", help=f"one of {PRESET_MODELS + AR_PRESET_MODELS}, `shipped` or a folder"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guidance-scale", type=float, help="default: 3.0 for a preset, the folder's otherwise")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["exact", "fast"],
        help="`exact` and preset names; `NAME+int8`: that setting on the pipeline quantized to int8 (CPU).",
    )
    parser.add_argument(
        "--num-diffusion-steps",
        type=int,
        help="head steps of the `exact` setting (default: the pipeline's; the presets keep their own)",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--write-docs", action="store_true", help="Update the section in docs/benchmarks.md.")
    args = parser.parse_args(argv)
    bases = ("exact", *SAMPLING_PRESETS)
    unknown = [name for name in args.settings if name.removesuffix(INT8_SUFFIX) not in bases]
    if unknown:
        parser.error(
            f"--settings must be `exact` or among {sorted(SAMPLING_PRESETS)}, each optionally with `{INT8_SUFFIX}` "
            f"(the pipeline quantized to int8, CPU); got {unknown}"
        )
    if min(args.batch_size, args.repeats, 1 if args.num_diffusion_steps is None else args.num_diffusion_steps) < 1:
        parser.error("--batch-size, --repeats and --num-diffusion-steps must be >= 1")
    check_preset_or_folder(parser, args.model, ar=True)
    if args.model in AR_PRESET_MODELS and {name.removesuffix(INT8_SUFFIX) for name in args.settings} != {"exact"}:
        parser.error(f"--settings for an AR preset: `exact` and `exact{INT8_SUFFIX}` (its pipeline has no presets)")
    if args.guidance_scale is None and args.model in PRESET_MODELS:
        args.guidance_scale = 3.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_preset_or_folder(args.model)
    if args.num_diffusion_steps:
        pipe.set_sampling_defaults(num_diffusion_steps=args.num_diffusion_steps)
    rows = summarise(args, run(args, pipe), pipe.sampling_defaults)
    machine = machine_description()
    command = recorded_command(__file__, argv)
    section = (
        f"## {'Causal AR sampling' if args.model in AR_PRESET_MODELS else 'Sampling presets'} on {args.model}, batch "
        f"{args.batch_size} (benchmarks/bench_fast_sampling.py)\n\nMachine: {machine}. Batch "
        f"{args.batch_size}, {'random weights' if args.model in PRESET_MODELS + AR_PRESET_MODELS else 'trained weights'}, {args.repeats} rounds (settings alternating in one process), median "
        f"(min-max); speed-up against `{args.settings[0]}` per round. Command: `{command}` "
        f"({time.perf_counter() - start:.0f} s in all).\n\n{table(rows)}\n"
    )
    markers = section_markers(f"bench_fast_sampling {args.model} batch {args.batch_size}")
    write_outputs(args, section, {"rows": rows, "machine": machine}, markers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
