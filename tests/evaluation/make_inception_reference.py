"""Regenerate `inception_reference.npz`, the reference outputs of torch-fidelity's own Inception-v3 module.

    pip download torch-fidelity==0.4.0 --no-deps -d /tmp/tf && unzip -o /tmp/tf/*.whl -d /tmp/tf/src
    PYTHONPATH=. python tests/evaluation/make_inception_reference.py /tmp/tf/src/torch_fidelity

Only its two plain-torch files are loaded (`interpolate_compat_tensorflow.py`, `feature_extractor_inceptionv3.py`),
with small stand-ins for the helpers they import, so neither torchvision nor the package `__init__` is needed. The
file stores the state-dict keys and shapes, and the module's `2048` and `logits_unbiased` outputs for two random
uint8 images under the random weights of `random_inception_state_dict` (test_inception.py).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import torch

from tests.evaluation.test_inception import REFERENCE_PATH, random_inception_state_dict, reference_images


def load_torch_fidelity_inception(folder: Path):
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(folder)]
    base = types.ModuleType("torch_fidelity.feature_extractor_base")

    class FeatureExtractorBase(torch.nn.Module):
        def __init__(self, name, features_list):
            super().__init__()
            self.name, self.features_list = name, list(features_list)

    base.FeatureExtractorBase = FeatureExtractorBase
    helpers = types.ModuleType("torch_fidelity.helpers")
    helpers.vassert = lambda truth, message: None if truth else (_ for _ in ()).throw(ValueError(message))
    helpers.text_to_dtype = lambda name, default=None: getattr(torch, name or default)
    helpers.get_kwarg = lambda name, kwargs: kwargs.get(name, False)
    sys.modules.update({"torch_fidelity": package, base.__name__: base, helpers.__name__: helpers})
    for name in ("interpolate_compat_tensorflow", "feature_extractor_inceptionv3"):
        spec = importlib.util.spec_from_file_location(f"torch_fidelity.{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.FeatureExtractorInceptionV3


def main(folder: str) -> None:
    cls = load_torch_fidelity_inception(Path(folder))
    load = cls.load_state_dict
    cls.load_state_dict = lambda self, state_dict, strict=True: None  # build it once without the weights file
    empty = Path("/tmp/empty_inception.pth")
    torch.save({}, empty)
    shapes_model = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    cls.load_state_dict = load
    shapes = {key: tuple(value.shape) for key, value in shapes_model.state_dict().items()}
    state_dict = random_inception_state_dict(shapes)
    weights = Path("/tmp/random_inception.pth")
    torch.save(state_dict, weights)
    model = cls("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        pool, logits = model(reference_images())
    keys = np.array(list(shapes))
    np.savez(
        REFERENCE_PATH,
        keys=keys,
        shapes=np.array([",".join(map(str, shapes[key])) for key in keys]),
        pool=pool.numpy(),
        logits_unbiased=logits.numpy(),
    )
    print(f"wrote {REFERENCE_PATH}: {len(keys)} tensors")


if __name__ == "__main__":
    main(sys.argv[1])
