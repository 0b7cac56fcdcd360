"""Reference statistics: read them from an `.npz` (the ADM evaluator's reference batches, LTH14/mar's
`fid_stats/adm_in256_stats.npz`, or any file with `mu` and `sigma`), and compute them for a dataset with the
centre crop of training.

Files we write hold `mu` `(D,)` and `sigma` `(D, D)` (float64), `features` `(N, D)` (float32, for precision /
recall), `num_images`, `resolution` and `feature_extractor`. ADM's reference batches also hold `arr_0`, the images
themselves (uint8 NHWC): precision / recall then uses their features.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from diffusers_mar.file_kinds import NPZ, describe_file


@dataclass
class ReferenceStatistics:
    path: str
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    features: np.ndarray | None  # (N, D) or None
    has_images: bool  # an ADM reference batch: `arr_0` holds the images
    num_classes: int | None

    def images(self) -> np.ndarray:
        with np.load(self.path) as data:
            return data["arr_0"]


def load_reference(path: str | Path) -> ReferenceStatistics:
    """Read reference statistics; `FileNotFoundError` / `ValueError` naming the file and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`reference` {str(path)!r} does not exist; compute one with --compute-reference.")
    kind = describe_file(path)
    if kind not in (NPZ, None):
        raise ValueError(
            f"`reference` {str(path)!r} is {kind}, not an .npz file: expected an .npz of reference statistics with "
            "'mu' and 'sigma' (an ADM reference batch, LTH14/mar's fid_stats, or --compute-reference's output)."
        )
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"`reference` {str(path)!r} is not an .npz file ({error}).") from None
    with data:
        if not {"mu", "sigma"} <= keys:
            raise ValueError(
                f"`reference` {str(path)!r} has no statistics: it needs 'mu' and 'sigma' (ADM format or plain); "
                f"found keys {sorted(keys)}."
            )
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"`reference` {str(path)!r}: 'mu' must be (D,) and 'sigma' (D, D); got {mu.shape} and {sigma.shape}."
            )
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"`reference` {str(path)!r}: 'mu' or 'sigma' holds NaN or infinite values.")
        features = np.asarray(data["features"], np.float64) if "features" in keys else None
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
            raise ValueError(
                f"`reference` {str(path)!r}: 'features' must be (N, {mu.shape[0]}); got {features.shape}."
            )
        num_classes = int(data["num_classes"]) if "num_classes" in keys else None
    return ReferenceStatistics(str(path), mu, sigma, features, "arr_0" in keys, num_classes)


def center_crop_arr(image: Image.Image, resolution: int) -> Image.Image:
    """ADM center crop: box-halve while the short side is >= 2 * resolution, bicubic resize, crop the center."""
    # As in LTH14/mar util/crop.py (from openai/guided-diffusion); training uses it too.
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")


def iter_reference_images(
    source: str, resolution: int, split: str = "train", image_column: str = "image", mode: str = "RGB"
):
    """Centre-cropped uint8 `(H, W, C)` images of an image folder (recursive) or a `datasets` dataset name."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = sorted(
            p for p in folder.rglob("*") if p.suffix in IMAGE_EXTENSIONS or p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"`data` folder {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS[:5])}).")
        for file in files:
            with Image.open(file) as image:
                yield _as_array(center_crop_arr(image.convert(mode), resolution))
        return
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"`data` {source!r} is not a folder, and `datasets` is not installed: pip install 'diffusers-mar[eval]'."
        ) from None
    try:
        dataset = datasets.load_dataset(source, split=split)
    except Exception as error:
        raise ValueError(f"`data` {source!r}: not a folder, and loading it with datasets failed ({error}).") from None
    if image_column not in dataset.column_names:
        raise ValueError(f"`image_column` {image_column!r} is not a column of {source!r}: {dataset.column_names}.")
    for row in dataset:
        yield _as_array(center_crop_arr(row[image_column].convert(mode), resolution))


def _as_array(image: Image.Image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array
