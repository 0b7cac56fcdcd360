"""A cheap feature extractor for the evaluation tests (`--feature-extractor tests.evaluation.stub_extractor:make`):
features are the pixels of the red channel (an 8x8 image gives 64 values), logits their first 10."""

from __future__ import annotations

import torch


def make(device: torch.device | str = "cpu"):
    def extractor(images: torch.Tensor) -> dict[str, torch.Tensor]:  # uint8 (N, 3, H, W)
        features = images[:, 0].flatten(1).double() / 255.0
        return {"features": features, "logits": 4.0 * features[:, :10]}

    return extractor
