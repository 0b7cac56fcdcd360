"""What the converter writes besides the weights: the recommended sampling settings and the model card.

The settings go into the pipeline's config (`MARPipeline(..., sampling=...)`, saved in `model_index.json`); the card is
the package's one template (`diffusers_mar.pipelines.model_card`), filled with the conversion's facts and, for
MAR-B/L/H, the paper's numbers.
"""

from __future__ import annotations

from huggingface_hub import ModelCard

from diffusers_mar import MAR_PRESETS, MARDiffusionHead, MARTransformer2DModel
from diffusers_mar.pipelines.model_card import make_model_card
from diffusers_mar.pipelines.sampling_settings import check_sampling_settings, resolve_sampling_settings

PRESET_TITLES = {"mar-base": "MAR-B", "mar-large": "MAR-L", "mar-huge": "MAR-H"}


def recommended_sampling(
    preset_name: str | None, args: dict, num_tokens: int, num_train_timesteps: int = 1000
) -> dict:
    """The `MARPipeline.__call__` defaults recommended for a converted model (every key of `SAMPLING_KEYS`).

    Presets use the original README's evaluation settings (guidance 2.9 / 3.0 / 3.2, linear, temperature 1.0) with the
    paper's step counts; other models take the `cfg`, `cfg_schedule`, `temperature`, `num_iter` and
    `num_sampling_steps` their checkpoint was trained with. A value the model cannot use falls back to the paper's,
    clipped to the model (`resolve_sampling_settings`).
    """
    from_args = {
        "num_inference_steps": args.get("num_iter"),
        "num_diffusion_steps": int(args["num_sampling_steps"])
        if str(args.get("num_sampling_steps")).isdigit()
        else None,
        "guidance_scale": args.get("cfg"),
        "guidance_schedule": args.get("cfg_schedule"),
        "temperature": args.get("temperature"),
    }
    if preset_name is not None:
        from_args = {"num_diffusion_steps": from_args["num_diffusion_steps"], **MAR_PRESETS[preset_name]["sampling"]}
    if isinstance(from_args.get("num_inference_steps"), int):
        from_args["num_inference_steps"] = max(1, min(from_args["num_inference_steps"], num_tokens))
    usable = {}
    for key, value in from_args.items():
        try:
            usable.update(check_sampling_settings({key: value}, num_tokens, num_train_timesteps))
        except ValueError:
            pass  # missing or unusable in the checkpoint's args: the paper's value
    return resolve_sampling_settings(usable, num_tokens, num_train_timesteps)


def conversion_model_card(
    transformer: MARTransformer2DModel,
    diffusion_head: MARDiffusionHead,
    preset_name: str | None,
    sampling: dict,
    weights: str,
    checkpoint_name: str,
    vae_name: str | None,
    dtype: str = "fp32",
    repo_id: str | None = None,
    epoch: int | None = None,
) -> ModelCard:
    """The `README.md` of a converted folder, from the package's model-card template.

    `weights` is `"model_ema"` or `"model"`; `checkpoint_name` / `vae_name` name the source files.
    """
    config = transformer.config
    title = PRESET_TITLES.get(preset_name, "MAR (custom size)")
    num_parameters = sum(p.numel() for p in transformer.parameters()) + sum(
        p.numel() for p in diffusion_head.parameters()
    )
    description = (
        f"{title}, a model of *Autoregressive Image Generation without Vector Quantization* (Li, Tian, Li, Deng, He, "
        "NeurIPS 2024): class-conditional image generation by masked autoregression over continuous VAE latent "
        "tokens, each token sampled by a small per-token diffusion MLP. Converted from the "
        f"[LTH14/mar](https://github.com/LTH14/mar) checkpoint `{checkpoint_name}` into a diffusers-mar `MARPipeline` "
        "folder."
    )
    if vae_name is None:
        description += (
            '\n\nThis folder has no VAE: its tokens are VAE latents (`token_space` "latent"), so it samples with '
            '`output_type="latent"` only; add the KL-16 `AutoencoderKL` as `vae` to decode images.'
        )
    details = {
        "Source": f"LTH14/mar `{checkpoint_name}`" + (f", epoch {epoch}" if epoch is not None else ""),
        "Weights": "EMA (`model_ema`), the ones the paper's results are measured with"
        if weights == "model_ema"
        else "training, non-EMA (`model`); the paper's results use the EMA weights, which sample much better",
        "Architecture": (
            f"{config.num_layers}+{config.decoder_num_layers or config.num_layers} transformer blocks "
            f"({transformer.encoder_dim} / {transformer.decoder_dim} wide, {config.num_attention_heads} / "
            f"{config.decoder_num_attention_heads or config.num_attention_heads} heads), a "
            f"{diffusion_head.config.num_res_blocks}x{diffusion_head.config.model_channels} diffusion MLP"
        ),
        "Parameters": f"{num_parameters:,} (transformer + diffusion head)",
        "Tokens": f"{transformer.num_tokens} latent tokens of {transformer.token_dim} values, {config.num_classes} classes",
        "VAE": f"`{vae_name}` as a diffusers `AutoencoderKL`" if vae_name else 'none (`output_type="latent"` only)',
        "Stored dtype": dtype,
    }
    if preset_name is not None:
        paper = MAR_PRESETS[preset_name]["paper"]
        sections = (
            "## Results in the paper\n\n"
            "ImageNet 256x256, FID-50K and Inception Score, `num_inference_steps=256`, EMA weights (the paper and the "
            "original README):\n\n"
            "| model | params | FID (no guidance) | IS (no guidance) | FID (guidance) | IS (guidance) |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            f"| {title} | {paper['num_parameters'] / 1e6:.1f}M | {paper['fid_no_guidance']} | "
            f"{paper['is_no_guidance']} | {paper['fid']} | {paper['is']} |\n\n"
            "These numbers are the paper's, not measured on this conversion. Without guidance the original uses "
            "`guidance_scale=1.0, temperature=0.95`."
        )
    else:
        sections = (
            "## Results\n\nThis is not one of the paper's MAR-B/L/H sizes, so there are no published numbers for it."
        )
    return make_model_card(
        title=f"{title} for diffusers",
        description=description,
        details=details,
        sampling=sampling,
        repo_id=repo_id or "path/to/this-folder",
        sections=sections,
        example_label=207 if config.num_classes == 1000 else 0,
        datasets=["imagenet-1k"] if config.num_classes == 1000 else None,
    )
