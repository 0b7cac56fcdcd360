"""Before/after pictures of inpainting, class-guided editing and outpainting for docs/inpainting.md.

Uses the shipped digits model (or --model; a pixel-space model) on held-out digits of the same split as eval_inpaint_digits.py and writes
PNGs (pixels enlarged with nearest-neighbour) into docs/images/:

- inpaint_bottom.png, inpaint_left.png: one digit per class; rows = real, input (hidden tokens in grey), completed
  with the true label.
- edit_bottom.png: rows = the same digits' bottom halves regenerated under each label 0..9 (one row per label).
- outpaint.png: rows = real, shrunk into the centre with a one-token border regenerated ("shrink"), panned one token
  to the right ("shift").

    python benchmarks/figure_inpaint.py [--model PATH] [--output-dir docs/images]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # `python benchmarks/<script>.py` from the repository root imports `benchmarks`

from benchmarks.benchmarking_utils import DigitsEvaluator, digit_splits, half_mask, load_inpaint_pipeline  # noqa: E402

SCALE = 8  # each pixel of an 8x8 digit becomes 8x8 screen pixels
GAP = 2


def grid(rows: list[np.ndarray]) -> PIL.Image.Image:
    """Rows of (N, H, W) or (N, H, W, 3) images in [0, 1] -> one RGB picture with white gaps."""
    rows = [np.repeat(r[..., None], 3, -1) if r.ndim == 3 else r for r in rows]
    n, h, w = len(rows[0]), rows[0].shape[1] * SCALE, rows[0].shape[2] * SCALE
    canvas = np.ones(((h + GAP) * len(rows) - GAP, (w + GAP) * n - GAP, 3))
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            big = image.repeat(SCALE, 0).repeat(SCALE, 1)
            canvas[i * (h + GAP) : i * (h + GAP) + h, j * (w + GAP) : j * (w + GAP) + w] = big
    return PIL.Image.fromarray((canvas * 255).round().astype(np.uint8))


def show_hidden(images: np.ndarray, token_mask: torch.Tensor, pipe) -> np.ndarray:
    """Grey-blue over the unknown tokens (the token-granular mask the pipeline really uses)."""
    grid_mask = token_mask.reshape(-1, pipe.transformer.grid_size, pipe.transformer.grid_size).numpy()
    pixel_mask = grid_mask.repeat(pipe.token_size, 1).repeat(pipe.token_size, 2).astype(bool)
    out = np.repeat(images[..., None], 3, -1).copy()
    out[np.broadcast_to(pixel_mask, images.shape)] = (0.45, 0.5, 0.65)
    return out


@torch.no_grad()  # not torch.set_grad_enabled(False): tests call main() in-process
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: diffusers_mar.DEFAULT_MODEL)")
    parser.add_argument("--output-dir", default="docs/images")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the folder's recommended one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = load_inpaint_pipeline(args.model, "cpu")
    card = pipe.sampling_defaults
    sampling = {
        "num_inference_steps": card.get("num_inference_steps", 64),
        "num_diffusion_steps": card.get("num_diffusion_steps", 100),
        "temperature": card.get("temperature", 1.0),
        "guidance_scale": args.guidance_scale or card.get("guidance_scale", 3.0),
        "resize": True,
    }
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    test_x, test_y = digit_splits(DigitsEvaluator())  # the held-out half B of eval_digits.py's classifier
    first = [int(np.flatnonzero(test_y == digit)[0]) for digit in range(10)]  # one test digit per class
    images, labels = test_x[first], test_y[first]  # (10, 8, 8)
    batch = images[..., None]  # (10, 8, 8, 1)
    real = torch.from_numpy(images)[:, None]
    if pipe.resolution != 8:  # as the pipeline's `resize=True`
        real = F.interpolate(real, size=pipe.resolution, mode="bicubic", antialias=True).clamp(0, 1)
    real = real[:, 0].numpy()  # (10, H, W) at the model's size

    def run(mask, class_labels) -> np.ndarray:
        generator = [torch.Generator().manual_seed(args.seed + i) for i in range(len(class_labels))]
        out = pipe(batch, mask, list(class_labels), generator=generator, output_type="np", **sampling).images
        return out[..., 0]

    for half in ("bottom", "left"):
        mask = half_mask(half, 8)
        token_mask = pipe.prepare_mask(mask, resize=True).expand(10, -1)
        rows = [real, show_hidden(real, token_mask, pipe), run(mask, labels)]
        grid(rows).save(output_dir / f"inpaint_{half}.png")

    mask = half_mask("bottom", 8)
    grid([real] + [run(mask, [label] * 10) for label in range(10)]).save(output_dir / "edit_bottom.png")

    rows = [real]
    for border, mode in ((1, "shrink"), ((0, 1, 0, 0), "shift")):
        canvas, outpaint_mask = pipe.prepare_outpainting(torch.from_numpy(images)[:, None], border, mode, resize=True)
        generator = [torch.Generator().manual_seed(args.seed + i) for i in range(10)]
        out = pipe(canvas, outpaint_mask, labels.tolist(), generator=generator, output_type="np", **sampling).images
        rows.append(out[..., 0])
    grid(rows).save(output_dir / "outpaint.png")
    print(f"wrote {sorted(p.name for p in output_dir.glob('*.png'))} to {output_dir}")


if __name__ == "__main__":
    main()
