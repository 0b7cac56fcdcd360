"""Train MAR from scratch, or fine-tune a converted one, with Accelerate: from one CPU to many GPUs.

    python training/train_mar.py --train_data_dir ./my_images --pretrained_vae ./kl16 --output_dir out
    accelerate launch --multi_gpu --num_processes 8 training/train_mar.py ...

The defaults are the paper's recipe (LTH14/mar `main_mar.py`, `engine_mar.py`): AdamW (0.9, 0.95), weight decay
0.02 except on 1-D tensors, biases and the diffusion head, `lr = blr * global_batch / 256` with blr 1e-4, 100 epochs
of linear warm-up then a constant rate, gradient clipping at 3.0, EMA 0.9999 from the first step, random orders,
a truncated-normal mask ratio on [0.7, 1], label dropout 0.1 and `diffusion_batch_mul` 4. The loss lives in
`training/mar_loss.py`, the data in `training/data.py`. The result is a `MARPipeline` folder (EMA weights, the
recommended sampling settings in `model_index.json`, a model card) in `--output_dir`.

`--model_family ar` trains the paper's causal AR instead (`ARTransformer2DModel`, loss in `training/ar_loss.py`):
teacher forcing over every position, the Diffusion Loss on every token, `--order raster | random | anneal` (RAR's
annealing from random to raster between `--anneal_start` and `--anneal_end`, fractions of training); it writes an
`ARPipeline` folder. Data, optimisation, EMA, checkpoints and resume are the same code.

`--model_family var` trains VAR's next-scale transformer (`VARTransformer2DModel`, loss in `training/var_loss.py`) on
the indices of a frozen `VARVQModel` (`--pretrained_vqvae`, e.g. one trained by `training/train_vqvae.py`), with the
recipe of FoundationVision/VAR `train.py`: label smoothing 0.1, weight decay 0.05 (and its no-decay rule), gradient
clipping at 2.0, `lr = blr * global_batch / 256` with the `lin0` schedule of `utils/lr_control.py`, optional
progressive training, no EMA (`--ema_decay` 0: the saved weights are the trained ones). It writes a `VARPipeline`
folder.

See `training/README.md` for the launch commands.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training.*` importable when run as a script

import datasets
import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline
from diffusers.models import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel
from huggingface_hub import ModelCard, create_repo, upload_folder
from tqdm.auto import tqdm

from diffusers_mar import (
    ARPipeline,
    ARTransformer2DModel,
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
    VARPipeline,
    VARTransformer2DModel,
    VARVQModel,
    get_preset_config,
)
from diffusers_mar.atomic_files import atomic_write
from diffusers_mar.configs import AR_PRESETS, MAR_PRESETS
from diffusers_mar.file_kinds import describe_file
from diffusers_mar.image_grid import auto_scale, make_grid
from diffusers_mar.pipelines.model_card import VAR_CITATION, make_model_card
from diffusers_mar.pipelines.pipeline_autoregressive import vae_scale_factor
from diffusers_mar.pipelines.sampling_settings import check_sampling_settings, resolve_sampling_settings
from diffusers_mar.threads import SMALL_MODEL_PARAMETERS, cpu_threads, resolve_num_threads
from training.ar_loss import AR_ORDERS, ARTrainingModule
from training.data import (
    DIGITS,
    CachedLatentsDataset,
    DigitsDataset,
    check_image_folder,
    check_labels,
    check_latent_cache,
    check_local_path,
    dataset_class_names,
    image_transform,
    load_image_dataset,
)
from training.launch import StopRequest, check_launch, launch_command, resume_argv, run_script
from training.mar_loss import MARTrainingModule, weight_decay_param_groups
from training.var_loss import (
    VAR_LR_SCHEDULES,
    VARTrainingModule,
    var_learning_rate_factor,
    var_weight_decay_at,
    var_weight_decay_param_groups,
)

logger = get_logger(__name__, log_level="INFO")

SCRIPT = "training/train_mar.py"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DIGITS_CONFIG = CONFIGS_DIR / "mar-digits.json"
AR_DIGITS_CONFIG = CONFIGS_DIR / "ar-digits.json"
VAR_DIGITS_CONFIG = CONFIGS_DIR / "var-digits.json"
# VAR's transformer sizes, as configs beside this script (FoundationVision/VAR README: depth d, width 64 d, d heads).
VAR_PRESETS = {p.stem: p for p in sorted(CONFIGS_DIR.glob("var-d*.json")) if re.fullmatch(r"var-d\d+(-s)?", p.stem)}
PRESETS = {"mar": MAR_PRESETS, "ar": AR_PRESETS, "var": VAR_PRESETS}
TRANSFORMERS = {"mar": MARTransformer2DModel, "ar": ARTransformer2DModel, "var": VARTransformer2DModel}
PIPELINES = {"mar": MARPipeline, "ar": ARPipeline, "var": VARPipeline}
VAR_TAGS = ["diffusers", "diffusers-mar", "var", "image-generation", "class-conditional", "autoregressive"]
PIPELINE_NAMES = {"mar": "MARPipeline", "ar": "ARPipeline", "var": "VARPipeline"}
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
VALIDATION_FILE = "validation_loss.json"  # the validation curve, [{"step", "epoch", "loss"}, ...]
PIPELINE_ITEMS = ("transformer", "diffusion_head", "scheduler", "vae", "vqvae", "README.md", "model_index.json")
# `--sample_*` flag of each sampling setting it overrides.
SAMPLE_FLAGS = {
    "guidance_scale": "sample_guidance_scale",
    "num_inference_steps": "sample_num_inference_steps",
    "num_diffusion_steps": "sample_num_diffusion_steps",
    "temperature": "sample_temperature",
}


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train or fine-tune MAR (diffusers-mar) with Accelerate.")

    # Data
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="Image folder, one sub-folder per class.")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help=f"A `datasets` dataset (Hub id or local path) with image and label columns, or '{DIGITS}' for "
        "scikit-learn's bundled 8x8 handwritten digits (no download, pixel space).",
    )
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--cached_latents_dir", type=str, default=None, help="Output of training/cache_latents.py.")
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--label_column", type=str, default="label")
    data.add_argument("--cache_dir", type=str, default=None, help="Cache folder of `datasets`.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Keep only the first N images.")
    data.add_argument(
        "--validation_fraction",
        type=float,
        default=0.0,
        help="Hold out this share of the images (a fixed split: the same for every --seed) and log the loss on them "
        "with the EMA weights every --validation_steps (0: no validation).",
    )
    data.add_argument(
        "--validation_steps", type=int, default=500, help="Validation loss every N steps, and at the end."
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Image side after the ADM center crop (default 256; digits: 8; fine-tuning: the model's).",
    )
    data.add_argument("--image_mode", type=str, default="RGB", choices=["RGB", "L"], help="Pixel-space channels.")
    data.add_argument(
        "--random_flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Random horizontal flip (default: on for images, off for digits).",
    )
    data.add_argument(
        "--bad_images",
        type=str,
        default="error",
        choices=["error", "skip"],
        help="Unreadable images: stop before training (listing them) or skip them (with a count).",
    )
    data.add_argument("--num_classes", type=int, default=None, help="Defaults to the data's (or the model's).")

    # Model
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_family",
        type=str,
        default="mar",
        choices=["mar", "ar", "var"],
        help="mar: MAR's masked encoder-decoder; ar: the paper's causal AR (ARTransformer2DModel, ARPipeline); var: "
        "VAR's next-scale prediction on a VARVQModel's indices (VARTransformer2DModel, VARPipeline).",
    )
    model.add_argument(
        "--model_config",
        type=str,
        default=None,
        help=f"{' | '.join([*MAR_PRESETS, *AR_PRESETS, *VAR_PRESETS])} | path to a JSON with 'transformer' and "
        f"'diffusion_head' configs (VAR: 'transformer' and optionally 'initialization') (default: mar-large, "
        f"ar-large or var-d16; digits: {DIGITS_CONFIG.relative_to(CONFIGS_DIR.parents[1])}, {AR_DIGITS_CONFIG.name} "
        f"or {VAR_DIGITS_CONFIG.name}).",
    )
    model.add_argument(
        "--override",
        dest="overrides",
        action="append",
        default=[],
        metavar="COMPONENT.KEY=VALUE",
        help="Change one config value, e.g. `transformer.num_layers=4` or `diffusion_head.model_channels=256`.",
    )
    model.add_argument(
        "--pretrained_model", type=str, default=None, help="A MARPipeline folder or Hub id to fine-tune."
    )
    model.add_argument("--pretrained_vae", type=str, default=None, help="An AutoencoderKL folder or Hub id.")
    model.add_argument(
        "--pretrained_vqvae",
        type=str,
        default=None,
        help="VAR: the frozen tokenizer, a VARVQModel folder or Hub id (train_vqvae.py's or a converted one).",
    )
    model.add_argument("--gradient_checkpointing", action="store_true")

    # MAR objective
    objective = parser.add_argument_group("objective")
    objective.add_argument("--mask_ratio_min", type=float, default=0.7)
    objective.add_argument("--label_drop_prob", type=float, default=0.1)
    objective.add_argument("--diffusion_batch_mul", type=int, default=4)
    objective.add_argument(
        "--order", type=str, default=None, choices=AR_ORDERS, help="AR only: training orders (default: random)."
    )
    objective.add_argument(
        "--anneal_start", type=float, default=None, help="AR, --order anneal: fraction of training where r leaves 1."
    )
    objective.add_argument(
        "--anneal_end", type=float, default=None, help="AR, --order anneal: fraction where r reaches 0 (raster)."
    )
    objective.add_argument("--label_smoothing", type=float, default=None, help="VAR only (default 0.1).")
    objective.add_argument(
        "--prog_fraction",
        type=float,
        default=None,
        help="VAR only: progressive training over this fraction of training (the original's --pg; default 0: off).",
    )
    objective.add_argument(
        "--prog_start", type=int, default=None, help="VAR only: the first progressive stage (--pg0; default 4)."
    )
    objective.add_argument(
        "--prog_warmup_epochs",
        type=float,
        default=None,
        help="VAR only: warm-up of each new stage's weight (--pgwp; default num_epochs / 300).",
    )

    # Optimisation
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=64, help="Per device.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_epochs", type=int, default=None, help="Default 400 (VAR: 250).")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_epochs.")
    optim.add_argument("--learning_rate", type=float, default=None, help="Absolute rate; overrides --blr.")
    optim.add_argument("--blr", type=float, default=1e-4, help="Base rate: lr = blr * global batch / 256.")
    optim.add_argument("--min_lr", type=float, default=0.0, help="Floor of the cosine schedule.")
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default=None,
        help="MAR/AR: constant (default) | cosine. VAR: lin0 (default) | lin | lin00 | cos | exp | linT (VAR's "
        "utils/lr_control.py; linT with T = --prog_fraction is the default in progressive training).",
    )
    optim.add_argument(
        "--lr_warmup_epochs", type=float, default=None, help="Default 100 (VAR: num_epochs / 50, as the original)."
    )
    optim.add_argument(
        "--lr_warmup_start", type=float, default=None, help="VAR only: lr factor at step 0 (--wp0; default 0.005)."
    )
    optim.add_argument(
        "--lr_end", type=float, default=None, help="VAR only: lr factor at the last step (--wpe; default 0.01)."
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=None, help="Overrides --lr_warmup_epochs.")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--adam_weight_decay", type=float, default=None, help="Default 0.02 (VAR: 0.05).")
    optim.add_argument(
        "--weight_decay_end",
        type=float,
        default=None,
        help="VAR only: cosine from --adam_weight_decay to this (--twde; default: constant).",
    )
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=None, help="Default 3.0 (VAR: 2.0).")
    optim.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="Default 0.9999 (VAR: 0, the original has no EMA: the saved weights are the trained ones).",
    )
    optim.add_argument(
        "--ema_warmup",
        action="store_true",
        help="diffusers' EMA warm-up (decay 1 - (1 + step / inv_gamma)^-power, capped at --ema_decay) instead of "
        "the original's constant decay; useful for short runs.",
    )
    optim.add_argument("--ema_inv_gamma", type=float, default=1.0)
    optim.add_argument("--ema_power", type=float, default=2 / 3)
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--dataloader_num_workers", type=int, default=0)

    # Output, checkpoints, logging, samples
    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="mar-model", help="Must be new or empty, unless resuming.")
    output.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in a non-empty --output_dir: its checkpoints, pipeline, samples and logs are removed.",
    )
    output.add_argument("--checkpointing_steps", type=int, default=5000)
    output.add_argument("--checkpoints_total_limit", type=int, default=None)
    output.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help="'latest' (the newest checkpoint of --output_dir; a new run if there is none) or a checkpoint folder.",
    )
    output.add_argument("--report_to", type=str, default="tensorboard", help="tensorboard | wandb | all | none.")
    output.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    output.add_argument("--tracker_project_name", type=str, default="train_mar")
    output.add_argument("--sample_steps", type=int, default=5000, help="Sample grid every N steps (0: at the end).")
    output.add_argument("--num_sample_images", type=int, default=16)
    output.add_argument("--sample_guidance_scale", type=float, default=None)
    output.add_argument("--sample_num_inference_steps", type=int, default=None)
    output.add_argument("--sample_num_diffusion_steps", type=int, default=None)
    output.add_argument("--sample_temperature", type=float, default=None)
    output.add_argument("--push_to_hub", action="store_true")
    output.add_argument("--hub_model_id", type=str, default=None)
    output.add_argument("--hub_token", type=str, default=None)
    output.add_argument("--license", type=str, default="mit", help="License in the model card's metadata.")

    args = parser.parse_args(input_args)
    argv = list(input_args if input_args is not None else sys.argv[1:])
    args.argv = argv
    args.command = launch_command(SCRIPT, argv)

    # Checks that need no data: fail before any work.
    sources = [name for name in ("train_data_dir", "dataset_name", "cached_latents_dir") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError(
            f"Give exactly one of --train_data_dir, --dataset_name, --cached_latents_dir; got {sources or 'none'}."
        )
    if args.train_data_dir is not None:
        check_image_folder(args.train_data_dir)
    if args.cached_latents_dir is not None:
        check_latent_cache(args.cached_latents_dir)
    if args.resume_from_checkpoint not in (None, "latest"):
        resume = Path(args.resume_from_checkpoint)
        if not (resume / "training_state.json").is_file():
            what = f"is {describe_file(resume) or 'a file'}, not" if resume.is_file() else "is not"
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} {what} a checkpoint folder of this script "
                "(a checkpoint-N folder with training_state.json); give 'latest' or an existing checkpoint-N folder."
            )
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.pretrained_model is not None and (args.model_config is not None or args.overrides):
        raise ValueError(
            "--pretrained_model fixes the architecture; do not combine it with --model_config/--override."
        )
    check_family_args(args)
    presets = PRESETS[args.model_family]
    if args.model_config is not None and args.model_config not in presets and not Path(args.model_config).is_file():
        raise ValueError(
            f"--model_config must be one of {sorted(presets)} (--model_family {args.model_family}) or a JSON file; "
            f"{args.model_config!r} is neither."
        )
    if args.pretrained_model is None:  # keys and value types
        apply_overrides(load_model_config(model_config_source(args)[1]), args.overrides, args.model_family)
    check_local_path("--pretrained_model", args.pretrained_model)
    check_local_path("--pretrained_vae", args.pretrained_vae)
    check_local_path("--pretrained_vqvae", args.pretrained_vqvae)
    positive = {
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_epochs": args.num_epochs,
        "checkpointing_steps": args.checkpointing_steps,
        "diffusion_batch_mul": args.diffusion_batch_mul,
        "num_sample_images": args.num_sample_images,
    }
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}.")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples", "resolution", "num_classes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}.")
    if not 0.0 <= args.mask_ratio_min <= 1.0:
        raise ValueError(f"--mask_ratio_min must be in [0, 1]; got {args.mask_ratio_min}.")
    if not 0.0 <= args.label_drop_prob < 1.0:
        raise ValueError(f"--label_drop_prob must be in [0, 1); got {args.label_drop_prob}.")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"--ema_decay must be in [0, 1]; got {args.ema_decay}.")
    if args.sample_steps < 0:
        raise ValueError(f"--sample_steps must be >= 0; got {args.sample_steps}.")
    if not 0.0 <= args.validation_fraction <= 0.5:
        raise ValueError(f"--validation_fraction must be in [0, 0.5]; got {args.validation_fraction}.")
    if args.validation_steps < 1:
        raise ValueError(f"--validation_steps must be >= 1; got {args.validation_steps}.")
    if args.dataset_name == DIGITS and args.image_mode != "RGB":
        raise ValueError("--image_mode does not apply to digits (they are single-channel).")
    for key, flag in SAMPLE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            try:
                check_sampling_settings({key: value})
            except ValueError as error:
                raise ValueError(f"--{flag}: {error}") from None
    return args


# The recipe of each family where they differ: LTH14/mar main_mar.py, FoundationVision/VAR utils/arg_util.py.
FAMILY_DEFAULTS = {
    "mar": {"num_epochs": 400, "adam_weight_decay": 0.02, "max_grad_norm": 3.0, "ema_decay": 0.9999},
    "var": {"num_epochs": 250, "adam_weight_decay": 0.05, "max_grad_norm": 2.0, "ema_decay": 0.0},
}
FAMILY_DEFAULTS["ar"] = FAMILY_DEFAULTS["mar"]
VAR_FLAGS = (
    "pretrained_vqvae",
    "label_smoothing",
    "prog_fraction",
    "prog_start",
    "prog_warmup_epochs",
    "lr_warmup_start",
    "lr_end",
    "weight_decay_end",
)


def check_family_args(args: argparse.Namespace) -> None:
    """Each family's flags go with it; fill in the family's defaults (AR: random order, anneal over [0.25, 0.75];
    VAR: the original's recipe)."""
    for name, value in FAMILY_DEFAULTS[args.model_family].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    var_flags = [name for name in VAR_FLAGS if getattr(args, name) is not None]
    if args.model_family != "var" and var_flags:
        raise ValueError(f"--{var_flags[0]} applies to --model_family var only.")
    if args.model_family == "var":
        check_var_args(args)
    else:
        args.lr_scheduler = args.lr_scheduler or "constant"
        if args.lr_scheduler not in ("constant", "cosine"):
            raise ValueError(f"--lr_scheduler must be constant or cosine for --model_family {args.model_family}.")
        args.lr_warmup_epochs = 100.0 if args.lr_warmup_epochs is None else args.lr_warmup_epochs
    ar_flags = [name for name in ("order", "anneal_start", "anneal_end") if getattr(args, name) is not None]
    if args.model_family != "ar":
        if ar_flags:
            raise ValueError(f"--{ar_flags[0]} applies to --model_family ar only.")
        return
    if args.sample_num_inference_steps is not None:
        raise ValueError("--sample_num_inference_steps does not apply to --model_family ar (one token per step).")
    args.order = args.order or "random"
    if args.order != "anneal" and (args.anneal_start is not None or args.anneal_end is not None):
        raise ValueError("--anneal_start/--anneal_end apply to --order anneal only.")
    args.anneal_start = 0.25 if args.anneal_start is None else args.anneal_start
    args.anneal_end = 0.75 if args.anneal_end is None else args.anneal_end
    if not 0.0 <= args.anneal_start <= args.anneal_end <= 1.0:
        raise ValueError(
            f"Need 0 <= --anneal_start <= --anneal_end <= 1 (fractions of training); got {args.anneal_start} and "
            f"{args.anneal_end}."
        )


def check_var_args(args: argparse.Namespace) -> None:
    """The VAR flags and their defaults (FoundationVision/VAR utils/arg_util.py): smoothing 0.1, warm-up over
    num_epochs / 50, lr from 0.005x to 0.01x of the peak, `lin0` (`linT` in progressive training), stage warm-up over
    num_epochs / 300."""
    for flag in ("cached_latents_dir", "pretrained_vae"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag} does not apply to --model_family var: it trains on a VARVQModel's indices.")
    if args.pretrained_vqvae is None and args.pretrained_model is None:
        raise ValueError(
            "--model_family var needs a tokenizer: --pretrained_vqvae (a VARVQModel folder, e.g. written by "
            "training/train_vqvae.py) or --pretrained_model (a VARPipeline folder)."
        )
    unused = ["sample_num_inference_steps", "sample_num_diffusion_steps", "sample_temperature"]
    unused = [flag for flag in unused if getattr(args, flag) is not None]
    if unused:
        raise ValueError(f"--{unused[0]} does not apply to --model_family var.")
    args.label_smoothing = 0.1 if args.label_smoothing is None else args.label_smoothing
    args.prog_fraction = 0.0 if args.prog_fraction is None else args.prog_fraction
    args.prog_start = 4 if args.prog_start is None else args.prog_start
    args.prog_warmup_epochs = args.num_epochs / 300 if args.prog_warmup_epochs is None else args.prog_warmup_epochs
    args.lr_warmup_epochs = args.num_epochs / 50 if args.lr_warmup_epochs is None else args.lr_warmup_epochs
    args.lr_warmup_start = 0.005 if args.lr_warmup_start is None else args.lr_warmup_start
    args.lr_end = 0.01 if args.lr_end is None else args.lr_end
    args.weight_decay_end = args.adam_weight_decay if args.weight_decay_end is None else args.weight_decay_end
    if args.lr_scheduler is None:
        args.lr_scheduler = f"lin{args.prog_fraction:g}" if args.prog_fraction > 0 else "lin0"
    try:
        var_learning_rate_factor(args.lr_scheduler, 10, 1, 20)
    except ValueError:
        raise ValueError(
            f"--lr_scheduler {args.lr_scheduler!r} is not a VAR schedule; choose one of {VAR_LR_SCHEDULES} or linT "
            "(T a fraction, e.g. lin0.8)."
        ) from None
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label_smoothing must be in [0, 1); got {args.label_smoothing}.")
    if not 0.0 <= args.prog_fraction <= 1.0:
        raise ValueError(f"--prog_fraction must be in [0, 1]; got {args.prog_fraction}.")


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite: bool) -> None:
    """One run per output folder: a non-empty one is refused unless the run resumes or `overwrite` is given."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--output_dir {output_dir!r} exists and is not a folder.")
    if overwrite and resume_from_checkpoint is not None:
        raise ValueError("--overwrite_output_dir starts a new run; do not combine it with --resume_from_checkpoint.")
    if resume_from_checkpoint not in (None, "latest") and list_checkpoints(folder):
        if Path(resume_from_checkpoint).resolve().parent != folder.resolve():
            raise ValueError(
                f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint of --output_dir "
                f"{output_dir!r}, which holds checkpoints of another run; resume into the checkpoint's own folder "
                "or into a new --output_dir."
            )
    contents = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if contents and resume_from_checkpoint is None and not overwrite:
        raise ValueError(
            f"--output_dir {output_dir!r} is not empty (it holds {', '.join(contents[:5])}"
            f"{', ...' if len(contents) > 5 else ''}). Pass --resume_from_checkpoint latest to continue its run, "
            "--overwrite_output_dir to start a new one there (its checkpoints, pipeline, samples and logs are "
            "removed), or choose another --output_dir."
        )


# --------------------------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------------------------


def model_config_source(args: argparse.Namespace) -> tuple[str, str]:
    """The model config's name (for the model card) and what to load: `--model_config` or the data's default."""
    if args.model_config is not None:
        return args.model_config, args.model_config
    if args.dataset_name == DIGITS:
        path = {"ar": AR_DIGITS_CONFIG, "var": VAR_DIGITS_CONFIG}.get(args.model_family, DIGITS_CONFIG)
        return str(path.relative_to(CONFIGS_DIR.parents[1])), str(path)
    if args.model_family == "var":
        return "var-d16", "var-d16"
    return f"{args.model_family}-large", f"{args.model_family}-large"


def load_model_config(name: str) -> dict:
    """A preset or a JSON file: `{"transformer": {...}, "diffusion_head": {...}, "sampling": {...}}` (VAR:
    `{"transformer": {...}, "initialization": {...}, "sampling": {...}}`)."""
    if name in MAR_PRESETS or name in AR_PRESETS:
        config = get_preset_config(name)
        config.pop("paper", None)
        return config
    config = json.loads(Path(VAR_PRESETS.get(name, name)).read_text())
    if "diffusion_head" not in config and "transformer" in config:  # a VAR config
        unknown = set(config) - {"transformer", "initialization", "sampling"}
        if unknown:
            raise ValueError(
                f"--model_config {name!r} (VAR) may hold 'transformer', 'initialization' and 'sampling'; unknown "
                f"keys: {sorted(unknown)}."
            )
        config.setdefault("initialization", {})
        config.setdefault("sampling", {})
        return config
    unknown = set(config) - {"transformer", "diffusion_head", "sampling"}
    if unknown or "transformer" not in config or "diffusion_head" not in config:
        raise ValueError(
            f"--model_config {name!r} must hold 'transformer' and 'diffusion_head' (and optionally 'sampling'); "
            f"unknown keys: {sorted(unknown)}."
        )
    config.setdefault("sampling", {})
    return config


def _config_type_error(value: object, hint: object) -> str | None:
    """None if `value` fits the `__init__` annotation `hint` (int, float, bool, str, or a union with None)."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        fits = bool in allowed
    elif isinstance(value, int):
        fits = int in allowed or float in allowed
    else:
        # A generic alias (`list[int]`) is checked by its origin (`list`).
        origins = [typing.get_origin(kind) or kind for kind in allowed]
        fits = any(isinstance(value, kind) for kind in origins if isinstance(kind, type) and kind is not type(None))
    names = " or ".join("null" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in allowed)
    return None if fits else f"must be {'an' if names[0] in 'aeiou' else 'a'} {names}; got {value!r}"


def apply_overrides(config: dict, overrides: list[str], family: str = "mar") -> dict:
    """Apply `--override COMPONENT.KEY=VALUE` (VALUE parsed as JSON) and check every key and value type against the
    model classes of `family` ("mar", "ar" or "var")."""
    overridden = set()
    components = (
        ("transformer", "initialization", "sampling") if family == "var" else ("transformer", "diffusion_head")
    )
    components = tuple(dict.fromkeys([*components, "sampling"]))
    if family == "var" and "diffusion_head" in config:
        raise ValueError("--model_config holds a diffusion_head: it is a MAR or AR config, not a VAR one.")
    if family != "var" and "diffusion_head" not in config:
        raise ValueError(f"--model_config is a VAR config (no diffusion_head); --model_family {family} needs one.")
    for override in overrides:
        key, sep, value = override.partition("=")
        component, dot, field = key.partition(".")
        if not sep or not dot or component not in components:
            raise ValueError(
                f"--override {override!r} must read COMPONENT.KEY=VALUE with COMPONENT {', '.join(components)}."
            )
        try:
            config[component][field] = json.loads(value)
        except json.JSONDecodeError:
            config[component][field] = value
        overridden.add((component, field))
    checked = [("transformer", TRANSFORMERS[family].__init__)]
    checked.append(
        ("initialization", VARTransformer2DModel.initialize_weights)
        if family == "var"
        else ("diffusion_head", MARDiffusionHead.__init__)
    )
    for component, function in checked:
        hints = {k: v for k, v in typing.get_type_hints(function).items() if k != "return"}
        unknown = set(config[component]) - set(hints)
        if unknown:
            raise ValueError(f"Unknown {component} config keys {sorted(unknown)}; allowed: {sorted(hints)}.")
        for field, value in config[component].items():
            error = _config_type_error(value, hints[field])
            if error is not None:
                source = "--override" if (component, field) in overridden else "--model_config"
                raise ValueError(f"{source}: {component}.{field} {error}.")
    if family == "var":
        return config  # the VAR pipeline checks its own settings
    try:
        check_sampling_settings(config["sampling"], name="sampling")
        if family == "ar" and "num_inference_steps" in config["sampling"]:
            raise ValueError("`sampling['num_inference_steps']` does not apply to the AR family (one token per step).")
    except ValueError as error:
        source = "--override" if any(component == "sampling" for component, _ in overridden) else "--model_config"
        raise ValueError(f"{source}: {error}") from None
    return config


def resolve_model_configs(
    config: dict, grid_size: int, channels: int, num_classes: int, family: str = "mar"
) -> tuple[dict, dict]:
    """Fill in (or check) the sizes the data decides: grid side, channels, classes and the head's widths."""
    transformer = dict(config["transformer"])
    for key, value in (("sample_size", grid_size), ("in_channels", channels)):
        if transformer.get(key, value) != value:
            raise ValueError(
                f"The model config has transformer.{key}={transformer[key]} but the data gives {value} "
                f"({'grid side: the resolution, divided by the VAE downsampling' if key == 'sample_size' else 'channels'}); "
                f"change --resolution or pass --override transformer.{key}={value}."
            )
        transformer[key] = value
    transformer["num_classes"] = num_classes
    patch_size = transformer.get("patch_size", 1)
    if grid_size % patch_size != 0:
        raise ValueError(
            f"The grid side {grid_size} is not a multiple of transformer.patch_size={patch_size}: the token count "
            "does not match the resolution and patch size."
        )
    # A model without blocks gives the derived widths; `decoder_num_layers` is MAR's only (the AR model has none).
    no_blocks = {"num_layers": 0, "decoder_num_layers": 0} if family == "mar" else {"num_layers": 0}
    probe = TRANSFORMERS[family].from_config({**transformer, **no_blocks})
    condition_dim = probe.inner_dim if family == "ar" else probe.decoder_dim
    head = dict(config["diffusion_head"])
    for key, value in (("in_channels", probe.token_dim), ("condition_channels", condition_dim)):
        if head.get(key, value) != value:
            raise ValueError(
                f"The model config has diffusion_head.{key}={head[key]} but the transformer needs {value}; "
                f"drop it or pass --override diffusion_head.{key}={value}."
            )
        head[key] = value
    return transformer, head


def reinit_class_embedding(transformer: MARTransformer2DModel, num_classes: int) -> MARTransformer2DModel:
    """A copy of `transformer` with `num_classes` classes: new class rows, the unconditional row kept."""
    config = {**transformer.config, "num_classes": num_classes}
    new = type(transformer).from_config(config)
    state = {k: v for k, v in transformer.state_dict().items() if k != "class_embedding.weight"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if missing != ["class_embedding.weight"] or unexpected:
        raise RuntimeError(f"Could not transfer the weights: missing {missing}, unexpected {unexpected}.")
    with torch.no_grad():
        new.class_embedding.weight[-1] = transformer.class_embedding.weight[-1]
    return new


# --------------------------------------------------------------------------------------------------------------------
# The steps of `main`
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenSpace:
    """What the tokens are: latents of `vae` (a `grid_size`^2 grid of `channels`), pixels (`vae` None), or the
    indices of every scale of the tokenizer `vqvae` (VAR; `channels` are then the images')."""

    vae: AutoencoderKL | None
    resolution: int
    grid_size: int
    channels: int
    cache_info: dict | None
    vqvae: VARVQModel | None = None

    @property
    def description(self) -> str:
        if self.vqvae is not None:
            config = self.vqvae.config
            scales = "-".join(str(side) for side in config.patch_nums)
            return f"VQ indices of {config.num_vq_embeddings} codes, scales {scales} ({self.channels}-channel images)"
        if self.vae is None:
            return f"pixel space ({self.channels}x{self.resolution}x{self.resolution})"
        size = f"{self.channels}x{self.grid_size}x{self.grid_size}"
        return f"latent space ({size}, scaling factor {self.vae.config.scaling_factor})"


@dataclass
class TrainData:
    """The training set (a torch dataset of pixels or posterior moments) and its classes."""

    dataset: torch.utils.data.Dataset
    labels: list[int]
    num_classes: int
    id2label: dict[int, str] | None
    random_flip: bool
    name: str
    validation: torch.utils.data.Dataset | None = None  # the held-out images (--validation_fraction)


@dataclass
class Models:
    """The networks to train and what the saved pipeline needs besides them."""

    transformer: MARTransformer2DModel | VARTransformer2DModel
    diffusion_head: MARDiffusionHead | None
    vae: AutoencoderKL | None
    id2label: dict[int, str] | None
    sampling: dict
    config_name: str
    training_order: str | None = None  # AR: `--order`, recorded in the pipeline's config
    vqvae: VARVQModel | None = None  # VAR: the frozen tokenizer

    @property
    def networks(self) -> list[torch.nn.Module]:
        """The trained networks, in the order of their EMA: the transformer, then the diffusion head (MAR, AR)."""
        return [m for m in (self.transformer, self.diffusion_head) if m is not None]

    def pipeline(self) -> MARPipeline:
        """A `MARPipeline` (`ARPipeline` for the AR family, with its `training_order`; `VARPipeline` for VAR) of the
        current weights, with the recommended sampling settings in its config."""
        if self.vqvae is not None:
            return VARPipeline(self.transformer, self.vqvae, id2label=self.id2label, sampling=self.sampling)
        # Pixels are bounded, so x0_hat is clipped as in pixel-space DDPM; the unbounded latents keep the original's
        # `clip_denoised=False`. Early in training this turns saturated pixel samples into clean ones (docs/training.md).
        scheduler = MARDDPMScheduler(clip_sample=self.vae is None)
        components = (self.transformer, self.diffusion_head, scheduler)
        settings = {"vae": self.vae, "id2label": self.id2label, "sampling": self.sampling}
        if isinstance(self.transformer, ARTransformer2DModel):
            return ARPipeline(*components, **settings, training_order=self.training_order)
        return MARPipeline(*components, **settings)


@dataclass
class Schedule:
    """Batch sizes, learning rate and step counts."""

    global_batch: int
    base_lr: float
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    warmup_steps: int


def setup_accelerator(args: argparse.Namespace) -> Accelerator:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        # One shuffling seed for all processes, advanced per epoch: the data order survives a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    check_launch(accelerator.num_processes)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    verbosity = "warning" if accelerator.is_local_main_process else "error"
    for library in (datasets, diffusers):
        getattr(library.utils.logging, f"set_verbosity_{verbosity}")()
    return accelerator


def resolve_var_token_space(args: argparse.Namespace, pretrained: DiffusionPipeline | None) -> TokenSpace:
    """VAR: the frozen tokenizer (`--pretrained_vqvae`, else the pretrained pipeline's); the resolution is its."""
    if args.pretrained_vqvae is not None:
        vqvae = VARVQModel.from_pretrained(args.pretrained_vqvae)
    else:
        vqvae = pretrained.vqvae
    vqvae.requires_grad_(False).eval()
    resolution, channels = vqvae.config.sample_size, vqvae.config.in_channels
    if args.resolution not in (None, resolution):
        raise ValueError(
            f"--resolution {args.resolution} differs from the tokenizer's sample_size {resolution}; leave it out "
            "(VAR trains at its tokenizer's resolution)."
        )
    wanted = 1 if args.dataset_name == DIGITS else len(args.image_mode)
    if channels != wanted:
        raise ValueError(
            f"The tokenizer takes {channels}-channel images but the data gives {wanted}-channel ones"
            + ("." if args.dataset_name == DIGITS else f" (--image_mode {args.image_mode}).")
        )
    return TokenSpace(None, resolution, vqvae.config.patch_nums[-1], channels, None, vqvae)


def resolve_token_space(args: argparse.Namespace, pretrained: MARPipeline | None) -> TokenSpace:
    """The VAE (or none), the resolution and the token grid; fine-tuning takes the resolution from the model."""
    if args.model_family == "var":
        return resolve_var_token_space(args, pretrained)
    is_digits = args.dataset_name == DIGITS
    cache_info = CachedLatentsDataset.read_info(args.cached_latents_dir) if args.cached_latents_dir else None
    vae = None
    if args.pretrained_vae is not None:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae)
    elif pretrained is not None and pretrained.vae is not None:
        vae = pretrained.vae
    elif cache_info is not None:
        if not cache_info.get("vae"):
            raise ValueError("The latent cache does not name its VAE; pass --pretrained_vae.")
        vae = AutoencoderKL.from_pretrained(cache_info["vae"])
    if is_digits and vae is not None:
        raise ValueError("Digits train in pixel space (8x8, one channel); drop the VAE.")
    if cache_info is not None and vae is None:
        raise ValueError("Training from cached latents needs the VAE that wrote them.")
    downsample = vae_scale_factor(vae) if vae is not None else 1

    if cache_info is not None:
        resolution = cache_info["resolution"]
        if args.resolution not in (None, resolution):
            raise ValueError(
                f"The latent cache was written at resolution {resolution}, not --resolution {args.resolution}."
            )
    elif args.resolution is not None:
        resolution = args.resolution
    elif pretrained is not None:
        resolution = pretrained.transformer.config.sample_size * downsample  # the model's own resolution
    else:
        resolution = 8 if is_digits else 256
    if resolution % downsample != 0:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE downsampling ({downsample}).")
    if vae is None:
        return TokenSpace(None, resolution, resolution, 1 if is_digits else len(args.image_mode), None)

    vae.requires_grad_(False).eval()
    grid_size, channels = resolution // downsample, vae.config.latent_channels
    if not is_digits and cache_info is None and vae.config.in_channels != len(args.image_mode):
        raise ValueError(f"The VAE takes {vae.config.in_channels}-channel images; --image_mode is {args.image_mode}.")
    if cache_info is not None and (cache_info["latent_channels"], cache_info["grid_size"]) != (channels, grid_size):
        raise ValueError(
            f"The latent cache holds {cache_info['latent_channels']}-channel {cache_info['grid_size']}^2 latents "
            f"but the VAE gives {channels}-channel {grid_size}^2 latents."
        )
    return TokenSpace(vae, resolution, grid_size, channels, cache_info)


def load_data(
    args: argparse.Namespace, accelerator: Accelerator, space: TokenSpace, pretrained: MARPipeline | None
) -> TrainData:
    """The training set, its labels and the number of classes (every check here runs before any training work)."""
    is_digits = args.dataset_name == DIGITS
    if space.cache_info is not None:
        dataset = CachedLatentsDataset(args.cached_latents_dir)
        labels = dataset.labels.tolist()
        names = space.cache_info.get("id2label")
        id2label = {int(k): v for k, v in names.items()} if names else None
    elif is_digits:
        dataset = DigitsDataset(space.resolution)
        labels, id2label = dataset.labels.tolist(), dataset.id2label
    else:
        with accelerator.main_process_first():
            hf_dataset, labels = load_image_dataset(args)
        id2label = dataset_class_names(hf_dataset, args.label_column)
        transform = image_transform(args.image_column, space.resolution, args.image_mode, args.label_column)
        dataset = hf_dataset.with_transform(transform)
    if args.max_train_samples is not None and (is_digits or space.cache_info is not None):
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_train_samples, len(labels))))
        labels = labels[: len(dataset)]

    if min(labels) < 0:
        raise ValueError(f"The data has negative labels ({min(labels)}); labels must be class indices >= 0.")
    data_classes = max(labels) + 1
    if args.num_classes is not None:
        num_classes = args.num_classes
        check_labels(labels, num_classes, "--num_classes")
    elif pretrained is not None:
        num_classes = pretrained.transformer.config.num_classes
        check_labels(labels, num_classes, f"the classes of --pretrained_model {args.pretrained_model!r}")
    else:
        num_classes = max(len(id2label) if id2label else data_classes, data_classes)
    if id2label is None and pretrained is not None and num_classes == pretrained.transformer.config.num_classes:
        id2label = pretrained.id2label or None
    random_flip = (not is_digits) if args.random_flip is None else args.random_flip
    name = args.dataset_name or args.train_data_dir or args.cached_latents_dir
    # train_vqvae.py shares this loader and has no validation flags (its card has reconstruction errors instead).
    dataset, labels, validation = split_validation(dataset, labels, getattr(args, "validation_fraction", 0.0))
    return TrainData(dataset, labels, num_classes, id2label, random_flip, name, validation)


VALIDATION_SEED = 0  # the split and the validation loss's randomness: the same for every --seed, so runs compare


def split_validation(
    dataset: torch.utils.data.Dataset, labels: list[int], fraction: float
) -> tuple[torch.utils.data.Dataset, list[int], torch.utils.data.Dataset | None]:
    """`(training set, its labels, held-out set)`: `round(fraction * len)` images (at least one) of a fixed random
    permutation are held out; `fraction` 0 holds out none."""
    if fraction <= 0:
        return dataset, labels, None
    permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(VALIDATION_SEED)).tolist()
    count = max(1, round(fraction * len(labels)))
    if count >= len(labels):
        raise ValueError(f"--validation_fraction {fraction} leaves no training images of {len(labels)}.")
    held, kept = sorted(permutation[:count]), sorted(permutation[count:])
    return (
        torch.utils.data.Subset(dataset, kept),
        [labels[i] for i in kept],
        torch.utils.data.Subset(dataset, held),
    )


def build_models(
    args: argparse.Namespace, data: TrainData, space: TokenSpace, pretrained: MARPipeline | None
) -> Models:
    """The transformer and the head (all processes build the same initial weights) and the sampling settings."""
    set_seed(args.seed)
    if args.model_family == "var":
        return build_var_models(args, data, space, pretrained)
    num_train_timesteps = MARDDPMScheduler().config.num_train_timesteps
    if pretrained is not None:
        transformer, diffusion_head = pretrained.transformer, pretrained.diffusion_head
        config = transformer.config
        if (config.sample_size, config.in_channels) != (space.grid_size, space.channels):
            needed = config.sample_size * (space.resolution // space.grid_size)
            raise ValueError(
                f"--pretrained_model works on {config.in_channels}-channel {config.sample_size}^2 grids but the data "
                f"gives {space.channels}-channel {space.grid_size}^2 ones; "
                + (
                    f"pass --resolution {needed} (or leave it out: fine-tuning takes the model's)."
                    if config.in_channels == space.channels
                    else "use the model's own VAE (drop --pretrained_vae) or a cache written with it."
                )
            )
        if data.num_classes != config.num_classes:
            logger.info(
                f"Re-initialising the class embedding for {data.num_classes} classes (was {config.num_classes})."
            )
            transformer = reinit_class_embedding(transformer, data.num_classes)
        sampling = pretrained.sampling_defaults  # the base model's recommended settings (its model_index.json)
        config_name = args.pretrained_model
    else:
        config_name, config_path = model_config_source(args)
        config = apply_overrides(load_model_config(config_path), args.overrides, args.model_family)
        config_name = " ".join([config_name, *args.overrides])
        transformer_config, head_config = resolve_model_configs(
            config, space.grid_size, space.channels, data.num_classes, args.model_family
        )
        transformer = TRANSFORMERS[args.model_family].from_config(transformer_config)
        diffusion_head = MARDiffusionHead.from_config(head_config)
        sampling = config["sampling"]
    num_tokens = transformer.num_tokens
    try:
        sampling = check_sampling_settings(
            resolve_sampling_settings(sampling, num_tokens, num_train_timesteps), num_tokens, num_train_timesteps
        )
    except ValueError as error:
        raise ValueError(f"The recommended sampling of {config_name!r}: {error}") from None
    if args.model_family == "ar":
        sampling.pop("num_inference_steps")  # one token per step
    for key, flag in SAMPLE_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            try:
                sampling[key] = check_sampling_settings({key: value}, num_tokens, num_train_timesteps)[key]
            except ValueError as error:
                raise ValueError(f"--{flag}: {error} (the model has {num_tokens} tokens)") from None
    transformer.train()
    diffusion_head.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        diffusion_head.enable_gradient_checkpointing()
    training_order = args.order if args.model_family == "ar" else None
    return Models(transformer, diffusion_head, space.vae, data.id2label, sampling, config_name, training_order)


def build_var_models(
    args: argparse.Namespace, data: TrainData, space: TokenSpace, pretrained: DiffusionPipeline | None
) -> Models:
    """VAR: the transformer on the tokenizer's scales and codebook, initialised as the original for training from
    scratch (the config's `initialization`: `VARTransformer2DModel.initialize_weights`' arguments)."""
    vqvae = space.vqvae
    fixed = {
        "patch_nums": list(vqvae.config.patch_nums),
        "vocab_size": vqvae.config.num_vq_embeddings,
        "vq_embed_dim": vqvae.vq_embed_dim,
    }
    if pretrained is not None:
        transformer = pretrained.transformer
        changed = {}
        for key, value in fixed.items():
            have = list(transformer.config[key]) if key == "patch_nums" else transformer.config[key]
            if have != value:
                changed[key] = (have, value)
        if changed:
            raise ValueError(f"--pretrained_vqvae does not fit --pretrained_model's transformer: {changed}.")
        if data.num_classes != transformer.config.num_classes:
            logger.info(
                f"Re-initialising the class embedding for {data.num_classes} classes "
                f"(was {transformer.config.num_classes})."
            )
            transformer = reinit_class_embedding(transformer, data.num_classes)
        sampling, config_name = dict(getattr(pretrained, "sampling_defaults", None) or {}), args.pretrained_model
    else:
        config_name, config_path = model_config_source(args)
        config = apply_overrides(load_model_config(config_path), args.overrides, "var")
        config_name = " ".join([config_name, *args.overrides])
        transformer_config = dict(config["transformer"])
        for key, value in fixed.items():
            given = transformer_config.get(key, value)
            if (list(given) if key == "patch_nums" else given) != value:
                raise ValueError(
                    f"The model config has transformer.{key}={given} but the tokenizer gives {value}; drop it from "
                    "the config (VAR takes it from --pretrained_vqvae)."
                )
            transformer_config[key] = value
        transformer_config["num_classes"] = data.num_classes
        transformer = VARTransformer2DModel.from_config(transformer_config)
        transformer.initialize_weights(**config["initialization"])
        sampling = dict(config["sampling"])
    if args.sample_guidance_scale is not None:
        sampling["guidance_scale"] = args.sample_guidance_scale
    try:  # the pipeline checks its settings (keys, ranges) and that the tokenizer fits the transformer
        VARPipeline(transformer, vqvae, id2label=data.id2label, sampling=sampling)
    except ValueError as error:
        raise ValueError(f"The recommended sampling of {config_name!r}: {error}") from None
    transformer.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return Models(transformer, None, None, data.id2label, sampling, config_name, vqvae=vqvae)


def load_pretrained(args: argparse.Namespace) -> MARPipeline | None:
    """The pipeline of `--pretrained_model` (the class its model_index.json names), which must be of the family."""
    if args.pretrained_model is None:
        return None
    pretrained = DiffusionPipeline.from_pretrained(args.pretrained_model)
    if type(pretrained).__name__ != PIPELINE_NAMES[args.model_family]:  # the families are siblings: one check
        raise ValueError(
            f"--pretrained_model {args.pretrained_model!r} holds a {type(pretrained).__name__}; --model_family "
            f"{args.model_family} fine-tunes a {PIPELINE_NAMES[args.model_family]}."
        )
    return pretrained


@torch.no_grad()
def batch_latents(batch: dict, vae, random_flip: bool, device: torch.device) -> torch.Tensor:
    """The model's input of a batch: pixels (randomly flipped), or VAE latents (a posterior sample, scaled)."""
    batch_size = batch["class_labels"].shape[0]
    flip = torch.rand(batch_size) < 0.5 if random_flip else torch.zeros(batch_size, dtype=torch.bool)
    flip = flip.to(device)[:, None, None, None]
    if "moments" in batch:
        moments = torch.where(flip, batch["moments"][:, 1], batch["moments"][:, 0]).to(device)
        latents = DiagonalGaussianDistribution(moments.float()).sample()
    else:
        pixels = batch["pixel_values"].float().to(device)
        pixels = torch.where(flip, pixels.flip(-1), pixels)
        latents = vae.encode(pixels).latent_dist.sample() if vae is not None else pixels
    if vae is not None:
        latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    return latents


@torch.no_grad()
def validation_loss(module: torch.nn.Module, loader, vae, device: torch.device) -> float:
    """The training loss on the held-out images, averaged per image, in eval mode (no dropout or label drop), with
    the module's weights as they are (the caller swaps in the EMA weights). Its randomness (masks, orders, noise) is
    the same at every call (`VALIDATION_SEED`) and leaves the training's generators where they were, so a resume
    stays exact."""
    devices = [device] if device.type == "cuda" else []
    total, count, was_training = 0.0, 0, module.training
    module.eval()  # no dropout, no label drop: the loss of the class-conditional model
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(VALIDATION_SEED)
            for batch in loader:
                class_labels = batch["class_labels"].long().to(device)
                latents = batch_latents(batch, vae, False, device)
                total += float(module(latents, class_labels)) * class_labels.shape[0]
                count += class_labels.shape[0]
    finally:
        module.train(was_training)
    return total / count


def load_validation_curve(output_dir: Path, last_step: int) -> list[dict]:
    """The points of `validation_loss.json` in the output folder up to `last_step` (later ones were left by a run that
    this one resumed before them); empty when there is none."""
    path = output_dir / VALIDATION_FILE
    curve = json.loads(path.read_text()) if path.exists() else []
    return [entry for entry in curve if entry["step"] <= last_step]


def record_validation(output_dir: Path, step: int, epoch: float, loss: float) -> list[dict]:
    """Append `loss` at `step` to `validation_loss.json` in the output folder (atomically, replacing the points from
    `step` on); the curve so far."""
    curve = load_validation_curve(output_dir, step - 1) + [{"step": step, "epoch": epoch, "loss": loss}]
    atomic_write(output_dir / VALIDATION_FILE, lambda file: file.write(json.dumps(curve, indent=1).encode()))
    return curve


def make_training_module(args: argparse.Namespace, models: Models) -> torch.nn.Module:
    """The networks under one module whose `forward` is the loss of the family (MAR's or the causal AR's)."""
    if args.model_family == "var":  # the schedule's step counts are set once the data loader is prepared
        return VARTrainingModule(
            models.transformer,
            models.vqvae,
            label_smoothing=args.label_smoothing,
            label_drop_prob=args.label_drop_prob,
            prog_fraction=args.prog_fraction,
            prog_start=args.prog_start,
        )
    common = {"label_drop_prob": args.label_drop_prob, "diffusion_batch_mul": args.diffusion_batch_mul}
    if args.model_family == "ar":
        return ARTrainingModule(
            models.transformer,
            models.diffusion_head,
            MARDDPMScheduler(),
            order=args.order,
            anneal_start=args.anneal_start,
            anneal_end=args.anneal_end,
            **common,
        )
    return MARTrainingModule(
        models.transformer, models.diffusion_head, MARDDPMScheduler(), mask_ratio_min=args.mask_ratio_min, **common
    )


def make_schedule(args: argparse.Namespace, num_processes: int, batches_per_epoch: int) -> Schedule:
    global_batch = args.train_batch_size * num_processes * args.gradient_accumulation_steps
    base_lr = args.learning_rate if args.learning_rate is not None else args.blr * global_batch / 256
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    warmup_steps = (
        args.lr_warmup_steps if args.lr_warmup_steps is not None else round(args.lr_warmup_epochs * steps_per_epoch)
    )
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    return Schedule(global_batch, base_lr, steps_per_epoch, max_train_steps, num_epochs, warmup_steps)


def set_learning_rate(
    args: argparse.Namespace,
    optimizer: torch.optim.Optimizer,
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
) -> None:
    """The learning rate (and, for VAR, the weight decay) of optimizer step `step` in every parameter group."""
    if args.model_family != "var":
        lr = learning_rate_at(step, base_lr, warmup_steps, total_steps, args.lr_scheduler, args.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return
    # As in FoundationVision/VAR utils/lr_control.py lr_wd_annealing: each group's decay times its `wd_sc`.
    factor = var_learning_rate_factor(
        args.lr_scheduler, step, warmup_steps, total_steps, args.lr_warmup_start, args.lr_end
    )
    weight_decay = var_weight_decay_at(step, total_steps, args.adam_weight_decay, args.weight_decay_end)
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor
        group["weight_decay"] = weight_decay * group["wd_sc"]


def learning_rate_at(
    step: int, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant", min_lr: float = 0.0
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or half-cycle cosine."""
    # As in LTH14/mar util/lr_sched.py adjust_learning_rate, per iteration.
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if schedule == "constant":
        return base_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------------------------------------
# Output folder: checkpoints, pipeline, model card, samples
# --------------------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N`, not `.tmp`), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def clear_run_outputs(output_dir: Path, logging_dir: str, items: tuple[str, ...] = PIPELINE_ITEMS) -> None:
    """Remove what a run of this script writes (`--overwrite_output_dir`; `items`: the final folder's); other files
    stay."""
    for path in sorted(output_dir.iterdir()):
        ours = path.name in (*items, "samples", logging_dir, "pipeline.tmp", VALIDATION_FILE) or path.name.startswith(
            "checkpoint-"
        )
        if ours:
            logger.info(f"--overwrite_output_dir: removing {path}")
            shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def ema_weights(models: Models, emas: list[EMAModel]):
    """The EMA weights in both networks, in eval mode, for the duration of the block; then the training weights."""
    modules = models.networks
    for ema, module in zip(emas, modules):
        ema.store(module.parameters())
        ema.copy_to(module.parameters())
        module.eval()
    try:
        yield
    finally:
        for ema, module in zip(emas, modules):
            ema.restore(module.parameters())
            module.train()


def save_pipeline(path: Path, models: Models, emas: list[EMAModel], card: ModelCard) -> None:
    """Write a `MARPipeline` folder with the EMA weights and the model card (main process only)."""
    with ema_weights(models, emas):
        models.pipeline().save_pretrained(path, safe_serialization=True)
    card.save(path / "README.md")


def validation_text(curve: list[dict], num_images: int) -> str:
    """The card's line for a validation curve: the last value and the best one, with their steps."""
    best = min(curve, key=lambda entry: entry["loss"])
    return (
        f"{curve[-1]['loss']:.4f} at step {curve[-1]['step']} (best {best['loss']:.4f} at step {best['step']}; "
        f"{num_images} held-out images, `{VALIDATION_FILE}`)"
    )


def model_card(
    args: argparse.Namespace,
    data: TrainData,
    space: TokenSpace,
    models: Models,
    schedule: Schedule,
    global_step: int,
    recent_losses: list[float],
    validation_curve: list[dict] | None = None,
) -> ModelCard:
    """The card of the pipeline folder after `global_step` steps (from `diffusers_mar`'s one template)."""
    final_loss = (
        f"{np.mean(recent_losses):.4f} (mean of the last {len(recent_losses)} steps)" if recent_losses else "n/a"
    )
    ema = f"decay {args.ema_decay}{', with warm-up' if args.ema_warmup else ''}"
    transformer_params = sum(p.numel() for p in models.transformer.parameters())
    if models.vqvae is not None:
        vqvae_params = sum(p.numel() for p in models.vqvae.parameters())
        parameters = f"transformer {transformer_params:,}, tokenizer {vqvae_params:,} (frozen)"
    else:
        head_params = sum(p.numel() for p in models.diffusion_head.parameters())
        parameters = f"transformer {transformer_params:,}, diffusion head {head_params:,}"
    details = {
        "data": f"{data.name} ({len(data.dataset)} images, {data.num_classes} classes, {space.description})",
        "model": models.config_name,
        "resolution": str(space.resolution),
        "training": f"{global_step} optimizer steps ({global_step / schedule.steps_per_epoch:.2f} epochs), "
        f"global batch {schedule.global_batch}",
        "final loss": final_loss,
        **({"validation loss": validation_text(validation_curve, len(data.validation))} if validation_curve else {}),
        "weights": f"exponential moving average ({ema})" if args.ema_decay > 0 else "the trained weights (no EMA)",
        "parameters": parameters,
    }
    hub = not (Path(args.dataset_name).exists() or args.dataset_name == DIGITS) if args.dataset_name else False
    family_text = "MAR model"
    if args.model_family == "ar":
        anneal = f" from {args.anneal_start} to {args.anneal_end} of training" if args.order == "anneal" else ""
        family_text = f"causal AR model (`ARPipeline`, trained with --order {args.order}{anneal})"
    base_model = args.pretrained_model if args.pretrained_model and not Path(args.pretrained_model).exists() else None
    sections = f"## Training\n\nTraining command (from the repository root):\n\n```bash\n{args.command}\n```"
    title = f"{'Causal AR' if args.model_family == 'ar' else 'MAR'} trained on {data.name}"
    description = (
        f"A class-conditional {family_text} (*Autoregressive Image Generation without Vector Quantization*, Li et "
        "al. 2024, original code [LTH14/mar](https://github.com/LTH14/mar)) for `diffusers-mar`, trained with "
        "`training/train_mar.py`."
    )
    family_card = {}
    if args.model_family == "var":
        family_card = {"citation": VAR_CITATION, "tags": VAR_TAGS}
        title = f"VAR trained on {data.name}"
        description = (
            "A class-conditional next-scale prediction model (*Visual Autoregressive Modeling: Scalable Image "
            "Generation via Next-Scale Prediction*, Tian et al. 2024, original code "
            "[FoundationVision/VAR](https://github.com/FoundationVision/VAR)) for `diffusers-mar`, trained with "
            f"`training/train_mar.py --model_family var` on the indices of the tokenizer {args.pretrained_vqvae or ''}"
            f" (label smoothing {args.label_smoothing})."
        )
    return make_model_card(
        title=title,
        description=description,
        details=details,
        sampling=models.sampling,
        repo_id=args.hub_model_id or "path/to/this-folder",
        sections=sections,
        license=args.license,
        base_model=base_model,
        datasets=[args.dataset_name] if hub else None,
        pipeline_class=PIPELINE_NAMES[args.model_family],
        **family_card,
    )


def load_checkpoint(
    accelerator: Accelerator, resume_from_checkpoint: str, output_dir: Path, emas: list[EMAModel], global_batch: int
) -> tuple[int, list[float]]:
    """Restore `--resume_from_checkpoint` ('latest': the newest of `output_dir`, if any); (step, recent losses)."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"No checkpoint in {output_dir}: starting a new run.")
            return 0, []
        path = checkpoints[-1]
    else:
        path = Path(resume_from_checkpoint)
    state = json.loads((path / "training_state.json").read_text())
    if state["global_batch"] != global_batch or state["num_processes"] != accelerator.num_processes:
        logger.warning(
            f"The checkpoint was written with global batch {state['global_batch']} on "
            f"{state['num_processes']} process(es); the data order will not continue exactly."
        )
    saved = {p.name: int(CHECKPOINT_PATTERN.match(p.name).group(1)) for p in list_checkpoints(output_dir)}
    newer = [name for name, step in saved.items() if step > state["global_step"]]
    if newer:
        logger.warning(f"Resuming from {path.name} although {newer} exist; `latest` would pick those.")
    accelerator.load_state(str(path))
    for ema in emas:
        ema.to(accelerator.device)
    logger.info(f"Resumed from {path} at step {state['global_step']}.")
    return state["global_step"], state.get("recent_losses", [])


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    global_step: int,
    training_state: dict,
    write_folder: typing.Callable[[Path], None],
    checkpoints_total_limit: int | None,
    folder_name: str = "pipeline",
) -> Path:
    """Write `checkpoint-N`: `accelerator.save_state`, `training_state.json` and `pipeline/` (`write_folder(path)`
    writes it: the EMA weights and the card; `folder_name` names it, e.g. `vqvae` for train_vqvae.py)."""
    # Written as checkpoint-N.tmp and renamed once complete: a killed run never leaves a half checkpoint.
    final = output_dir / f"checkpoint-{global_step}"
    tmp = output_dir / f"checkpoint-{global_step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "training_state.json").write_text(json.dumps({"global_step": global_step, **training_state}, indent=2))
        write_folder(tmp / folder_name)
        stale = final.with_name(final.name + ".old")  # a checkpoint of the same step from before a resume
        if final.exists():
            os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
        checkpoints = list_checkpoints(output_dir)
        if checkpoints_total_limit is not None:
            for old in checkpoints[: max(0, len(checkpoints) - checkpoints_total_limit)]:
                shutil.rmtree(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def stop_requested(stop_request: StopRequest, accelerator: Accelerator) -> bool:
    """Whether Ctrl-C reached any process: all of them stop at the same step."""
    if accelerator.num_processes == 1:
        return stop_request.requested
    requested = torch.tensor([float(stop_request.requested)], device=accelerator.device)
    return accelerator.reduce(requested, reduction="sum").item() > 0


def log_samples(
    args: argparse.Namespace,
    models: Models,
    emas: list[EMAModel],
    output_dir: Path,
    accelerator: Accelerator,
    step: int,
) -> None:
    """Sample `--num_sample_images` images (classes 0, 1, ...) with the EMA weights and the pipeline's own generator
    (the training randomness is untouched); save `samples/step-N.png`, one row per class, and log them to
    tensorboard. The CPU thread count follows the command line's `--num-threads auto` while sampling."""
    num_classes = models.transformer.config.num_classes
    class_labels = [i % num_classes for i in range(args.num_sample_images)]
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    path = output_dir / "samples" / f"step-{step:07d}.png"
    with ema_weights(models, emas):
        pipeline = models.pipeline()
        pipeline.set_progress_bar_config(disable=True)
        # One thread for a small model on the CPU: on a busy machine its samples take seconds instead of a minute
        # (docs/benchmarks.md, "CPU threads of the command line"). The training's thread count is back after.
        if models.vqvae is None:
            num_threads = resolve_num_threads("auto", pipeline, accelerator.device.type)
        else:  # the same rule on the transformer alone
            small = sum(p.numel() for p in models.transformer.parameters()) < SMALL_MODEL_PARAMETERS
            num_threads = 1 if accelerator.device.type == "cpu" and small else torch.get_num_threads()
        logger.info(f"Sampling {len(class_labels)} images for {path} ({num_threads} CPU thread(s)) ...")
        with cpu_threads(num_threads):
            images = pipeline(class_labels, generator=generator, output_type="np").images
    pil = pipeline.numpy_to_pil(images)
    rows = {label: [image for image, row in zip(pil, class_labels) if row == label] for label in class_labels}
    names = [(models.id2label or {}).get(label, str(label)) for label in rows]
    path.parent.mkdir(exist_ok=True)
    grid = make_grid(list(rows.values()), names, scale=auto_scale(images.shape[1]))
    atomic_write(path, lambda file: grid.save(file, format="PNG"))  # a stopped run leaves no partial PNG
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": images}, step=step, dataformats="NHWC")


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Path:
    output_dir = Path(args.output_dir)

    # 1. Accelerator, logging, launch sanity
    accelerator = setup_accelerator(args)

    # 2. Token space, data, models (every check runs here, before any output is written)
    pretrained = load_pretrained(args)
    space = resolve_token_space(args, pretrained)
    data = load_data(args, accelerator, space, pretrained)
    models = build_models(args, data, space, pretrained)
    model = make_training_module(args, models)
    vae, random_flip = space.vae, data.random_flip

    # 3. EMA of both networks, as the original: constant decay from the first step (see docs/training.md)
    ema_kwargs = (
        {"use_ema_warmup": True, "inv_gamma": args.ema_inv_gamma, "power": args.ema_power}
        if args.ema_warmup
        else {"use_ema_warmup": False, "min_decay": args.ema_decay, "update_after_step": -1}
    )
    emas = [EMAModel(m.parameters(), decay=args.ema_decay, **ema_kwargs) for m in models.networks]

    # 4. Data loader, batch sizes, learning rate
    train_dataloader = torch.utils.data.DataLoader(
        data.dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch's iterator (also mid-epoch, on resume) must not draw from the global
        # generator that the training step uses.
        generator=torch.Generator().manual_seed(args.seed),
    )
    validation_loader = None
    if data.validation is not None:  # evaluated on the main process only, unsharded
        validation_loader = torch.utils.data.DataLoader(
            data.validation, batch_size=args.train_batch_size, num_workers=args.dataloader_num_workers
        )
    if len(data.dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"The dataset has {len(data.dataset)} images, fewer than one batch of --train_batch_size "
            f"{args.train_batch_size} on each of {accelerator.num_processes} process(es)."
        )
    param_groups = (
        var_weight_decay_param_groups(model.transformer, args.adam_weight_decay)
        if args.model_family == "var"
        else weight_decay_param_groups(model.transformer, model.diffusion_head, args.adam_weight_decay)
    )
    optimizer = torch.optim.AdamW(
        param_groups,
        lr=0.0,  # set at every step by `learning_rate_at`
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    # Training randomness differs per process (orders, masks, noise), as the original's `seed + rank`.
    set_seed(args.seed, device_specific=True)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    for ema in emas:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    if vae is not None:
        vae.to(accelerator.device)
    if models.vqvae is not None:
        models.vqvae.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    models.transformer = unwrapped.transformer
    models.diffusion_head = getattr(unwrapped, "diffusion_head", None)
    schedule = make_schedule(args, accelerator.num_processes, len(train_dataloader))
    global_batch, base_lr, steps_per_epoch = schedule.global_batch, schedule.base_lr, schedule.steps_per_epoch
    max_train_steps, num_epochs, warmup_steps = schedule.max_train_steps, schedule.num_epochs, schedule.warmup_steps
    if isinstance(unwrapped, VARTrainingModule):  # progressive training follows the step (resume is exact)
        unwrapped.total_steps, unwrapped.warmup_steps = max_train_steps, warmup_steps
        unwrapped.stage_warmup_steps = args.prog_warmup_epochs * steps_per_epoch

    # 5. Output folder, trackers, resume
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir:
            clear_run_outputs(output_dir, args.logging_dir)
        for leftover in [*output_dir.glob("checkpoint-*.tmp"), *output_dir.glob("checkpoint-*.old")]:
            logger.warning(f"Removing {leftover}, left by an interrupted checkpoint save.")
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    global_step, recent = 0, collections.deque(maxlen=100)  # losses of the last steps, for the model card
    validation_curve: list[dict] = []
    if args.resume_from_checkpoint is not None:
        global_step, losses = load_checkpoint(accelerator, args.resume_from_checkpoint, output_dir, emas, global_batch)
        recent.extend(losses)
        if validation_loader is not None:
            validation_curve = load_validation_curve(output_dir, global_step)
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    logger.info("***** Running training *****")
    logger.info(
        f"  Images = {len(data.dataset)}, classes = {data.num_classes}, {space.description}, "
        f"{models.transformer.num_tokens} tokens"
    )
    logger.info(f"  Per-device batch = {args.train_batch_size}, global batch = {global_batch}, lr = {base_lr:.3e}")
    logger.info(f"  Steps = {max_train_steps} ({steps_per_epoch} per epoch), warm-up steps = {warmup_steps}")

    # 6. Training loop
    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    # Ctrl-C asks the loop to stop at the next step boundary (a second one stops at once).
    with StopRequest(Path(SCRIPT).name) as stop_request:
        step_loss, step_start = 0.0, time.perf_counter()
        for epoch in range(first_epoch, num_epochs):
            if global_step >= max_train_steps:
                break
            model.train()
            loader = train_dataloader
            if epoch == first_epoch and resume_batches > 0:
                loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            loader.set_epoch(epoch)
            for batch in loader:
                with accelerator.accumulate(model):
                    # Training randomness (flips, posterior samples, orders, masks, noise) is drawn in the step,
                    # from the global generators that `save_state` records: a resume continues it exactly.
                    class_labels = batch["class_labels"].long()
                    latents = batch_latents(batch, vae, random_flip, accelerator.device)
                    set_learning_rate(args, optimizer, global_step, base_lr, warmup_steps, max_train_steps)
                    # The order annealing and the progressive stage follow the step: resume is exact.
                    if isinstance(unwrapped, ARTrainingModule):
                        unwrapped.progress = global_step / max_train_steps
                    if isinstance(unwrapped, VARTrainingModule):
                        unwrapped.step = global_step
                    loss = model(latents, class_labels)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += (
                    accelerator.reduce(loss.detach(), reduction="mean").item() / args.gradient_accumulation_steps
                )

                if not accelerator.sync_gradients:
                    continue
                if not math.isfinite(step_loss):
                    raise RuntimeError(f"The loss is {step_loss} at step {global_step}; stopping.")
                for ema, module in zip(emas, models.networks):
                    ema.step(module.parameters())
                global_step += 1
                elapsed = time.perf_counter() - step_start
                logs = {
                    "loss": step_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "images_per_second": global_batch / elapsed,
                    "epoch": global_step / steps_per_epoch,
                    **getattr(unwrapped, "metrics", {}),  # VAR: the original's Lm, Lt, Accm, Acct (this process's)
                }
                if args.model_family == "var":
                    logs["weight_decay"] = max(group["weight_decay"] for group in optimizer.param_groups)
                recent.append(step_loss)
                accelerator.log(logs, step=global_step)
                progress_bar.update(1)
                progress_bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
                step_loss = 0.0

                if validation_loader is not None and (
                    global_step % args.validation_steps == 0 or global_step == max_train_steps
                ):
                    if accelerator.is_main_process:
                        with ema_weights(models, emas):
                            value = validation_loss(unwrapped, validation_loader, vae, accelerator.device)
                        epoch_now = global_step / steps_per_epoch
                        validation_curve = record_validation(output_dir, global_step, epoch_now, value)
                        accelerator.log({"validation_loss": value}, step=global_step)
                        logger.info(f"Step {global_step}: validation loss {value:.4f}")
                    accelerator.wait_for_everyone()
                # Ctrl-C: every process saves this step's checkpoint and stops here (a collective left alone hangs).
                stopping = stop_requested(stop_request, accelerator)
                if stopping or global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                    card = model_card(args, data, space, models, schedule, global_step, list(recent), validation_curve)
                    state = {
                        "global_batch": global_batch,
                        "num_processes": accelerator.num_processes,
                        "recent_losses": list(recent),
                    }
                    save_checkpoint(
                        accelerator,
                        output_dir,
                        global_step,
                        state,
                        lambda path, card=card: save_pipeline(path, models, emas, card),
                        args.checkpoints_total_limit,
                    )
                if stopping:
                    logger.info(f"Stopped at step {global_step} (Ctrl-C).")
                    raise KeyboardInterrupt  # `run_script` names the last checkpoint and the command that resumes
                if accelerator.is_main_process and args.sample_steps and global_step % args.sample_steps == 0:
                    log_samples(args, models, emas, output_dir, accelerator, global_step)
                step_start = time.perf_counter()
                if global_step >= max_train_steps:
                    break
        if stop_requested(stop_request, accelerator):  # Ctrl-C during the last step: its checkpoint is saved
            raise KeyboardInterrupt
    progress_bar.close()

    # 7. Final pipeline folder (EMA weights, sampling settings, model card), sample grid, Hub upload
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = output_dir / "pipeline.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        save_pipeline(
            staging,
            models,
            emas,
            model_card(args, data, space, models, schedule, global_step, list(recent), validation_curve),
        )
        # model_index.json moves last: until then the folder is not a loadable pipeline.
        for name in PIPELINE_ITEMS:
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if (staging / name).exists():
                os.replace(staging / name, target)
        shutil.rmtree(staging)
        if not args.sample_steps or global_step % args.sample_steps != 0:
            log_samples(args, models, emas, output_dir, accelerator, global_step)
        logger.info(f"Saved the pipeline to {output_dir}")
        if args.push_to_hub:
            repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=str(output_dir),
                commit_message=f"{args.model_family.upper()} trained for {global_step} steps",
                ignore_patterns=["checkpoint-*", f"{args.logging_dir}/*", "*.tmp"],
                token=args.hub_token,
            )
            logger.info(f"Pushed to https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def resume_hint(args: argparse.Namespace, script: str = SCRIPT) -> str:
    """What to print on Ctrl-C: the last complete checkpoint and the command that continues from it (`script`: the
    training script, also train_vqvae.py's)."""
    checkpoints = list_checkpoints(args.output_dir)
    saved = f"The last complete checkpoint is {checkpoints[-1]}." if checkpoints else "No checkpoint was saved yet."
    return f"{saved} Resume with:\n  {launch_command(script, resume_argv(args.argv))}"


if __name__ == "__main__":
    sys.exit(run_script("train_mar.py", parse_args, main, on_interrupt=resume_hint))
