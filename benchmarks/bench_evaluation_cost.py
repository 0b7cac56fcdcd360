"""What a 50K-image evaluation of MAR-B/L/H costs: FLOPs per image (counted) and images/s (measured).

For each preset a pipeline with random weights (the preset's transformer and head, the KL-16 VAE architecture) is
built. `torch.utils.flop_counter.FlopCounterMode` counts the FLOPs of one full call (transformer, diffusion head,
guidance and VAE decoding), divided by the batch size; `--count-only` counts them part by part on the meta device
instead (`count_flops_per_image`: no arithmetic, so MAR-H at 256 x 100 steps takes seconds). The throughput is the median of `--repeats` timed calls at `--batch-size` after one untimed warm-up call. FID's
Inception-v3 (random weights) is timed on uint8 256x256 images. Weights do not change the cost of either.

    python benchmarks/bench_evaluation_cost.py --device cuda --dtype bfloat16 --output-json cost.json
    python benchmarks/bench_evaluation_cost.py --models mar-base --num-inference-steps 4 --num-diffusion-steps 4  # CPU
    python benchmarks/bench_evaluation_cost.py --count-only --num-inference-steps 256  # FLOPs only, in seconds

Results and the GPU-hours per 50K: docs/evaluation.md ("What it costs").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmarking_utils import Timer, interleaved, spread  # noqa: E402
from diffusers_mar import (  # noqa: E402
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
    get_preset_config,
)
from diffusers_mar.evaluation.inception import InceptionV3Features  # noqa: E402
from diffusers_mar.pipelines.schedules import mask_schedule  # noqa: E402

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


def _flops(module, *inputs) -> int:
    with FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


def count_flops_per_image(
    name: str, num_inference_steps: int, num_diffusion_steps: int, guidance: bool = True
) -> dict:
    """FLOPs of one image at a setting, by parts, counted on the meta device (shapes only, no arithmetic): the
    encoder on the class slots + known tokens of each step, the decoder on all positions (its last block on the
    predicted ones), the head once per predicted token and diffusion step, all doubled by guidance; the VAE decoder."""
    config = get_preset_config(name)
    with torch.device("meta"):
        transformer = MARTransformer2DModel.from_config(config["transformer"]).eval()
        head = MARDiffusionHead.from_config(config["diffusion_head"]).eval()
        vae = AutoencoderKL(**KL16_CONFIG).eval()
    meta = {"device": "meta"}
    buffer, num_tokens = transformer.config.buffer_size, transformer.num_tokens
    encoder_dim, decoder_dim = transformer.encoder_dim, transformer.decoder_dim
    unknown_after = mask_schedule(num_tokens, num_inference_steps)
    parts = {"encoder": 0, "decoder": 0, "head": 0}
    unknown = num_tokens
    with torch.no_grad():
        rows = 1000
        head_inputs = (
            torch.empty(rows, head.config.in_channels, **meta),
            torch.zeros(rows, dtype=torch.long, **meta),
            torch.empty(rows, decoder_dim, **meta),
        )
        head_row = _flops(head, *head_inputs) / rows
        decoder_input = torch.empty(1, buffer + num_tokens, decoder_dim, **meta)
        decoder_body = sum(_flops(block, decoder_input) for block in transformer.decoder_blocks[:-1])
        for step in range(num_inference_steps):
            known = num_tokens - unknown
            predicted = unknown if step == num_inference_steps - 1 else unknown - unknown_after[step]
            x = torch.empty(1, buffer + known, encoder_dim, **meta)
            parts["encoder"] += sum(_flops(block, x) for block in transformer.encoder_blocks)
            parts["encoder"] += _flops(transformer.proj_in, torch.empty(1, known, transformer.token_dim, **meta))
            parts["decoder"] += _flops(transformer.decoder_embed, x) + decoder_body
            queries = torch.zeros(1, predicted, dtype=torch.long, **meta)
            parts["decoder"] += _flops(transformer.decoder_blocks[-1], decoder_input, queries)
            parts["head"] += head_row * predicted * num_diffusion_steps
            unknown -= predicted
        latents = torch.empty(1, 16, 16, 16, **meta)
        vae_flops = _flops(vae.decode, latents)
    factor = 2 if guidance else 1
    parts = {key: value * factor for key, value in parts.items()}
    parts["vae_decoder"] = vae_flops
    parts["total"] = sum(parts.values())
    return parts


def measure(pipe, batch_size: int, repeats: int, device: str, **settings) -> tuple[float, float, list[float]]:
    """(FLOPs per image, median images/s, all images/s)."""
    labels = [i % 1000 for i in range(batch_size)]
    flop_batch = min(batch_size, 2)
    with FlopCounterMode(display=False) as counter:
        pipe(labels[:flop_batch], generator=torch.manual_seed(0), output_type="np", **settings)
    flops = counter.get_total_flops() / flop_batch
    pipe(labels, generator=torch.manual_seed(0), output_type="np", **settings)  # warm-up
    seeds = itertools.count(1)  # a new seed for each timed call
    call = lambda: pipe(labels, generator=torch.manual_seed(next(seeds)), output_type="np", **settings)  # noqa: E731
    rates = [batch_size / timed["pipe"][0]["total"] for timed in interleaved({"pipe": call}, repeats, Timer(device))]
    return flops, spread(rates)["median"], rates


def measure_inception(device: str, batch_size: int, repeats: int) -> dict:
    model = InceptionV3Features().eval().to(device)
    images = torch.randint(0, 256, (batch_size, 3, 256, 256), dtype=torch.uint8, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images[:1])
    with torch.no_grad():
        model(images)
        rounds = interleaved({"inception": lambda: model(images)}, repeats, Timer(device))
        rates = [batch_size / timed["inception"][0]["total"] for timed in rounds]
    return {"flops_per_image": counter.get_total_flops(), "images_per_second": spread(rates)["median"], "all": rates}


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
    parser.add_argument("--count-only", action="store_true", help="only count FLOPs (meta device, no timing)")
    parser.add_argument("--no-guidance", action="store_true", help="count without classifier-free guidance")
    parser.add_argument("--output-json")
    args = parser.parse_args(argv)
    if args.count_only:
        counts = {}
        for name in args.models:
            counts[name] = count_flops_per_image(
                name, args.num_inference_steps, args.num_diffusion_steps, guidance=not args.no_guidance
            )
            parts = ", ".join(f"{key} {value / 1e12:.2f}" for key, value in counts[name].items())
            print(
                f"{name} {args.num_inference_steps} x {args.num_diffusion_steps}: TFLOP per image: {parts}", flush=True
            )
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(counts, indent=2))
        return 0
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
