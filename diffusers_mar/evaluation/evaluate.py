"""Evaluation end to end: sample the fixed list across processes, then (on the main process) read the PNGs back,
write the ADM `.npz`, extract features and compute the metrics against reference statistics."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from diffusers_mar.atomic_files import atomic_write
from diffusers_mar.evaluation.features import extract
from diffusers_mar.evaluation.metrics import frechet_distance, gaussian_statistics, inception_score, precision_recall
from diffusers_mar.evaluation.reference import ReferenceStatistics, iter_reference_images
from diffusers_mar.evaluation.sampling import NpzWriter, read_images


def _check_positive(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")


# Below these sizes the metrics are biased by the sample size: not comparable with published numbers or with runs of
# another size (issue 23: the digits model scored FD 2.32 on 50 images and 0.254 on 1,000, docs/benchmarks.md).
MIN_COMPARABLE_IMAGES = 1_000
INCEPTION_SCORE_SPLITS = 10


def comparability_warnings(num_images: int, num_logit_classes: int | None = None) -> list[str]:
    """Why metrics of `num_images` images are not comparable: fewer than `MIN_COMPARABLE_IMAGES` images, or IS splits
    smaller than the classifier's `num_logit_classes` (a split of n images cannot score above n)."""
    messages = []
    if num_images < MIN_COMPARABLE_IMAGES:
        messages.append(
            f"metrics of {num_images:,} images are not comparable with published numbers or with runs of another "
            f"size: FID / FD, IS and precision / recall depend on the number of images (the digits model scored FD "
            f"2.32 on 50 images and 0.254 on 1,000); use at least {MIN_COMPARABLE_IMAGES:,} images, and 50,000 to "
            "compare with the paper."
        )
    split_size = num_images // INCEPTION_SCORE_SPLITS
    if num_logit_classes is not None and split_size < num_logit_classes:
        messages.append(
            f"the Inception Score's {INCEPTION_SCORE_SPLITS} splits hold {split_size:,} image"
            f"{'s' if split_size != 1 else ''} each, fewer than the "
            f"classifier's {num_logit_classes:,} classes, so no split can score above {split_size:,}: the IS is not "
            "comparable with runs of another size."
        )
    return messages


def sample_batches(array: np.ndarray, batch_size: int):
    for first in range(0, len(array), batch_size):
        yield array[first : first + batch_size]


def compute_metrics(
    output_dir: str | Path,
    num_images: int,
    extractor,
    reference: ReferenceStatistics | None = None,
    npz_path: str | Path | None = None,
    batch_size: int = 100,
    precision_recall_k: int = 3,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Metrics of the PNGs `0..num_images-1` in `output_dir`: FID (with `reference`), Inception Score (when the
    extractor gives logits), precision / recall (when `reference` has features or images); writes `npz_path`.
    Without an `extractor`, only the `.npz` is written. `warn` (default: `warnings.warn`) receives each of
    `comparability_warnings` (too few images for comparable numbers)."""
    _check_positive(num_images=num_images, batch_size=batch_size, precision_recall_k=precision_recall_k)
    first = next(read_images(output_dir, 1, 1))
    writer = NpzWriter(npz_path, (num_images, *first.shape[1:])) if npz_path is not None else None
    try:
        if extractor is None:
            for batch in read_images(output_dir, num_images, batch_size):
                if writer is not None:
                    writer.write(batch)
            features = logits = None
        else:
            batches = read_images(output_dir, num_images, batch_size)
            features, logits = extract(extractor, batches, writer.write if writer is not None else None)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    metrics: dict = {}
    if extractor is None:
        return metrics
    warn = warn or (lambda message: warnings.warn(message, UserWarning, stacklevel=3))
    for message in comparability_warnings(num_images, logits.shape[1] if logits is not None else None):
        warn(message)
    if logits is not None and len(logits) >= INCEPTION_SCORE_SPLITS:
        metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, INCEPTION_SCORE_SPLITS)
    if reference is not None:
        if features.shape[1] != reference.mu.shape[0]:
            raise ValueError(
                f"`reference` {reference.path!r} holds {reference.mu.shape[0]}-d statistics but the feature "
                f"extractor gives {features.shape[1]}-d features: compute the reference with the same extractor."
            )
        metrics["fid"] = frechet_distance(*gaussian_statistics(features), reference.mu, reference.sigma)
        real = reference.features
        if real is None and reference.has_images:
            real, _ = extract(extractor, sample_batches(reference.images(), batch_size))
        if real is not None:
            metrics["precision"], metrics["recall"] = precision_recall(real, features, k=precision_recall_k)
    return metrics


def compute_reference(
    source: str,
    output: str | Path,
    extractor,
    resolution: int,
    feature_extractor: str,
    split: str = "train",
    image_column: str = "image",
    batch_size: int = 100,
    max_images: int | None = None,
) -> dict:
    """Write reference statistics (`mu`, `sigma`, `features`, ...) of an image folder or `datasets` dataset, centre-
    cropped to `resolution` as in training; returns a summary."""
    _check_positive(resolution=resolution, batch_size=batch_size)
    if max_images is not None:
        _check_positive(max_images=max_images)
    start = time.perf_counter()
    images = iter_reference_images(source, resolution, split, image_column)

    def batches():
        batch = []
        for count, image in enumerate(images):
            if max_images is not None and count >= max_images:
                break
            batch.append(image)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    features, _ = extract(extractor, batches())
    if len(features) < 2:
        raise ValueError(f"`data` {source!r} gave {len(features)} image(s); statistics need at least 2.")
    mu, sigma = gaussian_statistics(features)
    arrays = {
        "mu": mu,
        "sigma": sigma,
        "features": features.astype(np.float32),
        "num_images": np.array(len(features)),
        "resolution": np.array(resolution),
        "feature_extractor": np.array(feature_extractor),
    }
    output = Path(output).expanduser()
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda file: np.savez(file, **arrays))
    return {"output": str(output), "num_images": len(features), "seconds": time.perf_counter() - start}


def write_json(path: str | Path, content: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: file.write((json.dumps(content, indent=2) + "\n").encode()))
