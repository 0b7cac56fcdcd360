"""Feature extractors for the metrics: FID's Inception-v3 by default, or any `module:callable`.

An extractor is a callable `extractor(images) -> dict` taking uint8 images `(N, 3, H, W)` on its device and
returning `"features"` `(N, D)` (for FID and precision / recall) and, optionally, `"logits"` `(N, K)` (for the
Inception Score). `--feature-extractor module:callable` names a factory `callable(device) -> extractor`, e.g. one
that wraps DINOv2 from `transformers` for FD-DINOv2; the module is imported from `sys.path` or, failing that, from the
current directory (as `python -m` would).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch

from diffusers_mar.evaluation.inception import load_inception_v3

INCEPTION = "inception"


class InceptionExtractor:
    """torch-fidelity's Inception-v3 features: pool `2048` as `features`, `logits_unbiased` as `logits`."""

    def __init__(self, weights: str | None = None, device: str | torch.device = "cpu"):
        self.model = load_inception_v3(weights, device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.model(images.to(self.device))
        return {"features": outputs["2048"], "logits": outputs["logits_unbiased"]}


def _import_like_python_m(module_name: str):
    """Import `module_name`; if it (or its package) is not found, try again from the current directory, which
    `python -m` puts on `sys.path` but the `diffusers-mar` script does not (so `benchmarks.benchmarking_utils` imports
    from the repository root as documented). The directory stays on `sys.path` for the module's later imports."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        parts = module_name.split(".")
        missing_here = error.name in {".".join(parts[: i + 1]) for i in range(len(parts))}
        cwd = os.getcwd()
        if not missing_here or cwd in sys.path or "" in sys.path or not _importable_from(cwd, parts[0]):
            raise
    sys.path.insert(0, cwd)
    return importlib.import_module(module_name)


def _importable_from(folder: str, name: str) -> bool:
    return os.path.isfile(os.path.join(folder, f"{name}.py")) or os.path.isdir(os.path.join(folder, name))


def load_feature_extractor(
    spec: str = INCEPTION, inception_weights: str | None = None, device: str | torch.device = "cpu"
) -> Callable[[torch.Tensor], dict]:
    """`"inception"` (with `inception_weights`, else torch-fidelity's download) or `"module:callable"`, a factory
    called with `device`. Raises `ValueError` naming `feature_extractor` when the spec cannot be resolved."""
    if spec == INCEPTION:
        return InceptionExtractor(inception_weights, device)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"`feature_extractor` must be {INCEPTION!r} or 'module:callable'; got {spec!r}.")
    try:
        module = _import_like_python_m(module_name)
    except ImportError as error:
        raise ValueError(f"`feature_extractor` {spec!r}: cannot import {module_name!r} ({error}).") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"`feature_extractor` {spec!r}: {module_name!r} has no callable {attribute!r}.")
    return factory(device)


def to_rgb_tensor(batch: np.ndarray) -> torch.Tensor:
    """uint8 `(N, H, W, C)` with C = 1, 3 or 4 -> uint8 `(N, 3, H, W)`: grey repeated, alpha dropped."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be uint8 (N, H, W, C) with C in (1, 3, 4); got {batch.dtype} {batch.shape}.")
    images = torch.from_numpy(np.ascontiguousarray(batch[..., :3])).permute(0, 3, 1, 2)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def extract(extractor, batches: Iterable[np.ndarray], on_batch=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Features `(N, D)` float64 and logits `(N, K)` (or None) of uint8 NHWC `batches`; `on_batch(batch)` sees each
    batch first (to write it elsewhere)."""
    features, logits = [], []
    for batch in batches:
        if on_batch is not None:
            on_batch(batch)
        outputs = extractor(to_rgb_tensor(batch))
        if "features" not in outputs:
            raise ValueError(f"the feature extractor returned {sorted(outputs)}; it must return 'features'.")
        features.append(outputs["features"].double().cpu().numpy())
        if outputs.get("logits") is not None:
            logits.append(outputs["logits"].double().cpu().numpy())
    return np.concatenate(features), (np.concatenate(logits) if logits else None)
