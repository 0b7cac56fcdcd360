"""Train VAR's multi-scale VQ-VAE tokenizer (`VARVQModel`) from scratch, or fine-tune one, with Accelerate.

    python training/train_vqvae.py --dataset_name digits --output_dir vqvae-digits
    accelerate launch --multi_gpu --num_processes 8 training/train_vqvae.py --train_data_dir ./images ...

FoundationVision/VAR did not release its tokenizer's training; the objective (`training/vqvae_loss.py`) follows its
training-mode quantiser (`models/quant.py` `VectorQuantizer2.forward`: commitment and codebook terms with beta,
straight-through) and the VQGAN recipe's reconstruction (L2 or L1) and optional perceptual (LPIPS) and adversarial (PatchGAN, hinge, adaptive weight) terms. Codebook
health (usage, perplexity and dead codes per scale) is logged, and `--restart_dead_codes_every N` re-initialises dead
codes from the residuals of the batch. Data, checkpoints, resume, EMA, logging, Ctrl-C and the one-run-per-folder
rule are train_mar.py's (its helpers and `training/data.py`). The result is a `VARVQModel` folder in `--output_dir`
(`config.json`, weights, a model card with the codebook health and the per-scale reconstruction error), which
`train_mar.py --model_family var --pretrained_vqvae` trains a VAR on.

See docs/training.md for the commands.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import math
import os
import shutil
import socket
import sys
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training.*` importable when run as a script

import huggingface_hub
import numpy as np
import torch
from accelerate import Accelerator, init_empty_weights
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from huggingface_hub import ModelCard, ModelCardData
from tqdm.auto import tqdm

from diffusers_mar import VARVQModel
from training.data import DIGITS, check_image_folder, check_local_path
from training.launch import StopRequest, launch_command, run_script
from training.train_mar import (
    TokenSpace,
    _config_type_error,
    check_output_dir,
    clear_run_outputs,
    learning_rate_at,
    load_checkpoint,
    load_data,
    make_schedule,
    resume_hint,
    save_checkpoint,
    setup_accelerator,
    stop_requested,
)
from training.vqvae_loss import (
    CodebookStats,
    PatchDiscriminator,
    VQVAETrainingModule,
    adaptive_weight,
    hinge_discriminator_loss,
    restart_dead_codes,
    scale_hits,
)

logger = get_logger(__name__, log_level="INFO")

SCRIPT = "training/train_vqvae.py"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
# VAR's released tokenizer (vq-f16, 4096 codes, 10 scales, 256 px) and the digits one (see docs/training.md).
PRESETS = {"vqvae-f16": CONFIGS_DIR / "vqvae-f16.json", "vqvae-digits": CONFIGS_DIR / "vqvae-digits.json"}
MODEL_ITEMS = ("config.json", "diffusion_pytorch_model.safetensors", "README.md")
NUM_EVAL_IMAGES = 64


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train or fine-tune VAR's tokenizer (VARVQModel) with Accelerate.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="Image folder (sub-folders are ignored).")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=f"A `datasets` dataset (Hub id or local path) with an image column, or '{DIGITS}' (scikit-learn's 8x8 "
        "digits, no download).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--label_column", type=str, default="label", help="Unused by the tokenizer; read if present.")
    data.add_argument("--cache_dir", type=str, default=None, help="Cache folder of `datasets`.")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--resolution", type=int, default=None, help="Default: the model's sample_size.")
    data.add_argument("--image_mode", type=str, default="RGB", choices=["RGB", "L"])
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None)
    data.add_argument("--bad_images", type=str, default="error", choices=["error", "skip"])

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_config",
        type=str,
        default=None,
        help=f"{' | '.join(PRESETS)} | a JSON file of VARVQModel arguments (default: vqvae-f16; digits: "
        "vqvae-digits).",
    )
    model.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Change one VARVQModel config value, e.g. `num_vq_embeddings=512`.",
    )
    model.add_argument(
        "--pretrained_vqvae", type=str, default=None, help="A VARVQModel folder or Hub id to fine-tune."
    )

    objective = parser.add_argument_group("objective")
    objective.add_argument("--reconstruction_loss", type=str, default="l2", choices=["l1", "l2"])
    objective.add_argument("--reconstruction_weight", type=float, default=1.0)
    objective.add_argument("--beta", type=float, default=None, help="Commitment weight (default: the model's, 0.25).")
    objective.add_argument(
        "--perceptual_weight", type=float, default=0.0, help="LPIPS (VGG) weight; needs `lpips` and a download."
    )
    objective.add_argument(
        "--adversarial_weight",
        type=float,
        default=0.0,
        help="Weight of VQGAN's adversarial term (a PatchGAN discriminator, hinge loss, adaptive weight; 0: off).",
    )
    objective.add_argument(
        "--adversarial_start", type=int, default=0, help="First step of the adversarial term and discriminator."
    )
    objective.add_argument(
        "--discriminator_layers", type=int, default=3, help="PatchGAN stride-2 layers (fewer for small images)."
    )
    objective.add_argument("--discriminator_channels", type=int, default=64)
    objective.add_argument(
        "--discriminator_learning_rate", type=float, default=None, help="Default: the tokenizer's learning rate."
    )
    objective.add_argument(
        "--restart_dead_codes_every",
        type=int,
        default=0,
        help="Every N steps, re-initialise the codes unused at every scale from the batch's residuals (0: never).",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=32, help="Per device.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_epochs", type=int, default=100)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_epochs.")
    optim.add_argument("--learning_rate", type=float, default=None, help="Absolute rate; overrides --blr.")
    optim.add_argument("--blr", type=float, default=1e-4, help="Base rate: lr = blr * global batch / 256.")
    optim.add_argument("--min_lr", type=float, default=0.0)
    optim.add_argument("--lr_scheduler", type=str, default="constant", choices=["constant", "cosine"])
    optim.add_argument("--lr_warmup_epochs", type=float, default=1.0)
    optim.add_argument("--lr_warmup_steps", type=int, default=None, help="Overrides --lr_warmup_epochs.")
    optim.add_argument("--adam_beta1", type=float, default=0.5, help="VQGAN's Adam betas (0.5, 0.9).")
    optim.add_argument("--adam_beta2", type=float, default=0.9)
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument("--ema_decay", type=float, default=0.0, help="0: the saved weights are the trained ones.")
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--dataloader_num_workers", type=int, default=0)

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="vqvae-model", help="Must be new or empty, unless resuming.")
    output.add_argument("--overwrite_output_dir", action="store_true")
    output.add_argument("--checkpointing_steps", type=int, default=5000)
    output.add_argument("--checkpoints_total_limit", type=int, default=None)
    output.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    output.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard | wandb | all | none.")
    output.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    output.add_argument("--tracker_project_name", type=str, default="train_vqvae")
    output.add_argument("--license", type=str, default="mit", help="License in the model card's metadata.")

    args = parser.parse_args(input_args)
    args.argv = list(input_args if input_args is not None else sys.argv[1:])
    args.command = launch_command(SCRIPT, args.argv)
    # What train_mar.py's shared helpers read.
    args.cached_latents_dir, args.num_classes, args.pretrained_model = None, None, None

    # Checks that need no data: fail before any work.
    sources = [name for name in ("train_data_dir", "dataset_name") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError(f"Give exactly one of --train_data_dir, --dataset_name; got {sources or 'none'}.")
    if args.train_data_dir is not None:
        check_image_folder(args.train_data_dir)
    if args.resume_from_checkpoint not in (None, "latest"):
        if not (Path(args.resume_from_checkpoint) / "training_state.json").is_file():
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder of this script "
                "(a checkpoint-N folder with training_state.json); give 'latest' or an existing checkpoint-N folder."
            )
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    check_local_path("--pretrained_vqvae", args.pretrained_vqvae)
    if args.pretrained_vqvae is not None and (args.model_config is not None or args.overrides):
        raise ValueError(
            "--pretrained_vqvae fixes the architecture; do not combine it with --model_config/--override."
        )
    if args.model_config is not None and args.model_config not in PRESETS and not Path(args.model_config).is_file():
        raise ValueError(
            f"--model_config must be one of {sorted(PRESETS)} or a JSON file; {args.model_config!r} is neither."
        )
    if args.pretrained_vqvae is None:
        model_config(args)  # keys and value types
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}.")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}.")
    if args.restart_dead_codes_every < 0:
        raise ValueError(f"--restart_dead_codes_every must be >= 0; got {args.restart_dead_codes_every}.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1]; got {args.ema_decay}.")
    if args.dataset_name == DIGITS and args.image_mode != "RGB":
        raise ValueError("--image_mode does not apply to digits (they are single-channel).")
    check_adversarial_args(args)
    check_downloaded_terms(args)
    return args


def check_adversarial_args(args: argparse.Namespace) -> None:
    """The adversarial flags, before any work (the image size is checked against the layers once the model is
    known, in `make_discriminator`)."""
    if args.adversarial_weight < 0:
        raise ValueError(f"--adversarial_weight must be >= 0; got {args.adversarial_weight}.")
    if args.adversarial_start < 0:
        raise ValueError(f"--adversarial_start must be >= 0; got {args.adversarial_start}.")
    if args.discriminator_layers < 1 or args.discriminator_channels < 1:
        raise ValueError(
            f"--discriminator_layers and --discriminator_channels must be >= 1; got {args.discriminator_layers} "
            f"and {args.discriminator_channels}."
        )
    if args.discriminator_learning_rate is not None and args.discriminator_learning_rate <= 0:
        raise ValueError(f"--discriminator_learning_rate must be > 0; got {args.discriminator_learning_rate}.")
    if args.adversarial_weight > 0 and args.gradient_accumulation_steps > 1:
        raise ValueError(
            "--adversarial_weight with --gradient_accumulation_steps > 1 is not supported: the generator's step "
            "leaves gradients in the discriminator that its own step clears; use a larger --train_batch_size."
        )


def make_discriminator(args: argparse.Namespace, config) -> PatchDiscriminator | None:
    """The PatchGAN discriminator of `--adversarial_weight` > 0, refused when its layers leave no patch of the
    images."""
    if args.adversarial_weight <= 0:
        return None
    side = PatchDiscriminator.output_size(config.sample_size, args.discriminator_layers)
    if side < 1:
        fits = max((n for n in range(1, 9) if PatchDiscriminator.output_size(config.sample_size, n) >= 1), default=0)
        raise ValueError(
            f"--discriminator_layers {args.discriminator_layers} leaves no patch of {config.sample_size}x"
            f"{config.sample_size} images; use at most {fits}."
        )
    return PatchDiscriminator(config.in_channels, args.discriminator_channels, args.discriminator_layers)


def generator_term(discriminator: torch.nn.Module, output, vqvae: VARVQModel) -> tuple[torch.Tensor, dict]:
    """VQGAN's generator term `lambda * -mean(D(x_hat))` (before `--adversarial_weight`), with its logs."""
    generator_loss = -discriminator(output.sample).mean()
    weight = adaptive_weight(output.nll, generator_loss, vqvae.decoder.conv_out.weight)
    return weight * generator_loss, {"adversarial_weight": float(weight), "generator_loss": generator_loss.item()}


def discriminator_step(
    accelerator: Accelerator, discriminator, optimizer, pixels: torch.Tensor, sample: torch.Tensor, lr: float
) -> dict:
    """One step of the discriminator on the real images and the detached reconstructions (hinge loss); its logs."""
    optimizer.zero_grad(set_to_none=True)  # drop what the generator's backward left in it
    for group in optimizer.param_groups:
        group["lr"] = lr
    # One call on both halves (the norm is per image): distributed data parallel expects one forward per backward.
    logits_real, logits_fake = discriminator(torch.cat([pixels, sample.detach().to(pixels.dtype)])).chunk(2)
    loss = hinge_discriminator_loss(logits_real, logits_fake)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "discriminator_loss": loss.item(),
        "logits_real": logits_real.mean().item(),
        "logits_fake": logits_fake.mean().item(),
    }


def check_downloaded_terms(args: argparse.Namespace) -> None:
    """The perceptual term needs weights from the network (torchvision's VGG16 through `lpips`): refuse it, with the
    reason, when they cannot be had, instead of training without it."""
    if args.perceptual_weight <= 0:
        return
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise ValueError(
            "--perceptual_weight needs the LPIPS network's weights (torchvision's VGG16, downloaded at first use) but "
            "HF_HUB_OFFLINE is set: this run is offline. Unset it, or train with --perceptual_weight 0."
        )
    try:
        import lpips  # noqa: F401
    except ImportError:
        raise ValueError(
            "--perceptual_weight needs the `lpips` package (and torchvision): pip install lpips torchvision; or "
            "train with --perceptual_weight 0."
        ) from None
    try:
        socket.create_connection(("download.pytorch.org", 443), timeout=5).close()
    except OSError as error:
        raise ValueError(
            f"--perceptual_weight needs the LPIPS network's weights from download.pytorch.org, which cannot be "
            f"reached ({type(error).__name__}: {error}); train with --perceptual_weight 0."
        ) from None


def model_config(args: argparse.Namespace) -> dict:
    """The VARVQModel config of `--model_config` (or the data's default) with `--override`s, keys and types checked."""
    name = args.model_config or ("vqvae-digits" if args.dataset_name == DIGITS else "vqvae-f16")
    config = json.loads(Path(PRESETS.get(name, name)).read_text())
    hints = {k: v for k, v in typing.get_type_hints(VARVQModel.__init__).items() if k != "return"}
    for override in args.overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"--override {override!r} must read KEY=VALUE (a VARVQModel config key).")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    unknown = set(config) - set(hints)
    if unknown:
        raise ValueError(f"Unknown VARVQModel config keys {sorted(unknown)}; allowed: {sorted(hints)}.")
    for key, value in config.items():
        if isinstance(value, list):
            continue  # ch_mult, patch_nums, phi_indices: VARVQModel checks them
        error = _config_type_error(value, hints[key])
        if error is not None:
            raise ValueError(f"Model config: {key} {error}.")
    try:
        with init_empty_weights():  # the checks of __init__ without allocating the weights
            VARVQModel.from_config(config)
    except (ValueError, TypeError) as error:
        raise ValueError(f"Model config {name!r}: {error}") from None
    return config


# --------------------------------------------------------------------------------------------------------------------
# Evaluation and the model card
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reconstruction_table(vqvae: VARVQModel, images: torch.Tensor) -> list[dict[str, float]]:
    """Per scale `k`: the error of decoding the partial sum of scales `0 .. k` (images in [-1, 1]): MSE and PSNR."""
    was_training = vqvae.training
    vqvae.eval()
    latents = vqvae.quant_conv(vqvae.encoder(images))
    _, partial_sums = vqvae.quantize(latents)
    rows = []
    for side, f_hat in zip(vqvae.patch_nums, partial_sums):
        decoded = vqvae.decode_latents(f_hat).sample
        mse = (decoded.float() - images.float()).square().mean().item()
        psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # the range of [-1, 1] is 2
        rows.append({"side": side, "tokens": side * side, "mse": mse, "psnr": psnr})
    vqvae.train(was_training)
    return rows


def model_card(
    args: argparse.Namespace,
    data_name: str,
    num_images: int,
    vqvae: VARVQModel,
    global_step: int,
    steps_per_epoch: int,
    global_batch: int,
    recent_losses: list[float],
    health: list[dict[str, float]],
    reconstruction: list[dict[str, float]],
    restarted: int,
) -> ModelCard:
    """The tokenizer folder's card: the run, the codebook health and the per-scale reconstruction error."""
    config = vqvae.config
    final_loss = (
        f"{np.mean(recent_losses):.4f} (mean of the last {len(recent_losses)} steps)" if recent_losses else "n/a"
    )
    details = {
        "data": f"{data_name} ({num_images} images, {config.in_channels}x{config.sample_size}x{config.sample_size})",
        "model": args.pretrained_vqvae or args.model_config or "default",
        "codebook": f"{config.num_vq_embeddings} codes of {vqvae.vq_embed_dim} channels, scales "
        f"{'-'.join(str(p) for p in config.patch_nums)}",
        "training": f"{global_step} optimizer steps ({global_step / steps_per_epoch:.2f} epochs), global batch "
        f"{global_batch}",
        "losses": f"{args.reconstruction_loss} x {args.reconstruction_weight}, commitment beta {args.beta}, "
        f"LPIPS x {args.perceptual_weight}, adversarial x {args.adversarial_weight}"
        + (
            f" (PatchGAN of {args.discriminator_layers} layers from step {args.adversarial_start}, hinge loss, "
            "adaptive weight)"
            if args.adversarial_weight > 0
            else ""
        ),
        "final loss": final_loss,
        "dead-code restarts": f"{restarted} codes" + ("" if args.restart_dead_codes_every else " (off)"),
        "parameters": f"{sum(p.numel() for p in vqvae.parameters()):,}",
    }
    health_rows = "\n".join(
        f"| {row['side']}x{row['side']} | {row['usage']:.1f} | {row['perplexity']:.1f} | {row['dead']} |"
        for row in health
    )
    recon_rows = "\n".join(
        f"| 1..{k + 1} ({row['side']}x{row['side']}) | {row['mse']:.5f} | {row['psnr']:.2f} |"
        for k, row in enumerate(reconstruction)
    )
    metadata = ModelCardData(
        license=args.license,
        library_name="diffusers",
        tags=["diffusers", "diffusers-mar", "var", "vq-vae", "tokenizer"],
    )
    text = f"""---
{metadata.to_yaml()}
---

# VAR tokenizer trained on {data_name}

A multi-scale residual VQ-VAE (`VARVQModel`, the tokenizer of *Visual Autoregressive Modeling*, Tian et al. 2024,
[FoundationVision/VAR](https://github.com/FoundationVision/VAR)) for `diffusers-mar`, trained with
`training/train_vqvae.py`.

| | |
|---|---|
{chr(10).join(f"| {key} | {value} |" for key, value in details.items())}

## Usage

```python
from diffusers_mar import VARVQModel

vqvae = VARVQModel.from_pretrained("{args.output_dir}")
indices = vqvae.encode(images).indices  # images in [-1, 1]; one (B, side * side) tensor per scale
images = vqvae.decode(indices).sample
```

Train a VAR on it: `python training/train_mar.py --model_family var --pretrained_vqvae {args.output_dir} ...`.

## Codebook health

Average code hits per scale (decay 0.9, then 0.99 after 100 steps); a code is unused at a scale below 8% of a
uniform share of that scale's positions.

| scale | usage (%) | perplexity | dead codes |
|---|---|---|---|
{health_rows}

## Reconstruction error per scale

Decoding the partial sum of the first scales, on the first {NUM_EVAL_IMAGES} training images (at most), in [-1, 1]:

| scales | MSE | PSNR (dB) |
|---|---|---|
{recon_rows}

## Training

Training command (from the repository root):

```bash
{args.command}
```
"""
    return ModelCard(text)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def build_vqvae(args: argparse.Namespace) -> VARVQModel:
    set_seed(args.seed)  # every process builds the same initial weights
    if args.pretrained_vqvae is not None:
        return VARVQModel.from_pretrained(args.pretrained_vqvae)
    return VARVQModel.from_config(model_config(args))


def make_perceptual(args: argparse.Namespace) -> torch.nn.Module | None:
    if args.perceptual_weight <= 0:
        return None
    import lpips

    return lpips.LPIPS(net="vgg", verbose=False)


def codebook_step(
    args: argparse.Namespace,
    accelerator,
    vqvae: VARVQModel,
    stats: CodebookStats,
    hits: torch.Tensor,
    candidates: list[torch.Tensor],
    global_step: int,
) -> int:
    """Fold the step's hits of every process into `stats`; every `--restart_dead_codes_every` steps restart the codes
    unused at every scale from the residuals of every process (the same draw on each). Returns how many restarted."""
    stats.update(accelerator.reduce(hits, reduction="sum").cpu() / args.gradient_accumulation_steps)
    if not args.restart_dead_codes_every or (global_step + 1) % args.restart_dead_codes_every != 0:
        return 0
    batch = args.train_batch_size * accelerator.num_processes
    pool = accelerator.gather(torch.cat(candidates)).cpu()
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step)
    codes = restart_dead_codes(vqvae.embedding.weight.data, stats.dead(batch).all(dim=0), pool, generator)
    stats.hits[:, codes] = stats.margins(batch)[:, None]  # not dead again at once
    stats.restarted += codes.numel()
    return codes.numel()


def main(args: argparse.Namespace) -> Path:
    output_dir = Path(args.output_dir)

    # 1. Accelerator, logging, launch sanity
    accelerator = setup_accelerator(args)

    # 2. Model, data (every check runs here, before any output is written)
    vqvae = build_vqvae(args)
    config = vqvae.config
    if args.resolution not in (None, config.sample_size):
        raise ValueError(
            f"--resolution {args.resolution} differs from the model's sample_size {config.sample_size}; leave it out "
            "or change the model (--override sample_size=... with a patch_nums that fits)."
        )
    channels = 1 if args.dataset_name == DIGITS else len(args.image_mode)
    if config.in_channels != channels:
        raise ValueError(
            f"The model takes {config.in_channels}-channel images but the data gives {channels}-channel ones; pass "
            f"--override in_channels={channels} --override out_channels={channels} or --image_mode."
        )
    space = TokenSpace(None, config.sample_size, config.sample_size, channels, None)
    data = load_data(args, accelerator, space, None)
    args.beta = config.beta if args.beta is None else args.beta
    model = VQVAETrainingModule(
        vqvae, args.beta, args.reconstruction_loss, args.reconstruction_weight, args.perceptual_weight,
        make_perceptual(args),
    )  # fmt: skip
    vqvae.train()
    ema_kwargs = {"use_ema_warmup": False, "min_decay": args.ema_decay, "update_after_step": -1}
    ema = EMAModel(vqvae.parameters(), decay=args.ema_decay, **ema_kwargs)
    stats = CodebookStats(config.patch_nums, config.num_vq_embeddings)
    discriminator = make_discriminator(args, config)

    # 3. Data loader, optimizer, schedule
    train_dataloader = torch.utils.data.DataLoader(
        data.dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )
    if len(data.dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"The dataset has {len(data.dataset)} images, fewer than one batch of --train_batch_size "
            f"{args.train_batch_size} on each of {accelerator.num_processes} process(es)."
        )
    eval_images = torch.stack(
        [data.dataset[i]["pixel_values"] for i in range(min(NUM_EVAL_IMAGES, len(data.dataset)))]
    )
    optimizer = torch.optim.AdamW(
        vqvae.parameters(),
        lr=0.0,  # set at every step
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    set_seed(args.seed, device_specific=True)  # flips differ per process
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    d_optimizer = None
    if discriminator is not None:  # VQGAN's Adam (0.5, 0.9) for the discriminator; saved in the checkpoints
        d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=0.0, betas=(0.5, 0.9))
        discriminator, d_optimizer = accelerator.prepare(discriminator, d_optimizer)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(stats)
    unwrapped = accelerator.unwrap_model(model)
    if unwrapped.perceptual is not None:
        unwrapped.perceptual.to(accelerator.device)
    vqvae = unwrapped.vqvae
    schedule = make_schedule(args, accelerator.num_processes, len(train_dataloader))
    global_batch, base_lr, steps_per_epoch = schedule.global_batch, schedule.base_lr, schedule.steps_per_epoch
    max_train_steps, num_epochs, warmup_steps = schedule.max_train_steps, schedule.num_epochs, schedule.warmup_steps
    per_process_batch = args.train_batch_size * accelerator.num_processes  # positions a step's hits count

    # 4. Output folder, trackers, resume
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir:
            clear_run_outputs(output_dir, args.logging_dir, MODEL_ITEMS)
        for leftover in [*output_dir.glob("checkpoint-*.tmp"), *output_dir.glob("checkpoint-*.old")]:
            shutil.rmtree(leftover)
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)
    accelerator.wait_for_everyone()
    global_step, recent = 0, collections.deque(maxlen=100)
    if args.resume_from_checkpoint is not None:
        global_step, losses = load_checkpoint(
            accelerator, args.resume_from_checkpoint, output_dir, [ema], global_batch
        )
        recent.extend(losses)
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    def write_folder(path: Path) -> None:
        """The VARVQModel folder with the EMA weights and its card (main process only)."""
        ema.store(vqvae.parameters())
        ema.copy_to(vqvae.parameters())
        try:
            vqvae.save_pretrained(path, safe_serialization=True)
            table = reconstruction_table(vqvae, eval_images.to(accelerator.device))
        finally:
            ema.restore(vqvae.parameters())
        card = model_card(
            args, data.name, len(data.dataset), vqvae, global_step, steps_per_epoch, global_batch, list(recent),
            stats.summary(per_process_batch), table, stats.restarted,
        )  # fmt: skip
        card.save(path / "README.md")

    logger.info("***** Running training *****")
    logger.info(f"  Images = {len(data.dataset)}, {config.in_channels}x{config.sample_size}x{config.sample_size}")
    logger.info(f"  Per-device batch = {args.train_batch_size}, global batch = {global_batch}, lr = {base_lr:.3e}")
    logger.info(f"  Steps = {max_train_steps} ({steps_per_epoch} per epoch), warm-up steps = {warmup_steps}")

    # 5. Training loop
    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    with StopRequest(Path(SCRIPT).name) as stop_request:
        step_loss, step_start, step_hits, candidates = 0.0, time.perf_counter(), None, []
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            loader = train_dataloader
            if epoch == first_epoch and resume_batches > 0:
                loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            loader.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    pixels = batch["pixel_values"].float()
                    flip = (
                        torch.rand(pixels.shape[0]) < 0.5
                        if data.random_flip
                        else torch.zeros(pixels.shape[0], dtype=torch.bool)
                    )
                    pixels = torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)
                    lr = learning_rate_at(
                        global_step, base_lr, warmup_steps, max_train_steps, args.lr_scheduler, args.min_lr
                    )
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    output = model(pixels)
                    loss = output.loss
                    adversarial = discriminator is not None and global_step >= args.adversarial_start
                    if adversarial:  # the generator's term, at VQGAN's adaptive weight
                        term, adversarial_logs = generator_term(discriminator, output, vqvae)
                        loss = loss + args.adversarial_weight * term
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    if adversarial:  # the discriminator's step on the real images and the detached reconstructions
                        scale = (
                            1.0
                            if args.discriminator_learning_rate is None
                            else args.discriminator_learning_rate / base_lr
                        )
                        adversarial_logs.update(
                            discriminator_step(
                                accelerator, discriminator, d_optimizer, pixels, output.sample, lr * scale
                            )
                        )
                hits = scale_hits(output.indices, config.num_vq_embeddings)
                step_hits = hits if step_hits is None else step_hits + hits
                candidates.append(torch.cat(output.residuals))
                step_loss += (
                    accelerator.reduce(output.loss.detach(), reduction="mean").item()
                    / args.gradient_accumulation_steps
                )
                if not accelerator.sync_gradients:
                    continue
                if not math.isfinite(step_loss):
                    raise RuntimeError(f"The loss is {step_loss} at step {global_step}; stopping.")

                restarted = codebook_step(args, accelerator, vqvae, stats, step_hits, candidates, global_step)
                step_hits, candidates = None, []
                ema.step(vqvae.parameters())
                global_step += 1
                elapsed = time.perf_counter() - step_start
                logs = {
                    "loss": step_loss,
                    "reconstruction": output.reconstruction.item(),
                    "vq": output.vq.item(),
                    "perceptual": output.perceptual.item(),
                    **(adversarial_logs if adversarial else {}),
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "images_per_second": global_batch / elapsed,
                    "epoch": global_step / steps_per_epoch,
                    "restarted_codes": restarted,
                }
                for row in stats.summary(per_process_batch):
                    side = row["side"]
                    logs.update(
                        {
                            f"usage_{side}": row["usage"],
                            f"perplexity_{side}": row["perplexity"],
                            f"dead_{side}": row["dead"],
                        }
                    )
                recent.append(step_loss)
                accelerator.log(logs, step=global_step)
                progress_bar.update(1)
                progress_bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                step_loss = 0.0

                stopping = stop_requested(stop_request, accelerator)
                if stopping or global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                    state = {
                        "global_batch": global_batch,
                        "num_processes": accelerator.num_processes,
                        "recent_losses": list(recent),
                        "restarted_codes": stats.restarted,
                    }
                    save_checkpoint(
                        accelerator, output_dir, global_step, state, write_folder, args.checkpoints_total_limit,
                        folder_name="vqvae",
                    )  # fmt: skip
                if stopping:
                    raise KeyboardInterrupt
                step_start = time.perf_counter()
                if global_step >= max_train_steps:
                    break
        if stop_requested(stop_request, accelerator):
            raise KeyboardInterrupt
    progress_bar.close()

    # 6. Final VARVQModel folder (EMA weights, model card)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = output_dir / "vqvae.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        write_folder(staging)
        # config.json moves last: until then the folder is not a loadable model.
        for name in ("diffusion_pytorch_model.safetensors", "README.md", "config.json"):
            os.replace(staging / name, output_dir / name)
        shutil.rmtree(staging)
        logger.info(f"Saved the tokenizer to {output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    sys.exit(
        run_script("train_vqvae.py", parse_args, main, on_interrupt=functools.partial(resume_hint, script=SCRIPT))
    )
