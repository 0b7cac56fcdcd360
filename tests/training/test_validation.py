"""The held-out split and validation loss of train_mar.py (--validation_fraction, --validation_steps): a fixed split,
a curve in the output folder and the card, the loss recomputed from the saved pipeline, training left untouched."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffusers_mar import MARPipeline
from tests.training.test_train_mar import FAST as TRAIN_FAST
from tests.training.test_train_mar import fresh_accelerate_state  # noqa: F401 (an autouse fixture)
from training import train_mar
from training.data import DigitsDataset
from training.train_mar import VALIDATION_FILE, parse_args, split_validation, validation_loss

# test_train_mar.py's few-second digits run (its fixture resets Accelerate's process-wide state around each test),
# with an EMA that moves within a few steps.
FAST = [*TRAIN_FAST, "--ema_decay=0.9"]


def run(tmp_path, *extra, name="out"):
    return train_mar.main(parse_args([*FAST, f"--output_dir={tmp_path / name}", *extra]))


def test_the_split_is_fixed_disjoint_and_complete():
    labels = list(range(50))
    dataset = list(range(100, 150))
    train, train_labels, held = split_validation(dataset, labels, 0.2)
    assert len(held) == 10 and len(train) == 40 and train_labels == [dataset[i] - 100 for i in train.indices]
    assert sorted([*train.indices, *held.indices]) == labels
    again = split_validation(dataset, labels, 0.2)[2]
    assert held.indices == again.indices  # the same split at every call, whatever the training seed
    assert held.indices != list(range(40, 50)) and held.indices != list(range(10))  # a permutation, not a slice
    assert split_validation(dataset, labels, 0.0) == (dataset, labels, None)
    assert len(split_validation(dataset, labels, 0.001)[2]) == 1


def test_validation_curve_card_and_value_recomputed_from_the_saved_pipeline(tmp_path):
    output = run(tmp_path, "--validation_fraction=0.25", "--validation_steps=2", "--max_train_steps=5")
    curve = json.loads((output / VALIDATION_FILE).read_text())
    assert [entry["step"] for entry in curve] == [2, 4, 5]  # every 2 steps, and at the end
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in curve)
    assert curve[0]["epoch"] == pytest.approx(2 / 3)  # 30 training images, batch 8: 3 steps per epoch
    card = (output / "README.md").read_text()
    assert f"{curve[-1]['loss']:.4f} at step 5" in card and "10 held-out images" in card

    # The last value is the training loss of the saved (EMA) weights on the 10 held-out digits, recomputed here.
    pipe = MARPipeline.from_pretrained(output)
    args = parse_args([*FAST, f"--output_dir={tmp_path / 'unused'}"])
    module = train_mar.make_training_module(
        args, SimpleNamespace(transformer=pipe.transformer, diffusion_head=pipe.diffusion_head)
    ).eval()
    held = split_validation(DigitsDataset(8), DigitsDataset(8).labels.tolist()[:40], 0.25)[2]
    held = torch.utils.data.Subset(DigitsDataset(8), held.indices)
    loader = torch.utils.data.DataLoader(held, batch_size=8)
    value = validation_loss(module, loader, None, torch.device("cpu"))
    assert value == pytest.approx(curve[-1]["loss"], rel=1e-5)
    # Eval mode: the label drop of training does not apply (a module that drops 90% of the labels gives the same).
    dropping = train_mar.make_training_module(
        parse_args([*FAST, f"--output_dir={tmp_path / 'unused'}", "--label_drop_prob=0.9"]),
        SimpleNamespace(transformer=pipe.transformer, diffusion_head=pipe.diffusion_head),
    ).train()
    assert validation_loss(dropping, loader, None, torch.device("cpu")) == value
    assert dropping.training  # its mode is given back
    # The loss's randomness is fixed: a second call gives the same value; other weights give another.
    assert validation_loss(module, loader, None, torch.device("cpu")) == value
    with torch.no_grad():
        next(pipe.diffusion_head.parameters()).add_(0.1)
    assert validation_loss(module, loader, None, torch.device("cpu")) != pytest.approx(value, rel=1e-5)


def test_validation_leaves_the_training_unchanged(tmp_path):
    # Same held-out split (so the same training images): with and without validation the weights are equal.
    without = run(tmp_path, "--validation_fraction=0.25", "--validation_steps=100", "--max_train_steps=4", name="a")
    assert [entry["step"] for entry in json.loads((without / VALIDATION_FILE).read_text())] == [4]
    with_validation = run(
        tmp_path, "--validation_fraction=0.25", "--validation_steps=1", "--max_train_steps=4", name="b"
    )
    a = load_file(without / "checkpoint-4" / "model.safetensors")
    b = load_file(with_validation / "checkpoint-4" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)


def test_resume_keeps_the_curve_before_the_checkpoint(tmp_path):
    flags = ["--validation_fraction=0.25", "--validation_steps=1", "--checkpointing_steps=2"]
    run(tmp_path, *flags, "--max_train_steps=3", name="r")
    output = run(
        tmp_path,
        *flags,
        "--max_train_steps=4",
        f"--resume_from_checkpoint={tmp_path / 'r' / 'checkpoint-2'}",
        name="r",
    )
    curve = json.loads((output / VALIDATION_FILE).read_text())
    assert [entry["step"] for entry in curve] == [1, 2, 3, 4]  # step 3 of the first run replaced by the resumed one
    straight = run(tmp_path, *flags, "--max_train_steps=4", name="s")
    assert curve == json.loads((straight / VALIDATION_FILE).read_text())


@pytest.mark.parametrize(
    "flag, match",
    [
        ("--validation_fraction=0.7", r"--validation_fraction must be in \[0, 0.5\]; got 0.7"),
        ("--validation_steps=0", r"--validation_steps must be >= 1; got 0"),
    ],
)
def test_bad_validation_flags_are_refused(tmp_path, flag, match):
    with pytest.raises(ValueError, match=match):
        parse_args([*FAST, f"--output_dir={tmp_path}", flag])
