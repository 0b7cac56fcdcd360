"""The Inception-v3 of FID: torch-fidelity's `FeatureExtractorInceptionV3` (the TensorFlow 2015-12-05 graph ported by
pytorch-fid), written here so that evaluation needs neither torch-fidelity (its package imports torchvision) nor
torchvision.

It loads torch-fidelity's weights file `weights-inception-2015-12-05-6726825d.pth` unchanged (same state-dict keys,
`strict=True`): from a local path, or from torch-fidelity's release URL into the torch hub cache when online.
`tests/evaluation/test_inception.py` checks the keys, the shapes and the outputs against torch-fidelity 0.4.0's own
module on random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_mar.file_kinds import PYTORCH, SAFETENSORS, describe_file

WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INPUT_SIZE = 299


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as TensorFlow), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


# A mixed block is a list of branches whose outputs are concatenated along channels. A branch is a list of steps:
# a conv `(name, out_channels, kernel, stride, padding)`, a fork (a tuple of two convs applied to the same input,
# outputs concatenated), or a pool ("avg": 3x3 stride 1 without counting the padding, as TensorFlow; "max1": 3x3
# stride 1 padded; "max2": 3x3 stride 2).
def _block_a(pool_features: int) -> list:
    return [
        [("branch1x1", 64, 1, 1, 0)],
        [("branch5x5_1", 48, 1, 1, 0), ("branch5x5_2", 64, 5, 1, 2)],
        [("branch3x3dbl_1", 64, 1, 1, 0), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 1, 1)],
        ["avg", ("branch_pool", pool_features, 1, 1, 0)],
    ]


BLOCK_B = [
    [("branch3x3", 384, 3, 2, 0)],
    [("branch3x3dbl_1", 64, 1, 1, 0), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 2, 0)],
    ["max2"],
]


def _block_c(c7: int) -> list:
    row, column = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return [
        [("branch1x1", 192, 1, 1, 0)],
        [("branch7x7_1", c7, 1, 1, 0), ("branch7x7_2", c7, *row), ("branch7x7_3", 192, *column)],
        [
            ("branch7x7dbl_1", c7, 1, 1, 0),
            ("branch7x7dbl_2", c7, *column),
            ("branch7x7dbl_3", c7, *row),
            ("branch7x7dbl_4", c7, *column),
            ("branch7x7dbl_5", 192, *row),
        ],
        ["avg", ("branch_pool", 192, 1, 1, 0)],
    ]


BLOCK_D = [
    [("branch3x3_1", 192, 1, 1, 0), ("branch3x3_2", 320, 3, 2, 0)],
    [
        ("branch7x7x3_1", 192, 1, 1, 0),
        ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
        ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)),
        ("branch7x7x3_4", 192, 3, 2, 0),
    ],
    ["max2"],
]


def _block_e(pool: str) -> list:
    def fork(prefix: str) -> tuple:
        return ((f"{prefix}a", 384, (1, 3), 1, (0, 1)), (f"{prefix}b", 384, (3, 1), 1, (1, 0)))

    return [
        [("branch1x1", 320, 1, 1, 0)],
        [("branch3x3_1", 384, 1, 1, 0), fork("branch3x3_2")],
        [("branch3x3dbl_1", 448, 1, 1, 0), ("branch3x3dbl_2", 384, 3, 1, 1), fork("branch3x3dbl_3")],
        [pool, ("branch_pool", 192, 1, 1, 0)],
    ]


def _pool(kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "avg":
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    if kind == "max1":  # The TensorFlow graph max-pools in its last block (not the average of the paper)
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    return F.max_pool2d(x, kernel_size=3, stride=2)


class MixedBlock(nn.Module):
    """One Inception block built from its branch list; its convs are attributes named as in torch-fidelity."""

    def __init__(self, in_channels: int, branches: list):
        super().__init__()
        self.branches = branches
        self.out_channels = 0
        for branch in branches:
            channels = in_channels
            for step in branch:
                if isinstance(step, str):  # a pool keeps the channels
                    continue
                convs = step if isinstance(step[0], tuple) else (step,)
                for name, out, kernel, stride, padding in convs:
                    self.add_module(name, ConvBN(channels, out, kernel, stride, padding))
                channels = sum(conv[1] for conv in convs)
            self.out_channels += channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for branch in self.branches:
            y = x
            for step in branch:
                if isinstance(step, str):
                    y = _pool(step, y)
                elif isinstance(step[0], tuple):
                    y = torch.cat([getattr(self, conv[0])(y) for conv in step], dim=1)
                else:
                    y = getattr(self, step[0])(y)
            outputs.append(y)
        return torch.cat(outputs, dim=1)


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize `(N, C, H, W)` -> `(N, C, size, size)` as TensorFlow 1.x `resize_bilinear` with
    `align_corners=False` (source position = target index x in/out, no half-pixel offset), which FID's graph uses."""

    def axis(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        position = torch.arange(size, dtype=images.dtype, device=images.device) * torch.tensor(
            in_size / size, dtype=torch.float32, device=images.device
        )
        low = position.long()
        return low, (low + 1).clamp_max(in_size - 1), position - low.to(position.dtype)

    y_low, y_high, dy = axis(images.shape[2])
    x_low, x_high, dx = axis(images.shape[3])
    top, bottom = images[:, :, y_low], images[:, :, y_high]  # (N, C, size, W)
    top = top[..., x_low] + (top[..., x_high] - top[..., x_low]) * dx
    bottom = bottom[..., x_low] + (bottom[..., x_high] - bottom[..., x_low]) * dx
    return top + (bottom - top) * dy[:, None]


class InceptionV3Features(nn.Module):
    """FID's Inception-v3: uint8 images `(N, 3, H, W)` -> `{"2048": (N, 2048) pool features, "logits_unbiased":
    (N, 1008) logits without the fc bias}` (torch-fidelity's layers for FID / precision-recall and for IS)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        specs = {
            "Mixed_5b": _block_a(32),
            "Mixed_5c": _block_a(64),
            "Mixed_5d": _block_a(64),
            "Mixed_6a": BLOCK_B,
            "Mixed_6b": _block_c(128),
            "Mixed_6c": _block_c(160),
            "Mixed_6d": _block_c(160),
            "Mixed_6e": _block_c(192),
            "Mixed_7a": BLOCK_D,
            "Mixed_7b": _block_e("avg"),
            "Mixed_7c": _block_e("max1"),
        }
        self.mixed_names = list(specs)
        channels = 192
        for name, branches in specs.items():
            block = MixedBlock(channels, branches)
            self.add_module(name, block)
            channels = block.out_channels
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"`images` must be uint8 (N, 3, H, W); got {images.dtype} {tuple(images.shape)}.")
        x = resize_bilinear_tf1(images.to(self.fc.weight.dtype), INPUT_SIZE)  # (N, 3, 299, 299)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        for name in self.mixed_names:
            x = getattr(self, name)(x)  # ... (N, 2048, 8, 8)
        features = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (N, 2048)
        return {"2048": features.float(), "logits_unbiased": (features @ self.fc.weight.T).float()}


def _load_state_dict(path: Path, weights: str) -> dict:
    """A `.pth` or `.safetensors` state dict; a `ValueError` saying what the file is otherwise."""
    expected = f"expected torch-fidelity's Inception-v3 weights as a .pth or .safetensors state dict ({WEIGHTS_URL})"
    kind = describe_file(path)
    if kind == SAFETENSORS:
        from safetensors.torch import load_file

        return load_file(path)
    if kind not in (PYTORCH, None):
        raise ValueError(f"`inception_weights` {weights!r} is {kind}, not a state dict: {expected}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own message advises weights_only=False, which is not the fix here
        detail = str(error).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(
            f"`inception_weights` {weights!r} does not load as a state dict of tensors ({detail}): {expected}."
        ) from None


def load_inception_v3(weights: str | None = None, device: str | torch.device = "cpu") -> InceptionV3Features:
    """FID's Inception-v3 with torch-fidelity's weights from `weights` (a local `.pth`), else downloaded from
    `WEIGHTS_URL` into the torch hub cache; a local `.safetensors` copy works too. Raises `FileNotFoundError` /
    `ValueError` naming the file and, for a file of another kind (an image, an .npz), what it is."""
    model = InceptionV3Features()
    if weights is None:
        state_dict = torch.hub.load_state_dict_from_url(WEIGHTS_URL, map_location="cpu", progress=False)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights {weights!r} not found; download {WEIGHTS_URL} (torch-fidelity's file) there."
            )
        state_dict = _load_state_dict(path, weights)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{weights!r} holds a {type(state_dict).__name__}, not a state dict.")
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict) - {k for k in expected if k.endswith("num_batches_tracked")})
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights or WEIGHTS_URL!r} is not torch-fidelity's Inception-v3 ({WEIGHTS_URL.rsplit('/', 1)[1]}): "
            f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}."
        )
    model.load_state_dict(state_dict, strict=True)
    return model.requires_grad_(False).eval().to(device)
