"""Reading the original files: LTH14/mar training checkpoints, the weights to convert, class names, strict loading."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from diffusers_mar.file_kinds import PYTORCH, describe_file

IMAGENET_ID2LABEL_PATH = Path(__file__).resolve().parent / "imagenet_id2label.json"
# Keys every MAR state dict has (the class embedding, the token projection, the diffusion MLP's input).
MAR_KEYS = ("class_emb.weight", "z_proj.weight", "diffloss.net.input_proj.weight")


def _unreadable(path: Path, argument: str, detail: str = "") -> ValueError:
    """The error for a file `torch.load` cannot read, saying what the file looks like instead."""
    kind = describe_file(path)
    expected = "a checkpoint (expected the `.pth` file of an LTH14/mar training run, e.g. `checkpoint-last.pth`)"
    if kind is None:
        text = "has an unknown format (truncated or corrupted?)"
    elif kind == "an empty file":
        text = "is empty"
    elif kind == PYTORCH or "zip archive" in kind:
        container = "a zip archive" if "zip archive" in kind else kind
        text = f"is {container} that torch cannot read (truncated or corrupted?)"
    elif kind == "a text file":
        text = "is a text file (a torch checkpoint is the binary file `torch.save` writes, e.g. `checkpoint-last.pth`)"
    else:
        text = f"is {kind}, not {expected}"
    # Drop bare codes such as "101", and torch's advice to retry with `weights_only=False` (a file it cannot parse).
    detail = f": {detail}" if re.search(r"[A-Za-z]{3}", detail) and "weights_only" not in detail else ""
    return ValueError(f"`--{argument}` {str(path)!r} is not a readable torch checkpoint: it {text}{detail}.")


def load_checkpoint(
    path: str | os.PathLike, trust_checkpoint: bool = False, argument: str = "checkpoint_path"
) -> dict:
    """Load an original `.pth` / `.ckpt` file with `torch.load(weights_only=True)`.

    The training checkpoints pickle `args` (an `argparse.Namespace`), which is allowed explicitly. Anything else that is
    not a tensor or a plain container is refused unless `trust_checkpoint=True` (which unpickles arbitrary objects:
    only for files from a source you trust). Files in torch's zip format are memory-mapped, so only the tensors that
    are used are read from disk. `argument` names the flag in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`--{argument}` {str(path)!r} does not exist or is not a file.")
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # `weights_only` refuses a class it does not know ("Unsupported global: GLOBAL module.Class").
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if refused is None:
            raise _unreadable(
                path, argument, str(error).strip().splitlines()[0] if str(error).strip() else ""
            ) from None
        if not trust_checkpoint:
            raise ValueError(
                f"`--{argument}` {str(path)!r} pickles `{refused.group(1)}`, which `torch.load(weights_only=True)` "
                "refuses (only tensors, containers and `argparse.Namespace` are allowed). If you trust the file's "
                "source, pass `--trust_checkpoint` to load it with `weights_only=False` (this can run arbitrary code)."
            ) from None
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as error:
        raise _unreadable(path, argument, str(error).strip().splitlines()[0] if str(error).strip() else "") from None


def checkpoint_args(checkpoint: dict) -> dict:
    """The training arguments stored in an original checkpoint (`args`, an `argparse.Namespace`), or `{}`."""
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def select_mar_weights(checkpoint: dict, use_non_ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """Pick the weights to convert from an original training checkpoint: `(state_dict, "model_ema" | "model")`.

    The EMA weights (`model_ema`) are the ones the paper's FIDs use and the default. `use_non_ema=True` takes `model`
    (and warns if the checkpoint has no EMA weights at all). A checkpoint without `model_ema` is refused otherwise.
    """
    if not isinstance(checkpoint, dict) or not ({"model", "model_ema"} & set(checkpoint)):
        found = sorted(map(str, checkpoint))[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            "`--checkpoint_path` is not a MAR training checkpoint: expected a dict with `model` and `model_ema` state "
            f"dicts (LTH14/mar `checkpoint-last.pth`); found {found}."
        )
    for name in ("model_ema", "model"):
        weights = checkpoint.get(name)
        if weights is None:
            continue
        if not isinstance(weights, dict) or not all(key in weights for key in MAR_KEYS):
            sample = sorted(weights)[:5] if isinstance(weights, dict) else type(weights).__name__
            raise ValueError(
                f"Not a MAR checkpoint: `{name}` lacks the MAR keys {list(MAR_KEYS)} (found e.g. {sample}). "
                "Is `--checkpoint_path` the VAE file or another model's checkpoint?"
            )
    has_ema = checkpoint.get("model_ema") is not None
    if not use_non_ema:
        if not has_ema:
            raise ValueError(
                "The checkpoint has no EMA weights (`model_ema`), which the paper's results use. Pass "
                "`--use_non_ema` to convert the training weights (`model`) instead; they sample much worse."
            )
        return checkpoint["model_ema"], "model_ema"
    if checkpoint.get("model") is None:
        raise ValueError("`--use_non_ema` asks for the training weights `model`, which this checkpoint lacks.")
    if not has_ema:
        warnings.warn(
            "The checkpoint has no EMA weights (`model_ema`); converting the training weights `model`.", stacklevel=2
        )
    return checkpoint["model"], "model"


def load_id2label(path: str | os.PathLike | None, num_classes: int) -> dict[int, str] | None:
    """Class names for the pipeline's `get_label_ids`.

    From `path` (a JSON object `{"0": "name", ...}`, or one with that object under `"id2label"`), else the bundled
    ImageNet-1k names (`conversion/imagenet_id2label.json`) for 1000-class models, else `None`.
    """
    if path is None:
        if num_classes != 1000:
            return None
        path = IMAGENET_ID2LABEL_PATH
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`--id2label_path` {str(path)!r} is not a readable JSON file: {error}") from None
    data = data.get("id2label", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or sorted(data, key=str) != sorted(map(str, range(num_classes)), key=str):
        raise ValueError(
            f"`--id2label_path` {str(path)!r} must map every class id 0..{num_classes - 1} to a name "
            f"(a JSON object with {num_classes} entries)."
        )
    return {int(key): str(value) for key, value in data.items()}


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """`load_state_dict(strict=True, assign=True)` that first reports every missing, unexpected or misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"The converted {name} weights do not fit {type(model).__name__}: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches (converted vs model) {mismatched}."
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
