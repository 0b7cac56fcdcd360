"""`torch.compile` of both networks (`pipe.transformer.compile()`, `pipe.diffusion_head.compile()`) against eager.

One pipeline, one process: after an eager warm-up call, both models are compiled in place (inductor unless
`--backend`) and a first compiled call pays the compilation (reported apart). Then `--repeats` rounds alternate an
eager call (`torch.compiler.set_stance("force_eager")`, the same modules) and a compiled call, each timed alone.
Reported: median (min-max) seconds per call, the per-round speed-up, the graphs dynamo compiled for each model (0 for
the head meant the compile had no effect, issue 29) and the largest difference between the compiled and eager images.

    python benchmarks/bench_compile.py --model shipped --batch-size 10 --repeats 5 [--write-docs]
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
    PRESET_MODELS,
    Timer,
    check_preset_or_folder,
    format_spread,
    interleaved,
    load_preset_or_folder,
    machine_description,
    recorded_command,
    section_markers,
    spread,
    write_outputs,
)


def counting(backend: str | object, graphs: list) -> object:
    """`backend` (a name or a callable) that also counts the graphs dynamo hands it."""
    from torch._dynamo.backends.registry import lookup_backend

    compiler = lookup_backend(backend) if isinstance(backend, str) else backend

    def count(graph_module: torch.fx.GraphModule, example_inputs: list):
        graphs.append(len(graph_module.graph.nodes))
        return compiler(graph_module, example_inputs)

    return count


def make_call(pipe, args: argparse.Namespace):
    labels = [i % pipe.transformer.config.num_classes for i in range(args.batch_size)]
    steps = {"num_inference_steps": args.num_inference_steps, "num_diffusion_steps": args.num_diffusion_steps}
    steps = {key: value for key, value in steps.items() if value is not None}
    if args.guidance_scale is not None:
        steps["guidance_scale"] = args.guidance_scale

    def call() -> torch.Tensor:
        return pipe(labels, generator=torch.Generator().manual_seed(0), output_type="latent", **steps).images

    return call


def run(args: argparse.Namespace, pipe) -> dict:
    """Warm-up, compilation, then `args.repeats` rounds of (eager, compiled); seconds per call."""
    timer, call = Timer("cpu"), make_call(pipe, args)

    def eager() -> torch.Tensor:
        with torch.compiler.set_stance("force_eager"):
            return call()

    with torch.no_grad():
        call()  # eager warm-up: oneDNN's per-shape kernels, allocator growth
        graphs = {"transformer": [], "diffusion_head": []}
        options = {"mode": args.mode} if args.mode else {}
        pipe.transformer.compile(backend=counting(args.backend, graphs["transformer"]), **options)
        pipe.diffusion_head.compile(backend=counting(args.backend, graphs["diffusion_head"]), **options)
        first_compiled = timer.time(call)[0]["total"]
        rounds = []
        for repeat, timed in enumerate(interleaved({"eager": eager, "compiled": call}, args.repeats, timer)):
            (eager_totals, eager_images), (compiled_totals, compiled_images) = timed["eager"], timed["compiled"]
            difference = float((compiled_images - eager_images).abs().max())
            seconds = {"eager": eager_totals["total"], "compiled": compiled_totals["total"]}
            rounds.append({**seconds, "max_abs_diff": difference})
            print(json.dumps({"round": repeat, **rounds[-1]}), flush=True)
    return {
        "first_compiled_seconds": first_compiled,
        "graphs": {name: len(counts) for name, counts in graphs.items()},
        "eager": spread([r["eager"] for r in rounds]),
        "compiled": spread([r["compiled"] for r in rounds]),
        "speedup": spread([r["eager"] / r["compiled"] for r in rounds]),
        "max_abs_diff": max(r["max_abs_diff"] for r in rounds),
    }


def table(result: dict) -> str:
    graphs = result["graphs"]
    return "\n".join(
        [
            "| eager s/call | compiled s/call | speed-up | first compiled call s | graphs (transformer / head) | "
            "max abs diff |",
            "|---:|---:|---:|---:|---|---:|",
            f"| {format_spread(result['eager'])} | {format_spread(result['compiled'])} | "
            f"{format_spread(result['speedup'], 2)}x | "
            f"{result['first_compiled_seconds']:.0f} | {graphs['transformer']} / {graphs['diffusion_head']} | "
            f"{result['max_abs_diff']:.1e} |",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shipped", help=f"one of {PRESET_MODELS}, `shipped` or a folder")
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--num-inference-steps", type=int, help="default: the folder's (16 for a preset)")
    parser.add_argument("--num-diffusion-steps", type=int, help="default: the folder's (25 for a preset)")
    parser.add_argument("--guidance-scale", type=float, help="default: 3.0 for a preset, the folder's otherwise")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (eager, compiled), at least 3")
    parser.add_argument("--backend", default="inductor", help="a torch.compile backend name")
    parser.add_argument("--mode", help="torch.compile mode (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--write-docs", action="store_true", help="Update the section in docs/benchmarks.md.")
    args = parser.parse_args(argv)
    if args.repeats < 3 or args.batch_size < 1:
        parser.error("--repeats must be >= 3 and --batch-size >= 1")
    check_preset_or_folder(parser, args.model)
    if args.model in PRESET_MODELS:
        args.guidance_scale = 3.0 if args.guidance_scale is None else args.guidance_scale
        args.num_inference_steps = args.num_inference_steps or 16
        args.num_diffusion_steps = args.num_diffusion_steps or 25
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_preset_or_folder(args.model)
    result = run(args, pipe)
    machine = machine_description()
    command = recorded_command(__file__, argv)
    section = (
        f"## `torch.compile` on the CPU: {args.model}, batch {args.batch_size} (benchmarks/bench_compile.py)\n\n"
        f"Machine: {machine}; run on {time.strftime('%Y-%m-%d', time.gmtime())}. {args.repeats} rounds of an eager "
        f"and a compiled call in one process (backend `{args.backend}`), median (min-max) seconds per call and the "
        f"per-round speed-up. Command: `{command}` ({time.perf_counter() - start:.0f} s in all).\n\n{table(result)}\n"
    )
    markers = section_markers(f"bench_compile {args.model} batch {args.batch_size}")
    write_outputs(args, section, {**result, "machine": machine}, markers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
