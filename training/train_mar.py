"""Train MAR from scratch, or fine-tune a converted one, with Accelerate: from one CPU to many GPUs.

    accelerate launch training/train_mar.py --train_data_dir ./my_images --pretrained_vae ./kl16 --output_dir out

The defaults are the paper's recipe (LTH14/mar `main_mar.py`, `engine_mar.py`): AdamW (0.9, 0.95), weight decay
0.02 except on 1-D tensors, biases and the diffusion head, `lr = blr * global_batch / 256` with blr 1e-4, 100 epochs
of linear warm-up then a constant rate, gradient clipping at 3.0, EMA 0.9999 from the first step, random orders,
a truncated-normal mask ratio on [0.7, 1], label dropout 0.1 and `diffusion_batch_mul` 4. The loss lives in
`training/mar_loss.py`. The result is a `MARPipeline` folder (EMA weights, model card) in `--output_dir`.

See `training/README.md` for the launch commands.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import io
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import datasets
import diffusers
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from diffusers.models import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import EMAModel
from huggingface_hub import ModelCard, ModelCardData, create_repo, upload_folder
from PIL import Image
from tqdm.auto import tqdm

from diffusers_mar import MARDDPMScheduler, MARDiffusionHead, MARPipeline, MARTransformer2DModel, get_preset_config
from diffusers_mar.configs import MAR_PRESETS

try:
    from training.mar_loss import MARTrainingModule, weight_decay_param_groups
except ImportError:  # run as a script: its own folder is on sys.path
    from mar_loss import MARTrainingModule, weight_decay_param_groups

logger = get_logger(__name__, log_level="INFO")

DIGITS = "digits"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
DIGITS_CONFIG = CONFIGS_DIR / "mar-digits.json"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
CACHE_INFO = "cache_info.json"
PIPELINE_ITEMS = ("transformer", "diffusion_head", "scheduler", "vae", "README.md", "model_index.json")


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
        "--resolution", type=int, default=None, help="Image side after the ADM center crop (256; digits: 8)."
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
        "--model_config",
        type=str,
        default=None,
        help=f"{' | '.join(MAR_PRESETS)} | path to a JSON with 'transformer' and 'diffusion_head' configs "
        f"(default: mar-large; digits: {DIGITS_CONFIG.relative_to(CONFIGS_DIR.parents[1])}).",
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
    model.add_argument("--gradient_checkpointing", action="store_true")

    # MAR objective
    objective = parser.add_argument_group("objective")
    objective.add_argument("--mask_ratio_min", type=float, default=0.7)
    objective.add_argument("--label_drop_prob", type=float, default=0.1)
    objective.add_argument("--diffusion_batch_mul", type=int, default=4)

    # Optimisation
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=64, help="Per device.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--num_epochs", type=int, default=400)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_epochs.")
    optim.add_argument("--learning_rate", type=float, default=None, help="Absolute rate; overrides --blr.")
    optim.add_argument("--blr", type=float, default=1e-4, help="Base rate: lr = blr * global batch / 256.")
    optim.add_argument("--min_lr", type=float, default=0.0, help="Floor of the cosine schedule.")
    optim.add_argument("--lr_scheduler", type=str, default="constant", choices=["constant", "cosine"])
    optim.add_argument("--lr_warmup_epochs", type=float, default=100.0)
    optim.add_argument("--lr_warmup_steps", type=int, default=None, help="Overrides --lr_warmup_epochs.")
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--adam_weight_decay", type=float, default=0.02)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=3.0)
    optim.add_argument("--ema_decay", type=float, default=0.9999)
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
    output.add_argument("--output_dir", type=str, default="mar-model")
    output.add_argument("--checkpointing_steps", type=int, default=5000)
    output.add_argument("--checkpoints_total_limit", type=int, default=None)
    output.add_argument(
        "--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder path."
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
    args.command = " ".join(shlex.quote(arg) for arg in (input_args if input_args is not None else sys.argv[1:]))

    # Checks that need no data: fail before any work.
    sources = [name for name in ("train_data_dir", "dataset_name", "cached_latents_dir") if getattr(args, name)]
    if len(sources) != 1:
        raise ValueError(
            f"Give exactly one of --train_data_dir, --dataset_name, --cached_latents_dir; got {sources or 'none'}."
        )
    if args.train_data_dir is not None:
        check_image_folder(args.train_data_dir)
    if args.cached_latents_dir is not None and not (Path(args.cached_latents_dir) / CACHE_INFO).is_file():
        raise ValueError(
            f"--cached_latents_dir {args.cached_latents_dir!r} is not a latent cache (no {CACHE_INFO}); "
            "write one with training/cache_latents.py."
        )
    if args.resume_from_checkpoint not in (None, "latest"):
        if not (Path(args.resume_from_checkpoint) / "training_state.json").is_file():
            raise ValueError(
                f"--resume_from_checkpoint {args.resume_from_checkpoint!r} is not a checkpoint folder of this script "
                "(no training_state.json); give 'latest' or an existing checkpoint-N folder."
            )
    if args.pretrained_model is not None and (args.model_config is not None or args.overrides):
        raise ValueError(
            "--pretrained_model fixes the architecture; do not combine it with --model_config/--override."
        )
    if (
        args.model_config is not None
        and args.model_config not in MAR_PRESETS
        and not Path(args.model_config).is_file()
    ):
        raise ValueError(
            f"--model_config must be one of {sorted(MAR_PRESETS)} or a JSON file; {args.model_config!r} is neither."
        )
    check_local_path("--pretrained_model", args.pretrained_model)
    check_local_path("--pretrained_vae", args.pretrained_vae)
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
    if args.dataset_name == DIGITS and args.image_mode != "RGB":
        raise ValueError("--image_mode does not apply to digits (they are single-channel).")
    return args


def check_launch(num_processes: int) -> None:
    """Stop when the launcher asked for several processes but this one runs alone (CPU-only launches)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and num_processes == 1:
        raise RuntimeError(
            "Several processes were launched but they do not form a group (no GPU?). On CPU-only machines run "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )
    launched_alone = not any(name in os.environ for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if (
        num_processes == 1
        and parse_flag_from_env("ACCELERATE_USE_CPU")
        and "MASTER_ADDR" in os.environ
        and launched_alone
    ):
        raise RuntimeError(
            "`accelerate launch --cpu --num_processes N` starts ONE process unless mpirun is used. For N CPU "
            "processes run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`."
        )


def check_local_path(flag: str, path: str | None) -> None:
    # A Hub id reads "owner/name"; anything else must be an existing local path.
    if path is None or Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ValueError(f"{flag} {path!r} does not exist (give a local folder or a Hub id 'owner/name').")


def check_image_folder(path: str) -> None:
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--train_data_dir {path!r} does not exist or is not a folder.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file()):
        raise ValueError(
            f"--train_data_dir {path!r} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}); put the images of "
            "each class in its own sub-folder."
        )


# --------------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------------


def center_crop_arr(image: Image.Image, resolution: int) -> Image.Image:
    """ADM center crop: box-halve while the short side is >= 2 * resolution, bicubic resize, crop the center."""
    # As in LTH14/mar util/crop.py (from openai/guided-diffusion).
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> `(C, H, W)` float32 in [-1, 1] (as torchvision's ToTensor then Normalize(0.5, 0.5))."""
    array = np.asarray(image, dtype=np.float32)
    array = array[:, :, None] if array.ndim == 2 else array
    return (torch.from_numpy(array.copy()).permute(2, 0, 1) / 255.0 - 0.5) / 0.5


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes, values 0..16) in [-1, 1]."""

    def __init__(self, resolution: int = 8):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1)  # (N, 1, 8, 8), 0..16
        if resolution == 8:
            self.images = images / 8.0 - 1.0
        else:
            # Through 8-bit grayscale and the same ADM crop/resize as image folders.
            pil = [Image.fromarray(np.round(im[0].numpy() * 255.0 / 16.0).astype(np.uint8), "L") for im in images]
            self.images = torch.stack([image_to_tensor(center_crop_arr(im, resolution)) for im in pil])
        self.labels = torch.from_numpy(digits.target).long()
        self.num_classes = 10
        self.id2label = {i: str(i) for i in range(10)}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "class_labels": self.labels[index]}


class CachedLatentsDataset(torch.utils.data.Dataset):
    """VAE posteriors written by `cache_latents.py`: `moments` of each image and of its flipped copy."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.info = json.loads((self.path / CACHE_INFO).read_text())
        self.moments = np.load(self.path / "moments.npy", mmap_mode="r")
        self.moments_flip = np.load(self.path / "moments_flip.npy", mmap_mode="r")
        self.labels = np.load(self.path / "labels.npy")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        moments = np.stack([self.moments[index], self.moments_flip[index]])  # (2, 2C, h, w)
        return {"moments": torch.from_numpy(moments), "class_labels": torch.tensor(int(self.labels[index]))}


def _readable(image: dict | None, mode: str) -> bool:
    if image is None:
        return False
    try:
        with Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]) as pil:
            pil.convert(mode).load()
        return True
    except Exception:  # noqa: BLE001 - any decoding failure makes the image unreadable
        return False


def load_image_dataset(args: argparse.Namespace) -> tuple[datasets.Dataset, list[int]]:
    """Load `--train_data_dir` or `--dataset_name`, drop or report unreadable images; returns (dataset, labels)."""
    if args.train_data_dir is not None:
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train"
        )
    else:
        dataset = datasets.load_dataset(
            args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train"
        )
    if args.image_column not in dataset.column_names:
        raise ValueError(
            f"--image_column {args.image_column!r} is not a column of the dataset; columns: {dataset.column_names}."
        )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("The dataset has no images.")

    # Every image is decoded once; `datasets` caches the result, so later runs and other processes reuse it.
    raw = dataset.cast_column(args.image_column, datasets.Image(decode=False))
    flags = raw.map(
        lambda example: {"_readable": _readable(example[args.image_column], args.image_mode)},
        remove_columns=raw.column_names,
        num_proc=args.dataloader_num_workers or None,
        desc="Checking images",
    )["_readable"]
    bad = [i for i, ok in enumerate(flags) if not ok]
    if bad:
        names = [str((raw[i][args.image_column] or {}).get("path") or f"row {i}") for i in bad[:10]]
        if args.bad_images == "error":
            raise ValueError(
                f"{len(bad)} unreadable image(s), e.g. {names}; fix or remove them, or pass --bad_images skip."
            )
        logger.warning(f"Skipping {len(bad)} unreadable image(s), e.g. {names}.")
        dataset = dataset.select([i for i, ok in enumerate(flags) if ok])
        if len(dataset) == 0:
            raise ValueError("Every image of the dataset is unreadable.")

    if args.label_column in dataset.column_names:
        labels = [int(label) for label in dataset[args.label_column]]
    else:
        logger.warning(f"No label column {args.label_column!r}: every image gets class 0 (a single-class model).")
        labels = [0] * len(dataset)
    return dataset, labels


def dataset_class_names(dataset: datasets.Dataset, label_column: str) -> dict[int, str] | None:
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return dict(enumerate(feature.names))
    return None


def check_labels(labels: list[int], num_classes: int, what: str) -> None:
    """Every label must be a class of the model: in `[0, num_classes)`."""
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise ValueError(
            f"The data has labels {bad[:10]}{' ...' if len(bad) > 10 else ''} outside [0, {num_classes}) "
            f"({what}); pass a larger --num_classes (at least {max(labels) + 1})."
        )


# --------------------------------------------------------------------------------------------------------------------
# Model configs
# --------------------------------------------------------------------------------------------------------------------


def load_model_config(name: str) -> dict:
    """A preset or a JSON file: `{"transformer": {...}, "diffusion_head": {...}, "sampling": {...}}`."""
    if name in MAR_PRESETS:
        config = get_preset_config(name)
        config.pop("paper", None)
        return config
    config = json.loads(Path(name).read_text())
    unknown = set(config) - {"transformer", "diffusion_head", "sampling"}
    if unknown or "transformer" not in config or "diffusion_head" not in config:
        raise ValueError(
            f"--model_config {name!r} must hold 'transformer' and 'diffusion_head' (and optionally 'sampling'); "
            f"unknown keys: {sorted(unknown)}."
        )
    config.setdefault("sampling", {})
    return config


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    for override in overrides:
        key, sep, value = override.partition("=")
        component, dot, field = key.partition(".")
        if not sep or not dot or component not in ("transformer", "diffusion_head", "sampling"):
            raise ValueError(
                f"--override {override!r} must read COMPONENT.KEY=VALUE with COMPONENT transformer, "
                "diffusion_head or sampling."
            )
        try:
            config[component][field] = json.loads(value)
        except json.JSONDecodeError:
            config[component][field] = value
    for component, cls in (("transformer", MARTransformer2DModel), ("diffusion_head", MARDiffusionHead)):
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(config[component]) - allowed
        if unknown:
            raise ValueError(f"Unknown {component} config keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
    return config


def resolve_model_configs(config: dict, grid_size: int, channels: int, num_classes: int) -> tuple[dict, dict]:
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
    probe = MARTransformer2DModel.from_config({**transformer, "num_layers": 0, "decoder_num_layers": 0})
    head = dict(config["diffusion_head"])
    for key, value in (("in_channels", probe.token_dim), ("condition_channels", probe.decoder_dim)):
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
    new = MARTransformer2DModel.from_config(config)
    state = {k: v for k, v in transformer.state_dict().items() if k != "class_embedding.weight"}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if missing != ["class_embedding.weight"] or unexpected:
        raise RuntimeError(f"Could not transfer the weights: missing {missing}, unexpected {unexpected}.")
    with torch.no_grad():
        new.class_embedding.weight[-1] = transformer.class_embedding.weight[-1]
    return new


# --------------------------------------------------------------------------------------------------------------------
# Schedules, checkpoints, pipeline folders
# --------------------------------------------------------------------------------------------------------------------


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


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (`checkpoint-N`, not `.tmp`), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def sampling_scheduler(vae: AutoencoderKL | None) -> MARDDPMScheduler:
    """The pipeline's scheduler: the original's (no clipping) in latent space; pixels are clipped to [-1, 1]."""
    # Pixels are bounded, so x0_hat is clipped as in pixel-space DDPM; the unbounded latents keep the original's
    # `clip_denoised=False`. Early in training this turns saturated pixel samples into clean ones (docs/training.md).
    return MARDDPMScheduler(clip_sample=vae is None)


def save_pipeline(
    path: Path,
    model: MARTrainingModule,
    emas: list[EMAModel],
    vae: AutoencoderKL | None,
    id2label: dict[int, str] | None,
    card: dict,
) -> None:
    """Write a `MARPipeline` folder with the EMA weights and a model card (main process only)."""
    modules = [model.transformer, model.diffusion_head]
    for ema, module in zip(emas, modules):
        ema.store(module.parameters())
        ema.copy_to(module.parameters())
    try:
        pipeline = MARPipeline(
            model.transformer, model.diffusion_head, sampling_scheduler(vae), vae=vae, id2label=id2label
        )
        pipeline.save_pretrained(path, safe_serialization=True)
    finally:
        for ema, module in zip(emas, modules):
            ema.restore(module.parameters())
    write_model_card(path, card)


def write_model_card(path: Path, card: dict) -> None:
    metadata = ModelCardData(
        license=card["license"],
        library_name="diffusers",
        tags=["diffusers", "diffusers-mar", "mar", "image-generation", "class-conditional", "autoregressive"],
        datasets=[card["dataset"]] if card.get("dataset_on_hub") else None,
        base_model=card.get("base_model"),
        mar_sampling=card["sampling"],
    )
    classes = card["num_classes"]
    sampling = ", ".join(f"{key}={value!r}" for key, value in card["sampling"].items())
    body = f"""
# {card["title"]}

A class-conditional MAR model (*Autoregressive Image Generation without Vector Quantization*, Li et al. 2024,
original code [LTH14/mar](https://github.com/LTH14/mar)) for `diffusers-mar`, trained with `training/train_mar.py`.
The weights are the exponential moving average (decay {card["ema_decay"]}{", with warm-up" if card["ema_warmup"] else ""}).
Load it with `MARPipeline`; the `mar_sampling` metadata above holds the recommended sampling arguments.

| | |
|---|---|
| data | {card["dataset"]} ({card["num_images"]} images, {classes} classes, {card["space"]}) |
| model | {card["model_config"]} |
| resolution | {card["resolution"]} |
| training | {card["steps"]} optimizer steps ({card["epochs"]:.2f} epochs), global batch {card["global_batch"]} |
| final loss | {card["final_loss"]} |
| parameters | transformer {card["transformer_params"]:,}, diffusion head {card["head_params"]:,} |

```python
import torch
from diffusers_mar import MARPipeline

pipe = MARPipeline.from_pretrained("{card["repo"]}")
generator = torch.Generator().manual_seed(0)
images = pipe(class_labels=[0], generator=generator, {sampling}).images
```

Training command:

```bash
accelerate launch training/train_mar.py {card["command"]}
```
"""
    ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}").save(path / "README.md")


def make_grid(images: np.ndarray, cols: int | None = None, min_tile: int = 64) -> Image.Image:
    """(N, H, W, C) floats in [0, 1] -> one PIL grid, small tiles upscaled (nearest) to `min_tile` pixels."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.ones((rows * h, cols * w, c), dtype=np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = image
    grid = (grid * 255).round().clip(0, 255).astype(np.uint8)
    pil = Image.fromarray(grid[:, :, 0] if c == 1 else grid)
    factor = max(1, math.ceil(min_tile / h))
    return pil.resize((pil.width * factor, pil.height * factor), resample=Image.NEAREST)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> Path:
    output_dir = Path(args.output_dir)

    # 1. Accelerator, logging, launch sanity
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
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()

    # 2. Data: source, labels, classes (every check here runs before any training work)
    is_digits = args.dataset_name == DIGITS
    pretrained = None
    if args.pretrained_model is not None:
        pretrained = MARPipeline.from_pretrained(args.pretrained_model)
    cache_info = None
    if args.cached_latents_dir is not None:
        train_dataset = CachedLatentsDataset(args.cached_latents_dir)
        cache_info = train_dataset.info
        labels = train_dataset.labels.tolist()
        id2label = {int(k): v for k, v in cache_info["id2label"].items()} if cache_info.get("id2label") else None
        resolution = cache_info["resolution"]
        if args.resolution not in (None, resolution):
            raise ValueError(
                f"The latent cache was written at resolution {resolution}, not --resolution {args.resolution}."
            )
        if args.max_train_samples is not None:
            train_dataset = torch.utils.data.Subset(train_dataset, range(min(args.max_train_samples, len(labels))))
            labels = labels[: len(train_dataset)]
    elif is_digits:
        resolution = args.resolution or 8
        train_dataset = DigitsDataset(resolution)
        labels = train_dataset.labels.tolist()
        id2label = train_dataset.id2label
        if args.max_train_samples is not None:
            train_dataset = torch.utils.data.Subset(train_dataset, range(min(args.max_train_samples, len(labels))))
            labels = labels[: len(train_dataset)]
    else:
        resolution = args.resolution or 256
        with accelerator.main_process_first():
            hf_dataset, labels = load_image_dataset(args)
        id2label = dataset_class_names(hf_dataset, args.label_column)
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
        num_classes = len(id2label) if id2label else data_classes
        num_classes = max(num_classes, data_classes)
    if id2label is None and pretrained is not None and num_classes == pretrained.transformer.config.num_classes:
        id2label = pretrained.id2label or None
    random_flip = (not is_digits) if args.random_flip is None else args.random_flip

    # 3. Token space: a VAE's latents or pixels
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
    if vae is not None:
        vae.requires_grad_(False).eval()
        downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        if resolution % downsample != 0:
            raise ValueError(f"--resolution {resolution} is not a multiple of the VAE downsampling ({downsample}).")
        grid_size, channels = resolution // downsample, vae.config.latent_channels
        image_channels = vae.config.in_channels
        if not is_digits and cache_info is None and image_channels != len(args.image_mode):
            raise ValueError(f"The VAE takes {image_channels}-channel images; --image_mode is {args.image_mode}.")
        if cache_info is not None and (cache_info["latent_channels"], cache_info["grid_size"]) != (
            channels,
            grid_size,
        ):
            raise ValueError(
                f"The latent cache holds {cache_info['latent_channels']}-channel {cache_info['grid_size']}^2 latents "
                f"but the VAE gives {channels}-channel {grid_size}^2 latents."
            )
        space = f"latent space ({channels}x{grid_size}x{grid_size}, scaling factor {vae.config.scaling_factor})"
    else:
        if cache_info is not None:
            raise ValueError("Training from cached latents needs the VAE that wrote them.")
        grid_size, channels = resolution, 1 if is_digits else len(args.image_mode)
        space = f"pixel space ({channels}x{resolution}x{resolution})"

    # 4. Models (all processes build the same initial weights)
    set_seed(args.seed)
    if pretrained is not None:
        transformer, diffusion_head = pretrained.transformer, pretrained.diffusion_head
        config = transformer.config
        if (config.sample_size, config.in_channels) != (grid_size, channels):
            raise ValueError(
                f"--pretrained_model works on {config.in_channels}-channel {config.sample_size}^2 grids but the data "
                f"gives {channels}-channel {grid_size}^2 ones; change --resolution or the VAE."
            )
        if num_classes != config.num_classes:
            logger.info(f"Re-initialising the class embedding for {num_classes} classes (was {config.num_classes}).")
            transformer = reinit_class_embedding(transformer, num_classes)
        # The recommended sampling of the pretrained model's card, when it has one.
        card_path = Path(args.pretrained_model) / "README.md"
        sampling = ModelCard.load(card_path).data.to_dict().get("mar_sampling", {}) if card_path.is_file() else {}
        model_config_name = args.pretrained_model
    else:
        model_config_name = args.model_config or ("training/configs/mar-digits.json" if is_digits else "mar-large")
        config_path = DIGITS_CONFIG if args.model_config is None and is_digits else model_config_name
        config = apply_overrides(load_model_config(str(config_path)), args.overrides)
        model_config_name = " ".join([model_config_name, *args.overrides])
        transformer_config, head_config = resolve_model_configs(config, grid_size, channels, num_classes)
        transformer = MARTransformer2DModel.from_config(transformer_config)
        diffusion_head = MARDiffusionHead.from_config(head_config)
        sampling = dict(config.get("sampling", {}))
    transformer.train()
    diffusion_head.train()
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        diffusion_head.enable_gradient_checkpointing()
    num_tokens = transformer.num_tokens
    defaults = {
        "guidance_scale": 3.0,
        "guidance_schedule": "linear",
        "temperature": 1.0,
        "num_inference_steps": min(64, num_tokens),
        "num_diffusion_steps": 100,
    }
    flags = {
        "guidance_scale": args.sample_guidance_scale,
        "temperature": args.sample_temperature,
        "num_inference_steps": args.sample_num_inference_steps,
        "num_diffusion_steps": args.sample_num_diffusion_steps,
    }
    # The --sample_* flags, else the config's (or pretrained card's) `sampling`, else the pipeline's defaults.
    sampling = {
        key: flags[key] if flags.get(key) is not None else sampling.get(key, default)
        for key, default in defaults.items()
    }
    if not 1 <= sampling["num_inference_steps"] <= num_tokens:
        raise ValueError(f"--sample_num_inference_steps must be in [1, {num_tokens}] (the token count).")
    model = MARTrainingModule(
        transformer,
        diffusion_head,
        MARDDPMScheduler(),
        mask_ratio_min=args.mask_ratio_min,
        label_drop_prob=args.label_drop_prob,
        diffusion_batch_mul=args.diffusion_batch_mul,
    )

    # 5. EMA of both networks, as the original: constant decay from the first step (see docs/training.md)
    ema_kwargs = (
        {"use_ema_warmup": True, "inv_gamma": args.ema_inv_gamma, "power": args.ema_power}
        if args.ema_warmup
        else {"use_ema_warmup": False, "min_decay": args.ema_decay, "update_after_step": -1}
    )
    emas = [EMAModel(m.parameters(), decay=args.ema_decay, **ema_kwargs) for m in (transformer, diffusion_head)]

    # 6. Data loader, batch sizes, learning rate
    if args.cached_latents_dir is None and not is_digits:

        def preprocess(batch: dict) -> dict:
            images = [
                center_crop_arr(image.convert(args.image_mode), resolution) for image in batch[args.image_column]
            ]
            out = {"pixel_values": [image_to_tensor(image) for image in images]}
            out["class_labels"] = batch.get(args.label_column, [0] * len(images))
            return out

        train_dataset = hf_dataset.with_transform(preprocess)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.dataloader_num_workers,
        # Its own generator: starting an epoch's iterator (also mid-epoch, on resume) must not draw from the global
        # generator that the training step uses.
        generator=torch.Generator().manual_seed(args.seed),
    )
    global_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if len(train_dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(
            f"The dataset has {len(train_dataset)} images, fewer than one batch of --train_batch_size "
            f"{args.train_batch_size} on each of {accelerator.num_processes} process(es)."
        )
    base_lr = args.learning_rate if args.learning_rate is not None else args.blr * global_batch / 256
    optimizer = torch.optim.AdamW(
        weight_decay_param_groups(transformer, diffusion_head, args.adam_weight_decay),
        lr=base_lr,
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
    unwrapped = accelerator.unwrap_model(model)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    warmup_steps = (
        args.lr_warmup_steps if args.lr_warmup_steps is not None else round(args.lr_warmup_epochs * steps_per_epoch)
    )

    # 7. Output folder, trackers, resume
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*output_dir.glob("checkpoint-*.tmp"), *output_dir.glob("checkpoint-*.old")]:
            logger.warning(f"Removing {leftover}, left by an interrupted checkpoint save.")
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(args.tracker_project_name, config=tracker_config)

    global_step = 0
    recent: collections.deque = collections.deque(maxlen=100)  # losses of the last steps, for the model card
    if args.resume_from_checkpoint is not None:
        if args.resume_from_checkpoint == "latest":
            checkpoints = list_checkpoints(output_dir)
            path = checkpoints[-1] if checkpoints else None
        else:
            path = Path(args.resume_from_checkpoint)
        if path is None:
            logger.info(f"No checkpoint in {output_dir}: starting a new run.")
        else:
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
            global_step = state["global_step"]
            recent.extend(state.get("recent_losses", []))
            logger.info(f"Resumed from {path} at step {global_step}.")
    first_epoch = global_step // steps_per_epoch
    resume_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps

    logger.info("***** Running training *****")
    logger.info(f"  Images = {len(train_dataset)}, classes = {num_classes}, {space}, {num_tokens} tokens")
    logger.info(f"  Per-device batch = {args.train_batch_size}, global batch = {global_batch}, lr = {base_lr:.3e}")
    logger.info(f"  Steps = {max_train_steps} ({steps_per_epoch} per epoch), warm-up steps = {warmup_steps}")
    logger.info(
        f"  Parameters: transformer {sum(p.numel() for p in transformer.parameters()):,}, "
        f"diffusion head {sum(p.numel() for p in diffusion_head.parameters()):,}"
    )

    def mean_recent() -> float | None:
        return float(np.mean(recent)) if recent else None

    def card_info(final_loss: float | None) -> dict:
        return {
            "title": f"MAR trained on {args.dataset_name or args.train_data_dir or args.cached_latents_dir}",
            "license": args.license,
            "dataset": args.dataset_name or args.train_data_dir or args.cached_latents_dir,
            "dataset_on_hub": args.dataset_name not in (None, DIGITS) and not Path(args.dataset_name).exists(),
            "base_model": args.pretrained_model
            if args.pretrained_model and not Path(args.pretrained_model).exists()
            else None,
            "sampling": sampling,
            "num_classes": num_classes,
            "num_images": len(train_dataset),
            "space": space,
            "resolution": resolution,
            "model_config": model_config_name,
            "steps": global_step,
            "epochs": global_step / steps_per_epoch,
            "global_batch": global_batch,
            "final_loss": "n/a" if final_loss is None else f"{final_loss:.4f} (mean of the last {len(recent)} steps)",
            "ema_decay": args.ema_decay,
            "ema_warmup": args.ema_warmup,
            "transformer_params": sum(p.numel() for p in transformer.parameters()),
            "head_params": sum(p.numel() for p in diffusion_head.parameters()),
            "repo": args.hub_model_id or str(output_dir),
            "command": args.command,
        }

    def save_checkpoint() -> Path:
        # Written as checkpoint-N.tmp and renamed once complete: a killed run never leaves a half checkpoint.
        final = output_dir / f"checkpoint-{global_step}"
        tmp = output_dir / f"checkpoint-{global_step}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            state = {
                "global_step": global_step,
                "global_batch": global_batch,
                "num_processes": accelerator.num_processes,
                "recent_losses": list(recent),
            }
            (tmp / "training_state.json").write_text(json.dumps(state, indent=2))
            save_pipeline(tmp / "pipeline", unwrapped, emas, vae, id2label, card_info(mean_recent()))
            stale = final.with_name(final.name + ".old")  # a checkpoint of the same step from an earlier run
            if final.exists():
                os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
            checkpoints = list_checkpoints(output_dir)
            if args.checkpoints_total_limit is not None:
                for old in checkpoints[: max(0, len(checkpoints) - args.checkpoints_total_limit)]:
                    shutil.rmtree(old)
            logger.info(f"Saved {final}")
        accelerator.wait_for_everyone()
        return final

    def log_samples() -> None:
        # EMA weights, eval mode, the pipeline's own generator (training randomness is untouched).
        modules = [unwrapped.transformer, unwrapped.diffusion_head]
        for ema, module in zip(emas, modules):
            ema.store(module.parameters())
            ema.copy_to(module.parameters())
            module.eval()
        try:
            pipeline = MARPipeline(unwrapped.transformer, unwrapped.diffusion_head, sampling_scheduler(vae), vae=vae)
            pipeline.set_progress_bar_config(disable=True)
            class_labels = [i % num_classes for i in range(args.num_sample_images)]
            images = pipeline(
                class_labels,
                generator=torch.Generator(accelerator.device).manual_seed(args.seed),
                output_type="np",
                **sampling,
            ).images
        finally:
            for ema, module in zip(emas, modules):
                ema.restore(module.parameters())
                module.train()
        (output_dir / "samples").mkdir(exist_ok=True)
        # One column per class when the classes fit in a row (images cycle through the classes).
        cols = num_classes if num_classes <= min(16, args.num_sample_images) else None
        make_grid(images, cols).save(output_dir / "samples" / f"step-{global_step:07d}.png")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": images}, step=global_step, dataformats="NHWC")

    # 8. Training loop
    progress_bar = tqdm(
        total=max_train_steps, initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
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
                with torch.no_grad():
                    class_labels = batch["class_labels"].long()
                    batch_size = class_labels.shape[0]
                    # Training randomness (flips, posterior samples, orders, masks, noise) is drawn here, in the
                    # step, from the global generators that `save_state` records: a resume continues it exactly.
                    flip = torch.rand(batch_size) < 0.5 if random_flip else torch.zeros(batch_size, dtype=torch.bool)
                    flip = flip.to(accelerator.device)
                    if "moments" in batch:
                        moments = torch.where(
                            flip[:, None, None, None], batch["moments"][:, 1], batch["moments"][:, 0]
                        )
                        latents = DiagonalGaussianDistribution(moments.float()).sample()
                    else:
                        pixels = batch["pixel_values"].float()
                        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
                        latents = vae.encode(pixels).latent_dist.sample() if vae is not None else pixels
                    if vae is not None:
                        shift = vae.config.shift_factor or 0.0
                        latents = (latents - shift) * vae.config.scaling_factor
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate_at(
                        global_step, base_lr, warmup_steps, max_train_steps, args.lr_scheduler, args.min_lr
                    )
                loss = model(latents, class_labels)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.reduce(loss.detach(), reduction="mean").item() / args.gradient_accumulation_steps

            if not accelerator.sync_gradients:
                continue
            if not math.isfinite(step_loss):
                raise RuntimeError(f"The loss is {step_loss} at step {global_step}; stopping.")
            for ema, module in zip(emas, (unwrapped.transformer, unwrapped.diffusion_head)):
                ema.step(module.parameters())
            global_step += 1
            elapsed = time.perf_counter() - step_start
            logs = {
                "loss": step_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "images_per_second": global_batch / elapsed,
                "epoch": global_step / steps_per_epoch,
            }
            recent.append(step_loss)
            accelerator.log(logs, step=global_step)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
            step_loss = 0.0

            if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                save_checkpoint()
            if accelerator.is_main_process and args.sample_steps and global_step % args.sample_steps == 0:
                log_samples()
            step_start = time.perf_counter()
            if global_step >= max_train_steps:
                break
    progress_bar.close()

    # 9. Final pipeline folder (EMA weights + model card), sample grid, Hub upload
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        staging = output_dir / "pipeline.tmp"
        if staging.exists():
            shutil.rmtree(staging)
        save_pipeline(staging, unwrapped, emas, vae, id2label, card_info(mean_recent()))
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
            log_samples()
        logger.info(f"Saved the pipeline to {output_dir}")
        if args.push_to_hub:
            repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
            upload_folder(
                repo_id=repo_id,
                folder_path=str(output_dir),
                commit_message=f"MAR trained for {global_step} steps",
                ignore_patterns=["checkpoint-*", f"{args.logging_dir}/*", "*.tmp"],
                token=args.hub_token,
            )
            logger.info(f"Pushed to https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


if __name__ == "__main__":
    main(parse_args())
