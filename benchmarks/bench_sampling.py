"""Sampling speed and memory: diffusers-mar `MARPipeline` against the official LTH14/mar `sample_tokens`.

Both run the same weights (a random initialisation of a preset in the original layout, converted with our converter)
and the same settings, side by side in one run; each measurement runs in a fresh subprocess so that peak memory is its
own. Each process makes the same call twice: peak memory is measured on the first call and time on the second, so
one-off costs (oneDNN generates kernels per matrix shape on first use, allocator growth, CUDA kernel loading) are
left out for both; `--no-warmup` times the first call. Reports images/s, peak memory, the ratio, and where the time
goes (encoder, decoder, diffusion head + scheduler).

    pip install timm==0.9.12 --no-deps      # the official code's only extra dependency (torchvision is stubbed)
    python benchmarks/bench_sampling.py --original-repo /path/to/LTH14/mar [--model mar-base] [--write-docs]

Without `--original-repo` only ours is timed. Defaults: CPU float32, batch 1 and 8, 16 x 25 steps, guidance 3.0;
on CUDA also batch 64 and 64 x 100 steps (`--dtype bfloat16` for mixed precision). `--check-equal` replays the
official run's random draws through our pipeline and reports the largest relative difference of the tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from conversion.convert_mar_to_diffusers import (  # noqa: E402
    convert_diffusers_to_mar_state_dict,
    convert_mar_state_dict,
)
from diffusers_mar import (  # noqa: E402
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
    get_preset_config,
)

ORIGINAL_FACTORIES = {"mar-base": "mar_base", "mar-large": "mar_large", "mar-huge": "mar_huge"}
DOCS_MARKERS = ("<!-- bench_sampling:begin -->", "<!-- bench_sampling:end -->")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", type=Path, help="LTH14/mar checkout (commit fe470ac).")
    parser.add_argument("--model", default="mar-base", choices=sorted(ORIGINAL_FACTORIES))
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--num-inference-steps", type=int, nargs="+")
    parser.add_argument("--num-diffusion-steps", type=int, nargs="+")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="Runs of each implementation per setting, interleaved (official, ours, official, ...); the table gives "
        "the median and the spread (min-max), the speed-up that of the per-pair ratios.",
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
    return args


# ----------------------------------------------------------------------------------------------------------------
# Weights: one random initialisation in the original layout, shared by every measurement.


def make_original_weights(args: argparse.Namespace, path: Path) -> None:
    preset = get_preset_config(args.model)
    torch.manual_seed(0)
    if args.original_repo is not None:
        model = original_model(args, args.model, num_sampling_steps=25)
        state_dict = model.state_dict()
    else:
        transformer = MARTransformer2DModel.from_config(preset["transformer"])
        head = MARDiffusionHead.from_config(preset["diffusion_head"])
        state_dict = convert_diffusers_to_mar_state_dict(transformer.state_dict(), head.state_dict())
    # The original zero-initialises the head's AdaLN and output layers; random values keep every path busy.
    generator = torch.Generator().manual_seed(1)
    for key, value in state_dict.items():
        if key.startswith("diffloss."):
            value.add_(torch.randn(value.shape, generator=generator) * 0.02)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def original_model(
    args: argparse.Namespace, preset_name: str, num_sampling_steps: int, diffusion_batch_mul: int = 4
) -> torch.nn.Module:
    """The official `MAR` of a preset (random init, eval mode), from the checkout in `--original-repo`."""
    from conversion.original_mar import load_original_mar

    head = get_preset_config(preset_name)["diffusion_head"]
    factory = getattr(load_original_mar(args.original_repo), ORIGINAL_FACTORIES[preset_name])
    return factory(
        buffer_size=64,
        diffloss_d=head["num_res_blocks"],
        diffloss_w=head["model_channels"],
        num_sampling_steps=str(num_sampling_steps),
        diffusion_batch_mul=diffusion_batch_mul,
    ).eval()


def load_ours(args: argparse.Namespace, device: str, dtype: torch.dtype) -> MARPipeline:
    preset = get_preset_config(args.model)
    transformer_sd, head_sd = convert_mar_state_dict(load_file(str(args.weights)))
    with torch.device("meta"):
        transformer = MARTransformer2DModel.from_config(preset["transformer"])
        head = MARDiffusionHead.from_config(preset["diffusion_head"])
    # Real (resident) tensors, so that peak memory measures sampling, not pages of a memory-mapped file.
    transformer, head = transformer.to_empty(device="cpu"), head.to_empty(device="cpu")
    transformer.load_state_dict(transformer_sd, strict=True)
    head.load_state_dict(head_sd, strict=True)
    pipe = MARPipeline(transformer.eval(), head.eval(), MARDDPMScheduler()).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Timing helpers.


class Timer:
    """Accumulates wall time of named sections; synchronises CUDA at the edges. `clock` replaces the wall clock
    (e.g. a running count of floating-point operations) to accumulate another quantity over the same sections."""

    def __init__(self, device: str, clock=None):
        self.device = device
        self.clock = clock
        self.totals: dict[str, float] = {}
        self._starts: dict[str, float] = {}

    def _now(self) -> float:
        if self.clock is not None:
            return self.clock()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._starts[name] = self._now()

    def stop(self, name: str) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + self._now() - self._starts.pop(name)

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(name)

        return wrapped


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def measure_memory(device: str, result: dict):
    """Peak memory of the enclosed work above what was held before it (CUDA allocator, or the CPU resident set)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        result["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        result["memory_kind"] = "CUDA max_memory_allocated above the weights"
        return
    # CPU: reset the kernel's resident-set high-water mark (VmHWM), so that weight loading does not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    base = _status_mb("VmRSS")
    yield
    result["peak_memory_mb"] = _status_mb("VmHWM") - base
    result["memory_kind"] = "peak resident set (VmHWM) above the loaded weights"


def run_ours(args: argparse.Namespace, batch_size: int, steps: int, diffusion_steps: int) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    pipe = load_ours(args, device, dtype)
    timer = Timer(device)
    call = ours_call(args, pipe, timer, batch_size, steps, diffusion_steps)
    result = _timed_calls(args, device, timer, call)
    totals = dict(timer.totals)
    if args.profile_step is not None:  # one more call, not timed (its hooks still add to `timer`)
        profile = _OuterStepProfiler(pipe.transformer, args.profile_step, device)
        call()
        result["profile"] = profile.table()
    return _summarise(totals, batch_size, result)


def ours_call(
    args: argparse.Namespace, pipe: MARPipeline, timer: Timer, batch_size: int, steps: int, diffusion_steps: int
):
    """The measured call of ours, with `timer` accumulating the "transformer" and "encoder" sections."""
    transformer = pipe.transformer
    transformer.register_forward_pre_hook(lambda *a: timer.start("transformer"))
    transformer.register_forward_hook(lambda *a: timer.stop("transformer"))
    transformer.proj_in.register_forward_pre_hook(lambda *a: timer.start("encoder"))
    transformer.encoder_norm.register_forward_hook(lambda *a: timer.stop("encoder"))
    labels = [i % 1000 for i in range(batch_size)]
    call = {
        "num_inference_steps": steps,
        "num_diffusion_steps": diffusion_steps,
        "guidance_scale": args.guidance_scale,
        "output_type": "latent",
    }
    return lambda: pipe(labels, generator=torch.Generator().manual_seed(0), **call)


def _timed_calls(args: argparse.Namespace, device: str, timer: Timer, call) -> dict:
    """Peak memory of the first call; wall time of the second one (of the first with `--no-warmup`)."""
    result: dict = {}
    with measure_memory(device, result):
        timer.start("total")
        call()
        timer.stop("total")
    if args.warmup:
        timer.totals.clear()
        timer.start("total")
        call()
        timer.stop("total")
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
    model = original_model(args, args.model, diffusion_steps)
    model.load_state_dict(load_file(str(args.weights)), strict=True)
    model.to(device)
    timer = Timer(device)
    result = _timed_calls(args, device, timer, official_call(args, model, timer, batch_size, steps))
    totals = dict(timer.totals)
    totals["transformer"] = totals.get("encoder", 0.0) + totals.get("decoder", 0.0)
    return _summarise(totals, batch_size, result)


def official_call(args: argparse.Namespace, model: torch.nn.Module, timer: Timer, batch_size: int, steps: int):
    """The measured call of the official `sample_tokens`, with `timer` accumulating "encoder" and "decoder"."""
    device = args.device
    model.forward_mae_encoder = timer.wrap("encoder", model.forward_mae_encoder)
    model.forward_mae_decoder = timer.wrap("decoder", model.forward_mae_decoder)
    labels = torch.tensor([i % 1000 for i in range(batch_size)], device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()

    def call():
        np.random.seed(0)
        torch.manual_seed(0)
        with torch.no_grad(), autocast:
            model.sample_tokens(
                batch_size, num_iter=steps, cfg=args.guidance_scale, cfg_schedule="linear", labels=labels
            )

    return call


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


def spawn_worker(script: str, args: argparse.Namespace, worker: str, extra: list[str]) -> dict:
    """Run `script --worker WORKER` in a fresh process (so that its peak memory is its own) with the options every
    measurement shares, plus `extra`; the worker prints its result as JSON on its last line."""
    command = [sys.executable, script, "--worker", worker, "--weights", str(args.weights), "--model", args.model]
    command += ["--device", args.device, "--dtype", args.dtype, *extra]
    if args.original_repo is not None:
        command += ["--original-repo", str(args.original_repo)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if worker == "check":  # a float32 CPU replay: the official `.cuda()` calls must stay on the CPU too
        env["CUDA_VISIBLE_DEVICES"] = ""
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def _spawn(args: argparse.Namespace, worker: str, extra: list[str]) -> dict:
    shared = ["--guidance-scale", str(args.guidance_scale)] + ([] if args.warmup else ["--no-warmup"])
    return spawn_worker(__file__, args, worker, [*shared, *extra])


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "runs": len(values)}


def summarise_runs(runs: list[dict]) -> dict:
    """Medians of the numeric fields of repeated runs; `images_per_second` and `peak_memory_mb` also with spread."""
    summary = {key: value for key, value in runs[-1].items() if not isinstance(value, (int, float))}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)):
            summary[key] = float(np.median([run[key] for run in runs]))
    summary["spread"] = {key: spread([run[key] for run in runs]) for key in ("images_per_second", "peak_memory_mb")}
    return summary


def _range(stats: dict, digits: int) -> str:
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def machine_description(args: argparse.Namespace) -> str:
    if args.device == "cuda":
        return f"{torch.cuda.get_device_name()} ({args.dtype}), torch {torch.__version__}"
    threads = args.threads or torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {threads} threads, {args.dtype}, torch {torch.__version__}"


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
        line += f"{_range(ours['spread']['images_per_second'], 3)} | {_range(ours['spread']['peak_memory_mb'], 0)} |"
        if official:
            line += f" {_range(official['spread']['images_per_second'], 3)} |"
            line += f" {_range(official['spread']['peak_memory_mb'], 0)} |"
            line += f" {_range(row['speedup'], 2)}x | {_range(row['memory_ratio'], 2)}x |"
        line += " {encoder_seconds:.1f} / {decoder_seconds:.1f} / {head_seconds:.1f} |".format(**ours)
        if official:
            line += " {encoder_seconds:.1f} / {decoder_seconds:.1f} / {head_seconds:.1f} |".format(**official)
        lines.append(line)
    return "\n".join(lines)


def update_docs_section(section: str, markers: tuple[str, str] = DOCS_MARKERS) -> None:
    """Replace (or append) the block between `markers` in docs/benchmarks.md."""
    begin, end = markers
    path = REPO_ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def public_argv(argv: list[str]) -> list[str]:
    """The command line as the docs show it, without this machine's paths: the checkout becomes `path/to/LTH14-mar`,
    other absolute paths (output files, model folders) their last component."""
    shown = []
    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if arg.startswith("--") and not equals:
            shown.append(arg)  # an option name alone; its value is the next argument
            continue
        if option == "--original-repo" or (not option and i > 0 and argv[i - 1] == "--original-repo"):
            value = "path/to/LTH14-mar"
        elif os.path.isabs(value):
            value = os.path.basename(value.rstrip("/"))
        shown.append(f"{option}={value}" if equals else value)
    return shown


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
                    setting = ["--batch-sizes", str(batch_size), "--num-inference-steps", str(steps)]
                    setting += ["--num-diffusion-steps", str(diffusion_steps)]
                    row = {"batch_size": batch_size, "steps": steps, "diffusion_steps": diffusion_steps}
                    runs = {"ours": [], "official": []}
                    for repeat in range(args.repeats):
                        if have_official:
                            runs["official"].append(_spawn(args, "official", setting))
                        profile = args.profile_step is not None and not rows and repeat == args.repeats - 1
                        extra = ["--profile-step", str(args.profile_step)] if profile else []
                        runs["ours"].append(_spawn(args, "ours", setting + extra))
                    row["ours"] = summarise_runs(runs["ours"])
                    if have_official:
                        row["official"] = summarise_runs(runs["official"])
                        ratios = [o["images_per_second"] / f["images_per_second"] for o, f in zip(*runs.values())]
                        row["speedup"] = spread(ratios)
                        memory = [o["peak_memory_mb"] / f["peak_memory_mb"] for o, f in zip(*runs.values())]
                        row["memory_ratio"] = spread(memory)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        check = _spawn(args, "check", []) if args.check_equal else None

    command = "python benchmarks/bench_sampling.py " + " ".join(
        public_argv(argv if argv is not None else sys.argv[1:])
    )
    timing = (
        "Each run (a fresh process) makes the same call twice: peak memory is that of the first call, time that of "
        "the second (one-off costs such as oneDNN's per-shape kernel generation excluded)"
        if args.warmup
        else "Time and peak memory of the first call in a fresh process (`--no-warmup`)"
    )
    section = (
        f"## Sampling speed: ours vs official ({args.model})\n\nMachine: {machine_description(args)}. Guidance "
        f"{args.guidance_scale} (linear). {timing}. {args.repeats} runs of each implementation per setting, "
        "interleaved; median (min-max), ratios per interleaved pair.\n"
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
    print(section)
    if args.output_json:
        args.output_json.write_text(
            json.dumps({"rows": rows, "check": check, "machine": machine_description(args)}, indent=2)
        )
    if args.write_docs:
        update_docs_section(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
