"""One pipeline call of the demo in a worker thread: its live frames as they come, cancelling, its result and time.

The call holds its model's lock, so that calls on one model never mix (Gradio's queue already runs one event at a
time per model; the lock also covers a cancelled call that is finishing its current step). Cancelling sets the
pipeline's `_interrupt` from the callback, so the call stops after its current outer step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator

import torch
from PIL import Image

_DONE = object()


class PipelineRun:
    """`pipe(**call)` in a thread that holds `lock`, on `num_threads` CPU threads (default: PyTorch's); iterate over it
    for the frames of `frames` (a live view of `frames.py`, or None), then read `images`, `seconds` (the call without
    drawing frames), `cancelled`, `error`."""

    def __init__(self, pipe, lock: threading.Lock, call: dict, frames=None, num_threads: int | None = None):
        self.pipe, self.lock, self.call, self.frames = pipe, lock, call, frames
        self.num_threads = num_threads or torch.get_num_threads()
        self.images: list[Image.Image] | None = None
        self.error: Exception | None = None
        self.seconds = 0.0
        self.frame_seconds = 0.0  # spent drawing the live frames
        self.steps = 0
        self._cancel = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop the call after its current step (and drop the frames not drawn yet)."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def __iter__(self) -> Iterator[Image.Image]:
        while (item := self._queue.get()) is not _DONE:
            yield item

    def _callback(self, pipe, step: int, timestep: int, callback_kwargs: dict) -> dict:
        self.steps = step + 1
        if self._cancel.is_set():
            pipe._interrupt = True
        elif self.frames is not None:
            start = time.perf_counter()
            for frame in self.frames.update(pipe, callback_kwargs):
                self._queue.put(frame)
            self.frame_seconds += time.perf_counter() - start
        return {}

    def _run(self) -> None:
        try:
            with self.lock:
                if self._cancel.is_set():
                    return
                # Without frames the callback only watches for a cancel: it asks for the family's default input.
                inputs = (
                    self.frames.tensor_inputs
                    if self.frames is not None
                    else self.pipe.callback_tensor_inputs(None, None)
                )
                kwargs = {"callback_on_step_end": self._callback, "callback_on_step_end_tensor_inputs": list(inputs)}
                previous = torch.get_num_threads()
                torch.set_num_threads(self.num_threads)
                start = time.perf_counter()
                try:
                    images = self.pipe(**self.call, **kwargs).images
                finally:
                    torch.set_num_threads(previous)
                self.seconds = time.perf_counter() - start - self.frame_seconds
                if self.frames is not None and not self._cancel.is_set():
                    for frame in self.frames.finish(self.pipe):
                        self._queue.put(frame)
                if not self._cancel.is_set():
                    self.images = images
        except Exception as error:  # reported by the caller, which owns the interface
            self.error = error
        finally:
            self._queue.put(_DONE)


class RunRegistry:
    """The running call of each browser session, so that a Stop button cancels that session's call."""

    def __init__(self):
        self._runs: dict[str, PipelineRun] = {}
        self._lock = threading.Lock()

    def start(self, session: str, run: PipelineRun) -> PipelineRun:
        with self._lock:
            self._runs[session] = run
        return run

    def finish(self, session: str, run: PipelineRun) -> None:
        with self._lock:
            if self._runs.get(session) is run:
                del self._runs[session]

    def cancel(self, session: str) -> bool:
        """Cancel the session's running call; whether there was one."""
        with self._lock:
            run = self._runs.get(session)
        if run is not None:
            run.cancel()
        return run is not None
