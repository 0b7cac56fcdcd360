"""The model of a command: a local folder or a Hub id, its labels, the sampling settings it recommends, and what
`info` says about it."""

from __future__ import annotations

import argparse
import os
import re
import warnings
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging

from diffusers_mar import DEFAULT_MODEL, ARPipeline, MARPipeline, VARPipeline
from diffusers_mar.cli.errors import EXIT_FAILURE, CLIError
from diffusers_mar.hub import hub_unreachable_reason
from diffusers_mar.pipelines.pipeline_token_generator import TokenGeneratorPipeline
from diffusers_mar.pipelines.sampling_settings import _CALL_DEFAULTS, apply_sampling_preset
from diffusers_mar.quantization import quantize_int8

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# int8: float32 weights with the linear layers quantized to dynamic int8 after loading (CPU only; quantization.py).
DTYPE_CHOICES = (*DTYPES, "int8", "auto")
# CPU instructions that run bfloat16 matrix products natively (Linux /proc/cpuinfo flags): AVX-512 BF16 (Cooper Lake,
# Zen 4 and later) and AMX (Sapphire Rapids and later). Without them oneDNN converts to float32 and bfloat16 is slower.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's instruction-set flags (Linux); empty where the file is missing."""
    try:
        with open(path) as file:
            line = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def auto_dtype(device: str, flags: set[str] | None = None) -> tuple[str, str]:
    """`--dtype auto`: `(dtype, why)` for `device`. bfloat16 where the hardware runs it natively (a CUDA GPU with
    bfloat16 support; a CPU with one of `BF16_CPU_FLAGS`); on an x86 CPU without them but with AVX2, int8 (float32
    with dynamic int8 linear layers: `diffusers_mar.quantization`; MAR-B sampled 1.8-2.2x faster than in float32 at
    kept digits quality, `docs/benchmarks.md`); float32 elsewhere. Neither is exact to the original code (their
    samples differ from float32's, `docs/usage.md`): the default stays float32, and `auto` is the user's choice of
    speed."""
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", f"{torch.cuda.get_device_name(device)} supports bfloat16"
        return "float32", f"{torch.cuda.get_device_name(device)} has no bfloat16 support"
    if device == "mps":
        return "float32", "bfloat16 is not measured on Apple GPUs"
    flags = cpu_flags() if flags is None else flags
    found = [flag for flag in BF16_CPU_FLAGS if flag in flags]
    if found:
        return "bfloat16", f"the CPU has native bfloat16 instructions ({', '.join(found)})"
    capability = torch.backends.cpu.get_cpu_capability()
    reason = f"the CPU has no native bfloat16 instructions (none of {', '.join(BF16_CPU_FLAGS)}; {capability})"
    if "avx2" in flags and "x86" in torch.backends.quantized.supported_engines:
        return "int8", f"{reason}; int8 linear layers run there (AVX2), faster than float32"
    return "float32", reason


# The class that loads a folder, by the `_class_name` of its model_index.json (editing pipelines load as their
# family's generator); MARPipeline for any other name.
FOLDER_CLASSES = {"ARPipeline": ARPipeline, "VARPipeline": VARPipeline, "VARInpaintPipeline": VARPipeline}
# The options of one family only: the folder's family must be among those named.
FAMILY_OPTIONS = {
    "num_inference_steps": ((MARPipeline,), "MARPipeline folders only"),
    "num_diffusion_steps": ((MARPipeline, ARPipeline), "MARPipeline and ARPipeline folders only (a diffusion head)"),
    "guidance_schedule": ((MARPipeline, ARPipeline), "MARPipeline and ARPipeline folders only"),
    "temperature": ((MARPipeline, ARPipeline), "MARPipeline and ARPipeline folders only (a diffusion head)"),
    "order": ((ARPipeline,), "ARPipeline folders only (MAR draws a random order per image, VAR has none)"),
    "sampling_preset": ((MARPipeline,), "MARPipeline folders only"),
    "top_k": ((VARPipeline,), "VARPipeline folders only (logits over a codebook)"),
    "top_p": ((VARPipeline,), "VARPipeline folders only (logits over a codebook)"),
    "more_smooth": ((VARPipeline,), "VARPipeline folders only"),
}


def _looks_like_local_path(model: str) -> bool:
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or model.endswith("/")
    )


def load_pipeline(model: str, device: str = "cpu", dtype: str = "float32") -> TokenGeneratorPipeline:
    """Load a MARPipeline, or the ARPipeline or VARPipeline that the folder's model_index.json names, from a local
    folder or a Hugging Face Hub id, with errors that name `--model`.

    Raises `CLIError` (exit 2) when the model cannot be found, (exit 1) when the shipped default model is missing
    or a found model fails to load.
    """
    path = Path(model).expanduser()
    if os.path.abspath(path) == os.path.abspath(DEFAULT_MODEL) and not (path / "model_index.json").is_file():
        raise CLIError(
            f"the default model is not installed: {DEFAULT_MODEL} has no model_index.json. "
            "Pass --model with a MARPipeline folder or Hub id.",
            "--model",
            exit_code=EXIT_FAILURE,
        )
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CLIError(f"{model!r} is a folder but not a saved pipeline (no model_index.json)", "--model")
        source = str(path)
    elif path.exists():
        raise CLIError(f"{model!r} is a file; give a pipeline folder (with model_index.json) or a Hub id", "--model")
    elif _looks_like_local_path(model):
        raise CLIError(f"no such folder: {model!r}", "--model")
    else:
        source = model
    # A Hub id on a machine without network: only the local cache can help, so ask it alone, without retries.
    offline_reason = None if path.is_dir() else hub_unreachable_reason()
    verbosity = diffusers_logging.get_verbosity()
    if verbosity == diffusers_logging.WARNING:
        # Loading logs a progress bar and notes a CLI user cannot act on, such as the str keys of id2label in JSON (our
        # models no longer warn about an empty list of float32 modules on `.to(dtype)`: models/loading.py).
        diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # diffusers passes huggingface_hub an argument it has deprecated; not something a CLI user can act on.
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            local_only = offline_reason is not None
            config = MARPipeline.load_config(source, local_files_only=local_only)
            pipeline_class = FOLDER_CLASSES.get(config.get("_class_name"), MARPipeline)
            pipe = pipeline_class.from_pretrained(source, local_files_only=local_only)
        if not isinstance(pipe, TokenGeneratorPipeline):
            raise CLIError(
                f"{model!r} holds a {type(pipe).__name__}, not a MARPipeline, an ARPipeline or a VARPipeline",
                "--model",
            )
        pipe.to(device=device, dtype=DTYPES.get(dtype, torch.float32))
        if dtype == "int8":
            quantize_int8(pipe)
    except CLIError:
        raise
    except Exception as error:  # diffusers reports a missing or unreachable Hub repository as OSError/ValueError
        if offline_reason is not None:
            raise CLIError(
                f"{model!r} is not a local folder, and it is not in the local Hugging Face cache while the Hub "
                f"cannot be reached ({offline_reason}); give a pipeline folder, or connect and retry",
                "--model",
            ) from None
        if source == model and not path.exists():
            reason = " ".join(str(error).split())[:300]
            raise CLIError(
                f"{model!r} is not a local folder, and loading it as a Hugging Face Hub id failed "
                f"(the id may be wrong, or there is no network; HF_HUB_OFFLINE=1 forbids downloads): {reason}",
                "--model",
            ) from None
        raise CLIError(f"could not load the pipeline in {model!r}: {error}", "--model", EXIT_FAILURE) from error
    finally:
        diffusers_logging.set_verbosity(verbosity)
        diffusers_logging.enable_progress_bar()
    return pipe


IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what pixel tokens can hold to make an image


def can_decode(pipe: TokenGeneratorPipeline) -> bool:
    """Whether the pipeline's tokens make images: VQ tokens (VAR, with its VQ-VAE), latent tokens with a VAE, or pixel
    tokens of 1, 3 or 4 channels."""
    if isinstance(pipe, VARPipeline):
        return True
    if pipe.config.token_space == "latent":
        return getattr(pipe, "vae", None) is not None
    return pipe.transformer.config.in_channels in IMAGE_CHANNELS


def check_can_decode(pipe: MARPipeline, model: str) -> None:
    """Refuse (exit 2) a pipeline whose tokens are not images: latents without a VAE to decode them."""
    if can_decode(pipe):
        return
    if pipe.config.token_space == "latent":
        raise CLIError(
            f"{model!r} is a latent-space model without a decoder: its tokens are VAE latents "
            '(token_space="latent") and the folder has no vae, so there are no images to write. Add the VAE it was '
            "trained with (convert with --vae_path, or save the pipeline with vae=...), or sample latents in Python "
            'with output_type="latent"',
            "--model",
        )
    raise CLIError(
        f"{model!r} says its tokens are pixels, but they have {pipe.transformer.config.in_channels} channels, which "
        f"no image holds ({', '.join(map(str, IMAGE_CHANNELS))}): most likely VAE latents of a folder converted "
        "without --vae_path before folders recorded token_space. Add the VAE it was trained with, or set "
        '"token_space": "latent" in its model_index.json and sample latents in Python with output_type="latent"',
        "--model",
    )


def recommended_sampling(pipe: MARPipeline) -> tuple[dict, str]:
    """The sampling settings a model recommends (`pipe.sampling_defaults`), and where they come from."""
    if pipe.config.get("sampling"):
        return pipe.sampling_defaults, "the pipeline folder's recommended settings (model_index.json)"
    return pipe.sampling_defaults, "the paper's settings clipped to this model (the folder stores none)"


def check_family_options(args: argparse.Namespace, pipe: TokenGeneratorPipeline) -> None:
    """Refuse (exit 2) an option of another family, naming the folder's pipeline and the folders it applies to."""
    for key, (families, which) in FAMILY_OPTIONS.items():
        if getattr(args, key, None) is not None and not isinstance(pipe, families):
            option = "--" + key.replace("_", "-")
            if key == "num_inference_steps" and isinstance(pipe, ARPipeline):
                raise CLIError("does not apply to an ARPipeline folder, which makes one token per step", option)
            name = type(pipe).__name__
            article = "an" if name[0] in "AEIOU" else "a"
            raise CLIError(f"does not apply to {article} {name} folder: it applies to {which}", option)


def sampling_settings(args: argparse.Namespace, pipe: TokenGeneratorPipeline) -> tuple[dict, str]:
    """Options given on the command line, else the model's recommendations; range checks that name the option."""
    settings, source = recommended_sampling(pipe)
    check_family_options(args, pipe)
    given = {key for key in pipe.sampling_keys if getattr(args, key, None) is not None}
    settings.update({key: getattr(args, key) for key in given})
    if isinstance(pipe, VARPipeline):
        vocab_size = pipe.transformer.config.vocab_size
        if "top_k" in given and not settings["top_k"] <= vocab_size:
            raise CLIError(
                f"must be in [0, {vocab_size}] for this model (its codebook size); got {args.top_k}", "--top-k"
            )
        return settings, source
    preset = getattr(args, "sampling_preset", None)
    if preset is not None:
        arguments = _CALL_DEFAULTS | {key: settings[key] for key in given}  # the call's defaults, then the options
        resolved = apply_sampling_preset(preset, arguments, pipe.transformer.num_tokens)
        settings.update({key: resolved[key] for key in pipe.sampling_keys if resolved[key] is not None})
        source = f"sampling preset {preset!r}, then {source}"
    num_tokens = pipe.transformer.num_tokens
    max_steps = pipe.scheduler.config.num_train_timesteps
    ranges = {"num_inference_steps": (1, num_tokens), "num_diffusion_steps": (1, max_steps)}
    for key, (low, high) in ranges.items():
        if key not in settings or (key == "num_diffusion_steps" and isinstance(settings[key], (str, list))):
            continue  # a schedule per outer step (e.g. "linear-25-5"): the pipeline checks it
        if not (isinstance(settings[key], int) and low <= settings[key] <= high):
            option = "--" + key.replace("_", "-")
            message = f"must be an integer in [{low}, {high}] for this model"
            if key == "num_inference_steps":
                message += f" ({num_tokens} tokens, a step predicts at least one)"
            if key in given:
                raise CLIError(f"{message}; got {settings[key]}", option)
            raise CLIError(
                f"{source} gives {key}={settings[key]!r}, which is not an integer in [{low}, {high}] for this "
                f"model; pass {option}",
                option,
                EXIT_FAILURE,
            )
    return settings, source


def call_settings(args: argparse.Namespace, pipe: MARPipeline, settings: dict) -> tuple[dict, str]:
    """The pipeline call's arguments: `settings` plus the options that are not sampling settings (`--order`,
    `--sampling-preset`) when given, and the line that shows them."""
    text = ", ".join(f"{key}={settings[key]}" for key in pipe.sampling_keys)
    for option in ("order", "sampling_preset"):
        if getattr(args, option, None) is not None:
            text += f", {option}={getattr(args, option)}"
            settings = {**settings, option: getattr(args, option)}
    return settings, text


def parse_class_labels(pipe: MARPipeline, tokens: list[str]) -> list[int]:
    """Integers are class ids in `[0, num_classes]` (`num_classes` = unconditional); other tokens are names."""
    num_classes = pipe.transformer.config.num_classes
    labels = []
    for token in tokens:
        token = token.strip()
        if re.fullmatch(r"[+-]?\d+", token):
            label = int(token)
            if not 0 <= label <= num_classes:
                raise CLIError(
                    f"class id {label} is out of range: this model has classes 0..{num_classes - 1} "
                    f"({num_classes} = unconditional)",
                    "--class-labels",
                )
            labels.append(label)
        elif not pipe.labels:
            raise CLIError(
                f"{token!r} is not an integer, and this model has no id2label to look names up in; "
                f"give class ids in 0..{num_classes - 1}",
                "--class-labels",
            )
        elif token not in pipe.labels:
            names = list(pipe.labels)
            shown = ", ".join(repr(name) for name in names[:20]) + (", ..." if len(names) > 20 else "")
            raise CLIError(f"unknown class name {token!r}; known names: {shown}", "--class-labels")
        else:
            labels.extend(pipe.get_label_ids(token))
    return labels


def label_text(pipe: MARPipeline, label: int, max_chars: int = 24) -> str:
    if label == pipe.transformer.config.num_classes:
        return "uncond."
    name = pipe.id2label.get(label, "").split(",")[0].strip()
    text = str(label) if not name or name == str(label) else f"{label} {name}"
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def model_summary(pipe: MARPipeline, model: str) -> dict:
    """What `info` prints: components, sizes, classes and the recommended sampling settings.

    `space` is "pixel" or "latent" (the folder's `token_space`); `decoder` is the VAE class, or None; a latent model
    without one has no `image_size` or `image_channels` (None).
    """
    transformer = pipe.transformer
    config = transformer.config
    vae = getattr(pipe, "vae", None)
    if isinstance(pipe, VARPipeline):
        vae = pipe.vqvae
    components = {}
    for name, component in pipe.components.items():
        if component is None:
            continue
        entry = {"class": type(component).__name__}
        if isinstance(component, torch.nn.Module):
            entry["parameters"] = sum(p.numel() for p in component.parameters())
        components[name] = entry
    settings, source = recommended_sampling(pipe)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    dtype_auto = {device: auto_dtype(device) for device in devices}  # what --dtype auto picks here, and why
    if isinstance(pipe, VARPipeline):
        return {**_var_summary(pipe, model, components, settings, source), "dtype_auto": dtype_auto}
    image_size = config.sample_size * pipe.vae_scale_factor if can_decode(pipe) else None
    image_channels = (vae.config.out_channels if vae is not None else config.in_channels) if can_decode(pipe) else None
    return {
        "model": model,
        "pipeline": type(pipe).__name__,
        "space": pipe.config.token_space,
        "decoder": type(vae).__name__ if vae is not None else None,
        "components": components,
        "total_parameters": sum(entry.get("parameters", 0) for entry in components.values()),
        "token_grid": [transformer.grid_size, transformer.grid_size],
        "num_tokens": transformer.num_tokens,
        "patch_size": config.patch_size,
        "token_dim": transformer.token_dim,
        "in_channels": config.in_channels,
        "image_size": [image_size, image_size] if image_size is not None else None,
        "image_channels": image_channels,
        "num_classes": config.num_classes,
        "unconditional_label": config.num_classes,
        "id2label": {str(key): value for key, value in sorted(pipe.id2label.items())},
        "recommended_sampling": settings,
        "recommended_sampling_source": source,
        "scheduler_config": {
            key: value for key, value in dict(pipe.scheduler.config).items() if not key.startswith("_")
        },
        "dtype_auto": dtype_auto,
    }


def _var_summary(pipe: VARPipeline, model: str, components: dict, settings: dict, source: str) -> dict:
    """`model_summary` of a VARPipeline: its scales of codebook indices instead of a grid of continuous tokens."""
    config, size = pipe.transformer.config, pipe.vqvae.config.sample_size
    return {
        "model": model,
        "pipeline": type(pipe).__name__,
        "space": "vq",
        "decoder": type(pipe.vqvae).__name__,
        "components": components,
        "total_parameters": sum(entry.get("parameters", 0) for entry in components.values()),
        "token_grid": [config.patch_nums[-1], config.patch_nums[-1]],
        "patch_nums": list(config.patch_nums),
        "num_tokens": pipe.transformer.num_tokens,
        "vocab_size": config.vocab_size,
        "vq_embed_dim": config.vq_embed_dim,
        "image_size": [size, size],
        "image_channels": pipe.vqvae.config.out_channels,
        "num_classes": config.num_classes,
        "unconditional_label": config.num_classes,
        "id2label": {str(key): value for key, value in sorted(pipe.id2label.items())},
        "recommended_sampling": settings,
        "recommended_sampling_source": source,
    }
