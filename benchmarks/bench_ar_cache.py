"""Speed of the causal AR's KV cache: time per image against the number of tokens L (issue 15).

For L = 16, 64 and 256 (grids of 4x4, 8x8 and 16x16 one-value tokens), random-weight models of one size, sampled one
token per step (L steps):

- `ARPipeline` with the cache (`use_cache=True`): each step computes one sequence row, O(L) per step;
- `ARPipeline` without it: each step recomputes the whole causal sequence, O(L^2) per step;
- `MARPipeline` at one token per step (`num_inference_steps=L`): each step runs the bidirectional encoder on the known
  tokens and the decoder on all L positions.

The transformers have the same width and depth (AR: 4 causal blocks; MAR: 2 encoder + 2 decoder blocks, 64 wide);
the head is small and runs few diffusion steps, so the transformer's cost shows. Implementations are interleaved in
each repeat; the table gives the median and the min-max over the repeats.

    python benchmarks/bench_ar_cache.py --write-docs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmarking_utils import (  # noqa: E402
    DOCS_PATH,
    interleaved,
    machine_description,
    recorded_command,
    spread,
    update_titled_section,
)
from diffusers_mar import (  # noqa: E402
    ARPipeline,
    ARTransformer2DModel,
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
)

SECTION = "Causal AR: KV cache speed (benchmarks/bench_ar_cache.py)"
WIDTH = {"num_attention_heads": 4, "attention_head_dim": 16, "num_classes": 10, "patch_size": 1, "in_channels": 1}


def make_pipelines(side: int) -> dict:
    torch.manual_seed(0)
    head = MARDiffusionHead(in_channels=1, model_channels=64, condition_channels=64, num_res_blocks=2).eval()
    ar = ARTransformer2DModel(sample_size=side, num_layers=4, **WIDTH).eval()
    mar = MARTransformer2DModel(sample_size=side, num_layers=2, buffer_size=4, **WIDTH).eval()
    pipes = {
        "AR, cache": ARPipeline(ar, head, MARDDPMScheduler()),
        "AR, no cache": ARPipeline(ar, head, MARDDPMScheduler()),
        "MAR, one token per step": MARPipeline(mar, head, MARDDPMScheduler()),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def sampling_call(name: str, pipe, num_tokens: int, batch_size: int, diffusion_steps: int):
    """The call of sampler `name`: one token per step, no guidance."""
    kwargs = {"num_diffusion_steps": diffusion_steps, "guidance_scale": 1.0, "output_type": "latent"}
    if name.startswith("AR"):
        kwargs["use_cache"] = name == "AR, cache"
    else:
        kwargs["num_inference_steps"] = num_tokens
    return lambda: pipe(list(range(batch_size)), generator=torch.Generator().manual_seed(0), **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[4, 8, 16], help="grid sides (L = side^2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-diffusion-steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    for side in args.sides:
        num_tokens = side * side
        pipes = make_pipelines(side)
        for name, pipe in pipes.items():  # warm-up
            sampling_call(name, pipe, num_tokens, 2, 1)()
        calls = {
            name: sampling_call(name, pipe, num_tokens, args.batch_size, args.num_diffusion_steps)
            for name, pipe in pipes.items()
        }
        rounds = list(interleaved(calls, args.repeats))
        for name in pipes:
            ms = spread([1000 * timed[name][0]["total"] / args.batch_size for timed in rounds])
            rows.append((num_tokens, name, ms["median"], ms["min"], ms["max"]))
            print(f"L={num_tokens:4d} {name:26s} {ms['median']:9.1f} ms/image ({ms['min']:.1f}-{ms['max']:.1f})")

    command = recorded_command(__file__, argv)
    lines = [
        f"Machine: {machine_description(threads=args.threads)}. Batch {args.batch_size}, {args.num_diffusion_steps} diffusion "
        f"steps per token, no guidance, float32, {args.repeats} interleaved repeats (median, min-max).",
        "",
        f"Command: `{command}`",
        "",
        "| L | sampler | ms per image | min-max | vs AR with cache |",
        "|---:|---|---:|---|---:|",
    ]
    cached = {row[0]: row[2] for row in rows if row[1] == "AR, cache"}
    for num_tokens, name, median, low, high in rows:
        lines.append(
            f"| {num_tokens} | {name} | {median:.1f} | {low:.1f}-{high:.1f} | {median / cached[num_tokens]:.2f}x |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.write_docs:
        update_titled_section(DOCS_PATH, SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
