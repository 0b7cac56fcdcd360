"""Sample grids of the models that `benchmarks/eval_table1_digits.py` trained: one row per variant, digits 0-9.

    python benchmarks/figure_table1.py --output-root table1-digits --output docs/images/table1_digits_p1.png

Each row samples the digits 0 to 9 once with guidance 1.5, 50 diffusion steps and seed 0, with the variant's sampler
(AR raster and AR anneal in raster order, AR random in random orders; MAR at one token per step and at L / 4 steps;
VAR over its scales), for the variants whose folders exist.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_mar.cli import load_pipeline  # noqa: E402
from diffusers_mar.image_grid import make_grid  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-root", required=True, help="the --output-root of eval_table1_digits.py")
    parser.add_argument("--patch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="the training seed of the folders")
    parser.add_argument("--output", required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.output_root)
    rows, names = [], []
    for name in ("ar-raster", "ar-random", "ar-anneal", "mar", "var"):
        folder = root / f"p{args.patch_size}-s{args.seed}-{name}"
        if not (folder / "model_index.json").exists():
            continue
        pipe = load_pipeline(str(folder))  # the class its model_index.json names
        pipe.set_progress_bar_config(disable=True)
        samplers = {name: {"order": "random" if name == "ar-random" else "raster", "num_diffusion_steps": 50}}
        if name == "mar":
            num_tokens = pipe.transformer.num_tokens
            samplers = {
                "mar, 1 token/step": {"num_inference_steps": num_tokens, "num_diffusion_steps": 50},
                f"mar, {num_tokens // 4} steps": {
                    "num_inference_steps": max(1, num_tokens // 4),
                    "num_diffusion_steps": 50,
                },
            }
        if name == "var":
            samplers = {"var": {}}
        for label, sampling in samplers.items():
            generator = torch.Generator().manual_seed(0)
            images = pipe(list(range(10)), generator=generator, guidance_scale=1.5, **sampling)
            rows.append(images.images)
            names.append(label)
    make_grid(rows, names, scale=4).save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
