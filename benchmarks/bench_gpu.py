"""One short GPU run, the whole side-by-side table (issue 28): MAR-B, ours against the official LTH14/mar
`sample_tokens`, in float32 and bfloat16, at batch 64 and 256, at 16 x 25 and at the paper's 64 x 100 steps, with
CUDA graphs for the diffusion head's inner loop (`pipe.diffusion_head.compile(mode="reduce-overhead")`), peak memory,
and the outputs compared. It fits a lent device's few minutes:

    pip install timm==0.9.12 --no-deps      # the official code's only extra dependency
    python benchmarks/bench_gpu.py --original-repo path/to/LTH14-mar --budget-s 420 \
        --output-json gpu_table.json --output-md gpu_table.md

How it spends the time:

- One process, one set of random MAR-B weights in the original layout (converted with our converter for ours).
- Rows run cheapest first (16 x 25 before 64 x 100, batch 64 before 256, float32 before bfloat16). Before each row
  the cost of its calls is predicted from the rows already measured (seconds per image x diffusion step x outer
  step); a row that would not fit in what is left of `--budget-s` is written as skipped, not run.
- Each row: one warm-up call of each implementation at the row's batch with 1 x 2 steps (kernel loading and
  autotuning for the row's shapes), then `--repeats` rounds that call ours, the official and (with graphs) ours
  compiled in turn, each timed alone (CUDA synchronised at the edges), peak memory per call
  (`torch.cuda.max_memory_allocated` above the weights). The table gives the median and min-max of the rounds and
  the speed-up as the median of per-round ratios with its spread.
- Outputs compared (same generator seed): ours in bfloat16 against ours in float32 (relative difference of the
  tokens), ours compiled against ours eager, and the mean and standard deviation of ours' and the official tokens.
  Exact equality with the official is `bench_sampling.py --check-equal` (a replay of its random draws, CPU float32).

`--dry-run` runs the same code on the CPU in a few seconds with the shipped digits model (no download), batch 2 and
2 x 2 steps, the compile backend `eager` (no C++ toolchain, no CUDA graphs), and the official code only if
`--original-repo` is given: the test suite runs it, so that a lent GPU's minutes are not spent on debugging.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

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
    recorded_command,
    spread,
)
from diffusers_mar import DEFAULT_MODEL, MARPipeline  # noqa: E402
from diffusers_mar.atomic_files import atomic_write  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original-repo", type=Path, help="LTH14/mar checkout (commit fe470ac)")
    parser.add_argument("--model", default="mar-base", choices=sorted(ORIGINAL_FACTORIES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument(
        "--settings", nargs="+", default=["16x25", "64x100"], help="outer steps x diffusion steps of each row"
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (median and min-max)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True, help="also ours compiled")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the graphs rows")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting rows after this many seconds")
    parser.add_argument("--dry-run", action="store_true", help="the shipped digits model on the CPU, tiny sizes")
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--output-md", type=Path)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        args.settings = [tuple(int(part) for part in text.lower().split("x")) for text in args.settings]
        assert all(len(setting) == 2 and min(setting) >= 1 for setting in args.settings)
    except (ValueError, AssertionError):
        parser.error(
            f"--settings: each must be OUTERxDIFFUSION with positive integers, e.g. 64x100; got {args.settings}"
        )
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if min(args.batch_sizes) < 1 or args.budget_s <= 0:
        parser.error("--batch-sizes must be >= 1 and --budget-s > 0")
    if args.dry_run and args.original_repo is not None:
        parser.error(
            "--dry-run runs the shipped digits model, which has no official counterpart: drop --original-repo"
        )
    if args.dry_run:
        args.device, args.batch_sizes, args.settings, args.repeats = "cpu", [2], [(2, 2)], 2
        args.compile_backend = "eager"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA GPU: run it on a GPU machine (or --dry-run on the CPU)")
        if args.original_repo is None:
            parser.error("--original-repo is needed for the side-by-side table (a LTH14/mar checkout)")
        args.device = "cuda"
    return args


class Models:
    """Ours in each dtype (eager, and compiled for the graphs rows) and the official model, on one set of weights."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args, self.ours, self.compiled, self._official = args, {}, {}, {}
        self.has_official = args.original_repo is not None
        if args.dry_run:
            for name, dtype in DTYPES.items():
                self.ours[name] = MARPipeline.from_pretrained(DEFAULT_MODEL, dtype=dtype).to(args.device)
                self.ours[name].set_progress_bar_config(disable=True)
            self.num_classes = self.ours["float32"].transformer.config.num_classes
        else:
            args.weights = workdir / "weights.safetensors"
            make_original_weights(args, args.weights)
            for name, dtype in DTYPES.items():
                self.ours[name] = load_ours(args, args.device, dtype)
            self.num_classes = 1000

    def official(self, diffusion_steps: int) -> torch.nn.Module:
        """The official model sampling with `diffusion_steps` respaced steps (its own `num_sampling_steps`), one
        instance per step count on the same weights."""
        if diffusion_steps not in self._official:
            model = original_model(self.args, self.args.model, num_sampling_steps=diffusion_steps)
            model.load_state_dict(load_file(str(self.args.weights)), strict=True)
            self._official[diffusion_steps] = model.to(self.args.device)
        return self._official[diffusion_steps]

    def compiled_pipe(self, dtype: str) -> MARPipeline:
        """Ours with a copy of the head compiled for CUDA graphs (`reduce-overhead`; the dry run's backend has none);
        the transformer and scheduler are shared with the eager pipeline, which stays eager."""
        if dtype not in self.compiled:
            eager = self.ours[dtype]
            head = copy.deepcopy(eager.diffusion_head)
            head.compile(backend=self.args.compile_backend, **self._mode())
            pipe = MARPipeline(eager.transformer, head, eager.scheduler, token_space=eager.config.token_space)
            pipe.set_sampling_defaults(**eager.sampling_defaults)  # the eager pipeline's settings, folder's included
            pipe.set_progress_bar_config(disable=True)
            self.compiled[dtype] = pipe
        return self.compiled[dtype]

    def _mode(self) -> dict:
        return {} if self.args.compile_backend == "eager" else {"mode": "reduce-overhead"}


def ours_call(models: Models, pipe: MARPipeline, batch: int, steps: int, diffusion_steps: int):
    labels = [i % models.num_classes for i in range(batch)]
    guidance = models.args.guidance_scale

    def call():
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe(
                labels,
                generator=generator,
                num_inference_steps=steps,
                num_diffusion_steps=diffusion_steps,
                guidance_scale=guidance,
                output_type="latent",
            ).images.float()

    return call


def official_row_call(models: Models, dtype: str, batch: int, steps: int, diffusion_steps: int):
    """The official `sample_tokens` with `diffusion_steps` respaced steps, bfloat16 through autocast as its own
    evaluation does; returns the tokens."""
    model = models.official(diffusion_steps)
    namespace = argparse.Namespace(device=models.args.device, dtype=dtype, guidance_scale=models.args.guidance_scale)
    return official_call(namespace, model, None, batch, steps)


def measure(call, device: str) -> tuple[float, float, object]:
    """(seconds, peak MB above what was held, result) of one call timed alone."""
    memory: dict = {}
    timer = Timer(device)
    with measure_memory(device, memory):
        totals, result = timer.time(call)
    return totals["total"], memory["peak_memory_mb"], result


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run_row(models: Models, dtype: str, batch: int, steps: int, diffusion_steps: int, args) -> dict:
    device = args.device
    ours_pipe = models.ours[dtype]
    calls = {"ours": ours_call(models, ours_pipe, batch, steps, diffusion_steps)}
    warm = {"ours": ours_call(models, ours_pipe, batch, 1, 2)}
    if models.has_official:
        calls["official"] = official_row_call(models, dtype, batch, steps, diffusion_steps)
        warm["official"] = official_row_call(models, dtype, batch, 1, 2)
    if args.graphs:
        compiled = models.compiled_pipe(dtype)
        calls["ours_graphs"] = ours_call(models, compiled, batch, steps, diffusion_steps)
        warm["ours_graphs"] = ours_call(models, compiled, batch, 1, 2)
    for call in warm.values():  # kernel loading and autotuning for the row's shapes (compilation for graphs)
        call()
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    memory: dict[str, list[float]] = {name: [] for name in calls}
    outputs: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, call in calls.items():
            elapsed, peak, result = measure(call, device)
            seconds[name].append(elapsed)
            memory[name].append(peak)
            outputs[name] = result
    row = {"dtype": dtype, "batch_size": batch, "steps": steps, "diffusion_steps": diffusion_steps, "ran": True}
    for name in calls:
        row[name] = {
            "images_per_second": spread([batch / s for s in seconds[name]]),
            "seconds": spread(seconds[name]),
            "peak_memory_mb": max(memory[name]),
        }
    if "official" in calls:
        row["speedup"] = spread([o / s for s, o in zip(seconds["ours"], seconds["official"])])
        row["official_tokens"] = {
            "mean": float(outputs["official"].float().mean()),
            "std": float(outputs["official"].float().std()),
        }
        if "ours_graphs" in calls:
            row["graphs_speedup"] = spread([o / s for s, o in zip(seconds["ours_graphs"], seconds["official"])])
    if "ours_graphs" in calls:
        row["graphs_vs_eager"] = relative_difference(outputs["ours_graphs"], outputs["ours"])
    row["ours_tokens"] = {"mean": float(outputs["ours"].mean()), "std": float(outputs["ours"].std())}
    row["_ours_output"] = outputs["ours"]
    return row


def predicted_seconds(rows: list[dict], batch: int, steps: int, diffusion_steps: int, args) -> float | None:
    """The row's predicted cost from the measured rows: seconds per (image x outer step x (diffusion steps + 4)),
    the + 4 standing for the transformer's share of an outer step; times the calls of the row."""
    rates = []
    for row in rows:
        if row.get("ran"):
            work = row["batch_size"] * row["steps"] * (row["diffusion_steps"] + 4)
            per_round = sum(
                row[name]["seconds"]["median"] for name in ("ours", "official", "ours_graphs") if name in row
            )
            rates.append(per_round / work)
    if not rates:
        return None
    return max(rates) * batch * steps * (diffusion_steps + 4) * (args.repeats + 0.2)


def table(rows: list[dict]) -> str:
    lines = [
        "| steps | batch | dtype | ours img/s | official img/s | speed-up | ours + CUDA graphs img/s | graphs speed-up "
        "| peak MB ours / official | bf16 vs fp32 tokens | graphs vs eager |",
        "|---|---:|---|---|---|---|---|---|---|---:|---:|",
    ]
    for row in rows:
        head = f"| {row['steps']} x {row['diffusion_steps']} | {row['batch_size']} | {row['dtype']} |"
        if not row.get("ran"):
            lines.append(f"{head} {row['skipped']} | | | | | | | |")
            continue

        def cell(name, row=row):
            return format_spread(row[name]["images_per_second"], 2) if name in row else "n/a"

        speedup = f"{format_spread(row['speedup'], 2)}x" if "speedup" in row else "n/a"
        graphs_speedup = f"{format_spread(row['graphs_speedup'], 2)}x" if "graphs_speedup" in row else "n/a"
        official_memory = f"{row['official']['peak_memory_mb']:.0f}" if "official" in row else "n/a"
        drift = f"{row['bf16_vs_fp32']:.2e}" if "bf16_vs_fp32" in row else ""
        graphs = f"{row['graphs_vs_eager']:.2e}" if "graphs_vs_eager" in row else ""
        lines.append(
            f"{head} {cell('ours')} | {cell('official')} | {speedup} | {cell('ours_graphs')} | {graphs_speedup} | "
            f"{row['ours']['peak_memory_mb']:.0f} / {official_memory} | {drift} | {graphs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    plan = [
        (dtype, batch, steps, diffusion_steps)
        for steps, diffusion_steps in sorted(args.settings, key=lambda s: s[0] * s[1])
        for batch in sorted(args.batch_sizes)
        for dtype in args.dtypes
    ]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as workdir:
        models = Models(args, Path(workdir))
        for dtype, batch, steps, diffusion_steps in plan:
            left = args.budget_s - (time.perf_counter() - start)
            guess = predicted_seconds(rows, batch, steps, diffusion_steps, args)
            if left <= 0 or (guess is not None and guess > left):
                reason = (
                    f"skipped: predicted {guess:.0f} s, {max(left, 0):.0f} s of the budget left"
                    if guess
                    else "skipped: budget spent"
                )
                rows.append(
                    {
                        "dtype": dtype,
                        "batch_size": batch,
                        "steps": steps,
                        "diffusion_steps": diffusion_steps,
                        "ran": False,
                        "skipped": reason,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            row = run_row(models, dtype, batch, steps, diffusion_steps, args)
            fp32 = next(
                (
                    r
                    for r in rows
                    if r.get("ran")
                    and r["dtype"] == "float32"
                    and (r["batch_size"], r["steps"], r["diffusion_steps"]) == (batch, steps, diffusion_steps)
                ),
                None,
            )
            if dtype != "float32" and fp32 is not None:
                row["bf16_vs_fp32"] = relative_difference(row["_ours_output"], fp32["_ours_output"])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}), flush=True)
    device = args.device
    report = "\n".join(
        [
            f"Machine: {machine_description(device)}. Model: {'the shipped digits model (dry run)' if args.dry_run else args.model + ' (random weights)'}; "
            f"guidance {args.guidance_scale} (linear), {args.repeats} interleaved rounds per row, median (min-max); "
            f"graphs: the head compiled with backend {args.compile_backend!r}"
            f"{'' if args.compile_backend == 'eager' else ', mode reduce-overhead'}; {time.perf_counter() - start:.0f} s in all.",
            "",
            f"Command: `{recorded_command(__file__, args.argv)}`",
            "",
            table(rows),
            "",
        ]
    )
    print(report)
    results = {"rows": [{k: v for k, v in row.items() if not k.startswith("_")} for row in rows], "report": report}
    if args.output_json:
        text = json.dumps(results, indent=2, default=str)
        atomic_write(args.output_json, lambda file: file.write(text.encode()))
    if args.output_md:
        atomic_write(args.output_md, lambda file: file.write(report.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
