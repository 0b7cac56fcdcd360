"""Sampling speed and memory: diffusers-mar `MARPipeline` against the official LTH14/mar `sample_tokens`.

Both run the same weights (a random initialisation of a preset in the original layout, converted with our converter)
and the same settings, side by side in one run; each measurement runs in a fresh subprocess so that peak memory is its
own. Each process makes the same call twice: peak memory is measured on the first call and time on the second, so
one-off costs (oneDNN generates kernels per matrix shape on first use, allocator growth, CUDA kernel loading) are
left out for both; `--no-warmup` times the first call. `--harness in-process` runs both in this one process instead
(a long-lived process: a warm-up call each, then the order alternating round by round). Reports images/s, peak
memory, the ratio, and where the time goes (encoder, decoder, diffusion head + scheduler).

    pip install timm==0.9.12 --no-deps      # the official code's only extra dependency (torchvision is stubbed)
    python benchmarks/bench_sampling.py --original-repo /path/to/LTH14/mar [--model mar-base] [--write-docs]

Without `--original-repo` only ours is timed. Defaults: CPU float32, batch 1 and 8, 16 x 25 steps, guidance 3.0;
on CUDA also batch 64 and 64 x 100 steps (`--dtype bfloat16` for mixed precision). `--check-equal` replays the
official run's random draws through our pipeline and reports the largest relative difference of the tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import (  # noqa: E402
    ORIGINAL_FACTORIES,
    Timer,
    format_spread,
    load_ours,
    machine_description,
    make_original_weights,
    measure_memory,
    official_call,
    original_model,
    ours_cache_arguments,
    ours_call,
    recorded_command,
    section_markers,
    spawn_worker,
    spread,
    write_outputs,
)
from diffusers_mar.pipelines.sampling_settings import SAMPLING_PRESETS  # noqa: E402
from diffusers_mar.quantization import quantize_int8  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", type=Path, help="LTH14/mar checkout (commit fe470ac).")
    parser.add_argument("--model", default="mar-base", choices=sorted(ORIGINAL_FACTORIES))
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--num-inference-steps", type=int, nargs="+")
    parser.add_argument("--num-diffusion-steps", type=int, nargs="+")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "int8"],
        help="ours: the weights' dtype, or int8 (float32 with dynamic int8 linears, `diffusers_mar.quantization`, "
        "CPU); the official code runs float32 (bfloat16: under CUDA autocast, as its evaluation does).",
    )
    parser.add_argument(
        "--ours-preset",
        choices=sorted(SAMPLING_PRESETS),
        help="ours samples with this `sampling_preset` (its own steps); the official code with the steps given.",
    )
    for name, what in (("guidance", "the unconditional half of guidance"), ("feature", "the encoder's features")):
        parser.add_argument(
            f"--ours-{name}-cache-interval",
            type=int,
            help=f"ours reuses {what} for this many outer steps (`{name}_cache_interval`); the official code has none.",
        )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Runs of each implementation per setting, interleaved (official, ours, official, ...); the table gives "
        "the median and the spread (min-max), the speed-up that of the per-pair ratios.",
    )
    parser.add_argument(
        "--harness",
        default="fresh",
        choices=["fresh", "in-process"],
        help="fresh (default): every run in a fresh process, with its peak memory; in-process: both implementations "
        "in this one process, one untimed warm-up call each, then the rounds with the order alternating (no memory).",
    )
    parser.add_argument("--check-equal", action="store_true", help="Replay the official draws through ours.")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="Time the first call (default: each run makes the same call twice, memory measured on the first, time "
        "on the second, so that one-off costs such as oneDNN's per-shape kernel generation are not counted).",
    )
    parser.add_argument(
        "--profile-step", type=int, help="Profile outer step K of ours (first setting): the top operators."
    )
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--write-docs", action="store_true", help="Update the section in docs/benchmarks.md.")
    parser.add_argument("--worker", choices=["ours", "official", "check"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = args.device == "cuda"
    args.batch_sizes = args.batch_sizes or ([1, 8, 64] if on_gpu else [1, 8])
    args.num_inference_steps = args.num_inference_steps or ([16, 64] if on_gpu else [16])
    args.num_diffusion_steps = args.num_diffusion_steps or ([25, 100] if on_gpu else [25])
    if (args.worker in ("official", "check") or args.check_equal) and args.original_repo is None:
        parser.error("--check-equal and the official timings need --original-repo.")
    if args.dtype == "int8" and args.device != "cpu":
        parser.error("--dtype int8 runs on the CPU only; use --device cpu.")
    for name in ("guidance", "feature"):
        interval = getattr(args, f"ours_{name}_cache_interval")
        if interval is not None and interval < 1:
            parser.error(f"--ours-{name}-cache-interval must be >= 1")
    if args.harness == "in-process" and args.original_repo is None:
        parser.error("--harness in-process times ours against the official code: it needs --original-repo.")
    if args.harness == "in-process" and args.profile_step is not None:
        parser.error("--profile-step profiles a fresh process: use it with --harness fresh.")
    return args


def load_timed_ours(args: argparse.Namespace):
    """Ours in `--dtype` (int8: float32 weights, then `quantize_int8`)."""
    pipe = load_ours(args, args.device, torch.float32 if args.dtype == "int8" else getattr(torch, args.dtype))
    return quantize_int8(pipe) if args.dtype == "int8" else pipe


def load_timed_official(args: argparse.Namespace, diffusion_steps: int) -> torch.nn.Module:
    model = original_model(args, args.model, diffusion_steps)
    model.load_state_dict(load_file(str(args.weights)), strict=True)
    return model.to(args.device)


def run_ours(args: argparse.Namespace, batch_size: int, steps: int, diffusion_steps: int) -> dict:
    device = args.device
    pipe = load_timed_ours(args)
    timer = Timer(device)
    call = ours_call(args, pipe, timer, batch_size, steps, diffusion_steps)
    result = _timed_calls(args, device, timer, call)
    if args.dtype == "int8":  # the float32 weights freed by the quantization leave the resident set during the call
        result.update(peak_memory_mb=None, memory_kind="not comparable for int8")
    totals = dict(timer.totals)
    if args.profile_step is not None:  # one more call, not timed (its hooks still add to `timer`)
        profile = _OuterStepProfiler(pipe.transformer, args.profile_step, device)
        call()
        result["profile"] = profile.table()
    return _summarise(totals, batch_size, result)


def _timed_calls(args: argparse.Namespace, device: str, timer: Timer, call) -> dict:
    """Peak memory of the first call; wall time of the second one (of the first with `--no-warmup`)."""
    result: dict = {}
    with measure_memory(device, result):
        timer.time(call)
    if args.warmup:
        timer.time(call)
    return result


class _OuterStepProfiler:
    """Runs `torch.profiler` from the K-th transformer call to the next one: one outer step (transformer + head loop)."""

    def __init__(self, transformer: torch.nn.Module, step: int, device: str):
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.step, self.calls, self.running = step, 0, False
        transformer.register_forward_pre_hook(self._on_call)

    def _on_call(self, *args) -> None:
        if self.calls == self.step:
            self.profiler.__enter__()
            self.running = True
        elif self.running:
            self.profiler.__exit__(None, None, None)
            self.running = False
        self.calls += 1

    def table(self) -> str:
        if self.running:
            self.profiler.__exit__(None, None, None)
            self.running = False
        sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=sort_by, row_limit=12)


def run_official(args: argparse.Namespace, batch_size: int, steps: int, diffusion_steps: int) -> dict:
    device = args.device
    model = load_timed_official(args, diffusion_steps)
    timer = Timer(device)
    result = _timed_calls(args, device, timer, official_call(args, model, timer, batch_size, steps))
    return _summarise(_official_totals(timer.totals), batch_size, result)


def _official_totals(totals: dict[str, float]) -> dict[str, float]:
    return {**totals, "transformer": totals.get("encoder", 0.0) + totals.get("decoder", 0.0)}


def run_in_process(args: argparse.Namespace, batch_size: int, steps: int, diffusion_steps: int) -> dict:
    """Both implementations in this one process (`--harness in-process`): one untimed warm-up call each (none with
    `--no-warmup`), then `--repeats` rounds, the official code first in even rounds and ours first in odd ones, so
    that each follows itself and the other alike. `{"ours": runs, "official": runs, "sequence": [[name, seconds], ...]}`, a run being
    the wall time and sections of one call; no peak memory (this process holds both models)."""
    timers = {"official": Timer(args.device), "ours": Timer(args.device)}
    official = load_timed_official(args, diffusion_steps)
    calls = {
        "official": official_call(args, official, timers["official"], batch_size, steps),
        "ours": ours_call(args, load_timed_ours(args), timers["ours"], batch_size, steps, diffusion_steps),
    }
    for call in calls.values() if args.warmup else ():
        call()
    result: dict = {"ours": [], "official": [], "sequence": []}
    for repeat in range(args.repeats):
        for name in ("official", "ours") if repeat % 2 == 0 else ("ours", "official"):
            totals, _ = timers[name].time(calls[name])
            totals = _official_totals(totals) if name == "official" else totals
            result[name].append(_summarise(totals, batch_size, {}))
            result["sequence"].append([name, totals["total"]])
    return result


def _summarise(totals: dict[str, float], batch_size: int, result: dict) -> dict:
    total = totals["total"]
    encoder = totals.get("encoder", 0.0)
    transformer = totals.get("transformer", 0.0)
    result.update(
        seconds=total,
        images_per_second=batch_size / total,
        encoder_seconds=encoder,
        decoder_seconds=transformer - encoder,
        head_seconds=total - transformer,
    )
    return result


def run_check(args: argparse.Namespace) -> dict:
    """Record the official run's random draws, replay them through ours, compare the final tokens."""
    batch_size, steps, diffusion_steps = 2, 4, 5
    model = original_model(args, args.model, diffusion_steps)
    model.load_state_dict(load_file(str(args.weights)), strict=True)
    orders, x_t, step_noise = [], [], []
    shuffle, randn, randn_like = np.random.shuffle, torch.randn, torch.randn_like

    def recording_shuffle(array):
        shuffle(array)
        orders.append(np.array(array))

    def recording_randn(*shape, **kwargs):
        out = randn(*shape, **kwargs)
        x_t.append(out.clone())
        step_noise.append([])
        return out

    def recording_randn_like(tensor, **kwargs):
        out = randn_like(tensor, **kwargs)
        step_noise[-1].append(out.clone())
        return out

    labels = torch.tensor([3, 207])
    np.random.seed(0)
    torch.manual_seed(0)
    np.random.shuffle, torch.randn, torch.randn_like = recording_shuffle, recording_randn, recording_randn_like
    try:
        with torch.no_grad():
            expected = model.sample_tokens(batch_size, num_iter=steps, cfg=args.guidance_scale, labels=labels)
    finally:
        np.random.shuffle, torch.randn, torch.randn_like = shuffle, randn, randn_like

    noise = []
    for x0, draws in zip(x_t, step_noise):
        n = x0.shape[0] // batch_size
        stacked = torch.stack([draw[: x0.shape[0]] for draw in draws])  # conditional rows only
        noise.append(torch.cat([x0[None], stacked]).reshape(1 + diffusion_steps, batch_size, n, -1))
    pipe = load_ours(args, "cpu", torch.float32)
    actual = pipe(
        labels,
        num_inference_steps=steps,
        num_diffusion_steps=diffusion_steps,
        guidance_scale=args.guidance_scale,
        orders=torch.from_numpy(np.stack(orders)),
        noise=noise,
        output_type="latent",
    ).images
    difference = ((actual - expected).abs().max() / expected.abs().max()).item()
    return {"max_relative_difference": difference, "setting": "batch 2, 4 x 5 steps, guidance on, float32 CPU"}


# ----------------------------------------------------------------------------------------------------------------
# Driver: one subprocess per measurement.


def _spawn(args: argparse.Namespace, worker: str, extra: list[str]) -> dict:
    shared = ["--guidance-scale", str(args.guidance_scale)] + ([] if args.warmup else ["--no-warmup"])
    shared += ["--ours-preset", args.ours_preset] if args.ours_preset else []
    for key, value in ours_cache_arguments(args).items():
        shared += [f"--ours-{key.replace('_', '-')}", str(value)]
    return spawn_worker(__file__, args, worker, [*shared, *extra])


def summarise_runs(runs: list[dict]) -> dict:
    """Medians of the numeric fields of repeated runs; `images_per_second` and `peak_memory_mb` also with spread."""
    summary = {key: value for key, value in runs[-1].items() if not isinstance(value, (int, float))}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            summary[key] = float(np.median([run[key] for run in runs]))
    keys = [key for key in ("images_per_second", "peak_memory_mb") if runs[0].get(key) is not None]
    summary["spread"] = {key: spread([run[key] for run in runs]) for key in keys}
    return summary


def _table(rows: list[dict], have_official: bool) -> str:
    """Median (min-max) over the repeats; the speed-up and memory ratio are those of the interleaved pairs."""
    header = "| batch | steps (outer x inner) | ours img/s | ours peak MB |"
    rule = "|---:|---|---:|---:|"
    if have_official:
        header += " official img/s | official peak MB | speed-up | memory ratio |"
        rule += "---:|---:|---:|---:|"
    header += " ours: encoder / decoder / head+scheduler (s) |"
    rule += "---|"
    if have_official:
        header += " official: encoder / decoder / head+sampler (s) |"
        rule += "---|"
    lines = [header, rule]
    for row in rows:
        ours, official = row["ours"], row.get("official")
        line = f"| {row['batch_size']} | {row['steps']} x {row['diffusion_steps']} | "
        line += f"{format_spread(ours['spread']['images_per_second'], 3)} | {_memory(ours['spread'], 0)} |"
        if official:
            line += f" {format_spread(official['spread']['images_per_second'], 3)} |"
            line += f" {_memory(official['spread'], 0)} |"
            line += f" {format_spread(row['speedup'], 2)}x | {_memory(row, 2, 'memory_ratio')} |"
        line += " {encoder_seconds:.1f} / {decoder_seconds:.1f} / {head_seconds:.1f} |".format(**ours)
        if official:
            line += " {encoder_seconds:.1f} / {decoder_seconds:.1f} / {head_seconds:.1f} |".format(**official)
        lines.append(line)
    return "\n".join(lines)


def _memory(stats: dict, digits: int, key: str = "peak_memory_mb") -> str:
    """The median (min-max) of `stats[key]`, `x` after a ratio; "n/a" where not measured (`--harness in-process`)."""
    if key not in stats:
        return "n/a"
    return format_spread(stats[key], digits) + ("x" if key == "memory_ratio" else "")


def measure_setting(
    args: argparse.Namespace, batch_size: int, steps: int, diffusion_steps: int, profile: bool = False
) -> dict:
    """The runs of one setting: `{"ours": runs, "official": runs}` (no "official" without `--original-repo`), by
    the chosen harness; in fresh processes interleaved official, ours, official, ..., the last run of ours profiled
    when `profile` (and `--profile-step`)."""
    if args.harness == "in-process":
        return run_in_process(args, batch_size, steps, diffusion_steps)
    setting = ["--batch-sizes", str(batch_size), "--num-inference-steps", str(steps)]
    setting += ["--num-diffusion-steps", str(diffusion_steps)]
    runs: dict = {"ours": []} | ({"official": []} if args.original_repo is not None else {})
    for repeat in range(args.repeats):
        if "official" in runs:
            runs["official"].append(_spawn(args, "official", setting))
        last = profile and args.profile_step is not None and repeat == args.repeats - 1
        runs["ours"].append(_spawn(args, "ours", setting + (["--profile-step", str(args.profile_step)] * last)))
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        if args.worker == "check":
            result = run_check(args)
        else:
            run = run_ours if args.worker == "ours" else run_official
            result = run(args, args.batch_sizes[0], args.num_inference_steps[0], args.num_diffusion_steps[0])
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        args.weights = Path(tmp) / "weights.safetensors"
        make_original_weights(args, args.weights)
        have_official = args.original_repo is not None
        rows = []
        for steps in args.num_inference_steps:
            for diffusion_steps in args.num_diffusion_steps:
                for batch_size in args.batch_sizes:
                    row = {"batch_size": batch_size, "steps": steps, "diffusion_steps": diffusion_steps}
                    runs = measure_setting(args, batch_size, steps, diffusion_steps, profile=not rows)
                    row["ours"] = summarise_runs(runs["ours"])
                    if have_official:
                        pairs = list(zip(runs["ours"], runs["official"]))
                        row["official"] = summarise_runs(runs["official"])
                        row["speedup"] = spread([o["images_per_second"] / f["images_per_second"] for o, f in pairs])
                        if args.harness == "fresh" and args.dtype != "int8":
                            row["memory_ratio"] = spread([o["peak_memory_mb"] / f["peak_memory_mb"] for o, f in pairs])
                        if "sequence" in runs:
                            row["sequence"] = runs["sequence"]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        check = _spawn(args, "check", []) if args.check_equal else None

    machine = machine_description(args.device, args.dtype, args.threads)
    command = recorded_command(__file__, argv)
    timing = (
        "Each run (a fresh process) makes the same call twice: peak memory is that of the first call, time that of "
        "the second (one-off costs such as oneDNN's per-shape kernel generation excluded)"
        if args.warmup
        else "Time and peak memory of the first call in a fresh process (`--no-warmup`)"
    )
    if args.harness == "in-process":
        timing = (
            "Both implementations in one process (`--harness in-process`): "
            + ("one untimed warm-up call each, then " if args.warmup else "no warm-up call (`--no-warmup`), then ")
            + "the rounds, the official code first in even rounds and ours first in odd ones; no peak memory"
        )
    variant = ", ".join(
        ["in one process"] * (args.harness == "in-process")
        + [f"ours in {args.dtype}"] * (args.dtype != "float32")
        + [f"ours with `sampling_preset={args.ours_preset!r}`"] * bool(args.ours_preset)
        + [f"`{key}={value}`" for key, value in ours_cache_arguments(args).items()]
    )
    section = (
        f"## Sampling speed: ours vs official ({args.model}{': ' + variant if variant else ''})\n\nMachine: {machine}. "
        f"Guidance {args.guidance_scale} (linear). {timing}. {args.repeats} runs of each implementation per setting, "
        "interleaved; median (min-max), ratios per interleaved pair."
        + (" The steps are the official code's; ours uses the preset's own." if args.ours_preset else "")
        + (" The official code runs float32." if args.dtype == "int8" else "")
        + "\n"
    )
    section += f"Command: `{command}`\n\n{_table(rows, have_official)}\n"
    profile = rows[0]["ours"].pop("profile", None) if rows else None
    if profile:
        first = rows[0]
        section += (
            f"\nWhere the time goes in one outer step of ours (step {args.profile_step} of {first['steps']}, batch "
            f"{first['batch_size']}, {first['diffusion_steps']} head steps), top operators by self time:\n\n```\n{profile}\n```\n"
        )
    if check:
        section += f"\nEquality: replaying the official draws ({check['setting']}), max |ours - official| / max |official| = {check['max_relative_difference']:.1e}.\n"
    markers = section_markers("bench_sampling" + (f" {variant}" if variant else ""))
    write_outputs(args, section, {"rows": rows, "check": check, "machine": machine}, markers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
