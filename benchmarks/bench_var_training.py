"""Cost of a VAR training step: measured on this machine for the digits configs, counted in FLOPs for VAR's sizes.

    python benchmarks/bench_var_training.py

Times `--steps` optimizer steps (forward, backward, AdamW; batch `--batch_size`) of the digits tokenizer
(`training/configs/vqvae-digits.json`, `VQVAETrainingModule`) and of VAR-digits (`var-digits.json` on that tokenizer,
`VARTrainingModule`, the encoding included) and reports the median and the fastest step. Then counts the FLOPs of one
training step per image (`torch.utils.flop_counter`; VAR's sizes on the meta device, nothing allocated) for the
digits configs and for `vqvae-f16` / `var-d16` at 256 px, and scales the measured time per image by the FLOP ratio:
an estimate of the cost per ImageNet epoch (1,281,167 images) at this machine's measured FLOP rate, not a
measurement. Prints one JSON line; docs/training.md ("Cost estimates") records it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import machine_description  # noqa: E402
from diffusers_mar import VARTransformer2DModel, VARVQModel  # noqa: E402
from training.data import DigitsDataset  # noqa: E402
from training.var_loss import VARTrainingModule  # noqa: E402
from training.vqvae_loss import VQVAETrainingModule  # noqa: E402

CONFIGS = REPO_ROOT / "training" / "configs"
IMAGENET_IMAGES = 1_281_167


def build(vqvae_config: str, var_config: str, num_classes: int) -> tuple[VARVQModel, VARTransformer2DModel]:
    vqvae = VARVQModel.from_config(json.loads((CONFIGS / vqvae_config).read_text()))
    transformer = VARTransformer2DModel(
        patch_nums=list(vqvae.config.patch_nums),
        vocab_size=vqvae.config.num_vq_embeddings,
        vq_embed_dim=vqvae.vq_embed_dim,
        num_classes=num_classes,
        **json.loads((CONFIGS / var_config).read_text())["transformer"],
    )
    return vqvae, transformer


def step_seconds(module: torch.nn.Module, loss_fn, steps: int) -> tuple[float, float]:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = times[min(5, steps - 1) :]  # warm-up steps out
    return statistics.median(times), min(times)


def step_flops(loss_fn) -> float:
    with FlopCounterMode(display=False) as counter:
        loss_fn().backward()
    return counter.get_total_flops()


def flops_per_image(vqvae_config: str, var_config: str, device: str, batch: int = 1) -> tuple[float, float]:
    """FLOPs of one training step per image: the tokenizer's, and VAR's (transformer step + the encoder forward)."""
    with torch.device(device):
        vqvae, transformer = build(vqvae_config, var_config, 10 if device == "cpu" else 1000)
        size, channels = vqvae.config.sample_size, vqvae.config.in_channels
        pixels = torch.zeros(batch, channels, size, size)
        tokenizer = step_flops(lambda: VQVAETrainingModule(vqvae)(pixels).loss)
        # The teacher-forcing input's values do not change the count (and cannot be computed on the meta device).
        hidden = torch.zeros(batch, transformer.num_tokens - 1, vqvae.vq_embed_dim)
        labels = torch.zeros(batch, dtype=torch.long)
        var = step_flops(lambda: transformer(labels, hidden).sample.float().logsumexp(-1).mean())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vqvae.quant_conv(vqvae.encoder(pixels))
        var += counter.get_total_flops()
    return tokenizer / batch, var / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()

    torch.manual_seed(0)
    data = DigitsDataset(8)
    pixels, labels = data.images[: args.batch_size], data.labels[: args.batch_size]
    vqvae, transformer = build("vqvae-digits.json", "var-digits.json", 10)
    tokenizer = VQVAETrainingModule(vqvae)
    tokenizer_s = step_seconds(tokenizer, lambda: tokenizer(pixels).loss, args.steps)
    var = VARTrainingModule(transformer, vqvae)
    var_s = step_seconds(var, lambda: var(pixels, labels), args.steps)

    tiny = flops_per_image("vqvae-digits.json", "var-digits.json", "cpu")
    big = flops_per_image("vqvae-f16.json", "var-d16.json", "meta")
    per_image = {"tokenizer": tokenizer_s[0] / args.batch_size, "var": var_s[0] / args.batch_size}
    rate = {"tokenizer": tiny[0] / per_image["tokenizer"], "var": tiny[1] / per_image["var"]}  # FLOP/s measured
    result = {
        "machine": machine_description(),
        "batch_size": args.batch_size,
        "digits_step_seconds_median_min": {"tokenizer": tokenizer_s, "var": var_s},
        "digits_images_per_second": {k: 1 / v for k, v in per_image.items()},
        "digits_epoch_seconds": {k: len(data) * v for k, v in per_image.items()},
        "gflops_per_image_step": {"vqvae-digits": tiny[0] / 1e9, "var-digits": tiny[1] / 1e9},
        "gflops_per_image_step_256px": {"vqvae-f16": big[0] / 1e9, "var-d16": big[1] / 1e9},
        "measured_gflops_per_second": {k: v / 1e9 for k, v in rate.items()},
        "imagenet_epoch_hours_digits_configs": {k: IMAGENET_IMAGES * v / 3600 for k, v in per_image.items()},
        "imagenet_epoch_hours_256px_estimate": {
            "vqvae-f16": IMAGENET_IMAGES * big[0] / rate["tokenizer"] / 3600,
            "var-d16": IMAGENET_IMAGES * big[1] / rate["var"] / 3600,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
