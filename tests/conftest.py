"""Suite-wide checks."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _grad_mode_is_restored():
    """A test (or code it calls in-process, like a benchmark's `main`) must not leave gradients switched off: the
    next test on the same worker would then fail far from the cause."""
    assert torch.is_grad_enabled()
    yield
    assert torch.is_grad_enabled(), "this test left torch's gradient mode disabled (torch.set_grad_enabled(False)?)"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; with more, a loaded machine makes them 10-100x slower (issue 14)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
