"""Import the official LTH14/mar code from a checkout, for side-by-side benchmarks (never used by the package).

The official code needs timm 0.9.12 (`pip install timm==0.9.12 --no-deps`), whose import pulls in torchvision.
PyPI's torchvision does not match the CPU torch wheel, and MAR uses only timm's ViT `Block`, so a stand-in module
answers torchvision's imports while the official modules load. `.cuda()` becomes a no-op without CUDA.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import torch


class _Anything:
    """Stands for any torchvision object that timm touches at import time."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __mro_entries__(self, bases):
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything()


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@contextmanager
def _torchvision_stub():
    # Import what must see the real environment first (transformers probes torchvision's version).
    import diffusers  # noqa: F401

    diffusers.AutoencoderKL  # noqa: B018  (forces the lazy import chain)
    finder = _TorchvisionStub()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
            del sys.modules[name]


def load_original_mar(original_repo: str | Path) -> types.ModuleType:
    """Return the official `models.mar` module from a LTH14/mar checkout."""
    repo = Path(original_repo).resolve()
    if not (repo / "models" / "mar.py").is_file():
        raise FileNotFoundError(f"--original-repo {repo} is not a LTH14/mar checkout (no models/mar.py).")
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
        torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(repo))
    try:
        with _torchvision_stub():
            from models import mar  # the official module
    except ImportError as error:
        raise ImportError(f"{error}. The official code needs `pip install timm==0.9.12 --no-deps`.") from error
    return mar
