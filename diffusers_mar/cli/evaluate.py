"""`diffusers-mar evaluate`: balanced sampling across the processes of `accelerate launch` (or one plain process),
then FID / IS / precision-recall on the main process; `--compute-reference` writes reference statistics."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from diffusers_mar.atomic_files import atomic_write
from diffusers_mar.cli.errors import EXIT_FAILURE, EXIT_OK, CLIError
from diffusers_mar.cli.model import call_settings, check_can_decode, load_pipeline, sampling_settings
from diffusers_mar.threads import cpu_threads, resolve_num_threads

RESULTS_FILE, NPZ_FILE = "results.json", "samples.npz"


def _evaluation():
    """The evaluation module, whose metrics need scipy (the `[eval]` extra)."""
    try:
        import scipy  # noqa: F401
    except ImportError:
        raise CLIError("evaluation needs scipy: pip install 'diffusers-mar[eval]'", exit_code=EXIT_FAILURE) from None
    from diffusers_mar import evaluation

    return evaluation


def _feature_extractor(evaluation, args: argparse.Namespace, device):
    try:
        return evaluation.load_feature_extractor(args.feature_extractor, args.inception_weights, device)
    except FileNotFoundError as error:
        raise CLIError(str(error), "--inception-weights") from None
    except ValueError as error:
        option = "--feature-extractor" if args.feature_extractor != "inception" else "--inception-weights"
        raise CLIError(str(error), option) from None
    except OSError as error:  # the download of the Inception weights
        raise CLIError(
            f"could not download the Inception weights ({error}); pass --inception-weights with a local copy",
            "--inception-weights",
        ) from None


def cmd_compute_reference(args: argparse.Namespace) -> int:
    evaluation = _evaluation()
    for option, value in (("--data", args.data), ("--output", args.output), ("--resolution", args.resolution)):
        if value is None:
            raise CLIError("is required with --compute-reference", option)
    if Path(args.output).suffix != ".npz":
        raise CLIError(f"{args.output!r} must end in .npz", "--output")
    if Path(args.output).expanduser().exists():
        raise CLIError(f"{args.output!r} exists; delete it or give another file name", "--output")
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    extractor = _feature_extractor(evaluation, args, device)
    try:
        summary = evaluation.compute_reference(
            args.data,
            args.output,
            extractor,
            args.resolution,
            args.feature_extractor,
            split=args.split,
            image_column=args.image_column,
            batch_size=args.metrics_batch_size,
            max_images=args.max_images,
        )
    except ValueError as error:
        raise CLIError(str(error), "--data") from None
    print(f"Wrote {summary['output']}: {summary['num_images']} images in {summary['seconds']:.1f} s", file=sys.stderr)
    return EXIT_OK


def _model_hash(evaluation, model: str) -> str:
    path = Path(model).expanduser()
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, local_files_only=True))  # the files from_pretrained has just used
    return evaluation.folder_hash(path)


def _check_inputs(evaluation, args: argparse.Namespace):
    """Checks that need no model: the output folder, the reference file, the model card."""
    if args.output_dir is None:
        raise CLIError("is required (the folder for the images and results)", "--output-dir")
    for option, value in (("--data", args.data), ("--output", args.output), ("--resolution", args.resolution)):
        if value is not None:
            raise CLIError("is only used with --compute-reference", option)
    if args.update_model_card and not (Path(args.model).expanduser() / "model_index.json").is_file():
        raise CLIError(
            "needs --model to be a local pipeline folder (its README.md gets the line)", "--update-model-card"
        )
    if args.reference is None:
        return None
    try:
        return evaluation.load_reference(args.reference)
    except (FileNotFoundError, ValueError) as error:
        raise CLIError(str(error), "--reference") from None


def _steps_text(settings: dict) -> str:
    if "num_inference_steps" not in settings:  # an ARPipeline makes one token per step
        return f"one token per step x {settings['num_diffusion_steps']} diffusion steps"
    return f"{settings['num_inference_steps']} x {settings['num_diffusion_steps']} steps"


def _sampling_text(settings: dict) -> str:
    if "top_k" in settings:  # a VARPipeline: guidance_scale = 1 + the original's cfg
        smooth = ", more_smooth" if settings["more_smooth"] else ""
        return (
            f"guidance {settings['guidance_scale']:g} (cfg {settings['guidance_scale'] - 1:g}), top-k "
            f"{settings['top_k']}, top-p {settings['top_p']:g}{smooth}"
        )
    return (
        f"guidance {settings['guidance_scale']:g} ({settings['guidance_schedule']}), {_steps_text(settings)}, "
        f"temperature {settings['temperature']:g}"
    )


def _card_line(results: dict) -> str:
    metrics, settings = results["metrics"], results["settings"]
    names = {"fid": "FID", "inception_score": "IS", "precision": "precision", "recall": "recall"}
    values = ", ".join(f"{names[key]} {metrics[key]:.4g}" for key in names if key in metrics)
    reference = Path(results["reference"]).name if results["reference"] else "no reference"
    return (
        f"- {values} on {results['num_images']:,} images ({settings['images_per_class']} per class) against "
        f"`{reference}`; {_sampling_text(settings)}"
        + (f", sampling preset `{settings['sampling_preset']}`" if settings.get("sampling_preset") else "")
        + f", seed {settings['seed']} (`diffusers-mar evaluate`, {results['date']})"
    )


def update_model_card(folder: str, line: str) -> Path:
    """Append `line` under an `## Evaluation results` heading of the folder's README.md (created if missing)."""
    path = Path(folder).expanduser() / "README.md"
    text = path.read_text() if path.is_file() else ""
    heading = "## Evaluation results"
    if heading not in text:
        text = text.rstrip("\n") + f"\n\n{heading}\n\nMeasured with `diffusers-mar evaluate` (docs/evaluation.md).\n"
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))  # the section ends where the next one starts
    end = len(text) if end == -1 else end + 1
    text = (
        text[:start]
        + text[start:end].rstrip("\n")
        + "\n"
        + line
        + "\n"
        + ("\n" + text[end:] if end < len(text) else "")
    )
    atomic_write(path, lambda file: file.write(text.encode()))
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.compute_reference:
        return cmd_compute_reference(args)
    from accelerate import Accelerator

    # 1. Checks that need no model
    evaluation = _evaluation()
    reference = _check_inputs(evaluation, args)
    accelerator = Accelerator(cpu=args.cpu)
    main_process = accelerator.is_main_process

    # 2. Model, classes, settings, and the run the output folder must hold
    pipe = load_pipeline(args.model, str(accelerator.device), args.dtype)
    check_can_decode(pipe, args.model)
    num_classes = pipe.transformer.config.num_classes
    if args.num_classes is not None and args.num_classes != num_classes:
        raise CLIError(f"is {args.num_classes} but the model has {num_classes} classes", "--num-classes")
    if reference is not None and reference.num_classes not in (None, num_classes):
        raise CLIError(
            f"{args.reference!r} was computed for {reference.num_classes} classes, the model has {num_classes}",
            "--reference",
        )
    settings, source = sampling_settings(args, pipe)
    settings, settings_text = call_settings(args, pipe, settings)  # a preset is part of the run
    samples = evaluation.sample_list(num_classes, args.images_per_class, args.seed)
    run = {
        "model_hash": _model_hash(evaluation, args.model),
        "num_classes": num_classes,
        "images_per_class": args.images_per_class,
        "seed": args.seed,
        "sampling": settings,
        "dtype": args.dtype,
    }
    try:
        resuming = evaluation.check_output_folder(args.output_dir, run)
    except ValueError as error:
        raise CLIError(str(error), "--output-dir") from None
    extractor = None
    if not args.skip_metrics and main_process:  # fail now, not after hours of sampling
        extractor = _feature_extractor(evaluation, args, accelerator.device)
    created = not Path(args.output_dir).exists()
    accelerator.wait_for_everyone()
    if main_process:
        evaluation.write_run_file(args.output_dir, run)
        print(
            f"{'Resuming' if resuming else 'Sampling'} {len(samples):,} images ({args.images_per_class} per class, "
            f"{num_classes} classes) on {accelerator.num_processes} process(es) with {settings_text} "
            f"(options not given: {source})",
            file=sys.stderr,
        )
    accelerator.wait_for_everyone()

    # 3. Sample this process's batches
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with cpu_threads(resolve_num_threads(args.num_threads, pipe, accelerator.device.type)):
        try:
            generated = evaluation.generate_samples(
                pipe,
                samples,
                args.output_dir,
                args.batch_size,
                accelerator.process_index,
                accelerator.num_processes,
                show_progress=main_process and not args.quiet,
                **settings,
            )
        except ValueError as error:  # an argument that the pipeline rejected, at the first batch
            if main_process and not resuming:
                evaluation.discard_new_run(args.output_dir, created)
            raise CLIError(f"the pipeline rejected the settings ({settings_text}): {error}") from None
    sampling_seconds = time.perf_counter() - start
    accelerator.wait_for_everyone()
    if not main_process:
        return EXIT_OK

    # 4. Metrics on the main process (the PNGs read back: rounded uint8, as the paper's evaluation)
    start = time.perf_counter()
    npz_path = Path(args.output_dir) / NPZ_FILE
    metrics, notes = {}, []

    def warn(message: str) -> None:  # at once, and in results.json
        notes.append(message)
        print(f"{args.parser.prog}: warning: {message}", file=sys.stderr)

    try:
        metrics = evaluation.compute_metrics(
            args.output_dir, len(samples), extractor, reference, npz_path, args.metrics_batch_size, warn=warn
        )
    except ValueError as error:
        raise CLIError(str(error), "--reference" if "reference" in str(error) else None, EXIT_FAILURE) from None

    # 5. Results
    results = {
        "metrics": metrics,
        "warnings": notes,
        "model": args.model,
        "model_hash": run["model_hash"],
        "reference": args.reference,
        "feature_extractor": None if args.skip_metrics else args.feature_extractor,
        "num_images": len(samples),
        "settings": {**settings, "images_per_class": args.images_per_class, "seed": args.seed, "dtype": args.dtype},
        "num_processes": accelerator.num_processes,
        "device": accelerator.device.type,
        "images_generated_by_main_process": generated,
        "seconds": {"sampling": sampling_seconds, "metrics": time.perf_counter() - start},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }
    results_path = args.results or os.path.join(args.output_dir, RESULTS_FILE)
    evaluation.write_json(results_path, results)
    print(", ".join(f"{key} {value:.4f}" for key, value in metrics.items()) or "no metrics", file=sys.stderr)
    print(results_path)
    if args.update_model_card and metrics:
        print(update_model_card(args.model, _card_line(results)))
    return EXIT_OK
