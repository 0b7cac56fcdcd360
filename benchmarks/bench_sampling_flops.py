"""Matrix-product work of one sampling call: diffusers-mar `MARPipeline` against the official LTH14/mar `sample_tokens`.

`bench_sampling.py` times the two side by side; this script counts what each computes, with
`torch.utils.flop_counter.FlopCounterMode`: the floating-point operations of the matrix products and of attention
(the operations that bound the time on a CPU; elementwise work is not counted), split into encoder, decoder and
diffusion head + sampler exactly as `bench_sampling.py` splits the time (the same hooks, with the running count in
place of the clock). The counts do not depend on the weights or the random draws, only on the settings, so one call
of each implementation per setting is enough.

Dividing the official count by ours gives the speed-up that ours would have if both ran their products at the same
rate: where the products run near the machine's peak (MAR-B on a CPU), that is the ceiling of the exact path.

    pip install timm==0.9.12 --no-deps
    python benchmarks/bench_sampling_flops.py --original-repo path/to/LTH14-mar [--batch-sizes 1 8] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import (  # noqa: E402
    ORIGINAL_FACTORIES,
    Timer,
    load_ours,
    machine_description,
    make_original_weights,
    official_call,
    original_model,
    ours_call,
    recorded_command,
    section_markers,
    write_outputs,
)

PARTS = ("encoder", "decoder", "head")

# PyTorch's counter knows the generic flash-attention operator but not the CPU one that
# `scaled_dot_product_attention` dispatches to on a CPU (both implementations use it); same arithmetic.
_CPU_ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_ATTENTION not in flop_counter.flop_registry and _CPU_ATTENTION.default not in flop_counter.flop_registry:

    @flop_counter.register_flop_formula(_CPU_ATTENTION)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", type=Path, required=True, help="LTH14/mar checkout (commit fe470ac).")
    parser.add_argument("--model", default="mar-base", choices=sorted(ORIGINAL_FACTORIES))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--num-inference-steps", type=int, default=16)
    parser.add_argument("--num-diffusion-steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--output-json", type=Path)
    parser.add_argument("--write-docs", action="store_true", help="Update the section in docs/benchmarks.md.")
    args = parser.parse_args(argv)
    for name in ("batch_sizes", "num_inference_steps", "num_diffusion_steps"):
        values = getattr(args, name)
        if min(values if isinstance(values, list) else [values]) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {values}.")
    args.device, args.dtype, args.threads = "cpu", "float32", None
    return args


def count_call(build_call) -> dict[str, float]:
    """GFLOP of one call, in total and by part; `build_call(timer)` returns the call, its sections hooked to `timer`."""
    with FlopCounterMode(display=False) as counter:
        timer = Timer("cpu", clock=lambda: counter.get_total_flops() / 1e9)
        call = build_call(timer)
        timer.start("total")
        call()
        timer.stop("total")
    totals = timer.totals
    encoder = totals.get("encoder", 0.0)
    transformer = totals.get("transformer", encoder + totals.get("decoder", 0.0))
    return {
        "total": totals["total"],
        "encoder": encoder,
        "decoder": transformer - encoder,
        "head": totals["total"] - transformer,
    }


def count_setting(args: argparse.Namespace, pipe, official, batch_size: int) -> dict:
    steps, diffusion_steps = args.num_inference_steps, args.num_diffusion_steps
    ours = count_call(lambda timer: ours_call(args, pipe, timer, batch_size, steps, diffusion_steps))
    for module in pipe.transformer.modules():  # the sections' hooks of this setting
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    encoder, decoder = official.forward_mae_encoder, official.forward_mae_decoder
    theirs = count_call(lambda timer: official_call(args, official, timer, batch_size, steps))
    official.forward_mae_encoder, official.forward_mae_decoder = encoder, decoder
    return {
        "batch_size": batch_size,
        "steps": steps,
        "diffusion_steps": diffusion_steps,
        "ours_gflop": ours,
        "official_gflop": theirs,
        "ceiling": theirs["total"] / ours["total"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| batch | steps (outer x inner) | ours GFLOP: encoder / decoder / head / total "
        "| official GFLOP: encoder / decoder / head / total | official / ours |",
        "|---:|---|---|---|---:|",
    ]
    for row in rows:
        ours, theirs = row["ours_gflop"], row["official_gflop"]
        cells = [" / ".join(f"{part[key]:,.0f}" for key in (*PARTS, "total")) for part in (ours, theirs)]
        by_part = ", ".join(f"{key} {theirs[key] / ours[key]:.3f}" for key in PARTS if ours[key])
        lines.append(
            f"| {row['batch_size']} | {row['steps']} x {row['diffusion_steps']} | {cells[0]} | {cells[1]} "
            f"| **{row['ceiling']:.3f}x** ({by_part}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.weights = Path(tmp) / "weights.safetensors"
        make_original_weights(args, args.weights)
        pipe = load_ours(args, "cpu", torch.float32)
        official = original_model(args, args.model, args.num_diffusion_steps)
        official.load_state_dict(load_file(str(args.weights)), strict=True)
    rows = []
    for batch_size in args.batch_sizes:
        rows.append(count_setting(args, pipe, official, batch_size))
        print(json.dumps(rows[-1]), flush=True)
    machine = machine_description(args.device, args.dtype, args.threads)
    command = recorded_command(__file__, argv)
    section = (
        f"## Sampling work: ours vs official ({args.model})\n\n"
        f"Machine: {machine}. Guidance {args.guidance_scale} (linear). FLOPs of the matrix "
        "products and attention of one call (`torch.utils.flop_counter`), by part; the last column is the speed-up "
        "ours would have if both ran their products at the same rate.\n"
        f"Command: `{command}`\n\n{table(rows)}\n"
    )
    write_outputs(args, section, {"rows": rows, "machine": machine}, section_markers("bench_sampling_flops"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
