"""Sampling speed and memory of VAR: diffusers-mar `VARPipeline` against the official `autoregressive_infer_cfg`.

Both run the same weights (one random initialisation of a preset, made with the official classes and saved as the
official code saves them, then converted with our converter) with the same settings and seed, side by side: each
round runs ours and the official in turn, each in a fresh process (so that its peak memory is its own), the order
alternating from round to round. A process times its first call (the official d16 takes about a minute per image on
two cores, so no warm-up call: one-off costs count for both). Reports images/s as median (min-max) over the rounds,
the per-round ratio, the peak memory, and the largest difference between the two implementations' images (the same
`g_seed` / `generator`: the same draws, docs/var.md).

    python benchmarks/bench_var.py --original-repo path/to/VAR [--model var-d16] [--batch-sizes 1 8] \
        [--repeats 3] [--write-docs]

`--dtype int8` runs ours with dynamic int8 linear layers (the official code stays float32).
Defaults: CPU, float32, the folder's recommended settings (guidance 2.5 = cfg 1.5, top-k 900, top-p 0.96).
`--tiny` runs a two-block model at 4 scales (for the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.benchmarking_utils import (  # noqa: E402
    format_spread,
    machine_description,
    measure_memory,
    recorded_command,
    section_markers,
    spread,
    write_outputs,
)
from conversion.original_var import is_var_checkout, load_original_var  # noqa: E402
from diffusers_mar import VAR_PRESETS, get_preset_config  # noqa: E402

SETTINGS = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
TINY = {"depth": 2, "patch_nums": (1, 2, 3, 4), "ch": 32, "vocab_size": 64, "z_channels": 8, "num_classes": 10}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", type=Path, required=True, help="FoundationVision/VAR checkout (78b9539).")
    parser.add_argument("--model", default="var-d16", choices=sorted(VAR_PRESETS))
    parser.add_argument("--tiny", action="store_true", help="a two-block model at 4 scales instead of --model")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (each: ours and the official, interleaved)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="g_seed of the official call, the generator's seed")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "int8"],
        help="ours: float32, or int8 (its transformer's linear layers dynamic int8, `diffusers_mar.quantization`; "
        "the tokenizer stays float32); the official code runs float32",
    )
    parser.add_argument("--output-json", help="write all results to this JSON file")
    parser.add_argument("--write-docs", action="store_true", help="update the VAR section of docs/benchmarks.md")
    parser.add_argument("--worker", choices=["ours", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not is_var_checkout(args.original_repo):
        parser.error(f"argument --original-repo: {str(args.original_repo)!r} is not a FoundationVision/VAR checkout")
    if args.repeats < 1 or min(args.batch_sizes) < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --batch-sizes and --threads must be >= 1")
    return args


def _sizes(args: argparse.Namespace) -> dict:
    if args.tiny:
        return dict(TINY)
    config = get_preset_config(args.model)["transformer"]
    return {
        "depth": config["num_layers"],
        "patch_nums": tuple(config["patch_nums"]),
        "ch": 160,
        "vocab_size": config["vocab_size"],
        "z_channels": config["vq_embed_dim"],
        "num_classes": config["num_classes"],
        "shared_aln": config["shared_adaln"],
    }


def make_official_weights(args: argparse.Namespace, folder: Path) -> None:
    """A random initialisation of the official models (their own `init_weights`), saved as the official files are."""
    official = load_original_var(args.original_repo)
    sizes = _sizes(args)
    torch.manual_seed(0)
    vqvae = official.VQVAE(
        vocab_size=sizes["vocab_size"], z_channels=sizes["z_channels"], ch=sizes["ch"], test_mode=True,
        v_patch_nums=sizes["patch_nums"],
    )  # fmt: skip
    var = official.VAR(
        vae_local=vqvae, num_classes=sizes["num_classes"], depth=sizes["depth"], embed_dim=64 * sizes["depth"],
        num_heads=sizes["depth"], drop_path_rate=0.1 * sizes["depth"] / 24, shared_aln=sizes.get("shared_aln", False),
        attn_l2_norm=True, patch_nums=sizes["patch_nums"], flash_if_available=False, fused_if_available=False,
    )  # fmt: skip
    var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
    torch.save(vqvae.state_dict(), folder / "vae.pth")
    torch.save(var.state_dict(), folder / "var.pth")


def worker(args: argparse.Namespace) -> dict:
    """One measured call in this process: load, then time the first call and its peak memory."""
    if args.threads:
        torch.set_num_threads(args.threads)
    vae_sd = torch.load(args.weights / "vae.pth", map_location="cpu", weights_only=True)
    var_sd = torch.load(args.weights / "var.pth", map_location="cpu", weights_only=True)
    sizes, batch = _sizes(args), args.batch_size
    labels = [(7 * i) % sizes["num_classes"] for i in range(batch)]
    top_k = min(SETTINGS["top_k"], sizes["vocab_size"])
    result = {}
    if args.worker == "ours":
        from conversion.convert_var_to_diffusers import build_var_models
        from diffusers_mar import VARPipeline

        vqvae, transformer = build_var_models(vae_sd, var_sd, list(sizes["patch_nums"]))
        pipe = VARPipeline(transformer, vqvae)
        pipe.set_progress_bar_config(disable=True)
        if args.dtype == "int8":
            from diffusers_mar.quantization import quantize_int8

            quantize_int8(pipe)
        result["int8"] = bool(getattr(pipe.transformer, "int8_quantized", False))

        def call():
            return pipe(
                class_labels=labels, guidance_scale=1.0 + SETTINGS["cfg"], top_k=top_k, top_p=SETTINGS["top_p"],
                more_smooth=False, generator=torch.Generator().manual_seed(args.seed), output_type="pt",
            ).images  # fmt: skip
    else:
        from conversion.original_var import build_original_var

        vqvae_config = {"ch_mult": (1, 1, 2, 2, 4), "num_vq_embeddings": sizes["vocab_size"], "ch": sizes["ch"]}
        vqvae_config |= {"latent_channels": sizes["z_channels"], "share_quant_resi": 4}
        transformer_config = {
            "patch_nums": sizes["patch_nums"], "num_classes": sizes["num_classes"], "num_layers": sizes["depth"],
            "num_attention_heads": sizes["depth"], "attention_head_dim": 64, "mlp_ratio": 4.0,
            "shared_adaln": sizes.get("shared_aln", False),
        }  # fmt: skip
        _, model = build_original_var(args.original_repo, vae_sd, var_sd, vqvae_config, transformer_config)

        def call():
            with torch.inference_mode():
                return model.autoregressive_infer_cfg(
                    B=batch, label_B=torch.tensor(labels), g_seed=args.seed, cfg=SETTINGS["cfg"], top_k=top_k,
                    top_p=SETTINGS["top_p"], more_smooth=False,
                )  # fmt: skip

    with measure_memory("cpu", result):
        start = time.perf_counter()
        images = call()
        result["seconds"] = time.perf_counter() - start
    result["images_per_second"] = batch / result["seconds"]
    torch.save(images.float().cpu(), args.weights / f"images_{args.worker}_{batch}.pt")
    return result


def _spawn(args: argparse.Namespace, name: str, batch: int, weights: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--weights", str(weights), "--batch-size", str(batch)]
    command += ["--original-repo", str(args.original_repo), "--model", args.model, "--seed", str(args.seed)]
    command += ["--dtype", args.dtype] + (["--tiny"] if args.tiny else [])
    command += ["--threads", str(args.threads)] if args.threads else []
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    results = {
        "machine": machine_description("cpu", args.dtype, args.threads),
        "model": "tiny" if args.tiny else args.model,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp)
        make_official_weights(args, weights)
        for batch in args.batch_sizes:
            runs = {"ours": [], "official": []}
            for round_index in range(args.repeats):
                order = ("ours", "official") if round_index % 2 == 0 else ("official", "ours")
                for name in order:
                    runs[name].append(_spawn(args, name, batch, weights))
                    print(
                        f"batch {batch} round {round_index + 1} {name}: {runs[name][-1]['seconds']:.1f} s",
                        file=sys.stderr,
                    )
            ours = torch.load(weights / f"images_ours_{batch}.pt")
            official = torch.load(weights / f"images_official_{batch}.pt")
            ratios = [o["images_per_second"] / r["images_per_second"] for o, r in zip(runs["ours"], runs["official"])]
            row = {
                "batch_size": batch,
                "ours_images_per_second": spread([r["images_per_second"] for r in runs["ours"]]),
                "official_images_per_second": spread([r["images_per_second"] for r in runs["official"]]),
                "ratio": spread(ratios),
                "ours_peak_memory_mb": spread([r["peak_memory_mb"] for r in runs["ours"]]),
                "official_peak_memory_mb": spread([r["peak_memory_mb"] for r in runs["official"]]),
                "max_image_difference": (ours - official).abs().max().item(),
                "ours_int8": all(run["int8"] for run in runs["ours"]),
            }
            rows.append(row)
    results["rows"] = rows
    model = "tiny (2 blocks, 4 scales)" if args.tiny else f"{args.model}, random weights"
    int8 = args.dtype == "int8"
    report = (
        f"### VAR sampling: `VARPipeline`{' in int8' * int8} against the official `autoregressive_infer_cfg`\n\n"
        + (
            "Ours with its transformer's linear layers in dynamic int8 (`quantize_int8`), the official code in "
            "float32: the image difference is int8's, not a parity check. " * int8
        )  # fmt: skip
        + f"{model}; cfg 1.5 (`guidance_scale=2.5`), top-k 900, top-p 0.96, one seed for both; {results['machine']}. "
        f"{args.repeats} rounds, ours and the official interleaved (order alternating), each call in a fresh process, "
        "first call timed; median (min-max). Memory: peak resident set above the loaded weights.\n\n"
        "| batch | ours img/s | official img/s | ratio (ours / official) | ours peak MB | official peak MB | "
        "max image difference |\n|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    for row in rows:
        report += (
            f"| {row['batch_size']} | {format_spread(row['ours_images_per_second'], 4)} | "
            f"{format_spread(row['official_images_per_second'], 4)} | {format_spread(row['ratio'], 2)} | "
            f"{format_spread(row['ours_peak_memory_mb'], 0)} | {format_spread(row['official_peak_memory_mb'], 0)} | "
            f"{row['max_image_difference']:.1e} |\n"
        )
    report += f"\nCommand: `{recorded_command(__file__, argv, checkout='path/to/VAR')}`"
    markers = section_markers("bench_var" + " int8" * int8)
    write_outputs(args, report, results, markers if args.write_docs else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
