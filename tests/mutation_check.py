"""Our own mutation check: does the suite catch wrong code where it matters?

Each entry of `MUTATIONS` is a one-line change that breaks a piece of the numerics or of the bookkeeping that no
original code guards on its own (guidance in every family, the mask and outer schedules, the scheduler's temperature
and variance, the KV cache, orders, the FID / IS / precision-recall formulas, the EMA and learning-rate schedule, the
converter's key map, inpainting's keep-mask, the demo's frames and server, ...). The script applies each one to a
temporary copy of the repository and runs the tests that should catch it; a mutation that leaves them passing
*survives*, and a survivor is a gap in the suite.

    python tests/mutation_check.py                 # every mutation, report and exit 1 if any survives
    python tests/mutation_check.py --list          # the names
    python tests/mutation_check.py --only ar-guidance-halves fid-cross-term --jobs 2

Run it before you stop; `tests/test_mutation_check.py` keeps the list valid (each `old` line is found exactly once),
so that a refactor that moves a line updates the list with it. Parity fixtures are found as the suite finds them
(`MAR_FIXTURES_DIR`, else `../shared/fixtures/mar_tiny` beside the checkout) and passed on to the copies.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # a substring found exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids or paths that must catch it


# Guidance against a hand computation with a stub head, for MAR and AR (there is no original AR to compare with, and
# MAR's parity trace compares tokens of ~1e4 relatively, where the variance's part is below its tolerance).
STUB_GUIDANCE_TEST = (
    "tests/pipelines/test_pipeline_common_mar.py::test_guidance_halves_and_guided_noise_with_a_stub_head"
)
VAR_TESTS = "tests/models/test_models_transformer_var.py"

VAR_VQ_TESTS = "tests/models/test_models_vq_model_var.py"
VAR_LOSS_TESTS = "tests/training/test_var_loss.py"
VQVAE_TRAIN_TESTS = "tests/training/test_train_vqvae.py"
VAR_PIPELINE = "diffusers_mar/pipelines/pipeline_var.py"
VAR_PIPELINE_TESTS = "tests/pipelines/test_pipeline_var.py"
VAR_INPAINT_TESTS = "tests/pipelines/test_pipeline_var_inpaint.py"

MUTATIONS = [
    # Guidance, in every family
    Mutation(
        "var-release-kv-cache",
        "diffusers_mar/pipelines/pipeline_var.py",
        "kv_cache = logits = codes = embeddings = scale_input = next_map = None",
        "logits = codes = embeddings = scale_input = next_map = None",
        ("tests/pipelines/test_pipeline_var.py",),
    ),
    Mutation(
        "var-converter-top-k-clip",
        "conversion/convert_var_to_diffusers.py",
        'sampling["top_k"] = min(sampling["top_k"], vocab_size)',
        'sampling["top_k"] = sampling["top_k"]',
        ("tests/conversion/test_convert_var_to_diffusers.py",),
    ),
    Mutation(
        "var-preset-shared-adaln",
        "diffusers_mar/configs.py",
        '"shared_adaln": depth == 36,',
        '"shared_adaln": False,',
        ("tests/conversion/test_convert_var_to_diffusers.py",),
    ),
    Mutation(
        "guidance-direction",
        "diffusers_mar/pipelines/schedules.py",
        "eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])",
        "eps = cond[:, :channels] + scale * (uncond[:, :channels] - cond[:, :channels])",
        (STUB_GUIDANCE_TEST, "tests/pipelines/test_pipeline_mar.py", "tests/pipelines/test_pipeline_ar.py"),
    ),
    Mutation(
        "guidance-keeps-unconditional-variance",
        "diffusers_mar/pipelines/schedules.py",
        "model_output = torch.cat([eps, cond[:, channels:]], dim=1)",
        "model_output = torch.cat([eps, uncond[:, channels:]], dim=1)",
        (STUB_GUIDANCE_TEST, "tests/pipelines/test_pipeline_mar.py"),
    ),
    Mutation(
        "guidance-linear-schedule",
        "diffusers_mar/pipelines/schedules.py",
        "return (1 + (guidance_scale - 1) * (num_tokens - mask_len) / num_tokens).tolist()",
        "return (1 + (guidance_scale - 1) * mask_len / num_tokens).tolist()",
        ("tests/pipelines/test_pipeline_mar.py",),
    ),
    Mutation(
        "ar-guidance-halves",  # the doubling of every family, in the shared base (issue 24)
        "diffusers_mar/pipelines/pipeline_token_generator.py",
        "labels = torch.cat([labels, torch.full_like(labels, self.transformer.config.num_classes)])",
        "labels = torch.cat([torch.full_like(labels, self.transformer.config.num_classes), labels])",
        (STUB_GUIDANCE_TEST, "tests/pipelines/test_pipeline_ar.py", "tests/pipelines/test_pipeline_mar.py"),
    ),
    Mutation(
        "guidance-constant-schedule",
        "diffusers_mar/pipelines/schedules.py",
        "return [float(np.float32(guidance_scale))] * len(mask_lens)",
        "return [1.0] * len(mask_lens)",
        ("tests/pipelines/test_pipeline_mar.py",),
    ),
    # Compilation: what the pipeline calls is compiled
    Mutation(
        "compile-head-methods",
        "diffusers_mar/models/diffusion_head_mar.py",
        "setattr(self, name, torch.compile(getattr(type(self), name).__get__(self), *args, **kwargs))",
        "setattr(self, name, getattr(type(self), name).__get__(self))",
        ("tests/pipelines/test_pipeline_common_mar.py::test_compiling_each_model_compiles_what_the_pipeline_calls",),
    ),
    # The mask and outer schedules, orders
    Mutation(
        "mask-schedule-cosine",
        "diffusers_mar/pipelines/schedules.py",
        "target = np.floor(num_tokens * np.cos(math.pi / 2.0 * (step + 1) / num_inference_steps))",
        "target = np.floor(num_tokens * np.sin(math.pi / 2.0 * (step + 1) / num_inference_steps))",
        ("tests/pipelines/test_pipeline_mar.py",),
    ),
    Mutation(
        "mask-schedule-clamp",
        "diffusers_mar/pipelines/schedules.py",
        "unknown = int(max(1, min(unknown - 1, target)))",
        "unknown = int(max(1, min(unknown, target)))",
        ("tests/pipelines/test_pipeline_mar.py",),
    ),
    Mutation(
        "mask-by-order",
        "diffusers_mar/pipelines/schedules.py",
        "return mask.scatter(1, orders[:, orders.shape[1] - num_unknown :], 1.0)",
        "return mask.scatter(1, orders[:, :num_unknown], 1.0)",
        ("tests/pipelines/test_pipeline_mar.py", "tests/training/test_mar_loss.py"),  # sampling's and training's
    ),
    Mutation(
        "orders-from-original",
        "diffusers_mar/pipelines/orders.py",
        "return orders.flip(-1)",
        "return orders",
        ("tests/pipelines/test_pipeline_mar.py", "tests/training/test_mar_loss.py"),  # the parity replays
    ),
    Mutation(
        "raster-order",
        "diffusers_mar/pipelines/orders.py",
        "return torch.arange(num_tokens).expand(batch_size, -1)",
        "return torch.arange(num_tokens - 1, -1, -1).expand(batch_size, -1)",
        ("tests/pipelines/test_fast_sampling_mar.py",),
    ),
    Mutation(
        "inpaint-kept-tokens-first",
        "diffusers_mar/pipelines/orders.py",
        "unknown = (mask.to(device).gather(1, orders) != 0).to(torch.uint8)",
        "unknown = (mask.to(device).gather(1, orders) == 0).to(torch.uint8)",
        ("tests/pipelines/test_pipeline_mar_inpaint.py",),
    ),
    Mutation(
        "skeleton-schedule",
        "diffusers_mar/pipelines/orders.py",
        "mask_lens.append(num_tokens - skeleton + unknown)",
        "mask_lens.append(num_tokens - skeleton + unknown - 1)",
        ("tests/pipelines/test_fast_sampling_mar.py",),
    ),
    Mutation(
        "max-outer-steps",
        "diffusers_mar/pipelines/orders.py",
        "return min(high, max(1, num_tokens // tokens_per_step))",
        "return min(high, max(1, num_tokens // tokens_per_step + 1))",
        ("tests/pipelines/test_fast_sampling_mar.py",),
    ),
    Mutation(
        "checkerboard-order",
        "diffusers_mar/pipelines/orders.py",
        "skeleton = ((rows + cols) % 2 == 0).flatten()",
        "skeleton = (rows % 2 == 0).flatten()",
        ("tests/pipelines/test_fast_sampling_mar.py",),
    ),
    # The per-token scheduler
    Mutation(
        "scheduler-temperature",
        "diffusers_mar/schedulers/scheduling_ddpm_mar.py",
        "prev_sample = prev_sample + torch.exp(0.5 * log_variance) * variance_noise * temperature",
        "prev_sample = prev_sample + torch.exp(0.5 * log_variance) * variance_noise",
        ("tests/schedulers/test_scheduler_ddpm_mar.py",),
    ),
    Mutation(
        "scheduler-learned-variance",
        "diffusers_mar/schedulers/scheduling_ddpm_mar.py",
        "log_variance = frac * max_log + (1 - frac) * min_log",
        "log_variance = frac * min_log + (1 - frac) * max_log",
        ("tests/schedulers/test_scheduler_ddpm_mar.py",),
    ),
    Mutation(
        "scheduler-add-noise",
        "diffusers_mar/schedulers/scheduling_ddpm_mar.py",
        "sqrt_one_minus_abar = (1.0 - abar).sqrt().to(original_samples.dtype).reshape(shape)",
        "sqrt_one_minus_abar = (1.0 - abar).to(original_samples.dtype).reshape(shape)",
        ("tests/schedulers/test_scheduler_ddpm_mar.py", "tests/training/test_mar_loss.py"),
    ),
    # The causal AR transformer's KV cache
    Mutation(
        "kv-cache-position",
        "diffusers_mar/models/transformer_ar.py",
        "start, end = kv_cache.length, kv_cache.length + n",
        "start, end = kv_cache.length + 1, kv_cache.length + 1 + n",
        ("tests/models/test_models_transformer_ar.py",),
    ),
    # The VAR transformer: AdaLN, normalised attention, the block-causal mask, the KV cache, the MLP
    Mutation(
        "var-adaln-order",
        "diffusers_mar/models/transformer_var.py",
        "gate_msa, gate_mlp, scale_msa, scale_mlp, shift_msa, shift_mlp = modulation.unbind(2)",
        "scale_msa, scale_mlp, gate_msa, gate_mlp, shift_msa, shift_mlp = modulation.unbind(2)",
        (VAR_TESTS,),
    ),
    Mutation(
        "var-attention-scale-clamp",
        "diffusers_mar/models/transformer_var.py",
        "q = F.normalize(q, dim=-1) * self.log_scale.clamp_max(MAX_LOG_ATTENTION_SCALE).exp()",
        "q = F.normalize(q, dim=-1) * self.log_scale.exp()",
        (VAR_TESTS,),
    ),
    Mutation(
        "var-block-causal-mask",
        "diffusers_mar/models/transformer_var.py",
        "return levels[:, None] >= levels[None, :]",
        "return levels[:, None] <= levels[None, :]",
        (VAR_TESTS,),
    ),
    Mutation(
        "var-kv-cache-position",
        "diffusers_mar/models/transformer_var.py",
        "start, end = kv_cache.length, kv_cache.length + n",
        "start, end = 0, n",
        (VAR_TESTS,),
    ),
    Mutation(
        "var-gelu-tanh",
        "diffusers_mar/models/transformer_var.py",
        'return self.dropout(self.fc2(F.gelu(self.fc1(hidden_states), approximate="tanh")))',
        "return self.dropout(self.fc2(F.gelu(self.fc1(hidden_states))))",
        (VAR_TESTS,),
    ),
    # The demo (issue 27): its live frames, its generators, its inputs and its server
    Mutation(
        "demo-next-tokens-outlined",
        "diffusers_mar/demo/frames.py",
        "made = previous_unknown & ~unknown  # the tokens this step made",
        "made = unknown & ~previous_unknown  # the tokens this step made",
        ("tests/demo/test_frames.py",),
    ),
    Mutation(
        "demo-generator-per-image",
        "diffusers_mar/demo/actions.py",
        "generators = [torch.Generator().manual_seed(request.seed + i) for i in range(request.num_images)]",
        "generators = [torch.Generator().manual_seed(request.seed) for i in range(request.num_images)]",
        ("tests/demo/test_commands.py",),
    ),
    Mutation(
        "demo-upscaled-mask-any-pixel",
        "diffusers_mar/demo/inputs.py",
        "mask = mask.reshape(resolution, factor, resolution, factor).any(axis=(1, 3))",
        "mask = mask.reshape(resolution, factor, resolution, factor).all(axis=(1, 3))",
        ("tests/demo/test_inputs.py",),
    ),
    Mutation(
        "demo-listens-on-localhost",
        "diffusers_mar/demo/security.py",
        '"server_name": host or DEFAULT_HOST,',
        '"server_name": host or "0.0.0.0",',
        ("tests/demo/test_security.py",),
    ),
    # Evaluation metrics
    Mutation(
        "fid-cross-term",
        "diffusers_mar/evaluation/metrics.py",
        "covmean = linalg.sqrtm(sigma_1 @ sigma_2)",
        "covmean = linalg.sqrtm(sigma_1) @ linalg.sqrtm(sigma_2)",
        ("tests/evaluation/test_metrics.py",),
    ),
    Mutation(
        "fid-mean-term",
        "diffusers_mar/evaluation/metrics.py",
        "distance = ((mu_1 - mu_2) ** 2).sum()",
        "distance = abs(mu_1 - mu_2).sum()",
        ("tests/evaluation/test_metrics.py",),
    ),
    Mutation(
        "inception-score-marginal",
        "diffusers_mar/evaluation/metrics.py",
        "log_q = np.log(p.mean(axis=0, keepdims=True))",
        "log_q = np.log(p.mean(axis=1, keepdims=True))",
        ("tests/evaluation/test_metrics.py",),
    ),
    Mutation(
        "precision-ball-radius",
        "diffusers_mar/evaluation/metrics.py",
        "(pairwise_distances(points[i : i + batch_size], centres) <= radii[None, :]).any(axis=1)",
        "(pairwise_distances(points[i : i + batch_size], centres) < radii[None, :]).any(axis=1)",
        ("tests/evaluation/test_metrics.py",),
    ),
    # Training: the loss, the EMA and the learning rate
    Mutation(
        "loss-mask-weighting",
        "training/mar_loss.py",
        "loss = rows.mean() if mask is None else (rows * mask).sum() / mask.sum()",
        "loss = rows.mean() if mask is None else (rows * mask).mean()",
        ("tests/training/test_mar_loss.py",),
    ),
    Mutation(
        "training-mask-from-orders",
        "training/mar_loss.py",
        "return mask_by_order(num_masked, orders)",
        "return mask_by_order(num_masked, orders.flip(1))",
        ("tests/training/test_mar_loss.py",),
    ),
    Mutation(
        "training-mask-count",
        "training/mar_loss.py",
        "num_masked = int(np.ceil(num_tokens * mask_ratio))",
        "num_masked = int(np.floor(num_tokens * mask_ratio))",
        ("tests/training/test_mar_loss.py",),
    ),
    Mutation(
        "rar-annealing",
        "training/ar_loss.py",
        "return 1.0 - (progress - anneal_start) / (anneal_end - anneal_start)",
        "return (progress - anneal_start) / (anneal_end - anneal_start)",
        ("tests/training/test_train_ar.py",),
    ),
    Mutation(
        "ctrl-c-stops",
        "training/launch.py",
        "self.requested = True",
        "self.requested = False",
        ("tests/training/test_train_mar_failure_paths.py",),
    ),
    Mutation(
        "ema-first-step",
        "training/train_mar.py",
        '"update_after_step": -1',
        '"update_after_step": 0',
        ("tests/training/test_train_mar.py",),
    ),
    Mutation(
        "lr-warmup",
        "training/train_mar.py",
        "return base_lr * step / warmup_steps",
        "return base_lr * (step + 1) / warmup_steps",
        ("tests/training/test_train_mar.py",),
    ),
    Mutation(
        "lr-cosine",
        "training/train_mar.py",
        "return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))",
        "return min_lr + (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))",
        ("tests/training/test_train_mar.py",),
    ),
    # The converter's key map
    Mutation(
        "converter-modulation-block-order",
        "conversion/convert_mar_to_diffusers.py",
        'order = sorted(k for k in modulation["weight"] if k >= 0) + [-1]',
        'order = sorted((k for k in modulation["weight"] if k >= 0), reverse=True) + [-1]',
        ("tests/conversion",),
    ),
    Mutation(
        "converter-head-mlp-swap",
        "conversion/convert_mar_to_diffusers.py",
        '("diffloss.net.res_blocks.{i}.mlp.0.", "res_blocks.{i}.linear_1."),',
        '("diffloss.net.res_blocks.{i}.mlp.0.", "res_blocks.{i}.linear_2."),',
        ("tests/conversion",),
    ),
    # The shared base (issue 24): a callback's guidance, the head scheduler's adaptation
    Mutation(
        "callback-guidance-ignored",
        "diffusers_mar/pipelines/pipeline_autoregressive.py",
        "if self._guidance_values[0] != self._guidance_scale:",
        "if False:",
        ("tests/pipelines/test_pipeline_common_mar.py",),
    ),
    Mutation(
        "callback-latents-written-back",
        "diffusers_mar/pipelines/pipeline_autoregressive.py",
        'new_tokens = self.transformer.patchify(callback_outputs["latents"].to(tokens))',
        "new_tokens = tokens",
        ("tests/pipelines/test_pipeline_common_mar.py",),
    ),
    Mutation(
        "karras-leading-adaptation",
        "diffusers_mar/pipelines/head_scheduler.py",
        'scheduler = scheduler.__class__.from_config(scheduler.config, timestep_spacing="leading")',
        "scheduler = scheduler.__class__.from_config(scheduler.config)",
        ("tests/pipelines/test_pipeline_mar.py",),
    ),
    # Inpainting: which tokens are kept
    Mutation(
        "inpaint-keep-mask",
        "diffusers_mar/pipelines/pipeline_mar_inpaint.py",
        "return token_mask_from_pixels((mask >= 0.5).float(), self.token_size, mask_dilation)",
        "return token_mask_from_pixels((mask < 0.5).float(), self.token_size, mask_dilation)",
        ("tests/pipelines/test_pipeline_mar_inpaint.py",),
    ),
    # VAR's multi-scale VQ-VAE against the official fixtures (tests/fixtures/var_tiny)
    Mutation(
        "var-phi-mix",
        "diffusers_mar/models/vq_model_var.py",
        "return hidden_states * (1 - ratio) + conv(hidden_states) * ratio",
        "return hidden_states + conv(hidden_states) * ratio",
        (VAR_VQ_TESTS,),
    ),
    Mutation(
        "var-phi-ticks-float64",  # float32 moves scale 7 of the 256 px schedule to another phi
        "diffusers_mar/models/vq_model_var.py",
        "return [int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales)]",
        "return [int(np.argmin(np.abs(ticks.astype(np.float32) - np.float32(k / (num_scales - 1)))))"
        " for k in range(num_scales)]",
        (VAR_VQ_TESTS,),
    ),
    Mutation(
        "var-teacher-forcing-area",
        "diffusers_mar/models/vq_model_var.py",
        'next_map = F.interpolate(f_hat, size=(side, side), mode="area")',
        'next_map = F.interpolate(f_hat, size=(side, side), mode="bilinear")',
        (VAR_VQ_TESTS,),
    ),
    Mutation(
        "var-converter-qkv-order",
        "conversion/convert_var_to_diffusers.py",
        'for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):',
        'for name, chunk in zip(("to_k", "to_q", "to_v"), value.chunk(3, dim=0)):',
        (VAR_VQ_TESTS,),
    ),
    # VAR training (issue 26): the objective, the optimiser's recipe, the tokenizer's quantiser and restarts
    Mutation(
        "var-label-smoothing",
        "training/var_loss.py",
        "        label_smoothing=label_smoothing,",
        "        label_smoothing=0.0,",
        (VAR_LOSS_TESTS,),
    ),
    Mutation(
        "var-progressive-weight",
        "training/var_loss.py",
        "weights[begin:end] *= min(max(prog_wp, 0.0), 1.0)",
        "weights[:end] *= min(max(prog_wp, 0.0), 1.0)",
        (VAR_LOSS_TESTS,),
    ),
    Mutation(
        "var-no-decay-level-embedding",
        "training/var_loss.py",
        'NO_DECAY_NAMES = ("start_pos_embed", "pos_embed", "level_embedding", "log_scale", "adaln_table")',
        'NO_DECAY_NAMES = ("start_pos_embed", "pos_embed", "log_scale", "adaln_table")',
        (VAR_LOSS_TESTS,),
    ),
    Mutation(
        "var-lr-lin0-plateau",
        "training/var_loss.py",
        'flat = 0.15 if schedule == "lin" else 0.05',
        "flat = 0.15",
        (VAR_LOSS_TESTS, "tests/training/test_train_var.py::test_the_optimiser_follows_the_original_recipe"),
    ),
    Mutation(
        "vq-commitment-on-the-encoder",
        "training/vqvae_loss.py",
        "vq = vq + beta * F.mse_loss(f_hat.detach(), latents.float()) + F.mse_loss(f_hat, detached.float())",
        "vq = vq + beta * F.mse_loss(f_hat, detached.float()) + F.mse_loss(f_hat.detach(), latents.float())",
        (VQVAE_TRAIN_TESTS,),
    ),
    Mutation(
        "vq-restart-dead-codes-only",
        "training/vqvae_loss.py",
        "restarted = dead.nonzero().flatten()",
        "restarted = torch.arange(dead.numel())",
        (VQVAE_TRAIN_TESTS,),
    ),
    # VAR's sampling (pipeline_var.py): guidance, top-k / top-p, the Gumbel codes, the editing masks
    Mutation(
        "var-guidance-direction",
        VAR_PIPELINE,
        "return (1 + t) * cond - t * uncond",
        "return (1 + t) * uncond - t * cond",
        (VAR_PIPELINE_TESTS,),
    ),
    Mutation(
        "var-guidance-mapping",  # guidance_scale = 1 + cfg: taking it for cfg guides one step too far
        VAR_PIPELINE,
        "t = (guidance_scale - 1) * ratio  # the original's",
        "t = guidance_scale * ratio  # the original's",
        (VAR_PIPELINE_TESTS,),
    ),
    Mutation(
        "var-top-k-ties",
        VAR_PIPELINE,
        "logits = logits.masked_fill(logits < kth_largest, -torch.inf)",
        "logits = logits.masked_fill(logits <= kth_largest, -torch.inf)",
        (VAR_PIPELINE_TESTS,),
    ),
    Mutation(
        "var-top-p-threshold",
        VAR_PIPELINE,
        "remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)",
        "remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= top_p",
        (VAR_PIPELINE_TESTS,),
    ),
    Mutation(
        "var-gumbel-temperature",
        VAR_PIPELINE,
        "tau = max(0.27 * (1 - ratio * 0.95), 0.005)",
        "tau = max(0.27 * (1 - ratio), 0.005)",
        (VAR_PIPELINE_TESTS,),
    ),
    Mutation(
        "var-edit-keep-threshold",
        VAR_PIPELINE,
        'scale_keep = F.interpolate(keep, size=(p, p), mode="bilinear", align_corners=False).gt(0.5)',
        'scale_keep = F.interpolate(keep, size=(p, p), mode="bilinear", align_corners=False).ge(0.5)',
        (VAR_INPAINT_TESTS,),
    ),
    # The one-shot GPU table's planning
    Mutation(
        "gpu-table-prediction",
        "benchmarks/bench_gpu.py",
        '            work = row["batch_size"] * row["steps"] * (row["diffusion_steps"] + 4)',
        '            work = row["batch_size"] * row["steps"] * row["diffusion_steps"]',
        ("tests/benchmarks/test_bench_gpu.py",),
    ),
    # --dtype auto
    Mutation(
        "dtype-auto-flags",
        "diffusers_mar/cli/model.py",
        'BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")',
        'BF16_CPU_FLAGS = ("amx_bf16", "avx512f")',
        ("tests/cli/test_cli.py",),
    ),
    # The tokenizer's adversarial term
    Mutation(
        "vqgan-adaptive-weight-inverted",
        "training/vqvae_loss.py",
        "    weight = nll_grad.norm() / (generator_grad.norm() + 1e-4)",
        "    weight = generator_grad.norm() / (nll_grad.norm() + 1e-4)",
        (VQVAE_TRAIN_TESTS,),
    ),
    Mutation(
        "vqgan-hinge-fake-sign",
        "training/vqvae_loss.py",
        "    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())",
        "    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 - logits_fake).mean())",
        (VQVAE_TRAIN_TESTS,),
    ),
    Mutation(
        "vqgan-start-step",
        "training/train_vqvae.py",
        "adversarial = discriminator is not None and global_step >= args.adversarial_start",
        "adversarial = discriminator is not None and global_step > args.adversarial_start",
        (VQVAE_TRAIN_TESTS,),
    ),
    # The validation loss of train_mar.py
    Mutation(
        "validation-disturbs-training-rng",
        "training/train_mar.py",
        "        with torch.random.fork_rng(devices=devices):",
        "        with contextlib.nullcontext():",
        ("tests/training/test_validation.py",),
    ),
    Mutation(
        "validation-in-train-mode",
        "training/train_mar.py",
        "    module.eval()  # no dropout, no label drop: the loss of the class-conditional model",
        "    module.train()",
        ("tests/training/test_validation.py",),
    ),
    Mutation(
        "validation-split-per-seed",
        "training/train_mar.py",
        "torch.randperm(len(labels), generator=torch.Generator().manual_seed(VALIDATION_SEED))",
        "torch.randperm(len(labels))",
        ("tests/training/test_validation.py",),
    ),
    Mutation(
        "var-validation-progressive",
        "training/var_loss.py",
        "prog_si, prog_wp = self.stage if self.training else (-1, 1.0)",
        "prog_si, prog_wp = self.stage",
        (VAR_LOSS_TESTS,),
    ),
    Mutation(
        "int8-quantizes-the-projections",
        "diffusers_mar/quantization.py",
        "    _quantize_children(model, keep=FLOAT32_LINEARS)",
        "    _quantize_children(model)",
        ("tests/test_quantization.py",),
    ),
    Mutation(
        "int8-modulation-wrong-block",
        "diffusers_mar/quantization.py",
        "            return self.blocks[block](y)",
        "            return self.blocks[block - 1](y)",
        ("tests/test_quantization.py",),
    ),
    Mutation(
        "int8-save-not-refused",
        "diffusers_mar/pipelines/pipeline_token_generator.py",
        '        quantized = [name for name, model in self.components.items() if getattr(model, "int8_quantized", False)]',
        "        quantized = []",
        ("tests/test_quantization.py",),
    ),
    Mutation(
        "dtype-auto-no-int8",
        "diffusers_mar/cli/model.py",
        '    if "avx2" in flags and "x86" in torch.backends.quantized.supported_engines:',
        "    if False:",
        ("tests/cli/test_cli.py",),
    ),
    Mutation(
        "bench-sampling-int8-not-quantized",
        "benchmarks/bench_sampling.py",
        '    return quantize_int8(pipe) if args.dtype == "int8" else pipe',
        "    return pipe",
        ("tests/benchmarks/test_bench_sampling.py",),
    ),
    Mutation(
        "bench-sampling-in-process-same-order",
        "benchmarks/bench_sampling.py",
        'for name in ("official", "ours") if repeat % 2 == 0 else ("ours", "official"):',
        'for name in ("official", "ours"):',
        ("tests/benchmarks/test_bench_sampling.py",),
    ),
    Mutation(
        "bench-sampling-cache-intervals-dropped",
        "benchmarks/benchmarking_utils.py",
        "    call |= ours_cache_arguments(args)",
        "    pass",
        ("tests/benchmarks/test_bench_sampling.py",),
    ),
    Mutation(
        "eval-dtype-int8-quantizes-the-reference",
        "benchmarks/eval_dtype_digits.py",
        "            copies[dtype] = quantize_int8(copy.deepcopy(pipe))",
        "            copies[dtype] = quantize_int8(pipe)",
        ("tests/benchmarks/test_eval_dtype_digits.py",),
    ),
    Mutation(
        "digits-quality-frechet-rule-off",
        "benchmarks/benchmarking_utils.py",
        '    if result["frechet_distance"] > (1 + max_frechet_increase) * reference["frechet_distance"]:',
        "    if False:",
        ("tests/benchmarks/test_eval_dtype_digits.py", "tests/benchmarks/test_eval_fast_orders_digits.py"),
    ),
    Mutation(
        "bench-fast-ar-head-not-perturbed",
        "benchmarks/benchmarking_utils.py",
        "    perturb_head_weights(head.state_dict().values())",
        "    pass",
        ("tests/benchmarks/test_bench_fast_sampling.py",),
    ),
    Mutation(
        "table1-earlier-rows-replace-the-run",
        "benchmarks/eval_table1_digits.py",
        'if (row["tokens"], row["seed"], row["trained"]) not in have]',
        "]",
        ("tests/benchmarks/test_eval_table1_digits.py",),
    ),
    Mutation(
        "cli-int8-not-quantized",
        "diffusers_mar/cli/model.py",
        '        if dtype == "int8":',
        "        if False:",
        ("tests/cli/test_cli.py",),
    ),
]


def check_mutations(mutations: list[Mutation], root: Path = REPO_ROOT) -> list[str]:
    """Problems with the list itself: an `old` not found exactly once, a test path that does not exist, a name twice."""
    problems, names = [], set()
    for mutation in mutations:
        if mutation.name in names:
            problems.append(f"{mutation.name}: the name is used twice")
        names.add(mutation.name)
        text = (root / mutation.path).read_text() if (root / mutation.path).is_file() else None
        count = text.count(mutation.old) if text is not None else 0
        if count != 1:
            problems.append(f"{mutation.name}: {mutation.path} holds the line {count} times, not once")
        if mutation.old == mutation.new:
            problems.append(f"{mutation.name}: the mutation changes nothing")
        for test in mutation.tests:
            path, _, function = test.partition("::")
            if not (root / path).exists():
                problems.append(f"{mutation.name}: no test path {test}")
            elif function and f"def {function}(" not in (root / path).read_text():
                problems.append(f"{mutation.name}: {path} has no test {function}")
    return problems


def _fixtures_dir() -> str | None:
    candidates = [os.environ.get("MAR_FIXTURES_DIR"), str(REPO_ROOT.parent / "shared" / "fixtures" / "mar_tiny")]
    return next((c for c in candidates if c and Path(c).is_dir()), None)


def _copy_repository(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def run_mutation(mutation: Mutation, timeout: float) -> tuple[str, float, str]:
    """Apply `mutation` to a fresh copy and run its tests: ("caught" | "survived" | "error", seconds, last output)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"mutation-{mutation.name}-") as folder:
        copy = Path(folder) / "repo"
        _copy_repository(copy)
        target = copy / mutation.path
        text = target.read_text()
        if text.count(mutation.old) != 1:  # the tree moved on since the list was read
            return (
                "error",
                time.perf_counter() - start,
                f"{mutation.path} holds the line {text.count(mutation.old)} times",
            )
        target.write_text(text.replace(mutation.old, mutation.new, 1))
        env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        fixtures = _fixtures_dir()
        if fixtures:
            env["MAR_FIXTURES_DIR"] = fixtures
        # `-o addopts=` also runs tests marked slow; `-x` stops at the first failure, which is all we need.
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", "-o", "addopts="]
        try:
            result = subprocess.run(
                [*command, *mutation.tests], cwd=copy, env=env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return "error", time.perf_counter() - start, f"timed out after {timeout:.0f} s"
    tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-3:])
    # pytest: 0 all passed, 1 some failed; 2-5 mean the run itself went wrong (collection error, no tests, ...).
    outcome = {0: "survived", 1: "caught"}.get(result.returncode, "error")
    return outcome, time.perf_counter() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="print the mutations' names and exit")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per mutation (default 1200)")
    args = parser.parse_args(argv)
    problems = check_mutations(MUTATIONS)
    if problems:
        print("The mutation list is out of date:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    names = [m.name for m in MUTATIONS]
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.only or []) - set(names))
    if unknown:
        parser.error(f"argument --only: unknown mutations {unknown}; choose from {names}")
    if args.jobs < 1:
        parser.error(f"argument --jobs: must be >= 1; got {args.jobs}")
    selected = [m for m in MUTATIONS if not args.only or m.name in args.only]
    outcomes = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_mutation, m, args.timeout): m for m in selected}
        for future in concurrent.futures.as_completed(futures):
            mutation = futures[future]
            outcome, seconds, tail = future.result()
            outcomes[mutation.name] = outcome
            print(f"{outcome:9s} {mutation.name} ({seconds:.0f} s)", flush=True)
            if outcome != "caught":
                print("          " + tail.replace("\n", "\n          "), flush=True)
    survivors = [name for name, outcome in outcomes.items() if outcome != "caught"]
    print(f"{len(selected) - len(survivors)} of {len(selected)} mutations caught", flush=True)
    if survivors:
        print("not caught: " + ", ".join(survivors), flush=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
