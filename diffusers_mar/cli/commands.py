"""The subcommands: `generate` and `info`."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from PIL import Image

from diffusers_mar.cli.errors import EXIT_OK, CLIError
from diffusers_mar.cli.model import (
    call_settings,
    can_decode,
    check_can_decode,
    label_text,
    load_pipeline,
    model_summary,
    parse_class_labels,
    sampling_settings,
)
from diffusers_mar.cli.outputs import check_not_replacing, check_output_paths, save_image, single_file_paths
from diffusers_mar.image_grid import auto_scale, make_grid
from diffusers_mar.threads import cpu_threads, resolve_num_threads


def cmd_generate(args: argparse.Namespace) -> int:
    # 1. Checks that need no model
    check_output_paths(args.output, args.output_dir, args.overwrite)

    # 2. Model, labels, settings and the files to write (all checked before generating)
    pipe = load_pipeline(args.model, args.device, args.dtype)
    check_can_decode(pipe, args.model)
    labels = parse_class_labels(pipe, args.class_labels)
    single_files = single_file_paths(args.output_dir, labels, args.num_images_per_label) if args.output_dir else []
    if not args.overwrite:
        check_not_replacing([path for row in single_files for path in row], "--output-dir")
    settings, source = sampling_settings(args, pipe)
    pipe.set_progress_bar_config(disable=args.quiet, leave=False)
    settings, settings_text = call_settings(args, pipe, settings)
    print(f"Sampling with {settings_text} (options not given: {source})", file=sys.stderr)

    # 3. Generate: one generator per image (seed + index), so an image does not depend on --batch-size
    requested = [label for label in labels for _ in range(args.num_images_per_label)]
    images = []
    num_threads = resolve_num_threads(args.num_threads, pipe, args.device)
    start = time.perf_counter()
    with cpu_threads(num_threads):
        for first in range(0, len(requested), args.batch_size):
            batch = requested[first : first + args.batch_size]
            generators = [torch.Generator().manual_seed(args.seed + first + i) for i in range(len(batch))]
            try:
                images.extend(pipe(class_labels=batch, generator=generators, output_type="pil", **settings).images)
            except ValueError as error:  # an argument that the pipeline rejected (e.g. a stored setting)
                raise CLIError(f"the pipeline rejected the settings ({settings_text}): {error}") from None
    seconds = time.perf_counter() - start
    print(
        f"Generated {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.1f} img/s, "
        f"{num_threads} CPU thread(s))",
        file=sys.stderr,
    )

    # 4. Write the grid and the single files
    rows = [images[r * args.num_images_per_label : (r + 1) * args.num_images_per_label] for r in range(len(labels))]
    if args.output is not None:
        scale = args.scale or auto_scale(max(images[0].size))
        grid = make_grid(rows, [label_text(pipe, label) for label in labels], scale=scale)
        print(save_image(grid, args.output))
    for row, paths in zip(rows, single_files):
        for image, path in zip(row, paths):
            if args.scale and args.scale > 1:
                image = image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST)
            print(save_image(image, path))
    return EXIT_OK


def _space_text(summary: dict, decodes: bool) -> str:
    patch = f"{summary['patch_size']}x{summary['patch_size']}"
    if summary["space"] == "pixel" and decodes:
        return f"pixel space (no VAE): tokens are {patch} patches of pixels"
    if summary["space"] == "pixel":
        return (
            f"pixel space by its config, but {summary['in_channels']} channels are no image: most likely VAE latents "
            "without a decoder (generate refuses it)"
        )
    if summary["decoder"] is None:
        return (
            f"latent space without a decoder: tokens are {patch} patches of VAE latents and the folder has no VAE "
            '(generate refuses it; in Python only output_type="latent" works)'
        )
    return f"latent space: tokens are {patch} patches of VAE latents, decoded by {summary['decoder']}"


def cmd_info(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model)
    summary = model_summary(pipe, args.model)
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    grid = "x".join(map(str, summary["token_grid"]))
    decodes = can_decode(pipe)
    if decodes:
        height, width = summary["image_size"]
        images = f"{height}x{width}, {summary['image_channels']} channel(s)"
    else:
        images = "none (no VAE to decode the latents)"
    if summary["space"] == "vq":
        scales = "x".join(map(str, summary["patch_nums"]))
        space = f"next-scale prediction over a codebook of {summary['vocab_size']}, decoded by {summary['decoder']}"
        tokens = f"scales {scales} = {summary['num_tokens']} codebook indices ({summary['vq_embed_dim']}-d codes)"
    else:
        space = _space_text(summary, decodes)
        tokens = (
            f"{grid} = {summary['num_tokens']} tokens of {summary['token_dim']} values "
            f"(patch size {summary['patch_size']}, {summary['in_channels']} channel(s))"
        )
    lines = [
        f"model:        {summary['model']}",
        f"pipeline:     {summary['pipeline']}, {space}",
        f"images:       {images}",
        f"token grid:   {tokens}",
        "components:",
    ]
    for name, entry in summary["components"].items():
        if "parameters" in entry:
            detail = f"{entry['parameters']:>13,} parameters"
        else:
            config = summary.get("scheduler_config", {}) if name == "scheduler" else {}
            keys = ("num_train_timesteps", "beta_schedule", "variance_type", "prediction_type")
            detail = ", ".join(f"{key}={config[key]}" for key in keys if key in config)
        lines.append(f"  {name:<16}{entry['class']:<30}{detail}".rstrip())
    lines.append(f"  {'total':<46}{summary['total_parameters']:>13,} parameters")
    num_classes = summary["num_classes"]
    lines.append(f"classes:      {num_classes} (ids 0..{num_classes - 1}; {num_classes} = unconditional)")
    if summary["id2label"]:
        names = [f"{key}: {value}" for key, value in summary["id2label"].items()]
        shown = names if len(names) <= 30 else names[:30] + [f"... ({len(names) - 30} more)"]
        lines.extend(f"  {name}" for name in shown)
    else:
        lines.append("  (no id2label: use class ids)")
    lines.append(f"recommended sampling, from {summary['recommended_sampling_source']}:")
    lines.extend(f"  {key}: {value}" for key, value in summary["recommended_sampling"].items())
    lines.append("--dtype auto on this machine (generate, evaluate, demo; the default is float32, exact):")
    lines.extend(f"  {device}: {dtype} ({why})" for device, (dtype, why) in summary["dtype_auto"].items())
    print("\n".join(lines))
    return EXIT_OK
