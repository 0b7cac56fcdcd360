"""The CPU thread rule of the command line's `--num-threads auto`, also used by training to sample its grids."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# `--num-threads auto` runs models with fewer parameters (transformer + head; VAR's transformer) than this on one CPU
# thread: their matrix products are too small for a second thread to pay for its synchronisation, and on a busy machine
# threads waiting for each other cost 10x and more (the digits model on 2 cores: 4 s on one thread, over 45 s on two;
# docs/benchmarks.md, "CPU threads of the command line").
SMALL_MODEL_PARAMETERS = 10_000_000


def resolve_num_threads(num_threads: int | str, pipe: DiffusionPipeline, device: str) -> int:
    """The intra-op thread count for `--num-threads`: a number as given; `auto`: 1 for a small model on the CPU,
    else PyTorch's default."""
    if num_threads != "auto":
        return num_threads
    modules = [module for module in (pipe.transformer, getattr(pipe, "diffusion_head", None)) if module is not None]
    parameters = sum(p.numel() for module in modules for p in module.parameters())
    return 1 if device == "cpu" and parameters < SMALL_MODEL_PARAMETERS else torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads(num_threads: int) -> Iterator[None]:
    """`torch.set_num_threads(num_threads)` inside, the previous count restored after (main() may run in a process
    that goes on, such as a test or a notebook)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
