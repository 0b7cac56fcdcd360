"""The VAR training objective: next-scale prediction with teacher forcing on every scale in one pass.

Numerics follow FoundationVision/VAR (commit 78b9539) `trainer.py` (`VARTrainer.train_step`), the label drop of
`models/var.py` (`VAR.forward`) and the progressive schedule of `train.py` (`train_one_ep`). The images' indices of
every scale come from the frozen `VARVQModel` (`encode`), the transformer's input from its `teacher_forcing_input`
(the partial sums of the ground-truth scales before each scale); one block-causal pass gives the logits of every
token. The loss of a batch is

    ce[b, l]   = cross-entropy with label smoothing (0.1) of token l's logits against its index
    loss       = mean_b sum_l w[l] * ce[b, l]       with w[l] = 1 / L (L: all tokens of all scales)

which is the mean over every token of every scale (each token counts once, so the fine scales dominate). With
progressive training (`prog_si >= 0`) only the scales up to `prog_si` enter, and the newest one is weighted by the
stage's warm-up factor `prog_wp`; the weights stay `1 / L`, so the loss is smaller while fewer scales train, as in
the original. Every random draw (the label drop) is made here, from `generator` (or torch's global generator).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_mar import VARTransformer2DModel, VARVQModel
from training.mar_loss import drop_labels


def scale_bounds(patch_nums: list[int] | tuple[int, ...]) -> list[tuple[int, int]]:
    """`(begin, end)` of each scale's tokens in the sequence (the original's `begin_ends`)."""
    bounds, start = [], 0
    for side in patch_nums:
        bounds.append((start, start + side * side))
        start += side * side
    return bounds


def token_loss_weights(
    patch_nums: list[int] | tuple[int, ...],
    prog_si: int = -1,
    prog_wp: float = 1.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The per-token weights of the loss, `(end,)`: `1 / L` for every token of the scales that train (all of them,
    or those up to `prog_si`), the newest one times `prog_wp` in progressive training (as `VARTrainer.train_step`)."""
    bounds = scale_bounds(patch_nums)
    num_tokens = bounds[-1][1]
    if prog_si >= len(patch_nums) - 1:
        prog_si = -1  # the last stage trains everything: as if there were no progressive training
    end = num_tokens if prog_si < 0 else bounds[prog_si][1]
    weights = torch.full((end,), 1.0 / num_tokens, device=device)
    if prog_si >= 0:
        begin = bounds[prog_si][0]
        weights[begin:end] *= min(max(prog_wp, 0.0), 1.0)
    return weights


def progressive_stage(
    step: int,
    total_steps: int,
    warmup_steps: int,
    num_scales: int,
    prog_fraction: float = 0.0,
    prog_start: int = 4,
    stage_warmup_steps: float = 1.0,
) -> tuple[int, float]:
    """The progressive-training stage `(prog_si, prog_wp)` of optimizer step `step` (0-based), from the step alone.

    As `train.py` `train_one_ep`: stage `prog_start` through the lr warm-up, then rising linearly (rounded) to the
    last scale at `prog_fraction` of training; `prog_wp` ramps from 0.01 to 1 over `stage_warmup_steps` after each
    stage change (`VARTrainer.train_step`), except in the first stage. `prog_fraction` 0 disables it: `(-1, 1.0)`.
    The original counts the steps of a stage as it goes; here they follow from `step`, so a resumed run is exact.
    """
    if prog_fraction <= 0:
        return -1, 1.0

    def stage(it: int) -> int:
        if it <= warmup_steps:
            return prog_start
        if it >= total_steps * prog_fraction:
            return num_scales - 1
        progress = min(max((it - warmup_steps) / (total_steps * prog_fraction - warmup_steps), 0), 1)
        return prog_start + round(progress * (num_scales - 1 - prog_start))

    current = stage(step)
    first = step
    while first > 0 and stage(first - 1) == current:  # the stage is non-decreasing in the step
        first -= 1
    if first == 0:
        prog_wp = 1.0  # no stage warm-up in the first stage: the lr warm-up covers it
    else:
        prog_wp = max(min((step - first + 1) / max(stage_warmup_steps, 1e-8), 1.0), 0.01)
    return (-1 if current == num_scales - 1 else current), prog_wp


@dataclass
class VARLossOutput:
    """The scalar loss of a batch and what it was computed from (for logging and tests)."""

    loss: torch.Tensor
    logits: torch.Tensor  # (B, end, V): the tokens that train
    targets: torch.Tensor  # (B, end)
    token_losses: torch.Tensor  # (B, end), label-smoothed cross-entropy
    class_labels: torch.Tensor  # after the label drop


def var_loss(
    transformer: VARTransformer2DModel,
    vqvae: VARVQModel,
    indices: list[torch.LongTensor],
    class_labels: torch.Tensor,
    label_smoothing: float = 0.1,
    label_drop_prob: float = 0.1,
    prog_si: int = -1,
    prog_wp: float = 1.0,
    generator: torch.Generator | None = None,
) -> VARLossOutput:
    r"""
    The VAR training loss of one batch, as FoundationVision/VAR `VARTrainer.train_step`.

    Args:
        transformer (`VARTransformer2DModel`):
            The next-scale transformer; its train/eval mode controls dropout and drop-path.
        vqvae (`VARVQModel`):
            The (frozen) tokenizer: gives the teacher-forcing input of the indices.
        indices (`list[torch.LongTensor]`):
            The ground-truth indices of every scale, `(batch, patch_nums[k] ** 2)` each (`vqvae.encode`).
        class_labels (`torch.LongTensor` of shape `(batch,)`):
            Class labels in `[0, num_classes)`.
        label_smoothing (`float`, *optional*, defaults to 0.1):
            Label smoothing of the cross-entropy.
        label_drop_prob (`float`, *optional*, defaults to 0.1):
            Probability of replacing a label by the unconditional class `num_classes` (pass 0 to disable).
        prog_si (`int`, *optional*, defaults to -1):
            Progressive training: the last scale that trains (-1: all of them).
        prog_wp (`float`, *optional*, defaults to 1.0):
            Progressive training: the weight factor of scale `prog_si`.
        generator (`torch.Generator`, *optional*):
            Source of the label drop; torch's global generator if not given.

    Returns:
        `VARLossOutput`.
    """
    batch_size = class_labels.shape[0]
    num_classes = transformer.config.num_classes
    if class_labels.ndim != 1 or bool(((class_labels < 0) | (class_labels >= num_classes)).any()):
        raise ValueError(f"`class_labels` must be ({batch_size},) labels in [0, {num_classes}); got {class_labels}.")
    if list(vqvae.patch_nums) != list(transformer.config.patch_nums):
        raise ValueError(
            f"The VQ-VAE's patch_nums {list(vqvae.patch_nums)} differ from the transformer's "
            f"{list(transformer.config.patch_nums)}."
        )

    # 1. Teacher-forcing input of every scale after the first, from the ground-truth indices
    with torch.no_grad():
        hidden_states = vqvae.teacher_forcing_input(indices)  # (B, L - first_l, C)
    targets = torch.cat(indices, dim=1)  # (B, L)

    # 2. Label dropout to the unconditional class
    class_labels = drop_labels(class_labels, num_classes, label_drop_prob, generator=generator)

    # 3. Logits of every token in one block-causal pass; the scales after `prog_si` do not enter the loss
    logits = transformer(class_labels, hidden_states, return_dict=False)[0]  # (B, L, V)
    weights = token_loss_weights(transformer.config.patch_nums, prog_si, prog_wp, device=logits.device)  # (end,)
    end = weights.shape[0]
    logits, targets = logits[:, :end], targets[:, :end]

    # 4. Label-smoothed cross-entropy of every token, weighted and summed over tokens, averaged over images
    token_losses = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        label_smoothing=label_smoothing,
        reduction="none",
    ).view(batch_size, end)
    loss = (token_losses * weights).sum(dim=-1).mean()
    return VARLossOutput(
        loss=loss, logits=logits, targets=targets, token_losses=token_losses, class_labels=class_labels
    )


class VARTrainingModule(nn.Module):
    """The VAR transformer under a module whose `forward(pixels, class_labels)` returns the VAR loss.

    A training construct only (the pipeline's models stay pure functions). The frozen tokenizer is held outside the
    module's parameters (`vqvae`: not saved in the training checkpoints, not wrapped by distributed data parallel;
    move it to the device yourself): it encodes the images in float32 with no gradient, outside any autocast, as the
    original encodes before its autocast context. The training loop sets `step` before each step; the progressive
    stage follows from it (`progressive_stage`), so a resumed run is exact. `metrics` holds the last batch's mean
    cross-entropy without smoothing and the accuracy, of all tokens and of the last scale (the original's Lm, Lt,
    Accm, Acct).
    """

    def __init__(
        self,
        transformer: VARTransformer2DModel,
        vqvae: VARVQModel,
        label_smoothing: float = 0.1,
        label_drop_prob: float = 0.1,
        total_steps: int = 1,
        warmup_steps: int = 0,
        prog_fraction: float = 0.0,
        prog_start: int = 4,
        stage_warmup_steps: float = 1.0,
    ):
        super().__init__()
        self.transformer = transformer
        object.__setattr__(self, "vqvae", vqvae.requires_grad_(False).eval())  # not a sub-module
        self.label_smoothing = label_smoothing
        self.label_drop_prob = label_drop_prob
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.prog_fraction = prog_fraction
        self.prog_start = prog_start
        self.stage_warmup_steps = stage_warmup_steps
        self.step = 0
        self.metrics: dict[str, float] = {}

    @property
    def stage(self) -> tuple[int, float]:
        """`(prog_si, prog_wp)` at `step`."""
        return progressive_stage(
            self.step,
            self.total_steps,
            self.warmup_steps,
            len(self.transformer.config.patch_nums),
            self.prog_fraction,
            self.prog_start,
            self.stage_warmup_steps,
        )

    def encode(self, pixels: torch.Tensor) -> list[torch.LongTensor]:
        """The indices of every scale of images in [-1, 1], in float32 without autocast."""
        device_type = pixels.device.type
        no_autocast = (
            torch.autocast(device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with torch.no_grad(), no_autocast:
            return self.vqvae.encode(pixels.float()).indices

    def forward(self, pixels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The scalar loss of a batch of images `(B, C, H, W)` in [-1, 1]; labels drop, and progressive training
        leaves scales out, in train mode only (eval mode, as the validation loss: every scale, no label drop)."""
        prog_si, prog_wp = self.stage if self.training else (-1, 1.0)
        output = var_loss(
            self.transformer,
            self.vqvae,
            self.encode(pixels),
            class_labels,
            label_smoothing=self.label_smoothing,
            label_drop_prob=self.label_drop_prob if self.training else 0.0,
            prog_si=prog_si,
            prog_wp=prog_wp,
        )
        with torch.no_grad():
            logits, targets = output.logits.float(), output.targets
            last = self.transformer.config.patch_nums[-1] ** 2
            predictions = logits.argmax(dim=-1)
            self.metrics = {
                "loss_mean": F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item(),
                "accuracy_mean": (predictions == targets).float().mean().item() * 100,
            }
            if prog_si < 0:  # the last scale trains
                self.metrics["loss_tail"] = F.cross_entropy(
                    logits[:, -last:].reshape(-1, logits.shape[-1]), targets[:, -last:].reshape(-1)
                ).item()
                self.metrics["accuracy_tail"] = (
                    predictions[:, -last:] == targets[:, -last:]
                ).float().mean().item() * 100
        return output.loss


# As in FoundationVision/VAR train.py: the parameters without weight decay, besides 1-D tensors and biases (the names
# of the original's keys that our VARTransformer2DModel has: its pos_start, pos_1LC, lvl_embed, scale_mul_1H11 and,
# with shared AdaLN, ada_gss).
NO_DECAY_NAMES = ("start_pos_embed", "pos_embed", "level_embedding", "log_scale", "adaln_table")


def var_weight_decay_param_groups(transformer: nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """AdamW groups as FoundationVision/VAR `utils/lr_control.py` `filter_params`: no decay on 1-D tensors, biases and
    the position, level and attention-scale parameters; each group records its `wd_sc` (0 or 1) for the schedule."""
    decay, no_decay = [], []
    for name, param in transformer.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim == 1 or name.endswith("bias") or any(key in name for key in NO_DECAY_NAMES)
        (no_decay if skip else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0, "wd_sc": 0.0},
        {"params": decay, "weight_decay": weight_decay, "wd_sc": 1.0},
    ]


VAR_LR_SCHEDULES = ("lin0", "lin", "lin00", "cos", "exp")


def var_learning_rate_factor(
    schedule: str, step: int, warmup_steps: float, total_steps: int, wp0: float = 0.005, wpe: float = 0.01
) -> float:
    """The factor of the peak learning rate at optimizer step `step` (0-based), as FoundationVision/VAR
    `utils/lr_control.py` `lr_wd_annealing`: linear warm-up from `wp0`, then `lin0` (constant for 5% of the rest,
    then linear to `wpe`), `lin` (15%), `lin00` (linear from the start), `cos`, `exp`, or `linT` (progressive training's
    two-slope schedule with the break at `T`)."""
    warmup_steps = round(warmup_steps)
    if step < warmup_steps:
        return wp0 + (1 - wp0) * step / warmup_steps
    passed = (step - warmup_steps) / max(total_steps - 1 - warmup_steps, 1)  # [0, 1]
    rest = 1 - passed
    if schedule == "cos":
        return wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * passed))
    if schedule in ("lin", "lin0"):
        flat = 0.15 if schedule == "lin" else 0.05
        return 1.0 if passed < flat else wpe + (1 - wpe) * rest / (1 - flat)
    if schedule == "lin00":
        return wpe + (1 - wpe) * rest
    if schedule == "exp":
        flat = 0.15
        return 1.0 if passed < flat else math.exp((passed - flat) / (1 - flat) * math.log(wpe))
    if schedule.startswith("lin"):
        flat = float(schedule[3:])
        mid = (1 + wpe + (1 - wpe) * (1 - flat)) / 2
        return 1 + (mid - 1) * passed / flat if passed < flat else wpe + (mid - wpe) * rest / (1 - flat)
    raise ValueError(f"Unknown VAR learning-rate schedule {schedule!r}; choose one of {VAR_LR_SCHEDULES} or linT.")


def var_weight_decay_at(step: int, total_steps: int, weight_decay: float, weight_decay_end: float) -> float:
    """Weight decay at step `step`: half-cycle cosine from `weight_decay` to `weight_decay_end` (as `lr_wd_annealing`;
    the original's default end equals the start: constant)."""
    passed = step / max(total_steps - 1, 1)
    return weight_decay_end + (weight_decay - weight_decay_end) * (0.5 + 0.5 * math.cos(math.pi * passed))
