"""Training-step speed and memory: our `MARTrainingModule` (training/mar_loss.py) against the official `MAR.forward`.

One step = loss (masking, label drop, transformer, `diffusion_batch_mul` x diffusion loss) + backward + AdamW step,
on the same weights (a random initialisation of a preset in the original layout, converted with our converter), in
train mode (dropout on). Each measurement runs in a fresh subprocess; the reported time is the mean of the timed steps
after one warm-up step.

    python benchmarks/bench_training.py --original-repo /path/to/LTH14/mar [--model mar-base] [--write-docs]

Defaults: CPU float32, batch 8, 3 timed steps; on CUDA batch 64 and `--dtype bfloat16` for autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import (  # noqa: E402
    ORIGINAL_FACTORIES,
    Timer,
    load_ours,
    machine_description,
    make_original_weights,
    measure_memory,
    original_model,
    recorded_command,
    section_markers,
    spawn_worker,
    update_docs_section,
)
from diffusers_mar import get_preset_config  # noqa: E402
from training.mar_loss import MARTrainingModule, weight_decay_param_groups  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", type=Path, help="LTH14/mar checkout (commit fe470ac).")
    parser.add_argument("--model", default="mar-base", choices=sorted(ORIGINAL_FACTORIES))
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps (after one warm-up step).")
    parser.add_argument("--diffusion-batch-mul", type=int, default=4)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--worker", choices=["ours", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.batch_sizes = args.batch_sizes or ([64] if args.device == "cuda" else [8])
    return args


def _timed_steps(args: argparse.Namespace, param_groups: list[dict], step_loss, batch_size: int) -> dict:
    device = args.device
    config = get_preset_config(args.model)["transformer"]
    latents = torch.randn(
        batch_size, config["in_channels"], config["sample_size"], config["sample_size"], device=device
    )
    labels = torch.randint(0, config["num_classes"], (batch_size,), device=device)
    optimizer = torch.optim.AdamW(param_groups, lr=1e-4, betas=(0.9, 0.95))
    autocast = torch.autocast(device, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()

    def step():
        with autocast:
            loss = step_loss(latents, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    step()  # warm-up: allocates gradients and optimizer state
    result: dict = {}
    with measure_memory(device, result):
        totals, _ = Timer(device).time(lambda: [step() for _ in range(args.steps)])
    seconds = totals["total"] / args.steps
    result.update(seconds_per_step=seconds, images_per_second=batch_size / seconds)
    return result


def run_ours(args: argparse.Namespace, batch_size: int) -> dict:
    pipe = load_ours(args, args.device, torch.float32)
    module = MARTrainingModule(
        pipe.transformer, pipe.diffusion_head, pipe.scheduler, diffusion_batch_mul=args.diffusion_batch_mul
    ).train()
    groups = weight_decay_param_groups(module.transformer, module.diffusion_head, 0.02)
    return _timed_steps(args, groups, module, batch_size)


def run_official(args: argparse.Namespace, batch_size: int) -> dict:
    model = original_model(args, args.model, num_sampling_steps=100, diffusion_batch_mul=args.diffusion_batch_mul)
    model.load_state_dict(load_file(str(args.weights)), strict=True)
    model.to(args.device).train()
    # As LTH14/mar util/misc.py add_weight_decay: no decay on 1-D tensors, biases and the diffusion loss MLP.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim == 1 or name.endswith(".bias") or name.startswith("diffloss.")
        (no_decay if skip else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.02}]
    return _timed_steps(args, groups, model, batch_size)


def _spawn(args: argparse.Namespace, worker: str, batch_size: int) -> dict:
    extra = ["--batch-sizes", str(batch_size), "--steps", str(args.steps)]
    return spawn_worker(__file__, args, worker, extra + ["--diffusion-batch-mul", str(args.diffusion_batch_mul)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        run = run_ours if args.worker == "ours" else run_official
        print(json.dumps(run(args, args.batch_sizes[0])))
        return 0

    have_official = args.original_repo is not None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.weights = Path(tmp) / "weights.safetensors"
        make_original_weights(args, args.weights)
        for batch_size in args.batch_sizes:
            row = {"batch_size": batch_size, "ours": _spawn(args, "ours", batch_size)}
            if have_official:
                row["official"] = _spawn(args, "official", batch_size)
            rows.append(row)
            print(json.dumps(row), flush=True)

    lines = [
        "| batch | ours img/s | ours peak MB |"
        + (" official img/s | official peak MB | speed-up |" if have_official else "")
    ]
    lines.append("|---:|---:|---:|" + ("---:|---:|---:|" if have_official else ""))
    for row in rows:
        ours, official = row["ours"], row.get("official")
        line = f"| {row['batch_size']} | {ours['images_per_second']:.2f} | {ours['peak_memory_mb']:.0f} |"
        if official:
            ratio = ours["images_per_second"] / official["images_per_second"]
            line += f" {official['images_per_second']:.2f} | {official['peak_memory_mb']:.0f} | {ratio:.2f}x |"
        lines.append(line)
    command = recorded_command(__file__, argv)
    section = (
        f"## Training step: ours vs official ({args.model})\n\nMachine: {machine_description(args.device, args.dtype, args.threads)}. One step = loss "
        f"(diffusion_batch_mul {args.diffusion_batch_mul}) + backward + AdamW, train mode; mean of {args.steps} steps "
        f"after a warm-up step. Peak memory: {rows[0]['ours']['memory_kind']}.\nCommand: `{command}`\n\n"
        + "\n".join(lines)
        + "\n"
    )
    print(section)
    if args.write_docs:
        update_docs_section(section, section_markers("bench_training"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
