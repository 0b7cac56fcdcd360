"""Cache the VAE posteriors of a training set, for `train_mar.py --cached_latents_dir`.

    accelerate launch training/cache_latents.py --train_data_dir ./imagenet/train --pretrained_vae ./kl16 \
        --output_dir ./imagenet-kl16-256

As LTH14/mar `main_cache.py`: each image is center-cropped (ADM), encoded, and the posterior moments (mean and log
variance before clamping) of the image and of its horizontally flipped copy are stored; training picks one of the two
at random and samples the posterior, so the cache reproduces the flip augmentation and the posterior noise.

The folder holds `moments.npy` and `moments_flip.npy` (float32, `(N, 2 * latent_channels, h, w)`, memory-mapped by
the trainer), `labels.npy` and `cache_info.json`. It is written as `<output_dir>.tmp` and renamed when complete.
Several processes (`accelerate launch --num_processes N`) each encode a share of the images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `training.*` importable when run as a script

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import parse_flag_from_env
from diffusers.models import AutoencoderKL
from tqdm.auto import tqdm

from diffusers_mar import MARPipeline
from diffusers_mar.pipelines.pipeline_autoregressive import vae_scale_factor
from training.data import (
    CACHE_INFO,
    DIGITS,
    check_image_folder,
    check_local_path,
    dataset_class_names,
    image_transform,
    load_image_dataset,
)
from training.launch import check_launch, run_script

logger = get_logger(__name__, log_level="INFO")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Cache VAE posteriors (image and flipped image) for MAR training.")
    parser.add_argument("--train_data_dir", type=str, default=None, help="Image folder, one sub-folder per class.")
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset (Hub id or path).")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--label_column", type=str, default="label")
    parser.add_argument("--cache_dir", type=str, default=None, help="Cache folder of `datasets`.")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--bad_images", type=str, default="error", choices=["error", "skip"])
    parser.add_argument("--pretrained_vae", type=str, default=None, help="An AutoencoderKL folder or Hub id.")
    parser.add_argument("--pretrained_model", type=str, default=None, help="A MARPipeline folder with a VAE.")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64, help="Images per encoder call, per process.")
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--output_dir", type=str, required=True, help="The cache folder to write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing cache folder.")
    args = parser.parse_args(input_args)
    args.image_mode = "RGB"

    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Give exactly one of --train_data_dir and --dataset_name.")
    if args.dataset_name == DIGITS:
        raise ValueError("Digits train in pixel space; there is nothing to cache.")
    if args.train_data_dir is not None:
        check_image_folder(args.train_data_dir)
    if (args.pretrained_vae is None) == (args.pretrained_model is None):
        raise ValueError("Give exactly one of --pretrained_vae and --pretrained_model (a pipeline with a VAE).")
    check_local_path("--pretrained_vae", args.pretrained_vae)
    check_local_path("--pretrained_model", args.pretrained_model)
    for name in ("resolution", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if Path(args.output_dir).exists() and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir!r} exists; pass --overwrite to replace it.")
    return args


@torch.no_grad()
def main(args: argparse.Namespace) -> Path:
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_launch(state.num_processes)
    output_dir = Path(args.output_dir)
    tmp = output_dir.with_name(output_dir.name + ".tmp")

    # 1. Data and VAE (every check before any encoding)
    with state.main_process_first():
        dataset, labels = load_image_dataset(args)
    if args.pretrained_vae is not None:
        vae, vae_source = AutoencoderKL.from_pretrained(args.pretrained_vae), args.pretrained_vae
        if Path(vae_source).expanduser().exists():
            vae_source = str(Path(vae_source).expanduser().resolve())
    else:
        vae = MARPipeline.from_pretrained(args.pretrained_model).vae
        if vae is None:
            raise ValueError(f"--pretrained_model {args.pretrained_model!r} has no VAE.")
        local = Path(args.pretrained_model).expanduser()
        vae_source = str(local.resolve() / "vae") if local.exists() else None
    downsample = vae_scale_factor(vae)
    if args.resolution % downsample != 0:
        raise ValueError(f"--resolution {args.resolution} is not a multiple of the VAE downsampling ({downsample}).")
    vae = vae.to(state.device).eval()
    grid_size, channels = args.resolution // downsample, vae.config.latent_channels
    shape = (len(dataset), 2 * channels, grid_size, grid_size)

    # 2. The main process allocates the arrays; every process fills its share of the rows
    if state.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name in ("moments", "moments_flip"):
            np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape).flush()
        np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
    state.wait_for_everyone()
    arrays = {name: np.load(tmp / f"{name}.npy", mmap_mode="r+") for name in ("moments", "moments_flip")}

    indices = list(range(state.process_index, len(dataset), state.num_processes))
    shard = torch.utils.data.Subset(
        dataset.with_transform(image_transform(args.image_column, args.resolution)), indices
    )
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch_size, num_workers=args.dataloader_num_workers)
    position = 0
    for batch in tqdm(loader, desc="Encoding", disable=not state.is_local_main_process):
        pixels = batch["pixel_values"].to(state.device, dtype=vae.dtype)
        rows = indices[position : position + len(pixels)]
        position += len(pixels)
        # `latent_dist.parameters` are the moments before the log-variance clamp, as the original stores.
        arrays["moments"][rows] = vae.encode(pixels).latent_dist.parameters.float().cpu().numpy()
        arrays["moments_flip"][rows] = vae.encode(pixels.flip(-1)).latent_dist.parameters.float().cpu().numpy()
    for array in arrays.values():
        array.flush()
    del arrays
    state.wait_for_everyone()

    # 3. Describe the cache and publish it
    if state.is_main_process:
        info = {
            "num_images": len(dataset),
            "resolution": args.resolution,
            "latent_channels": channels,
            "grid_size": grid_size,
            "scaling_factor": vae.config.scaling_factor,
            "shift_factor": vae.config.shift_factor,
            "vae": vae_source,
            "dataset": args.dataset_name or args.train_data_dir,
            "id2label": dataset_class_names(dataset, args.label_column),
        }
        (tmp / CACHE_INFO).write_text(json.dumps(info, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
        logger.info(f"Cached {len(dataset)} images to {output_dir}")
    state.wait_for_everyone()
    return output_dir


if __name__ == "__main__":
    sys.exit(run_script("cache_latents.py", parse_args, main))
