"""Pipeline calls of the demo: frames as they come, cancelling stops the pipeline itself, calls on one model never
overlap, errors reach the caller."""

from __future__ import annotations

import threading
import time

import torch

from diffusers_mar.demo import actions
from diffusers_mar.demo.inputs import generation_request
from diffusers_mar.demo.runner import PipelineRun, RunRegistry


class SlowFrames:
    """A live view that takes `delay` seconds per step and returns the step's number."""

    tensor_inputs = ("tokens",)

    def __init__(self, delay: float = 0.0, log: list | None = None):
        self.delay, self.log, self.count = delay, log, 0

    def update(self, pipe, callback_kwargs):
        if self.log is not None:
            self.log.append(("step", threading.get_ident(), time.perf_counter()))
        time.sleep(self.delay)
        self.count += 1
        return [self.count]

    def finish(self, pipe):
        return ["last"]


def call(steps: int = 16, **kwargs) -> dict:
    return {
        "class_labels": [1, 2],
        "num_inference_steps": steps,
        "num_diffusion_steps": 2,
        "generator": torch.Generator().manual_seed(0),
        **kwargs,
    }


def test_a_run_yields_a_frame_per_step_then_its_images(mar_model):
    run = PipelineRun(mar_model.pipe, threading.Lock(), call(5), SlowFrames())
    assert list(run) == [1, 2, 3, 4, 5, "last"]
    assert run.join(5) and len(run.images) == 2 and run.error is None and not run.cancelled
    assert run.steps == 5 and run.seconds > 0


def test_cancelling_stops_the_pipeline_after_its_current_step_and_frees_the_model(mar_model):
    lock = threading.Lock()
    run = PipelineRun(mar_model.pipe, lock, call(16), SlowFrames(delay=0.1))
    frames = iter(run)
    assert next(frames) == 1
    run.cancel()
    assert len(list(frames)) <= 2  # the frames drawn before the callback saw the cancel
    assert run.join(5)
    assert run.images is None and run.cancelled and run.steps < 16
    assert not lock.locked()
    assert len(mar_model.pipe(**call(2)).images) == 2  # the next call runs in full


def test_calls_on_one_model_do_not_overlap(mar_model):
    lock, log = threading.Lock(), []
    runs = [PipelineRun(mar_model.pipe, lock, call(4), SlowFrames(0.01, log)) for _ in range(3)]
    for run in runs:
        list(run)
        assert run.join(10) and run.error is None
    threads = [thread for _, thread, _ in log]
    blocks = [threads[i : i + 4] for i in range(0, len(threads), 4)]
    assert len(blocks) == 3 and all(len(set(block)) == 1 for block in blocks)  # each call's steps in one block


def test_an_error_reaches_the_caller(mar_model):
    run = PipelineRun(mar_model.pipe, threading.Lock(), call(2, temperature=-1.0))
    assert list(run) == []
    assert run.join(5) and isinstance(run.error, ValueError) and "temperature" in str(run.error)
    assert run.images is None


def test_closing_a_generation_early_cancels_its_run(mar_model, tmp_path):
    request = generation_request(mar_model.pipe, "1 2 3", 4, 0, {"num_inference_steps": 16, "num_diffusion_steps": 50})
    runs = RunRegistry()
    updates = actions.generate(mar_model, request, runs, "session", tmp_path)
    next(updates), next(updates)  # the commands, then the first frame
    run = runs._runs["session"]
    updates.close()  # what Gradio does when the user cancels
    assert run.cancelled and run.join(10) and run.images is None
    assert "session" not in runs._runs and not mar_model.lock.locked()


def test_the_registry_cancels_the_run_of_a_session(mar_model):
    runs = RunRegistry()
    run = runs.start("a", PipelineRun(mar_model.pipe, threading.Lock(), call(16), SlowFrames(delay=0.05)))
    assert not runs.cancel("b") and not run.cancelled
    assert runs.cancel("a") and run.cancelled
    list(run)
    assert run.join(5) and run.images is None
    runs.finish("a", run)
    assert not runs.cancel("a")
