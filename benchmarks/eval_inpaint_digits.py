"""Inpainting and class-guided editing quality of a digits MAR (scikit-learn's 8x8 handwritten digits).

Hides the bottom half, and separately the left half, of held-out real digits and completes them with
`MARInpaintPipeline`:
- with the true label: a digit classifier should recognise the completions about as well as the real digits;
- with another label (class-guided editing): how often the classifier follows the new label, and how often it keeps
  the old one;
- references: the real digits, the digits with the half blanked (what the visible half alone tells the classifier),
  and unconditional completions (label `num_classes`).

The classifier is the one of `benchmarks/eval_digits.py` (`benchmarking_utils.DigitsEvaluator`: an MLP on the pixels, trained on the
fixed stratified half A of the digits, seed 0), so both digits benchmarks judge with one classifier. The test
digits are its held-out half B. They are held out from the classifier, not from the MAR model (a model trained on
all 1,797 digits has seen them).

    python benchmarks/eval_inpaint_digits.py [--model PATH] [--num-images 500]

Results go to docs/benchmarks.md with the command that made them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python benchmarks/<script>.py` from the repository root imports `benchmarks`

import diffusers_mar  # noqa: E402
from benchmarks.benchmarking_utils import (  # noqa: E402
    HALVES,
    DigitsEvaluator,
    digit_splits,
    half_mask,
    load_inpaint_pipeline,
    to_digit_scale,
)
from diffusers_mar import MARInpaintPipeline  # noqa: E402


def predict(evaluator: DigitsEvaluator, images: np.ndarray) -> np.ndarray:
    """The evaluator's classifier on (N, H, W) images in [0, 1] (a multiple of 8x8 is block-averaged to 8x8)."""
    return evaluator.predict(to_digit_scale(np.asarray(images)[..., None]))


def complete(
    pipe: MARInpaintPipeline,
    images: np.ndarray,
    mask: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    **sampling,
) -> np.ndarray:
    """Inpaint `images` (N, 8, 8) under `mask` with `labels`; returns (N, H, W) in [0, 1] at the model's size."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size, :, :, None]  # (B, 8, 8, 1), channels last
        result = pipe(
            batch,
            mask,
            labels[start : start + batch_size].tolist(),
            generator=torch.Generator().manual_seed(seed + start),
            output_type="np",
            resize=True,  # no-op for a model of the digits' 8x8 size
            **sampling,
        ).images
        out.append(result[..., 0])
    return np.concatenate(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: diffusers_mar.DEFAULT_MODEL)")
    parser.add_argument(
        "--num-images", type=int, default=500, help="test digits used (a prefix of the 899 held-out digits)"
    )
    parser.add_argument(
        "--guidance-scales", type=float, nargs="+", default=None, help="default: 1.0 and the model card's"
    )
    parser.add_argument("--num-inference-steps", type=int, default=None, help="default: the model card's, or 64")
    parser.add_argument("--num-diffusion-steps", type=int, default=None, help="default: the model card's, or 100")
    parser.add_argument("--temperature", type=float, default=None, help="default: the model card's, or 1.0")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="generation and new-label seed (the classifier: 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output-json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num-images and --batch-size must be >= 1")
    return args


def pick(value, default):
    return default if value is None else value


@torch.no_grad()  # not torch.set_grad_enabled(False): tests call main() in-process
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    pipe = load_inpaint_pipeline(args.model, args.device)
    card = pipe.sampling_defaults
    sampling = {
        "num_inference_steps": pick(args.num_inference_steps, card.get("num_inference_steps", 64)),
        "num_diffusion_steps": pick(args.num_diffusion_steps, card.get("num_diffusion_steps", 100)),
        "temperature": pick(args.temperature, card.get("temperature", 1.0)),
        "guidance_schedule": card.get("guidance_schedule", "linear"),
    }
    guidance_scales = args.guidance_scales or sorted({1.0, float(card.get("guidance_scale", 3.0))})
    num_classes = pipe.transformer.config.num_classes

    evaluator = DigitsEvaluator()  # the classifier of eval_digits.py (always seed 0)
    test_x, test_y = digit_splits(evaluator)
    test_x, test_y = test_x[: args.num_images], test_y[: args.num_images]
    # Another label for every digit: old + k mod 10, k in 1..9 drawn with a fixed seed.
    new_y = (test_y + np.random.default_rng(args.seed).integers(1, 10, len(test_y))) % 10
    real_accuracy = float((predict(evaluator, test_x) == test_y).mean())
    print(f"model: {args.model or diffusers_mar.DEFAULT_MODEL}  resolution: {pipe.resolution}  tokens: "
          f"{pipe.transformer.num_tokens} of {pipe.token_size}x{pipe.token_size} px  sampling: {sampling}")  # fmt: skip
    print(f"classifier accuracy on {len(test_x)} real test digits: {real_accuracy:.3f}")

    results = {"real_accuracy": real_accuracy, "num_images": len(test_x), "sampling": sampling, "halves": {}}
    seconds, generated = 0.0, 0
    for half in HALVES:
        mask = half_mask(half, 8)
        blanked = test_x * (mask == 0)
        row = {"blanked_accuracy": float((predict(evaluator, blanked) == test_y).mean()), "guidance": {}}
        start = time.perf_counter()
        unconditional = complete(
            pipe, test_x, mask, np.full_like(test_y, num_classes), args.batch_size, args.seed, guidance_scale=1.0,
            **sampling,
        )  # fmt: skip
        row["unconditional_accuracy"] = float((predict(evaluator, unconditional) == test_y).mean())
        for scale in guidance_scales:
            same = complete(pipe, test_x, mask, test_y, args.batch_size, args.seed, guidance_scale=scale, **sampling)
            edit = complete(pipe, test_x, mask, new_y, args.batch_size, args.seed, guidance_scale=scale, **sampling)
            edit_pred = predict(evaluator, edit)
            row["guidance"][scale] = {
                "true_label_accuracy": float((predict(evaluator, same) == test_y).mean()),
                "edit_follows_new_label": float((edit_pred == new_y).mean()),
                "edit_keeps_old_label": float((edit_pred == test_y).mean()),
            }
        seconds += time.perf_counter() - start
        generated += len(test_x) * (1 + 2 * len(guidance_scales))
        results["halves"][half] = row

    print(f"\n{generated} completions in {seconds:.1f} s ({generated / seconds:.1f} img/s, {args.device})\n")
    print("| hidden half | guidance | completed, true label: accuracy | edited: follows new label | "
          "edited: keeps old label |")  # fmt: skip
    print("|---|---|---|---|---|")
    for half, row in results["halves"].items():
        for scale, values in row["guidance"].items():
            print(
                f"| {half} | {scale:g} | {values['true_label_accuracy']:.1%} | {values['edit_follows_new_label']:.1%}"
                f" | {values['edit_keeps_old_label']:.1%} |"
            )
    print(f"\nReferences (accuracy of the classifier): real digits {real_accuracy:.1%}; ", end="")
    print(
        "; ".join(
            f"{half} half blanked {row['blanked_accuracy']:.1%}, completed unconditionally "
            f"{row['unconditional_accuracy']:.1%}"
            for half, row in results["halves"].items()
        )
    )
    results["seconds"], results["completions"] = seconds, generated
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
