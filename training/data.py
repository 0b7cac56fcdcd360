"""Training data for `train_mar.py` and `cache_latents.py`: sources, checks, the ADM crop and the latent cache.

Sources: an image folder (`datasets` `imagefolder`, one sub-folder per class), any `datasets` dataset with image and
label columns, scikit-learn's bundled 8x8 digits, and the VAE posteriors written by `cache_latents.py`. Images are
cropped as LTH14/mar `util/crop.py` and scaled to `[-1, 1]`; unreadable images are found before any training work.
"""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Callable
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import torch
from accelerate.logging import get_logger
from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
from PIL import Image

from diffusers_mar.evaluation.reference import center_crop_arr  # the ADM crop, shared with evaluation
from diffusers_mar.file_kinds import describe_file

logger = get_logger(__name__, log_level="INFO")

DIGITS = "digits"
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
CACHE_INFO = "cache_info.json"


# --------------------------------------------------------------------------------------------------------------------
# Checks that need no data loading
# --------------------------------------------------------------------------------------------------------------------


# What each model flag takes: a folder that `from_pretrained` reads (or a Hub id), never a single file.
EXPECTED_FOLDERS = {
    "--pretrained_model": "a MARPipeline or ARPipeline folder (with model_index.json, as `save_pretrained` and "
    "train_mar.py write; convert an original checkpoint with conversion/convert_mar_to_diffusers.py), or a "
    "VARPipeline folder",
    "--pretrained_vae": "an AutoencoderKL folder (config.json and weights, as `save_pretrained` writes)",
    "--pretrained_vqvae": "a VARVQModel folder (config.json and weights, as `save_pretrained` and train_vqvae.py "
    "write; convert VAR's vae_ch160v4096z32.pth with conversion/convert_var_to_diffusers.py)",
}


def check_local_path(flag: str, path: str | None) -> None:
    """A Hub id reads "owner/name"; anything else must be an existing local folder (`EXPECTED_FOLDERS[flag]`)."""
    if path is None:
        return
    local = Path(path).expanduser()
    if local.is_file():
        raise ValueError(
            f"{flag} {path!r} is {describe_file(local) or 'a file'}, not a folder; expected {EXPECTED_FOLDERS[flag]}, or a Hub "
            "id 'owner/name'."
        )
    if local.exists():
        return
    if path.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise ValueError(f"{flag} {path!r} does not exist (give a local folder or a Hub id 'owner/name').")


def check_image_folder(path: str) -> None:
    """`--train_data_dir` must be a folder holding at least one image file."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"--train_data_dir {path!r} does not exist or is not a folder.")
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.rglob("*") if p.is_file()):
        raise ValueError(
            f"--train_data_dir {path!r} holds no image ({', '.join(sorted(IMAGE_EXTENSIONS))}); put the images of "
            "each class in its own sub-folder."
        )


def check_latent_cache(path: str) -> None:
    if not (Path(path) / CACHE_INFO).is_file():
        raise ValueError(
            f"--cached_latents_dir {path!r} is not a latent cache (no {CACHE_INFO}); "
            "write one with training/cache_latents.py."
        )


def check_labels(labels: list[int], num_classes: int, what: str) -> None:
    """Every label must be a class of the model: in `[0, num_classes)`."""
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise ValueError(
            f"The data has labels {bad[:10]}{' ...' if len(bad) > 10 else ''} outside [0, {num_classes}) "
            f"({what}); pass a larger --num_classes (at least {max(labels) + 1})."
        )


# --------------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------------


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> `(C, H, W)` float32 in [-1, 1] (as torchvision's ToTensor then Normalize(0.5, 0.5))."""
    array = np.asarray(image, dtype=np.float32)
    array = array[:, :, None] if array.ndim == 2 else array
    return (torch.from_numpy(array.copy()).permute(2, 0, 1) / 255.0 - 0.5) / 0.5


def image_transform(
    image_column: str, resolution: int, image_mode: str = "RGB", label_column: str | None = None
) -> Callable[[dict], dict]:
    """The `datasets` transform of both scripts: crop, scale to `[-1, 1]` and (with `label_column`) the labels."""

    def transform(batch: dict) -> dict:
        images = [center_crop_arr(image.convert(image_mode), resolution) for image in batch[image_column]]
        out = {"pixel_values": [image_to_tensor(image) for image in images]}
        if label_column is not None:
            out["class_labels"] = batch.get(label_column, [0] * len(images))
        return out

    return transform


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


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
        self.info = self.read_info(path)
        self.moments = np.load(self.path / "moments.npy", mmap_mode="r")
        self.moments_flip = np.load(self.path / "moments_flip.npy", mmap_mode="r")
        self.labels = np.load(self.path / "labels.npy")

    @staticmethod
    def read_info(path: str) -> dict:
        """The cache's `cache_info.json`: resolution, latent channels and grid, the VAE, class names."""
        return json.loads((Path(path) / CACHE_INFO).read_text())

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


def _unknown_dataset(name: str, reason: str) -> ValueError:
    return ValueError(
        f"--dataset_name {name!r} is not a local folder and {reason}. Give a `datasets` dataset on the Hub "
        f"('owner/name'), a local dataset folder, '{DIGITS}' (scikit-learn's bundled handwritten digits, no "
        "download), or an image folder with --train_data_dir."
    )


def check_hub_dataset(name: str) -> None:
    """A `--dataset_name` that is not a local folder must be on the Hub: one request, no retries, so that a typo or
    an unreachable Hub stops the run at once (`datasets` retries for about half a minute). Offline, `load_dataset`
    itself fails at once when the dataset is not cached."""
    if Path(name).expanduser().exists() or datasets.config.HF_HUB_OFFLINE:
        return
    try:
        huggingface_hub.HfApi().dataset_info(name, timeout=10)
    except GatedRepoError:
        return  # `load_dataset` explains the access it needs
    except (RepositoryNotFoundError, HFValidationError):
        raise _unknown_dataset(name, "there is no such dataset on the Hugging Face Hub") from None
    except huggingface_hub.errors.HfHubHTTPError:
        return  # the Hub answered (e.g. a server error): `load_dataset` tries again
    except Exception as error:  # noqa: BLE001 - any transport failure (no network, no DNS, a timeout)
        raise _unknown_dataset(
            name,
            f"the Hugging Face Hub cannot be reached ({type(error).__name__}: {error}); set HF_HUB_OFFLINE=1 to use "
            "a copy in the `datasets` cache",
        ) from None


def load_image_dataset(args: argparse.Namespace) -> tuple[datasets.Dataset, list[int]]:
    """Load `--train_data_dir` or `--dataset_name`, drop or report unreadable images; returns (dataset, labels)."""
    if args.train_data_dir is not None:
        dataset = datasets.load_dataset(
            "imagefolder", data_dir=args.train_data_dir, cache_dir=args.cache_dir, split="train"
        )
    else:
        check_hub_dataset(args.dataset_name)
        try:
            dataset = datasets.load_dataset(
                args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, split="train"
            )
        except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as error:
            reason = (
                "is not in the `datasets` cache (HF_HUB_OFFLINE is set)"
                if datasets.config.HF_HUB_OFFLINE
                else f"could not be loaded ({error})"
            )
            raise _unknown_dataset(args.dataset_name, reason) from None
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
