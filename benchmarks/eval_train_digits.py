"""Digits learning check: a short CPU run of `training/train_mar.py`, then its loss curve and sample quality.

    python benchmarks/eval_train_digits.py --output_dir /tmp/mar-digits-bench

Trains on scikit-learn's bundled 8x8 digits (no download) with the recipe of `training/README.md`, reads the
logged losses, then samples 10 images per class with the EMA pipeline and the folder's recommended sampling settings
and classifies them with an SVM trained on the real digits (about 99% accurate on real ones; random images score
about 10%). Prints one JSON line; record it in `docs/benchmarks.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import machine_description  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=str, default="/tmp/mar-digits-bench")
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--window", type=int, default=50, help="Steps averaged for the first and last loss.")
    parser.add_argument("--samples_per_class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # 1. Train (the command of training/README.md)
    command = [
        sys.executable,
        str(REPO_ROOT / "training" / "train_mar.py"),
        "--dataset_name=digits",
        f"--output_dir={args.output_dir}",
        "--overwrite_output_dir",  # the benchmark's own folder: a rerun replaces the previous run
        f"--train_batch_size={args.train_batch_size}",
        f"--max_train_steps={args.max_train_steps}",
        "--learning_rate=1e-3",
        "--lr_warmup_steps=50",
        "--ema_decay=0.999",
        "--ema_warmup",
        "--sample_steps=0",
        "--num_sample_images=20",
        f"--checkpointing_steps={args.max_train_steps}",
        f"--seed={args.seed}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start

    # 2. Loss curve from the tensorboard log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The scalars are in the run's own event file; its sub-folders hold the hyper-parameter summaries.
    (events,) = Path(args.output_dir, "logs", "train_mar").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("loss")]
    speed = [event.value for event in accumulator.Scalars("images_per_second")]

    # 3. Sample quality: an SVM trained on the real digits classifies class-conditional samples
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    from diffusers_mar import MARPipeline

    digits = load_digits()
    classifier = SVC(gamma=0.001).fit(digits.data, digits.target)
    pipe = MARPipeline.from_pretrained(args.output_dir)
    pipe.set_progress_bar_config(disable=True)
    sampling = pipe.sampling_defaults
    labels = [c for c in range(10) for _ in range(args.samples_per_class)]
    images = pipe(labels, generator=torch.Generator().manual_seed(args.seed), output_type="np", **sampling).images
    features = (images[..., 0].reshape(len(labels), -1) * 16.0).clip(0, 16)  # [0, 1] -> the digits' 0..16 range
    accuracy = float(np.mean(classifier.predict(features) == np.array(labels)))

    print(
        json.dumps(
            {
                "machine": machine_description(),
                "steps": len(losses),
                "global_batch": args.train_batch_size,
                "first_loss": round(float(np.mean(losses[: args.window])), 4),
                "last_loss": round(float(np.mean(losses[-args.window :])), 4),
                "images_per_second": round(float(np.median(speed)), 1),
                "wall_seconds": round(wall, 1),
                "sampling": sampling,
                "sample_accuracy": accuracy,
                "sample_grid": str(sorted(Path(args.output_dir, "samples").glob("*.png"))[-1]),
            }
        )
    )


if __name__ == "__main__":
    main()
