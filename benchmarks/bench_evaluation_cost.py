"""What a 50K-image evaluation of MAR-B/L/H costs: FLOPs per image (counted) and images/s (measured).

For each preset a pipeline with random weights (the preset's transformer and head, the KL-16 VAE architecture) is
built. `torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of one full call (transformer, diffusion head,
guidance and VAE decoding) at the paper's settings (64 x 100 steps, guidance on), divided by the batch size; the
throughput is the median of `--repeats` timed calls at `--batch-size` after one untimed warm-up call. FID's
Inception-v3 (random weights) is timed on uint8 256x256 images. Weights do not change the cost of either.

    python benchmarks/bench_evaluation_cost.py --device cuda --dtype bfloat16 --output-json cost.json
    python benchmarks/bench_evaluation_cost.py --models mar-base --num-inference-steps 4 --num-diffusion-steps 4  # CPU

Results and the GPU-hours per 50K: docs/evaluation.md ("What it costs").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_mar import (  # noqa: E402
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
    get_preset_config,
)
from diffusers_mar.evaluation.inception import InceptionV3Features  # noqa: E402

# The KL-16 VAE of LTH14/mar (ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks, attention at 16x16, 16 latent channels).
KL16_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [128, 128, 256, 256, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.2325,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_pipeline(name: str, device: str, dtype: torch.dtype) -> MARPipeline:
    config = get_preset_config(name)
    torch.manual_seed(0)
    pipe = MARPipeline(
        MARTransformer2DModel.from_config(config["transformer"]).eval(),
        MARDiffusionHead.from_config(config["diffusion_head"]).eval(),
        MARDDPMScheduler(),
        vae=AutoencoderKL(**KL16_CONFIG).eval(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(pipe, batch_size: int, repeats: int, device: str, **settings) -> tuple[float, float, list[float]]:
    """(FLOPs per image, median images/s, all images/s)."""
    labels = [i % 1000 for i in range(batch_size)]
    flop_batch = min(batch_size, 2)
    with FlopCounterMode(display=False) as counter:
        pipe(labels[:flop_batch], generator=torch.manual_seed(0), output_type="np", **settings)
    flops = counter.get_total_flops() / flop_batch
    pipe(labels, generator=torch.manual_seed(0), output_type="np", **settings)  # warm-up
    rates = []
    for repeat in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        pipe(labels, generator=torch.manual_seed(repeat + 1), output_type="np", **settings)
        synchronize(device)
        rates.append(batch_size / (time.perf_counter() - start))
    return flops, statistics.median(rates), rates


def measure_inception(device: str, batch_size: int, repeats: int) -> dict:
    model = InceptionV3Features().eval().to(device)
    images = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    rates = []
    with torch.no_grad():
        model(images)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(images)
            synchronize(device)
            rates.append(batch_size / (time.perf_counter() - start))
    return {"flops_per_image": counter.get_total_flops(), "images_per_second": statistics.median(rates), "all": rates}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["mar-base", "mar-large", "mar-huge"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-inference-steps", type=int, default=64)
    parser.add_argument("--num-diffusion-steps", type=int, default=100)
    parser.add_argument("--inception-batch-size", type=int, default=0, help="0: skip Inception")
    parser.add_argument("--output-json")
    args = parser.parse_args(argv)
    settings = {
        "num_inference_steps": args.num_inference_steps,
        "num_diffusion_steps": args.num_diffusion_steps,
        "guidance_scale": 3.0,
    }
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"machine": machine, "torch": torch.__version__, "dtype": args.dtype, "settings": settings, "models": {}}
    results["batch_size"] = args.batch_size
    for name in args.models:
        pipe = build_pipeline(name, args.device, DTYPES[args.dtype])
        flops, rate, rates = measure(pipe, args.batch_size, args.repeats, args.device, **settings)
        hours = 50_000 / rate / 3600
        results["models"][name] = {
            "flops_per_image": flops,
            "images_per_second": rate,
            "all_images_per_second": rates,
            "hours_per_50k": hours,
        }
        print(
            f"{name}: {flops / 1e12:.2f} TFLOP/image, {rate:.2f} img/s ({min(rates):.2f}-{max(rates):.2f}), "
            f"{hours:.2f} h per 50K on one {machine}",
            flush=True,
        )
        del pipe
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.inception_batch_size:
        results["inception"] = measure_inception(args.device, args.inception_batch_size, args.repeats)
        print(f"inception: {results['inception']}", flush=True)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
