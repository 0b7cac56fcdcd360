"""Convert the official LTH14/mar checkpoints (and the KL-16 VAE) into a diffusers-mar `MARPipeline` folder.

```
python conversion/convert_mar_to_diffusers.py --checkpoint_path mar_base/checkpoint-last.pth --vae_path kl16.ckpt \
    --output_dir mar-base [--verify [--original_repo path/to/LTH14-mar]] [--push_to_hub --repo_id user/mar-base]
```

This file holds the MAR weight mapping (`convert_mar_state_dict` and its inverse, both built from one list of key
pairs), building the models, and the command line (`main`). Beside it: `checkpoints.py` (reading the original files),
`mar_configs.py` (sizes and head counts), `kl_vae.py` (the VAE), `card.py` (sampling settings and model card),
`folder.py` (atomic writing), `verify.py` (`--verify`) and `hub.py` (upload). `docs/conversion.md` explains the
choices.

Key mapping (original -> diffusers-mar; the VAE's is in `kl_vae.py`):

| LTH14/mar `MAR` | `MARTransformer2DModel` |
|---|---|
| `class_emb.weight` + `fake_latent` | `class_embedding.weight` (`fake_latent` is the last row, label `num_classes`) |
| `z_proj`, `z_proj_ln` | `proj_in`, `proj_in_norm` |
| `encoder_pos_embed_learned`, `decoder_pos_embed_learned` | `encoder_pos_embed`, `decoder_pos_embed` |
| `diffusion_pos_embed_learned` | `diffusion_pos_embed` |
| `{en,de}coder_blocks.i.attn.qkv`, `.attn.proj` | `{en,de}coder_blocks.i.attn.to_qkv` (kept fused, rows [q; k; v]), `.attn.to_out` |
| `{en,de}coder_blocks.i.mlp.fc1`, `.mlp.fc2` | `{en,de}coder_blocks.i.ff.fc1`, `.ff.fc2` |
| `norm1`, `norm2`, `encoder_norm`, `decoder_embed`, `mask_token`, `decoder_norm` | same names |

| LTH14/mar `diffloss.net` (`SimpleMLPAdaLN`) | `MARDiffusionHead` |
|---|---|
| `time_embed.mlp.0`, `time_embed.mlp.2` | `time_embedding.linear_1`, `time_embedding.linear_2` |
| `cond_embed`, `input_proj` | `cond_proj`, `proj_in` |
| `res_blocks.i.in_ln`, `.mlp.0`, `.mlp.2` | `res_blocks.i.norm`, `.linear_1`, `.linear_2` |
| `res_blocks.i.adaLN_modulation.1` (3W rows each) | rows `[3Wi, 3W(i+1))` of `adaln_modulation` |
| `final_layer.adaLN_modulation.1` (2W rows) | the last 2W rows of `adaln_modulation` |
| `final_layer.linear` | `proj_out` |
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python conversion/convert_mar_to_diffusers.py`: import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402

from conversion.card import PRESET_TITLES, conversion_model_card, recommended_sampling  # noqa: E402
from conversion.checkpoints import (  # noqa: E402
    checkpoint_args,
    load_checkpoint,
    load_id2label,
    load_state_dict_strict,
    select_mar_weights,
)
from conversion.command_line import DTYPES, add_output_arguments, check_output_arguments, run_converter
from conversion.folder import check_output_dir, save_pipeline_folder  # noqa: E402
from conversion.hub import push_folder_to_hub  # noqa: E402
from conversion.kl_vae import (  # noqa: E402
    build_vae,
    convert_vae_state_dict,  # noqa: F401  (the converter's `convert_*` functions are importable from here)
    infer_vae_config,
    load_original_vae_state_dict,
)
from conversion.mar_configs import (  # noqa: E402
    OFFICIAL_FACTORIES,
    attention_heads,
    infer_configs_from_checkpoint,
    infer_mar_configs,  # noqa: F401
    match_preset,  # noqa: F401
    num_blocks,
)
from conversion.verify import (  # noqa: E402
    VerificationError,
    build_original_mar,
    verify_against_original,
    verify_pipeline_folder,
)
from diffusers_mar import (  # noqa: E402
    MAR_PRESETS,
    MARDDPMScheduler,
    MARDiffusionHead,
    MARPipeline,
    MARTransformer2DModel,
)
from diffusers_mar.pipelines.pipeline_autoregressive import vae_scale_factor  # noqa: E402

PROG = "convert_mar_to_diffusers.py"  # errors start with it, as argparse's and `diffusers-mar`'s do

# ----------------------------------------------------------------------------------------------------------------------
# The weight mapping: one list of (original, diffusers-mar) key pairs per model, read in both directions. A pair
# ending in "." maps every key under that prefix; `{i}` stands for a block index.
# ----------------------------------------------------------------------------------------------------------------------

_BLOCK_KEYS = [
    ("attn.qkv.", "attn.to_qkv."),
    ("attn.proj.", "attn.to_out."),
    ("mlp.fc1.", "ff.fc1."),
    ("mlp.fc2.", "ff.fc2."),
    ("norm1.", "norm1."),
    ("norm2.", "norm2."),
]
TRANSFORMER_KEYS = [
    ("z_proj.", "proj_in."),
    ("z_proj_ln.", "proj_in_norm."),
    ("encoder_pos_embed_learned", "encoder_pos_embed"),
    ("decoder_pos_embed_learned", "decoder_pos_embed"),
    ("diffusion_pos_embed_learned", "diffusion_pos_embed"),
    ("mask_token", "mask_token"),
    ("encoder_norm.", "encoder_norm."),
    ("decoder_embed.", "decoder_embed."),
    ("decoder_norm.", "decoder_norm."),
    *[
        (f"{side}_blocks.{{i}}.{old}", f"{side}_blocks.{{i}}.{new}")
        for side in ("encoder", "decoder")
        for old, new in _BLOCK_KEYS
    ],
]
HEAD_KEYS = [
    ("diffloss.net.time_embed.mlp.0.", "time_embedding.linear_1."),
    ("diffloss.net.time_embed.mlp.2.", "time_embedding.linear_2."),
    ("diffloss.net.cond_embed.", "cond_proj."),
    ("diffloss.net.input_proj.", "proj_in."),
    ("diffloss.net.res_blocks.{i}.in_ln.", "res_blocks.{i}.norm."),
    ("diffloss.net.res_blocks.{i}.mlp.0.", "res_blocks.{i}.linear_1."),
    ("diffloss.net.res_blocks.{i}.mlp.2.", "res_blocks.{i}.linear_2."),
    ("diffloss.net.final_layer.linear.", "proj_out."),
]
# Two tensors are joined rather than renamed (both directions are written out below): `class_emb.weight` +
# `fake_latent` -> `class_embedding.weight`, and the adaLN modulations of every res block + the final layer ->
# `adaln_modulation`.
_MODULATION = re.compile(r"^diffloss\.net\.(?:res_blocks\.(\d+)|final_layer)\.adaLN_modulation\.1\.(weight|bias)$")


@functools.cache
def _pattern(template: str) -> re.Pattern:
    return re.compile(
        "^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + ("" if template.endswith(".") else "$")
    )


def _rename(key: str, pairs: list[tuple[str, str]], inverse: bool = False) -> str | None:
    for pair in pairs:
        source, target = pair[::-1] if inverse else pair
        match = _pattern(source).match(key)
        if match:
            index = match.groupdict().get("i")
            return (target if index is None else target.replace("{i}", index)) + key[match.end() :]
    return None


def convert_mar_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Map an original `MAR` state dict to `(transformer_state_dict, diffusion_head_state_dict)`.

    Every key must be mapped; an unknown key raises `KeyError` listing all of them.
    """
    transformer, head, unmapped = {}, {}, []
    modulation = {"weight": {}, "bias": {}}  # res block index (-1: the final layer) -> tensor
    for key, value in state_dict.items():
        if key in ("class_emb.weight", "fake_latent"):
            continue
        if match := _MODULATION.match(key):
            modulation[match.group(2)][int(match.group(1)) if match.group(1) is not None else -1] = value
        elif (new_key := _rename(key, TRANSFORMER_KEYS)) is not None:
            transformer[new_key] = value
        elif (new_key := _rename(key, HEAD_KEYS)) is not None:
            head[new_key] = value
        else:
            unmapped.append(key)
    if "class_emb.weight" not in state_dict or "fake_latent" not in state_dict:
        unmapped.append("<missing class_emb.weight or fake_latent>")
    if unmapped:
        raise KeyError(f"Not a MAR checkpoint, or an unknown layout; keys that cannot be mapped: {unmapped}")
    transformer["class_embedding.weight"] = torch.cat([state_dict["class_emb.weight"], state_dict["fake_latent"]])
    order = sorted(k for k in modulation["weight"] if k >= 0) + [-1]
    if set(modulation["weight"]) != set(order) or set(modulation["bias"]) != set(order):
        raise KeyError("The diffusion head's adaLN_modulation weights are incomplete.")
    for kind, tensors in modulation.items():
        head[f"adaln_modulation.{kind}"] = torch.cat([tensors[k] for k in order])
    return transformer, head


def convert_diffusers_to_mar_state_dict(
    transformer_state_dict: dict[str, torch.Tensor], head_state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The inverse of `convert_mar_state_dict`: diffusers-mar weights in the original `MAR` layout."""
    original, unmapped = {}, []
    for key, value in transformer_state_dict.items():
        if key == "class_embedding.weight":
            original["class_emb.weight"], original["fake_latent"] = value[:-1], value[-1:]
        elif (old_key := _rename(key, TRANSFORMER_KEYS, inverse=True)) is not None:
            original[old_key] = value
        else:
            unmapped.append(key)
    blocks = num_blocks(head_state_dict, "res_blocks.")
    for key, value in head_state_dict.items():
        if key.startswith("adaln_modulation."):
            kind, rows = key.split(".")[-1], 3 * (value.shape[0] // (3 * blocks + 2))
            for i in range(blocks):
                original[f"diffloss.net.res_blocks.{i}.adaLN_modulation.1.{kind}"] = value[rows * i : rows * (i + 1)]
            original[f"diffloss.net.final_layer.adaLN_modulation.1.{kind}"] = value[rows * blocks :]
        elif (old_key := _rename(key, HEAD_KEYS, inverse=True)) is not None:
            original[old_key] = value
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyError(f"Keys that have no place in the original `MAR` layout: {unmapped}")
    return original


def build_mar_models(
    state_dict: dict[str, torch.Tensor],
    transformer_config: dict,
    head_config: dict,
    dtype: torch.dtype | None = None,
) -> tuple[MARTransformer2DModel, MARDiffusionHead]:
    """Map an original `MAR` state dict and load it, strictly, into `(transformer, diffusion_head)` in eval mode.

    The models are created without allocating weights (`accelerate.init_empty_weights`) and take the converted
    tensors as they are (`assign=True`, cast to `dtype` if given), so nothing is initialised or copied twice; `meta`
    tensors give `meta` models.
    """
    transformer_state_dict, head_state_dict = convert_mar_state_dict(state_dict)
    if dtype is not None:
        transformer_state_dict = {key: value.to(dtype) for key, value in transformer_state_dict.items()}
        head_state_dict = {key: value.to(dtype) for key, value in head_state_dict.items()}
    with init_empty_weights():
        transformer = MARTransformer2DModel.from_config(transformer_config)
        head = MARDiffusionHead.from_config(head_config)
    load_state_dict_strict(transformer, transformer_state_dict, "transformer")
    load_state_dict_strict(head, head_state_dict, "diffusion head")
    return transformer.eval(), head.eval()


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an official LTH14/mar checkpoint (and the KL-16 VAE) into a diffusers-mar MARPipeline folder.",
    )
    parser.add_argument("--checkpoint_path", required=True, help="LTH14/mar `checkpoint-last.pth` (MAR-B/L/H or own).")
    parser.add_argument("--vae_path", default=None, help="LTH14/mar `kl16.ckpt`; without it no VAE is saved.")
    parser.add_argument("--output_dir", required=True, help="Folder to write (must not exist or be empty).")
    parser.add_argument(
        "--model_type", choices=sorted(MAR_PRESETS), default=None, help="Preset to check against (default: inferred)."
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help="Encoder heads (not stored in the weights); needed when the checkpoint's `args.model` is not mar_base/"
        "mar_large/mar_huge and, without `args.model`, for widths other than 768/1024/1280.",
    )
    parser.add_argument(
        "--decoder_num_attention_heads",
        type=int,
        default=None,
        help="Decoder heads (default: `--num_attention_heads`).",
    )
    parser.add_argument("--use_non_ema", action="store_true", help="Convert `model` instead of `model_ema`.")
    parser.add_argument("--vae_norm_num_groups", type=int, default=32, help="GroupNorm groups of the VAE (KL-16: 32).")
    add_output_arguments(
        parser,
        "user/mar-base",
        "With --verify: a LTH14/mar checkout; the converted model must reproduce the original model's outputs.",
    )
    args = parser.parse_args(argv)
    check_output_arguments(parser, args, "user/mar-base")
    for flag in ("num_attention_heads", "decoder_num_attention_heads", "vae_norm_num_groups"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"`--{flag}` must be >= 1; got {getattr(args, flag)}.")
    if args.original_repo is not None and not (Path(args.original_repo) / "models" / "mar.py").is_file():
        parser.error(f"`--original_repo` {args.original_repo!r} is not a LTH14/mar checkout (no models/mar.py).")
    return args


def _original_factory(args: argparse.Namespace, train_args: dict, preset_name: str | None, head_source: str) -> str:
    """The checkout's factory that rebuilds the original model for `--verify` ("" without `--original_repo`)."""
    if args.original_repo is None:
        if head_source == "flags":
            raise VerificationError(
                "`--verify` cannot check head counts given by `--num_attention_heads` / "
                "`--decoder_num_attention_heads`: they are not stored in the weights, and the checkpoint names no "
                "official factory. Pass `--original_repo path/to/LTH14-mar` (the checkout whose models/mar.py built "
                f"this model{', `' + train_args['model'] + '`' if isinstance(train_args.get('model'), str) else ''}) "
                "to compare with the original model, or convert without `--verify`."
            )
        return ""
    if isinstance(train_args.get("model"), str):
        return train_args["model"]
    factories = {preset: factory for factory, preset in OFFICIAL_FACTORIES.items()}
    if preset_name is None:
        raise VerificationError(
            "`--verify --original_repo` needs the factory that built the model: the checkpoint has no `args.model` and "
            "its size is not MAR-B/L/H."
        )
    return factories[preset_name]


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion described by the parsed command-line `args`; returns the output folder."""
    # 1. Check the output folder before any heavy work
    inputs = (args.checkpoint_path, args.vae_path, args.id2label_path)
    check_output_dir(args.output_dir, args.overwrite, inputs)
    dtype = DTYPES[args.dtype]

    # 2. Load the original checkpoint and choose the weights
    checkpoint = load_checkpoint(args.checkpoint_path, trust_checkpoint=args.trust_checkpoint)
    state_dict, weights = select_mar_weights(checkpoint, use_non_ema=args.use_non_ema)
    train_args = checkpoint_args(checkpoint)

    # 3. The VAE (its latent channels split the token width when the checkpoint has no `args`)
    vae_state_dict = vae_config = in_channels = None
    if args.vae_path is not None:
        vae_state_dict = load_original_vae_state_dict(args.vae_path, trust_checkpoint=args.trust_checkpoint)
        vae_config = infer_vae_config(vae_state_dict, norm_num_groups=args.vae_norm_num_groups)
        in_channels = vae_config["latent_channels"]
        if isinstance(train_args.get("vae_embed_dim"), int) and train_args["vae_embed_dim"] != in_channels:
            raise ValueError(
                f"The VAE has {in_channels} latent channels but the MAR checkpoint was trained on "
                f"{train_args['vae_embed_dim']} (`args.vae_embed_dim`); is `--vae_path` the right VAE?"
            )

    # 4. Configs (head counts: see `attention_heads`) and models
    encoder_heads, decoder_heads, head_source = attention_heads(
        state_dict, train_args, args.model_type, args.num_attention_heads, args.decoder_num_attention_heads
    )
    transformer_config, head_config, preset_name = infer_configs_from_checkpoint(
        state_dict, train_args, args.model_type, encoder_heads, in_channels, decoder_heads
    )
    factory = _original_factory(args, train_args, preset_name, head_source) if args.verify else ""
    transformer, head = build_mar_models(state_dict, transformer_config, head_config, dtype=dtype)
    vae = None
    if vae_state_dict is not None:
        if vae_config["latent_channels"] != transformer.config.in_channels:
            raise ValueError(
                f"The VAE has {vae_config['latent_channels']} latent channels but the MAR tokens have "
                f"{transformer.config.in_channels}; is `--vae_path` the right VAE?"
            )
        vae_config["sample_size"] = transformer.config.sample_size * vae_scale_factor(vae_config)
        vae = build_vae(vae_state_dict, vae_config, dtype=dtype)
    else:
        print("note: no `--vae_path`: the folder holds latent tokens without a decoder (output_type='latent').")

    # 5. The pipeline (recommended sampling settings in its config; MAR's tokens are always VAE latents), its card
    sampling = recommended_sampling(preset_name, train_args, transformer.num_tokens)
    id2label = load_id2label(args.id2label_path, transformer.config.num_classes)
    pipeline = MARPipeline(
        transformer, head, MARDDPMScheduler(), vae=vae, id2label=id2label, sampling=sampling, token_space="latent"
    )
    epoch = checkpoint.get("epoch") if isinstance(checkpoint.get("epoch"), int) else None
    card = conversion_model_card(
        transformer,
        head,
        preset_name,
        sampling,
        weights,
        checkpoint_name=Path(args.checkpoint_path).name,
        vae_name=Path(args.vae_path).name if args.vae_path else None,
        dtype=args.dtype,
        repo_id=args.repo_id,
        epoch=epoch,
    )

    # 6. Save atomically, verifying the written folder (and the original's outputs) before it gets its name
    verified = []

    def verify(folder: Path) -> None:
        verify_pipeline_folder(folder, pipeline, dtype, use_safetensors=args.safe_serialization)
        verified.append("the folder reloads to the converted weights and outputs")
        if args.original_repo is not None:
            stored = {key: value.to(dtype).float() for key, value in state_dict.items()}
            original = build_original_mar(
                args.original_repo, factory, stored, transformer_config, head_config, train_args.get("vae_stride", 16)
            )
            diffs = verify_against_original(pipeline, original)
            verified.append(
                f"the transformer and diffusion head reproduce the original `{factory}` of {args.original_repo} "
                f"(max differences {', '.join(f'{name} {diff:.1e}' for name, diff in diffs.items())})"
            )

    output_dir = save_pipeline_folder(
        pipeline,
        card,
        args.output_dir,
        safe_serialization=args.safe_serialization,
        overwrite=args.overwrite,
        inputs=inputs,
        check=verify if args.verify else None,
    )
    num_parameters = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in head.parameters())
    print(
        f"Converted `{weights}` of {args.checkpoint_path} ({PRESET_TITLES.get(preset_name, 'custom size')}, "
        f"{num_parameters:,} parameters, {args.dtype}{', with VAE' if vae is not None else ', no VAE'}) "
        f"to {output_dir}{' (verified)' if args.verify else ''}."
    )
    if verified:
        print("Verified: " + "; ".join(verified) + ".")
    if args.push_to_hub:
        url = push_folder_to_hub(output_dir, args.repo_id, private=args.private, token=args.hub_token)
        print(f"Uploaded to {url}")
    return output_dir


def main(argv: list[str] | None = None) -> int:
    """The command line; exit codes: 0 done, 2 bad input (nothing written), 1 a failure while running. Errors are one
    line on stderr, `convert_mar_to_diffusers.py: error: ...` (`conversion/command_line.py`)."""
    return run_converter(PROG, parse_args, convert, argv)


if __name__ == "__main__":
    sys.exit(main())
