"""VARPipeline: class-conditional image generation by next-scale prediction (VAR, Tian et al. 2024).

The image is a pyramid of codebook indices from 1x1 to 16x16 (`patch_nums`). At each scale the transformer gives
the logits of all of the scale's tokens at once from the class and the scales before it (kept in its KV cache);
they are guided, filtered (top-k, top-p) and sampled, and the VQ-VAE adds the scale's codes to the running latent
`f_hat` and gives the next scale's input. The last `f_hat` is decoded. Sampling follows FoundationVision/VAR (commit
78b9539) `models/var.py` `autoregressive_infer_cfg` and `models/helpers.py` (`sample_with_top_k_top_p_`,
`gumbel_softmax_with_rng`), and draws from `generator` as the original draws from its `rng` (docs/var.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from diffusers_mar.models.transformer_var import VARTransformer2DModel
from diffusers_mar.models.vq_model_var import VARVQModel
from diffusers_mar.pipelines.pipeline_token_generator import TokenGeneratorPipeline
from diffusers_mar.pipelines.sampling_settings import VAR_PAPER_SAMPLING, VAR_SAMPLING_KEYS, check_sampling_settings
from diffusers_mar.pipelines.schedules import prepare_class_labels

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_mar import VARPipeline

        >>> pipe = VARPipeline.from_pretrained("path/to/var-d16")
        >>> # guidance_scale = 1 + the original's cfg; other settings come from the folder (`pipe.sampling_defaults`).
        >>> generator = torch.Generator().manual_seed(0)
        >>> images = pipe(class_labels=[207, 360], guidance_scale=5.0, generator=generator).images
        ```
"""


def guide_logits(logits: torch.Tensor, guidance_scale: float, ratio: float) -> torch.Tensor:
    """One scale's guided logits `(B, n, V)` from the rows `[cond; uncond]` `(2B, n, V)`: VAR's `(1 + t) cond -
    t uncond` with `t = (guidance_scale - 1) * ratio`, i.e. `uncond + s (cond - uncond)` at `s = 1 + t`."""
    cond, uncond = logits.chunk(2)
    t = (guidance_scale - 1) * ratio  # the original's `cfg * ratio`, with guidance_scale = 1 + cfg
    return (1 + t) * cond - t * uncond


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p filtering of logits `(B, n, V)` (-inf where removed); 0 turns either off."""
    # As in FoundationVision/VAR models/helpers.py sample_with_top_k_top_p_ (which filters in place): top-k keeps the
    # ties of the k-th largest; top-p removes the smallest logits whose softmax sums to at most 1 - top_p, never the
    # largest.
    if top_k > 0:
        kth_largest = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth_largest, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_index = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(-1, sorted_index, remove), -torch.inf)
    return logits


def _per_image(draw: Callable, generator: torch.Generator | list[torch.Generator] | None, batch_size: int):
    """`draw(rows, generator)` once for the batch with one generator, or once per image with a list of them."""
    if isinstance(generator, list):
        return torch.cat([draw(slice(i, i + 1), g) for i, g in enumerate(generator)])
    return draw(slice(0, batch_size), generator)


def sample_indices(
    logits: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None
) -> torch.LongTensor:
    """One codebook index per token `(B, n)` from filtered logits `(B, n, V)`: VAR's one `torch.multinomial` over the
    batch's rows, or one per image with a list of generators. Draws on the generator's device."""
    probs = logits.softmax(dim=-1)

    def draw(rows: slice, g: torch.Generator | None) -> torch.Tensor:
        rows_probs = probs[rows]
        device = g.device if g is not None else probs.device
        index = torch.multinomial(rows_probs.reshape(-1, probs.shape[-1]).to(device), 1, replacement=True, generator=g)
        return index.view(rows_probs.shape[:2]).to(probs.device)

    return _per_image(draw, generator, probs.shape[0])


def gumbel_softmax(
    logits: torch.Tensor, ratio: float, generator: torch.Generator | list[torch.Generator] | None
) -> torch.Tensor:
    """VAR's `more_smooth` codes: weights over the codebook `(B, n, V)`, a Gumbel softmax of the filtered logits
    times `1 + ratio` at temperature `max(0.27 (1 - 0.95 ratio), 0.005)` (`ratio`: the scale's place in [0, 1])."""
    # As in FoundationVision/VAR models/var.py autoregressive_infer_cfg and models/helpers.py gumbel_softmax_with_rng.
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)

    def draw(rows: slice, g: torch.Generator | None) -> torch.Tensor:
        shape = logits[rows].shape
        device = g.device if g is not None else logits.device
        return torch.empty(shape, device=device).exponential_(generator=g).to(logits.device)

    gumbels = -_per_image(draw, generator, logits.shape[0]).log()
    return ((logits.mul(1 + ratio) + gumbels) / tau).softmax(dim=-1)


def edit_keep_masks(mask: torch.Tensor, patch_nums: list[int]) -> list[torch.Tensor]:
    """Where each scale keeps the known tokens `(B, 1, p, p)` (True = keep), from the token mask of the last scale
    `(B, p_last**2)` (1 = generate): bilinear downsampling of the keep mask, kept above 0.5; every token of the
    scales with at most 3 tokens is kept."""
    # As in FoundationVision/VAR demo_zero_shot_edit.ipynb replace_embedding (its edit_mask is our 1 - mask).
    side = patch_nums[-1]
    keep = (1 - mask.float()).view(-1, 1, side, side)
    masks = []
    for p in patch_nums:
        scale_keep = F.interpolate(keep, size=(p, p), mode="bilinear", align_corners=False).gt(0.5)
        masks.append(torch.ones_like(scale_keep) if p * p <= 3 else scale_keep)
    return masks


class VARPipeline(TokenGeneratorPipeline):
    r"""
    Pipeline for class-conditional image generation with VAR (next-scale prediction).

    This model inherits from [`TokenGeneratorPipeline`] (labels, sampling settings, guidance properties, common
    checks, saving) and [`DiffusionPipeline`] (downloading, saving, running on a particular device, etc.).

    Parameters:
        transformer ([`VARTransformer2DModel`]):
            The next-scale transformer: the logits over the codebook of one scale's tokens (with its KV cache).
        vqvae ([`VARVQModel`]):
            The multi-scale VQ-VAE: its codebook, the running latent `f_hat` between scales and the decoder. Its
            `patch_nums`, codebook size and code channels must be the transformer's.
        id2label (`dict[int, str]`, *optional*):
            Class names, comma-separated synonyms allowed (as `DiTPipeline`), for `get_label_ids`.
        sampling (`dict`, *optional*):
            The recommended sampling settings of the model (keys among `VAR_SAMPLING_KEYS`: `guidance_scale`,
            `top_k`, `top_p`, `more_smooth`), the defaults of `__call__`; saved in `model_index.json`. Keys not given
            take the original's FID setting (guidance 2.5 = cfg 1.5, top-k 900 clipped to the codebook, top-p 0.96,
            no smoothing).
    """

    # The VQ-VAE runs between the transformer's calls at every scale (as a ControlNet in diffusers' pipelines), so it
    # is not in the chain: in the chain it would send the transformer back to the CPU at every scale. Its hook loads
    # it at its first use; both leave the device at the end of the call (`maybe_free_model_hooks`).
    model_cpu_offload_seq = "transformer"
    # "latents": the running latent `f_hat` after the scale (B, C, h, w); "indices": the scale's tokens (B, n);
    # "logits": the distribution they were drawn from, guided and filtered (B, n, V).
    _callback_tensor_inputs = ["latents", "indices", "logits"]
    _default_callback_tensor_inputs = ["latents"]
    _transformer_class = VARTransformer2DModel
    sampling_keys = VAR_SAMPLING_KEYS
    paper_sampling = VAR_PAPER_SAMPLING

    def __init__(
        self,
        transformer: VARTransformer2DModel,
        vqvae: VARVQModel,
        id2label: dict[int, str] | dict[str, str] | None = None,
        sampling: dict | None = None,
    ):
        super().__init__()
        self.check_transformer(transformer)
        if not isinstance(vqvae, VARVQModel):
            raise ValueError(f"`vqvae` must be a VARVQModel, got a {type(vqvae).__name__}.")
        config = transformer.config
        ours = (list(config.patch_nums), config.vocab_size, config.vq_embed_dim)
        theirs = (list(vqvae.config.patch_nums), vqvae.config.num_vq_embeddings, vqvae.vq_embed_dim)
        if ours != theirs:
            raise ValueError(
                "`vqvae` does not belong to `transformer`: (patch_nums, codebook size, code channels) are "
                f"{theirs} for the VQ-VAE and {ours} for the transformer."
            )
        self.register_modules(transformer=transformer, vqvae=vqvae)
        self.register_labels_and_sampling(id2label, sampling)
        self.vae_scale_factor = vqvae.config.sample_size // vqvae.config.patch_nums[-1]
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def sampling_limits(self) -> dict:
        return {"vocab_size": self.transformer.config.vocab_size}

    def check_inputs(
        self,
        class_labels: list[int],
        settings: dict,
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        indices: list[torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Validate the arguments of `__call__`."""
        self.check_common_inputs(class_labels, generator, output_type, callback_on_step_end_tensor_inputs)
        check_sampling_settings(settings, keys=self.sampling_keys, **self.sampling_limits())
        if (indices is None) != (mask is None):
            raise ValueError("`indices` and `mask` go together (the known tokens and where to keep them); got one.")
        if mask is None:
            return
        batch_size, patch_nums = len(class_labels), self.transformer.config.patch_nums
        vocab_size = self.transformer.config.vocab_size
        last = patch_nums[-1] ** 2
        if (
            not isinstance(mask, torch.Tensor)
            or tuple(mask.shape) != (batch_size, last)
            or not ((mask == 0) | (mask == 1)).all()
        ):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"`mask` must be a ({batch_size}, {last}) tensor of 0 (keep the token of `indices`) and 1 (generate) "
                f"over the last scale's tokens; got {got}."
            )
        shapes = [(batch_size, p * p) for p in patch_nums]
        if (
            not isinstance(indices, (list, tuple))
            or [tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in indices] != shapes
            or any(t.dtype not in (torch.int32, torch.int64) or t.min() < 0 or t.max() >= vocab_size for t in indices)
        ):
            raise ValueError(
                f"`indices` must be a list of {len(patch_nums)} integer tensors of shapes {shapes} with values in "
                f"[0, {vocab_size}) (the tokens of every scale, `vqvae.encode(images).indices`); got {indices!r}."
            )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | list[int] | torch.Tensor,
        guidance_scale: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        more_smooth: bool | None = None,
        num_images_per_label: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        indices: list[torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images of the given classes, one scale of tokens at a time.

        The four sampling arguments (`guidance_scale` to `more_smooth`) default to `pipe.sampling_defaults`: those
        stored in the folder, else the original's FID setting (guidance 2.5, top-k 900 clipped to the codebook,
        top-p 0.96, no smoothing).

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`):
                One class id per image, in `[0, num_classes]`; `num_classes` means unconditional. Names: map them with
                `pipe.get_label_ids(...)`.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance `uncond + s (cond - uncond)`, rising linearly over the scales: at scale `k` of
                `K`, `s = 1 + (guidance_scale - 1) * k / (K - 1)` (1 at the first scale). The original's `cfg` is
                `guidance_scale - 1` (its `(1 + t) cond - t uncond` with `t = cfg * k / (K - 1)`): its FID setting
                `cfg=1.5` is `guidance_scale=2.5`. 1.0 disables guidance and the doubled batch (the original computes
                the unconditional half and weights it by 0: the same logits).
            top_k (`int`, *optional*):
                Keep the `top_k` largest logits of each token (with their ties); 0 keeps all.
            top_p (`float`, *optional*):
                Keep the smallest set of largest logits whose probability exceeds `top_p` (nucleus); 0 keeps all.
            more_smooth (`bool`, *optional*):
                The original's smoothing for visual quality (not for FID): each scale's codes are a Gumbel-softmax mix
                of the codebook (temperature falling from 0.27 with the scale) instead of the sampled entries.
            num_images_per_label (`int`, *optional*, defaults to 1):
                Images per class label, next to each other in the output (diffusers' `num_images_per_prompt`).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                All randomness. One generator draws for the batch exactly as the original's `rng` does
                (`autoregressive_infer_cfg(g_seed=seed)` is `generator=torch.Generator(device).manual_seed(seed)`, on
                the device of the original's `rng`). A list holds one generator per image (`len(class_labels) *
                num_images_per_label`): each image then equals the image generated alone with its generator.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"` (the last latent `f_hat`, `(B, vq_embed_dim, h, w)`).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after each scale as `callback_on_step_end(pipe, scale, timestep, callback_kwargs)`, with
                `timestep` the number of tokens still to make. It may return a new `"latents"` (the running `f_hat`,
                which the next scales read), set `pipe._interrupt = True` to stop (the `f_hat` so far is decoded), and
                set `pipe._guidance_scale` (a guided call's scale from the next scale on).
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*):
                Among `"latents"` (`f_hat` after the scale, `(B, vq_embed_dim, h, w)`), `"indices"` (the scale's
                tokens `(B, n)`) and `"logits"` (the guided and filtered logits they were drawn from, `(B, n, V)`).
                Defaults to `["latents"]`.
            indices (`list[torch.Tensor]`, *optional*):
                Known tokens of every scale, `(B, patch_nums[k] ** 2)` each (`vqvae.encode(images).indices`), for
                editing with `mask` (`VARInpaintPipeline` makes both from images).
            mask (`torch.Tensor` of shape `(batch, patch_nums[-1] ** 2)`, *optional*):
                1 = generate, 0 = keep the token of `indices`, over the last scale. At each scale the keep mask is
                downsampled (bilinear, kept above 0.5; scales of at most 3 tokens are kept whole) and the kept tokens
                replace the sampled ones, as the original's zero-shot editing.

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs
        settings = self.resolve_sampling_settings(
            guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, more_smooth=more_smooth
        )
        class_labels = prepare_class_labels(class_labels, num_images_per_label, self.transformer.config.num_classes)
        callback_inputs = self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_inputs(class_labels, settings, generator, output_type, indices, mask, callback_inputs)
        device = self._execution_device
        patch_nums, batch_size = self.transformer.config.patch_nums, len(class_labels)
        self._interrupt = False
        self._num_timesteps = len(patch_nums)

        # 2. Class labels; the unconditional half follows the conditional one under guidance
        labels = self.prepare_labels(class_labels, settings["guidance_scale"], device)

        # 3. Editing: where each scale keeps the known tokens
        keep = edit_keep_masks(mask.to(device), patch_nums) if mask is not None else None

        # 4. Next-scale loop: the transformer's logits of a scale, guided, filtered and sampled; the VQ-VAE adds the
        # scale's codes to the running latent f_hat and gives the next scale's input
        kv_cache = self.transformer.make_kv_cache(len(labels))
        side = patch_nums[-1]
        f_hat = torch.zeros(batch_size, self.transformer.config.vq_embed_dim, side, side, device=device)
        scale_input = None  # the first scale's tokens come from the class
        for scale, p in enumerate(self.progress_bar(patch_nums)):
            if self.interrupt:
                break
            ratio = scale / (len(patch_nums) - 1)
            logits = self.transformer(labels, scale_input, kv_cache=kv_cache, return_dict=False)[0].float()
            if self._guided:
                logits = guide_logits(logits, self._guidance_scale, ratio)  # (B, n, V)
            logits = filter_logits(logits, settings["top_k"], settings["top_p"])
            scale_indices = sample_indices(logits, generator)  # (B, n); drawn with more_smooth too, as the original
            codes = gumbel_softmax(logits, ratio, generator) if settings["more_smooth"] else scale_indices
            embeddings = self.vqvae.embed(codes.to(self.vqvae.dtype) if codes.is_floating_point() else codes)
            if keep is not None:
                scale_indices = torch.where(keep[scale].flatten(1), indices[scale].to(device), scale_indices)
                embeddings = torch.where(keep[scale], self.vqvae.embed(indices[scale].to(device)), embeddings)
            f_hat, next_map = self.vqvae.next_scale_input(scale, f_hat, embeddings)  # (B, C, h, w), (B, C, p', p')

            if callback_on_step_end is not None:
                tensors = {"latents": f_hat, "indices": scale_indices, "logits": logits}
                callback_kwargs = {name: tensors[name] for name in callback_inputs}
                remaining = self.transformer.num_tokens - self.transformer.scale_starts[scale] - p * p
                outputs = callback_on_step_end(self, scale, remaining, callback_kwargs) or {}
                if "latents" in outputs:  # written back (or changed in place): the next scale reads it
                    f_hat = outputs["latents"].to(f_hat)
                    if next_map is not None:  # as VARVQModel.next_scale_input
                        next_map = F.interpolate(f_hat, size=next_map.shape[-2:], mode="area")
            if next_map is not None:
                scale_input = next_map.flatten(2).transpose(1, 2)  # (B, n', C)
                scale_input = torch.cat([scale_input, scale_input]) if self._guided else scale_input

        # 5. Decode, with the loop's tensors released first: the KV cache (1.4 GB for d16 at batch 8) would otherwise
        # stay alive under the decoder's peak (docs/benchmarks.md, bench_var.py)
        kv_cache = logits = codes = embeddings = scale_input = next_map = None
        return self.decode_output(f_hat, output_type, return_dict=return_dict)

    def decode_output(
        self, latents: torch.Tensor, output_type: str, generator: object = None, return_dict: bool = True
    ) -> ImagePipelineOutput | tuple:
        """The running latent `f_hat` `(B, vq_embed_dim, h, w)` -> the call's output of `output_type` (the same
        signature as the other families' `decode_output`, so that callers such as the demo decode any family;
        `generator` is unused: the decoder does not sample)."""
        if output_type == "latent":
            image = latents
        else:
            image = self.vqvae.decode_latents(latents.to(self.vqvae.dtype)).sample  # [-1, 1]
            image = self.image_processor.postprocess(image.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
