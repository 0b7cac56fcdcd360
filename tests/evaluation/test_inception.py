"""FID's Inception-v3 (`diffusers_mar.evaluation.inception`) against torch-fidelity 0.4.0's own module: the same
state-dict keys and shapes (so torch-fidelity's weights file loads with `strict=True`) and the same outputs on random
weights. `inception_reference.npz` comes from torch-fidelity; `make_inception_reference.py` says how to regenerate it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers_mar.evaluation.inception import InceptionV3Features, load_inception_v3, resize_bilinear_tf1

REFERENCE_PATH = Path(__file__).parent / "inception_reference.npz"


def random_inception_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with bounded activations, drawn key by key in sorted order (a function of `shapes` only)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=generator) if shape else torch.zeros(())
        if key.endswith("num_batches_tracked"):
            value = torch.zeros((), dtype=torch.long)
        elif key.endswith("conv.weight"):
            value = noise * (2.0 / np.prod(shape[1:])) ** 0.5
        elif key.endswith("running_var"):
            value = 1.0 + 0.2 * noise.abs()
        elif key.endswith("bn.weight"):
            value = 1.0 + 0.1 * noise
        else:  # bn.bias, running_mean, fc
            value = 0.05 * noise
        state_dict[key] = value
    return state_dict


def reference_images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, 40, 52), generator=generator, dtype=torch.uint8)


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE_PATH) as data:
        return {key: data[key] for key in data.files}


def test_state_dict_keys_and_shapes_match_torch_fidelity(reference):
    ours = {key: tuple(value.shape) for key, value in InceptionV3Features().state_dict().items()}
    theirs = {str(k): tuple(int(n) for n in s.split(",") if n) for k, s in zip(reference["keys"], reference["shapes"])}
    assert ours == theirs
    assert ours["fc.weight"] == (1008, 2048) and ours["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_outputs_match_torch_fidelity_on_random_weights(reference, tmp_path):
    shapes = {str(k): tuple(int(n) for n in s.split(",") if n) for k, s in zip(reference["keys"], reference["shapes"])}
    weights = tmp_path / "weights.pth"
    torch.save(random_inception_state_dict(shapes), weights)
    model = load_inception_v3(str(weights))
    with torch.no_grad():
        outputs = model(reference_images())
    np.testing.assert_allclose(outputs["2048"].numpy(), reference["pool"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outputs["logits_unbiased"].numpy(), reference["logits_unbiased"], rtol=1e-5, atol=1e-5)


def test_resize_matches_tensorflow_1_on_a_hand_computed_case():
    # TF1 align_corners=False: target pixel i samples source position i * in / out (no half-pixel offset).
    image = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    resized = resize_bilinear_tf1(image, 4)[0, 0]
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float)
    torch.testing.assert_close(resized, expected)


def test_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_inception_v3(str(tmp_path / "missing.pth"))
    # A file of another kind is named as such (issue 23c: torch advised weights_only=False for a PNG).
    Image.new("RGB", (4, 4)).save(tmp_path / "image.png")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    for name, kind in [
        ("image.png", "a PNG image"),
        ("stats.npz", "a NumPy .npz archive"),
        ("junk.pth", "a text file"),
    ]:
        with pytest.raises(ValueError) as error:
            load_inception_v3(str(tmp_path / name))
        assert str(error.value).startswith(f"`inception_weights` {str(tmp_path / name)!r} is {kind}, not a state dict")
        assert "expected torch-fidelity's Inception-v3 weights as a .pth or .safetensors state dict" in str(
            error.value
        )
    # A torch file that pickles other objects, or unknown bytes: torch's reason, without its weights_only advice.
    torch.save({"args": argparse.Namespace(model="x")}, tmp_path / "pickled.pth")
    (tmp_path / "binary.pth").write_bytes(b"\x00\x01\x02binary")
    for name in ("pickled.pth", "binary.pth"):
        with pytest.raises(ValueError, match="does not load as a state dict of tensors") as error:
            load_inception_v3(str(tmp_path / name))
        assert "weights_only" not in str(error.value) and "\n" not in str(error.value)
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_inception_v3(str(tmp_path / "other.pth"))
    save_file({"fc.weight": torch.zeros(1008, 2048)}, tmp_path / "other.safetensors")  # read, then checked
    with pytest.raises(ValueError, match="is not torch-fidelity's Inception-v3 .* missing keys"):
        load_inception_v3(str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="uint8"):
        InceptionV3Features()(torch.zeros(1, 3, 8, 8))
