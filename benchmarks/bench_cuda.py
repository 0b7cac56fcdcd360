"""Checks and timings that need a CUDA GPU: run it on a machine with one (the test suite runs on the CPU only).

Each check prints one JSON line and goes on after a failure; the summary lists them all. With the shipped digits
model (`DEFAULT_MODEL`, no download) and a random-weight MAR of `--model` size:

- `cuda_vs_cpu`: the same call (CPU generator, TF32 off) on CUDA and on the CPU, in float32.
- `bfloat16`: the whole pipeline cast to bfloat16 on CUDA (finite, and how far from float32).
- `model_cpu_offload`, `sequential_cpu_offload`, `group_offload_block`, `group_offload_leaf_stream`: diffusers'
  offloading on our classes, each equal to the plain CUDA run.
- `layerwise_casting`: float8 storage, bfloat16 compute (finite, distance to float32).
- `compile`: `.compile()` of both networks (equal to eager within 1e-4; time per call after warm-up).
- `throughput`: images/s of the `--model` pipeline at `--batch-size`, float32 and bfloat16, eager (and compiled
  with `--compile`).
- `train_bf16`: `training/train_mar.py` on the digits for a few steps with `--mixed_precision bf16`.

Usage (from the repository root, on the GPU machine):

    python benchmarks/bench_cuda.py --output-json cuda_checks.json

The speed of ours against the official code on the GPU is `benchmarks/bench_sampling.py --device cuda`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.benchmarking_utils import Timer, interleaved, spread  # noqa: E402
from diffusers_mar import DEFAULT_MODEL, MARDDPMScheduler, MARDiffusionHead, MARPipeline, MARTransformer2DModel
from diffusers_mar.configs import get_preset_config

RESULTS: dict[str, dict] = {}


def check(name: str):
    def decorator(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                result = {"ok": True, **(fn(*args, **kwargs) or {})}
            except Exception as error:  # a failed check is a result, not the end of the run
                result = {"ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
            result["seconds"] = round(time.perf_counter() - start, 2)
            RESULTS[name] = result
            print(json.dumps({name: {k: v for k, v in result.items() if k != "trace"}}), flush=True)

        return run

    return decorator


def digits_call(pipe: MARPipeline, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(0)
    call = {"num_inference_steps": 8, "num_diffusion_steps": 25, "guidance_scale": 2.0, "output_type": "np"}
    return pipe(list(range(10)), generator=generator, **{**call, **kwargs}).images.astype(np.float64)


def load_digits(device: str, dtype: torch.dtype = torch.float32) -> MARPipeline:
    pipe = MARPipeline.from_pretrained(DEFAULT_MODEL, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


def distance(a: np.ndarray, b: np.ndarray) -> dict:
    return {"max_abs_diff": float(np.abs(a - b).max()), "mean_abs_diff": float(np.abs(a - b).mean())}


@check("cuda_vs_cpu")
def bench_cuda_vs_cpu(reference: dict) -> dict:
    cpu = digits_call(load_digits("cpu"))
    reference["cuda"] = digits_call(load_digits("cuda"))
    result = distance(reference["cuda"], cpu)
    assert result["max_abs_diff"] < 1e-3, result
    return result


@check("bfloat16")
def check_bfloat16(reference: dict) -> dict:
    images = digits_call(load_digits("cuda", torch.bfloat16))
    assert np.isfinite(images).all()
    return distance(images, reference["cuda"])


def offload_check(reference: dict, setup) -> dict:
    pipe = load_digits(None)
    setup(pipe)
    result = distance(digits_call(pipe), reference["cuda"])
    assert result["max_abs_diff"] < 1e-5, result
    return result


@check("model_cpu_offload")
def check_model_offload(reference: dict) -> dict:
    return offload_check(reference, lambda pipe: pipe.enable_model_cpu_offload())


@check("sequential_cpu_offload")
def check_sequential_offload(reference: dict) -> dict:
    return offload_check(reference, lambda pipe: pipe.enable_sequential_cpu_offload())


def _group_offload(pipe: MARPipeline, **kwargs) -> None:
    for model in (pipe.transformer, pipe.diffusion_head):
        model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"), **kwargs)


@check("group_offload_block")
def check_group_offload_block(reference: dict) -> dict:
    return offload_check(
        reference, lambda pipe: _group_offload(pipe, offload_type="block_level", num_blocks_per_group=1)
    )


@check("group_offload_leaf_stream")
def check_group_offload_leaf(reference: dict) -> dict:
    return offload_check(reference, lambda pipe: _group_offload(pipe, offload_type="leaf_level", use_stream=True))


@check("layerwise_casting")
def check_layerwise_casting(reference: dict) -> dict:
    pipe = load_digits("cuda", torch.bfloat16)  # the compute dtype; the hooks cast the weights to it
    for model in (pipe.transformer, pipe.diffusion_head):
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    images = digits_call(pipe)
    assert np.isfinite(images).all()
    return distance(images, reference["cuda"])


def median_seconds(fn, repeats: int = 3) -> float:
    """Median seconds of `repeats` calls of `fn`, each timed alone (CUDA synchronised)."""
    rounds = interleaved({"call": fn}, repeats, Timer("cuda"))
    return spread([timed_round["call"][0]["total"] for timed_round in rounds])["median"]


@check("compile")
def check_compile(reference: dict) -> dict:
    pipe = load_digits("cuda")
    eager = median_seconds(lambda: digits_call(pipe))
    pipe.transformer.compile()
    pipe.diffusion_head.compile()  # its sampler methods too (a `torch.compile(head)` wrapper reaches only forward)
    totals, images = Timer("cuda").time(lambda: digits_call(pipe))
    first = totals["total"]
    result = {**distance(images, reference["cuda"]), "eager_s": eager, "first_compiled_s": first}
    result["compiled_s"] = median_seconds(lambda: digits_call(pipe))
    assert result["max_abs_diff"] < 1e-4, result
    return result


def random_pipeline(model: str, dtype: torch.dtype) -> MARPipeline:
    preset = get_preset_config(model)
    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = MARTransformer2DModel.from_config(preset["transformer"])
        head = MARDiffusionHead.from_config(preset["diffusion_head"])
    pipe = MARPipeline(transformer.eval(), head.eval(), MARDDPMScheduler(), token_space="latent").to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _throughput(args: argparse.Namespace, dtype: torch.dtype, call: dict) -> dict:
    pipe = random_pipeline(args.model, dtype)
    labels = [i % 1000 for i in range(args.batch_size)]

    def run():
        return pipe(labels, generator=torch.Generator("cpu").manual_seed(0), **call)

    run()
    result = {f"{dtype}_eager_images_per_s": args.batch_size / median_seconds(run, repeats=2)}
    torch.cuda.reset_peak_memory_stats()
    run()
    result[f"{dtype}_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if args.compile:
        pipe.transformer.compile(dynamic=True)
        pipe.diffusion_head.compile(dynamic=True)
        run()
        result[f"{dtype}_compiled_images_per_s"] = args.batch_size / median_seconds(run, repeats=2)
    return result


@check("throughput")
def check_throughput(args: argparse.Namespace) -> dict:
    call = {"num_inference_steps": args.steps, "num_diffusion_steps": args.diffusion_steps, "output_type": "latent"}
    call["guidance_scale"] = 3.0
    result = {"model": args.model, "batch_size": args.batch_size, **call}
    for dtype in (torch.float32, torch.bfloat16):
        result.update(_throughput(args, dtype, call))
        torch.cuda.empty_cache()
    return result


@check("train_bf16")
def check_train() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "training/train_mar.py", "--dataset_name", "digits", "--max_train_steps", "30"]
        command += ["--train_batch_size", "64", "--mixed_precision", "bf16", "--output_dir", tmp, "--seed", "0"]
        command += ["--checkpointing_steps", "15", "--sample_steps", "0"]
        process = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert process.returncode == 0, process.stderr[-3000:]
        pipe = MARPipeline.from_pretrained(tmp).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        images = digits_call(pipe)
        assert np.isfinite(images).all()
        return {"folder": sorted(os.listdir(tmp)), "log_tail": process.stderr[-600:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mar-base")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--diffusion-steps", type=int, default=100)
    parser.add_argument("--compile", action="store_true", help="Also time the --model pipeline compiled.")
    parser.add_argument("--skip", nargs="*", default=[], help="Names of checks to skip.")
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this script checks the GPU paths")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference: dict = {}
    checks = {
        "cuda_vs_cpu": lambda: bench_cuda_vs_cpu(reference),
        "bfloat16": lambda: check_bfloat16(reference),
        "model_cpu_offload": lambda: check_model_offload(reference),
        "sequential_cpu_offload": lambda: check_sequential_offload(reference),
        "group_offload_block": lambda: check_group_offload_block(reference),
        "group_offload_leaf_stream": lambda: check_group_offload_leaf(reference),
        "layerwise_casting": lambda: check_layerwise_casting(reference),
        "compile": lambda: check_compile(reference),
        "train_bf16": check_train,
        "throughput": lambda: check_throughput(args),
    }
    for name, run in checks.items():
        if name not in args.skip:
            run()
    environment = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    print(json.dumps({"environment": environment, "passed": [n for n, r in RESULTS.items() if r["ok"]]}))
    if args.output_json:
        args.output_json.write_text(json.dumps({"environment": environment, "results": RESULTS}, indent=2))
    return 0 if all(result["ok"] for result in RESULTS.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
