"""Generation orders, step schedules and caches (issue 17) on a digits MAR: images/s against quality, and where the
time goes.

The reference is the exact default: the folder's recommended settings with `MARDDPMScheduler` (for a 64-token
model: 64 outer steps x 100 head steps). Each candidate is a comma-separated list of `KEY=VALUE`:

- `steps` (`num_inference_steps`), `diffusion` (`num_diffusion_steps`: an int or a named schedule such as
  `linear-25-5`), `order` (`random`, `raster`, `checkerboard`), `outer` (`outer_schedule`: `cosine`, `skeleton`),
  `gcache` / `fcache` (`guidance_cache_interval` / `feature_cache_interval`), `preset` (`sampling_preset`),
  `scheduler` (`ddpm`, `ddim`, `dpm` = DPM-Solver++, optionally `-SPACING`, e.g. `-leading`: the head's scheduler,
  built from the folder's scheduler config), `guidance` (`guidance_scale`), `dtype` (`float32`, the default, or
  `int8`: the setting runs on a copy of the pipeline quantized with `diffusers_mar.quantization.quantize_int8`).

e.g. `steps=8,diffusion=linear-25-5,order=checkerboard,outer=skeleton`. Every setting generates `--num-per-class`
images of each digit for each seed in `--seeds` (in batches of `--batch-size`), interleaved: each seed runs every
setting in turn. Quality: `benchmarks/eval_digits.py`'s `DigitsEvaluator` (means over the seeds). Speed: img/s of
each batch, median and min-max over all batches of all seeds. Time split: the transformer's forward, the diffusion
head (modulation + forward), the rest (scheduler steps, guidance arithmetic, orders, decoding), summed over the run.

A setting *keeps the quality* when its accuracy is at most `--max-accuracy-drop` (0.01) below the reference's and
its Fréchet distance at most `--max-frechet-increase` (10%) above it; with `--min-speedup X` it must also have at
least X times the reference's img/s (median), and the table calls it a *fast setting*. For example, the first
search for a fast setting of the shipped model (docs/benchmarks.md, "Fast setting (the first search)"):

    python benchmarks/eval_fast_orders_digits.py --min-speedup 3 --batch-size 1000 \
        --candidates scheduler=dpm-leading,diffusion=15,steps=8 scheduler=ddim-leading,diffusion=25,steps=16

    python benchmarks/eval_fast_orders_digits.py --model path/to/digits64 --write-docs --grid docs/images/grid.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python benchmarks/<script>.py` from the repository root imports `benchmarks`

from benchmarks.benchmarking_utils import (  # noqa: E402
    NUM_CLASSES,
    SCHEDULERS,
    TIMESTEP_SPACINGS,
    DigitsEvaluator,
    Timer,
    add_common_arguments,
    check_common_arguments,
    head_scheduler,
    load_digits_pipeline,
    machine_description,
    public_argv,
    quality_misses,
    recorded_command,
    reports_cli_errors,
    timed_pipelines,
    to_digit_scale,
    write_outputs,
)
from diffusers_mar import DEFAULT_MODEL  # noqa: E402

DEFAULT_SECTION = "Orders, step schedules and caches (benchmarks/eval_fast_orders_digits.py)"
KEYS = {
    "steps": "num_inference_steps",
    "diffusion": "num_diffusion_steps",
    "order": "order",
    "outer": "outer_schedule",
    "gcache": "guidance_cache_interval",
    "fcache": "feature_cache_interval",
    "preset": "sampling_preset",
    "guidance": "guidance_scale",
    "scheduler": "scheduler",
    "dtype": "dtype",
}
DTYPES = ("float32", "int8")
INT_KEYS = ("steps", "gcache", "fcache")
METRICS = ("accuracy", "frechet_distance", "frechet_ratio", "diversity_ratio", "near_copy_fraction")


def parse_candidate(text: str) -> dict:
    """`KEY=VALUE,...` -> `{"name": text, "arguments": {...}, "scheduler": (name, spacing), "int8": bool}`
    (ValueError if bad)."""
    arguments, scheduler, int8 = {}, ("ddpm", None), False
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in KEYS:
            raise ValueError(f"a candidate is KEY=VALUE,... with KEY in {tuple(KEYS)}; got {item!r} in {text!r}")
        if key == "scheduler":
            name, _, spacing = value.partition("-")
            if name not in SCHEDULERS or (spacing and spacing not in TIMESTEP_SPACINGS):
                raise ValueError(
                    f"scheduler must be one of {SCHEDULERS}, optionally -SPACING with SPACING in {TIMESTEP_SPACINGS}; "
                    f"got {value!r}"
                )
            scheduler = (name, spacing or None)
        elif key == "dtype":
            if value not in DTYPES:
                raise ValueError(f"dtype must be one of {DTYPES}; got {value!r}")
            int8 = value == "int8"
        elif key in INT_KEYS or (key == "diffusion" and value.isdigit()):
            arguments[KEYS[key]] = int(value)
        elif key == "guidance":
            arguments[KEYS[key]] = float(value)
        else:
            arguments[KEYS[key]] = value
    return {"name": text or "default", "arguments": arguments, "scheduler": scheduler, "int8": int8}


def run_setting(pipe, base_config, timer: Timer, setting: dict, seed: int, args) -> dict:
    pipe.scheduler = head_scheduler(base_config, *setting["scheduler"])
    labels = np.repeat(np.arange(NUM_CLASSES), args.num_per_class)
    generator = torch.Generator().manual_seed(seed)
    images, batch_rates, total = [], [], 0.0
    split = {"transformer": 0.0, "head": 0.0}
    for first in range(0, len(labels), args.batch_size):
        batch = labels[first : first + args.batch_size].tolist()
        totals, out = timer.time(  # the folder's defaults where the setting says nothing
            lambda batch=batch: pipe(batch, generator=generator, output_type="np", **setting["arguments"]).images
        )
        images.append(out)
        batch_rates.append(len(batch) / totals["total"])
        total += totals["total"]
        for key in split:
            split[key] += totals.get(key, 0.0)
    split["other"] = total - split["transformer"] - split["head"]
    return {"images": np.concatenate(images), "labels": labels, "rates": batch_rates, "seconds": total, "split": split}


def summarize(setting: dict, runs: list[dict], evaluator: DigitsEvaluator) -> dict:
    scores = [evaluator.evaluate(to_digit_scale(run["images"]), run["labels"]) for run in runs]
    rates = [rate for run in runs for rate in run["rates"]]
    seconds = sum(run["seconds"] for run in runs)
    split = {key: sum(run["split"][key] for run in runs) / seconds for key in ("transformer", "head", "other")}
    return {
        "name": setting["name"],
        "arguments": setting["arguments"],
        "scheduler": "-".join(filter(None, setting["scheduler"])),
        **{key: float(np.mean([score[key] for score in scores])) for key in METRICS},
        "images_per_second": float(np.median(rates)),
        "images_per_second_min": float(min(rates)),
        "images_per_second_max": float(max(rates)),
        "num_batches": len(rates),
        "seconds": seconds,
        "split": split,
    }


def markdown_report(reference: dict, results: list[dict], context: dict, args) -> str:
    lines = [
        f"Model: `{context['model']}` ({context['num_tokens']} tokens). Machine: {context['machine']}.",
        "",
        f"Command: `{context['command']}`",
        "",
        f"Reference: the exact default, {context['reference']}. Guidance and temperature are the folder's unless a "
        f"row says otherwise; {args.num_per_class} images per digit and seed, seeds {', '.join(map(str, args.seeds))}"
        f", batches of {args.batch_size}, settings interleaved per seed. Metrics are means over the seeds; img/s is the"
        f" median over all batches (min-max). Fréchet floor (real vs real) {context['frechet_floor']:.3f}. Time split:"
        " share of the wall time in the transformer, the diffusion head and the rest. Quality kept: accuracy at most "
        f"{args.max_accuracy_drop:g} below the reference's, Fréchet at most {args.max_frechet_increase:.0%} above"
        + (f"; a fast setting also needs >= {args.min_speedup:g}x its img/s." if args.min_speedup else "."),
        "",
        "| setting | head scheduler | img/s (min-max) | speed-up | accuracy | Fréchet (x floor) | diversity | "
        f"transformer / head / other | {'fast setting' if args.min_speedup else 'quality kept'}? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [reference, *results]:
        verdict = "reference" if r is reference else ("**yes**" if r["kept"] else "no: " + ", ".join(r["misses"]))
        split = " / ".join(f"{r['split'][key]:.0%}" for key in ("transformer", "head", "other"))
        lines.append(
            f"| `{r['name']}` | {r['scheduler']} | {r['images_per_second']:.1f} ({r['images_per_second_min']:.1f}-"
            f"{r['images_per_second_max']:.1f}) | {r['images_per_second'] / reference['images_per_second']:.1f}x "
            f"| {r['accuracy']:.3f} | {r['frechet_distance']:.3f} ({r['frechet_ratio']:.2f}x) "
            f"| {r['diversity_ratio']:.3f} | {split} | {verdict} |"
        )
    return "\n".join(lines)


def save_grid(path: str, runs: dict[str, dict]) -> None:
    """One panel per setting (10 rows = digits, 10 columns, 1-pixel gaps), side by side with a white 3-pixel gap,
    4x upscaled."""
    panels = []
    for run in runs.values():
        images = run["images"].mean(axis=-1) if run["images"].ndim == 4 else run["images"]  # (N, H, W)
        images = np.pad(images, ((0, 0), (0, 1), (0, 1)))  # a black gap after each digit
        rows = [np.concatenate(list(images[np.flatnonzero(run["labels"] == d)[:10]]), axis=1) for d in range(10)]
        panels.append(np.concatenate(rows, axis=0))
    gap = np.ones((panels[0].shape[0], 3))
    grid = np.concatenate([part for panel in panels for part in (panel, gap)][:-1], axis=1)
    image = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULT_SECTION)
    parser.set_defaults(batch_size=100)
    parser.add_argument("--candidates", nargs="+", required=True, help="see the docstring")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="generation seeds (default 0 1)")
    parser.add_argument("--max-accuracy-drop", type=float, default=0.01)
    parser.add_argument("--max-frechet-increase", type=float, default=0.10)
    parser.add_argument("--min-speedup", type=float, help="also require this many times the reference's img/s")
    parser.add_argument("--grid", help="save the reference's and the --grid-setting's digits side by side here")
    parser.add_argument("--grid-setting", help="the candidate shown next to the reference (default: the last)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    try:
        args.settings = [parse_candidate(text) for text in args.candidates]
    except ValueError as error:
        parser.error(f"argument --candidates: {error}")
    if args.min_speedup is not None and args.min_speedup <= 0:
        parser.error(f"argument --min-speedup: must be > 0; got {args.min_speedup}")
    if args.grid_setting is not None and args.grid_setting not in args.candidates:
        parser.error("argument --grid-setting: must be one of --candidates")
    return args


@reports_cli_errors("eval_fast_orders_digits")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_digits_pipeline(args.model)
    base_config = pipe.scheduler.config
    sampling = pipe.sampling_defaults
    reference = {"name": "default", "arguments": {}, "scheduler": ("ddpm", None), "int8": False}
    settings = [reference, *args.settings]
    # `dtype=int8` settings run on a quantized copy (the same weights before quantization); one timer for both.
    pipes, timer = timed_pipelines(pipe, any(setting["int8"] for setting in settings))
    evaluator = DigitsEvaluator()
    runs = {setting["name"]: [] for setting in settings}
    for seed in args.seeds:  # interleaved: each seed runs every setting in turn
        for setting in settings:
            try:
                setting_pipe = pipes[setting["int8"]]
                runs[setting["name"]].append(run_setting(setting_pipe, base_config, timer, setting, seed, args))
            except ValueError as error:  # the pipeline's check of the arguments (e.g. more steps than tokens)
                print(f"eval_fast_orders_digits: error: {setting['name']}: {error}", file=sys.stderr)
                return 2
            print(f"seed {seed} {setting['name']}: {runs[setting['name']][-1]['seconds']:.1f} s", file=sys.stderr)
    results = [summarize(setting, runs[setting["name"]], evaluator) for setting in settings]
    reference_result = results[0]
    for result in results[1:]:
        result["misses"] = []
        if args.min_speedup and result["images_per_second"] < args.min_speedup * reference_result["images_per_second"]:
            result["misses"].append("speed")
        result["misses"] += quality_misses(result, reference_result, args.max_accuracy_drop, args.max_frechet_increase)
        result["kept"] = not result["misses"]
    context = {
        "model": public_argv([args.model])[0] if args.model != DEFAULT_MODEL else "diffusers_mar.DEFAULT_MODEL",
        "num_tokens": pipe.transformer.num_tokens,
        "machine": machine_description(threads=args.threads),
        "command": recorded_command(__file__, argv),
        "reference": (
            f"MARDDPMScheduler, {sampling.get('num_inference_steps', 'one token per')} outer x "
            f"{sampling['num_diffusion_steps']} head steps, guidance {sampling['guidance_scale']:g} ({sampling['guidance_schedule']}), temperature "
            f"{sampling['temperature']:g}"
        ),
        "frechet_floor": evaluator.frechet_floor,
    }
    if args.grid:
        shown = args.grid_setting or args.settings[-1]["name"]
        save_grid(args.grid, {"default": runs["default"][0], shown: runs[shown][0]})
    report = markdown_report(reference_result, results[1:], context, args)
    write_outputs(args, report, {**context, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
