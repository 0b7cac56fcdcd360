"""What the benchmark scripts share (as diffusers' `benchmarks/benchmarking_utils.py`): the scripts import this module
and nothing else of `benchmarks/`.

- Timing: `Timer` (named sections, CUDA synchronised at the edges), `interleaved` (rounds of calls, each call
  timed alone, so that a slow minute of a shared machine hits every setting alike), `spread` (median, min, max).
- Memory: `measure_memory` (CUDA allocator peak, or the CPU's resident-set high-water mark).
- Reporting: `machine_description`, `public_argv` (the command as the docs show it), `update_docs_section` (one
  section of docs/benchmarks.md replaced in place, written atomically).
- Full-size models: a preset's random weights in the original LTH14/mar layout, our pipeline on them, the official
  model, and the measured calls of both; `spawn_worker` runs one measurement in a fresh process.
- Digits: `DigitsEvaluator` (the real digits, a classifier on half of them and the real-data baselines: accuracy,
  Fréchet distance, diversity, near-copies; defined in `eval_digits.py`'s docstring), generation, the head's
  schedulers, the options every digits script takes, and the inpainting inputs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import SchedulerMixin

import diffusers_mar
from diffusers_mar import (
    DEFAULT_MODEL,
    ARPipeline,
    ARTransformer2DModel,
    MARDDPMScheduler,
    MARDiffusionHead,
    MARInpaintPipeline,
    MARPipeline,
    MARTransformer2DModel,
)
from diffusers_mar.atomic_files import atomic_write
from diffusers_mar.configs import get_preset_config
from diffusers_mar.evaluation.metrics import (
    frechet_distance_of_features,
    mean_pairwise_distance,
    nearest_neighbour_distances,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = REPO_ROOT / "docs" / "benchmarks.md"


# ----------------------------------------------------------------------------------------------------------------
# Timing and memory.


class Timer:
    """Accumulates wall time of named sections; synchronises CUDA at the edges. `clock` replaces the wall clock
    (e.g. a running count of floating-point operations) to accumulate another quantity over the same sections."""

    def __init__(self, device: str = "cpu", clock: Callable[[], float] | None = None):
        self.device = device
        self.clock = clock
        self.totals: dict[str, float] = {}
        self._starts: dict[str, float] = {}

    def _now(self) -> float:
        if self.clock is not None:
            return self.clock()
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._starts[name] = self._now()

    def stop(self, name: str) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + self._now() - self._starts.pop(name)

    def wrap(self, name: str, fn: Callable) -> Callable:
        """`fn`, with its calls added to section `name`."""

        def wrapped(*args, **kwargs):
            self.start(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop(name)

        return wrapped

    def time(self, call: Callable[[], object]) -> tuple[dict[str, float], object]:
        """One call timed alone: `(its section totals, with "total" for the whole call; its result)`."""
        self.totals.clear()
        self.start("total")
        result = call()
        self.stop("total")
        return dict(self.totals), result


def interleaved(
    calls: dict[str, Callable[[], object]], repeats: int, timer: Timer | None = None
) -> Iterator[dict[str, tuple[dict[str, float], object]]]:
    """`repeats` rounds; each calls every entry of `calls` in turn, timed alone by `timer` (`Timer()` if None).
    Yields one round at a time: `{name: (section totals with "total", result)}`."""
    timer = timer or Timer()
    for _ in range(repeats):
        yield {name: timer.time(call) for name, call in calls.items()}


def pipeline_timer(pipe: MARPipeline, timer: Timer | None = None) -> Timer:
    """`timer` (a new `Timer()` if None) with the sections "transformer" (its forward, by hooks) and "head" (the
    diffusion head's three entry points of the sampling loop) of `pipe`'s calls."""
    timer = timer or Timer()
    pipe.transformer.register_forward_pre_hook(lambda *a: timer.start("transformer"))
    pipe.transformer.register_forward_hook(lambda *a: timer.stop("transformer"))
    head = pipe.diffusion_head
    for method in ("compute_modulation", "forward_with_modulation", "forward_with_condition_embedding"):
        setattr(head, method, timer.wrap("head", getattr(head, method)))
    return timer


def timed_pipelines(pipe: MARPipeline, int8: bool) -> tuple[dict[bool, MARPipeline], Timer]:
    """`{False: pipe}`, with `{True: an int8 copy}` when `int8` (`quantize_int8` of a deep copy: the same weights
    before quantization), and one `pipeline_timer` that sees the sections of both."""
    from diffusers_mar.quantization import quantize_int8

    pipes = {False: pipe}
    if int8:
        pipes[True] = quantize_int8(copy.deepcopy(pipe))
    timer = Timer()
    for each in pipes.values():
        pipeline_timer(each, timer)
    return pipes, timer


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": float(np.median(values)), "min": min(values), "max": max(values), "runs": len(values)}


def format_spread(stats: dict, digits: int = 3) -> str:
    """`median (min-max)` of a `spread`."""
    return f"{stats['median']:.{digits}f} ({stats['min']:.{digits}f}-{stats['max']:.{digits}f})"


def _status_mb(field_name: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def measure_memory(device: str, result: dict):
    """Peak memory of the enclosed work above what was held before it (CUDA allocator, or the CPU resident set)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        result["peak_memory_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        result["memory_kind"] = "CUDA max_memory_allocated above the weights"
        return
    # CPU: reset the kernel's resident-set high-water mark (VmHWM), so that weight loading does not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    base = _status_mb("VmRSS")
    yield
    result["peak_memory_mb"] = _status_mb("VmHWM") - base
    result["memory_kind"] = "peak resident set (VmHWM) above the loaded weights"


# ----------------------------------------------------------------------------------------------------------------
# Reporting.


def machine_description(device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> str:
    """The GPU (CUDA) or the CPU model, its logical CPUs and torch threads (`threads`: torch's count if None)."""
    if str(device).startswith("cuda"):
        return f"{torch.cuda.get_device_name()} ({dtype}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = threads or torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {threads}, {dtype}, torch {torch.__version__}"


def public_argv(argv: list[str], checkout: str = "path/to/LTH14-mar") -> list[str]:
    """The command line as the docs show it, without this machine's paths: the checkout becomes `checkout`, other
    absolute paths (output files, model folders) their last component."""
    shown = []
    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if arg.startswith("--") and not equals:
            shown.append(arg)  # an option name alone; its value is the next argument
            continue
        if option == "--original-repo" or (not option and i > 0 and argv[i - 1] == "--original-repo"):
            value = checkout
        elif os.path.isabs(value):
            value = os.path.basename(value.rstrip("/"))
        shown.append(f"{option}={value}" if equals else value)
    return shown


def recorded_command(script: str, argv: list[str] | None, checkout: str = "path/to/LTH14-mar") -> str:
    """`python benchmarks/<script> ...` as the docs record it: `argv` (None: this process's) through `public_argv`."""
    given = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", f"benchmarks/{Path(script).name}", *public_argv(given, checkout)])


def section_markers(name: str) -> tuple[str, str]:
    """The markers around a section of docs/benchmarks.md: `<!-- name:begin -->`, `<!-- name:end -->`."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def titled_section_markers(title: str) -> tuple[str, str]:
    """The markers around a section that `update_titled_section` writes under the heading `## title`."""
    return f"<!-- eval_digits: {title} -->", f"<!-- /eval_digits: {title} -->"


def update_docs_section(content: str, markers: tuple[str, str], path: str | Path = DOCS_PATH) -> None:
    """Replace the block between `markers` (the markers included) in `path` by `content` between them, or append it;
    every other section stays as it is. Written atomically."""
    path = Path(path)
    begin, end = markers
    block = f"{begin}\n{content}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section names its machine and command.\n"
    if begin in text and end in text and text.index(begin) < text.index(end):
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: file.write(text.encode()))


def update_titled_section(path: str | Path, title: str, body: str) -> None:
    """`update_docs_section` for the section `## title` with `body` under it."""
    update_docs_section(f"## {title}\n\n{body}", titled_section_markers(title), path)


# ----------------------------------------------------------------------------------------------------------------
# Full-size models: one random initialisation of a preset in the original layout, shared by every measurement.

ORIGINAL_FACTORIES = {"mar-base": "mar_base", "mar-large": "mar_large", "mar-huge": "mar_huge"}
PRESET_MODELS = ("mar-base", "mar-large", "mar-huge")
AR_PRESET_MODELS = ("ar-base", "ar-large", "ar-huge")  # `load_preset_or_folder`: random weights, `ARPipeline`


def spawn_worker(script: str, args: argparse.Namespace, worker: str, extra: list[str]) -> dict:
    """Run `script --worker WORKER` in a fresh process (so that its peak memory is its own) with the options every
    measurement shares, plus `extra`; the worker prints its result as JSON on its last line."""
    command = [sys.executable, script, "--worker", worker, "--weights", str(args.weights), "--model", args.model]
    command += ["--device", args.device, "--dtype", args.dtype, *extra]
    if args.original_repo is not None:
        command += ["--original-repo", str(args.original_repo)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if worker == "check":  # a float32 CPU replay: the official `.cuda()` calls must stay on the CPU too
        env["CUDA_VISIBLE_DEVICES"] = ""
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def make_original_weights(args: argparse.Namespace, path: Path) -> None:
    from safetensors.torch import save_file

    from conversion.convert_mar_to_diffusers import convert_diffusers_to_mar_state_dict

    preset = get_preset_config(args.model)
    torch.manual_seed(0)
    if args.original_repo is not None:
        model = original_model(args, args.model, num_sampling_steps=25)
        state_dict = model.state_dict()
    else:
        transformer = MARTransformer2DModel.from_config(preset["transformer"])
        head = MARDiffusionHead.from_config(preset["diffusion_head"])
        state_dict = convert_diffusers_to_mar_state_dict(transformer.state_dict(), head.state_dict())
    perturb_head_weights(value for key, value in state_dict.items() if key.startswith("diffloss."))
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))


def perturb_head_weights(tensors: Iterable[torch.Tensor]) -> None:
    """Add N(0, 0.02) noise (generator seed 1, in the given order) to a diffusion head's tensors in place: the
    original zero-initialises the head's AdaLN and output layers, and random values keep every path busy."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for value in tensors:
            value.add_(torch.randn(value.shape, generator=generator) * 0.02)


def original_model(
    args: argparse.Namespace, preset_name: str, num_sampling_steps: int, diffusion_batch_mul: int = 4
) -> torch.nn.Module:
    """The official `MAR` of a preset (random init, eval mode), from the checkout in `--original-repo`."""
    from conversion.original_mar import load_original_mar

    head = get_preset_config(preset_name)["diffusion_head"]
    factory = getattr(load_original_mar(args.original_repo), ORIGINAL_FACTORIES[preset_name])
    return factory(
        buffer_size=64,
        diffloss_d=head["num_res_blocks"],
        diffloss_w=head["model_channels"],
        num_sampling_steps=str(num_sampling_steps),
        diffusion_batch_mul=diffusion_batch_mul,
    ).eval()


def load_ours(args: argparse.Namespace, device: str, dtype: torch.dtype) -> MARPipeline:
    from safetensors.torch import load_file

    from conversion.convert_mar_to_diffusers import convert_mar_state_dict

    preset = get_preset_config(args.model)
    transformer_sd, head_sd = convert_mar_state_dict(load_file(str(args.weights)))
    with torch.device("meta"):
        transformer = MARTransformer2DModel.from_config(preset["transformer"])
        head = MARDiffusionHead.from_config(preset["diffusion_head"])
    # Real (resident) tensors, so that peak memory measures sampling, not pages of a memory-mapped file.
    transformer, head = transformer.to_empty(device="cpu"), head.to_empty(device="cpu")
    transformer.load_state_dict(transformer_sd, strict=True)
    head.load_state_dict(head_sd, strict=True)
    pipe = MARPipeline(transformer.eval(), head.eval(), MARDDPMScheduler(), token_space="latent").to(
        device=device, dtype=dtype
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_preset_or_folder(parser: argparse.ArgumentParser, model: str, ar: bool = False) -> None:
    """Refuse (argparse's exit 2) a `--model` that `load_preset_or_folder` cannot load (AR presets only if `ar`)."""
    presets = PRESET_MODELS + (AR_PRESET_MODELS if ar else ())
    if model not in presets and model != "shipped" and not Path(model).is_dir():
        parser.error(f"--model must be one of {presets}, `shipped` or a pipeline folder; got {model!r}")


def load_preset_or_folder(model: str) -> MARPipeline | ARPipeline:
    """The model to time: a MAR preset with random weights in the original layout, converted; an AR preset
    (`ar-base`, ...) with random weights; or a pipeline folder (`shipped`: the digits model inside the package)."""
    import tempfile

    if model in AR_PRESET_MODELS:
        return random_ar_pipeline(model)
    if model not in PRESET_MODELS:
        pipe = MARPipeline.from_pretrained(DEFAULT_MODEL if model == "shipped" else model)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "weights.safetensors"
        make_original_weights(argparse.Namespace(model=model, original_repo=None), weights)
        return load_ours(argparse.Namespace(model=model, weights=weights), "cpu", torch.float32)


def random_ar_pipeline(model: str) -> ARPipeline:
    """An `ARPipeline` of an AR preset with random weights (seed 0), in float32 on the CPU; the head's output and
    AdaLN layers (zero at initialisation) perturbed as `make_original_weights` does, so every path computes."""
    preset = get_preset_config(model)
    torch.manual_seed(0)
    transformer = ARTransformer2DModel.from_config(preset["transformer"]).eval()
    head = MARDiffusionHead.from_config(preset["diffusion_head"]).eval()
    perturb_head_weights(head.state_dict().values())
    pipe = ARPipeline(transformer, head, MARDDPMScheduler(), token_space="latent")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours_call(
    args: argparse.Namespace, pipe: MARPipeline, timer: Timer, batch_size: int, steps: int, diffusion_steps: int
):
    """The measured call of ours, with `timer` accumulating the "transformer" and "encoder" sections."""
    transformer = pipe.transformer
    transformer.register_forward_pre_hook(lambda *a: timer.start("transformer"))
    transformer.register_forward_hook(lambda *a: timer.stop("transformer"))
    transformer.proj_in.register_forward_pre_hook(lambda *a: timer.start("encoder"))
    transformer.encoder_norm.register_forward_hook(lambda *a: timer.stop("encoder"))
    labels = [i % 1000 for i in range(batch_size)]
    call = {
        "num_inference_steps": steps,
        "num_diffusion_steps": diffusion_steps,
        "guidance_scale": args.guidance_scale,
        "output_type": "latent",
    }
    if getattr(args, "ours_preset", None):  # the preset's own steps (bench_sampling.py --ours-preset)
        call = {"sampling_preset": args.ours_preset, "guidance_scale": args.guidance_scale, "output_type": "latent"}
    call |= ours_cache_arguments(args)
    return lambda: pipe(labels, generator=torch.Generator().manual_seed(0), **call)


def ours_cache_arguments(args: argparse.Namespace) -> dict[str, int]:
    """The cache intervals ours is asked for (bench_sampling.py `--ours-guidance-cache-interval`, `--ours-feature-
    cache-interval`) as `MARPipeline.__call__` arguments; none given: {}."""
    names = ("guidance_cache_interval", "feature_cache_interval")
    return {name: getattr(args, f"ours_{name}") for name in names if getattr(args, f"ours_{name}", None)}


def official_call(
    args: argparse.Namespace, model: torch.nn.Module, timer: Timer | None, batch_size: int, steps: int
) -> Callable[[], torch.Tensor]:
    """The measured call of the official `sample_tokens` (it returns the tokens), with `timer` accumulating "encoder"
    and "decoder" (None: no hooks, nothing but the call). bfloat16 runs under CUDA autocast, as the official
    evaluation does."""
    device = args.device
    if timer is not None:
        model.forward_mae_encoder = timer.wrap("encoder", model.forward_mae_encoder)
        model.forward_mae_decoder = timer.wrap("decoder", model.forward_mae_decoder)
    labels = torch.tensor([i % 1000 for i in range(batch_size)], device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()

    def call():
        np.random.seed(0)
        torch.manual_seed(0)
        with torch.no_grad(), autocast:
            return model.sample_tokens(
                batch_size, num_iter=steps, cfg=args.guidance_scale, cfg_schedule="linear", labels=labels
            )

    return call


# ----------------------------------------------------------------------------------------------------------------
# Digits: scikit-learn's 8x8 handwritten digits (1,797 images, no download) as the reference of generated digits.

NUM_CLASSES = 10
DIGIT_SIZE = 8
DIGIT_MAX = 16.0
SCHEDULERS = ("ddpm", "ddim", "dpm")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
HALVES = ("bottom", "left")


def to_digit_scale(images: np.ndarray) -> np.ndarray:
    """Pipeline `np` output `(N, H, W, C)` in [0, 1] -> `(N, 64)` 8x8 digits on the 0..16 scale."""
    if images.ndim != 4:
        raise ValueError(f"`images` must be a (N, H, W, C) array (output_type='np'); got shape {images.shape}.")
    n, height, width, _ = images.shape
    if height % DIGIT_SIZE or width % DIGIT_SIZE:
        raise ValueError(f"images must be 8x8 or a multiple of it to compare with the digits; got {height}x{width}.")
    grey = images.mean(axis=-1)  # (N, H, W)
    blocks = grey.reshape(n, DIGIT_SIZE, height // DIGIT_SIZE, DIGIT_SIZE, width // DIGIT_SIZE).mean(axis=(2, 4))
    return blocks.reshape(n, DIGIT_SIZE * DIGIT_SIZE).astype(np.float64) * DIGIT_MAX


@dataclass
class DigitsEvaluator:
    """The real digits, a classifier trained on half A of them, and every real-data baseline of the metrics.

    Build once (about a second), then `evaluate(images, labels)` as often as needed.
    """

    seed: int = 0
    near_copy_percentile: float = 1.0
    images: np.ndarray = field(init=False, repr=False)  # (1797, 64) on the 0..16 scale
    labels: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        self.images, self.labels = load_digits(return_X_y=True)
        self.images = self.images.astype(np.float64)
        indices = np.arange(len(self.labels))
        self.half_a, self.half_b = train_test_split(
            indices, test_size=0.5, stratify=self.labels, random_state=self.seed
        )
        self.classifier = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=self.seed)
        self.classifier.fit(self.images[self.half_a] / DIGIT_MAX, self.labels[self.half_a])
        self.heldout_accuracy = float(
            self.classifier.score(self.images[self.half_b] / DIGIT_MAX, self.labels[self.half_b])
        )
        self.reference_features = self.features(self.images[self.half_a])
        self.frechet_floor = frechet_distance_of_features(
            self.features(self.images[self.half_b]), self.reference_features
        )
        real_nn = nearest_neighbour_distances(self.images, self.images, exclude_self=True)
        self.near_copy_threshold = float(np.percentile(real_nn, self.near_copy_percentile))
        self.real_diversity = {c: mean_pairwise_distance(self.images[self.labels == c]) for c in range(NUM_CLASSES)}

    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's hidden-layer (ReLU) activations `(N, 64)` of digits on the 0..16 scale."""
        hidden = images / DIGIT_MAX @ self.classifier.coefs_[0] + self.classifier.intercepts_[0]
        return np.maximum(hidden, 0.0)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """The classifier's output-layer logits `(N, 10)` of digits on the 0..16 scale."""
        return self.features(images) @ self.classifier.coefs_[1] + self.classifier.intercepts_[1]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.classifier.predict(images / DIGIT_MAX)

    def evaluate(self, images: np.ndarray, labels: np.ndarray) -> dict:
        """All metrics of generated digits `(N, 64)` (0..16 scale) requested with class `labels` `(N,)`."""
        labels = np.asarray(labels)
        if images.ndim != 2 or images.shape[1] != DIGIT_SIZE * DIGIT_SIZE or len(images) != len(labels):
            raise ValueError(f"`images` must be (N, 64) with N = len(labels); got {images.shape}, {labels.shape}.")
        correct = self.predict(images) == labels
        diversity = {}
        for c in np.unique(labels).tolist():
            if (labels == c).sum() >= 2:
                diversity[c] = mean_pairwise_distance(images[labels == c]) / self.real_diversity[c]
        nearest = nearest_neighbour_distances(images, self.images)
        frechet = (
            frechet_distance_of_features(self.features(images), self.reference_features) if len(images) > 1 else None
        )
        return {
            "accuracy": float(correct.mean()),
            "accuracy_per_class": {c: float(correct[labels == c].mean()) for c in np.unique(labels).tolist()},
            "frechet_distance": frechet,
            "frechet_ratio": frechet / self.frechet_floor if frechet is not None else None,
            "diversity_ratio": float(np.mean(list(diversity.values()))) if diversity else None,
            "diversity_ratio_per_class": diversity,
            "near_copy_fraction": float((nearest < self.near_copy_threshold).mean()),
        }

    def baselines(self) -> dict:
        return {
            "classifier_heldout_accuracy": self.heldout_accuracy,
            "frechet_floor": self.frechet_floor,
            "near_copy_threshold": self.near_copy_threshold,
            "near_copy_percentile": self.near_copy_percentile,
            "real_diversity_per_class": self.real_diversity,
            "num_real": len(self.labels),
        }


def digits_feature_extractor(device: str | torch.device = "cpu"):
    """A feature extractor for `diffusers-mar evaluate --feature-extractor benchmarks.benchmarking_utils:digits_feature_extractor`:
    uint8 images `(N, 3, H, W)` -> the classifier's hidden features (`features`, 64-d) and logits (`logits`)."""
    evaluator = DigitsEvaluator()

    def extractor(images: torch.Tensor) -> dict[str, torch.Tensor]:
        digits = to_digit_scale(images.permute(0, 2, 3, 1).double().cpu().numpy() / 255.0)  # (N, 64) on 0..16
        return {
            "features": torch.from_numpy(evaluator.features(digits)),
            "logits": torch.from_numpy(evaluator.logits(digits)),
        }

    return extractor


def head_scheduler(config, name: str, timestep_spacing: str | None = None) -> SchedulerMixin:
    """The head's scheduler `name` built from a MARDDPMScheduler `config`.

    `ddpm`: MARDDPMScheduler (the model's own); `ddim`, `dpm`: diffusers' DDIMScheduler and
    DPMSolverMultistepScheduler (DPM-Solver++, which starts at t = 995 through the config's `lambda_min_clipped`).
    `timestep_spacing` overrides the config's (`linspace`).
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if name not in SCHEDULERS:
        raise ValueError(f"`scheduler` must be one of {SCHEDULERS}; got {name!r}.")
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"`timestep_spacing` must be one of {TIMESTEP_SPACINGS}; got {timestep_spacing!r}.")
    cls = {"ddpm": MARDDPMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    overrides = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    return cls.from_config(config, **overrides)


def set_head_scheduler(pipe: MARPipeline, name: str, timestep_spacing: str | None = None) -> None:
    """Replace `pipe.scheduler` by `head_scheduler(pipe.scheduler.config, name, timestep_spacing)`."""
    pipe.scheduler = head_scheduler(pipe.scheduler.config, name, timestep_spacing)


def quality_misses(result: dict, reference: dict, max_accuracy_drop: float, max_frechet_increase: float) -> list[str]:
    """What a setting's digits metrics miss against the reference's (the rule of the digits speed-quality tables):
    "accuracy" if more than `max_accuracy_drop` lower, "Fréchet" if more than `max_frechet_increase` (a fraction)
    higher; [] when the quality is kept."""
    misses = []
    if result["accuracy"] < reference["accuracy"] - max_accuracy_drop:
        misses.append("accuracy")
    if result["frechet_distance"] > (1 + max_frechet_increase) * reference["frechet_distance"]:
        misses.append("Fréchet")
    return misses


def generate_digits(
    pipe: MARPipeline, num_per_class: int, seed: int = 0, batch_size: int = 1000, **sampling
) -> tuple[np.ndarray, np.ndarray, float]:
    """`num_per_class` images of each digit: `(images (N, 64) on 0..16, labels (N,), seconds of generation)`."""
    labels = np.repeat(np.arange(NUM_CLASSES), num_per_class)
    generator = torch.Generator().manual_seed(seed)
    batches = [labels[first : first + batch_size].tolist() for first in range(0, len(labels), batch_size)]

    def generate() -> list[np.ndarray]:
        return [
            pipe(class_labels=batch, generator=generator, output_type="np", **sampling).images for batch in batches
        ]

    seconds, images = Timer().time(generate)
    return to_digit_scale(np.concatenate(images)), labels, seconds["total"]


def add_common_arguments(parser: argparse.ArgumentParser, default_section: str) -> None:
    """Options every digits benchmark takes: the model, the image count, threads and where the results go."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a MARPipeline folder or Hub id (default: shipped)")
    parser.add_argument("--num-per-class", type=int, default=100, help="generated images per digit (default 100)")
    parser.add_argument("--batch-size", type=int, default=1000, help="images per pipeline call")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: one core)")
    parser.add_argument("--output-json", help="write all results to this JSON file")
    parser.add_argument("--write-docs", action="store_true", help=f"update a section of {DOCS_PATH.name}")
    parser.add_argument("--docs-section", default=default_section, help="the section title to replace or append")
    parser.add_argument("--docs-path", default=str(DOCS_PATH), help="the markdown file for --write-docs")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a usage error naming the option when a common option is out of range."""
    for name in ("batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"argument --{name.replace('_', '-')}: must be >= 1; got {getattr(args, name)}")
    if args.num_per_class < 2:
        parser.error("argument --num-per-class: must be >= 2 (diversity needs pairs)")


def reports_cli_errors(prog: str):
    """Decorate a script's `main`: a `CLIError` (e.g. from `load_digits_pipeline`) prints as `prog: error: ...` and
    `main` returns its exit code, as the command line does."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            from diffusers_mar.cli import CLIError

            try:
                return main(argv)
            except CLIError as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                return error.exit_code

        return run

    return decorate


def load_digits_pipeline(model: str, dtype: str = "float32") -> MARPipeline:
    """Load `model` in `dtype` with the CLI's error messages; raises `CLIError` (exit 2) unless it has the 10 digit
    classes."""
    from diffusers_mar.cli import CLIError, load_pipeline

    pipe = load_pipeline(model, dtype=dtype)
    if pipe.transformer.config.num_classes != NUM_CLASSES:
        raise CLIError(f"the model has {pipe.transformer.config.num_classes} classes, not {NUM_CLASSES}", "--model")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_outputs(
    args: argparse.Namespace, report: str, results: dict, markers: tuple[str, str] | None = None
) -> None:
    """Print the markdown report; write `results` to `--output-json`; with `--write-docs`, write the report into the
    docs: between `markers` of docs/benchmarks.md, or (None) as the section `--docs-section` of `--docs-path`."""
    print(report)
    if args.output_json:
        text = json.dumps(results, indent=2, default=str)
        atomic_write(Path(args.output_json), lambda file: file.write(text.encode()))
    if args.write_docs:
        if markers is None:
            update_titled_section(args.docs_path, args.docs_section, report)
        else:
            update_docs_section(report, markers)


def digit_splits(evaluator: DigitsEvaluator) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's held-out half B of the digits: images (N, 8, 8) in [0, 1] and labels (N,)."""
    images = evaluator.images[evaluator.half_b].reshape(-1, DIGIT_SIZE, DIGIT_SIZE) / DIGIT_MAX
    return images.astype(np.float32), evaluator.labels[evaluator.half_b]


def half_mask(half: str, size: int) -> np.ndarray:
    """White (regenerate) on the hidden half of a size x size image."""
    mask = np.zeros((size, size), dtype=np.uint8)
    if half == "bottom":
        mask[size // 2 :] = 255
    elif half == "left":
        mask[:, : size // 2] = 255
    else:
        raise ValueError(f"`half` must be one of {HALVES}; got {half!r}.")
    return mask


def load_inpaint_pipeline(model: str | None, device: str) -> MARInpaintPipeline:
    """The inpainting pipeline of `model`, or of the shipped digits model (`diffusers_mar.DEFAULT_MODEL`)."""
    if model is None:
        model = getattr(diffusers_mar, "DEFAULT_MODEL", None)
        if model is None:
            raise SystemExit(
                "error: no --model given and this diffusers_mar has no DEFAULT_MODEL (the shipped digits model). "
                "Pass --model with a pipeline folder trained on the digits (training/train_mar.py --dataset_name "
                "digits)."
            )
    if not (Path(model) / "model_index.json").is_file():
        raise SystemExit(f"error: --model {model!r} is not a pipeline folder (no model_index.json).")
    pipe = MARInpaintPipeline.from_pretrained(model).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
