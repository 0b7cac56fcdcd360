"""Small pure functions of MARPipeline's outer loop: the mask and guidance schedules, classifier-free guidance of the
head's output, the generation-order mask, the head's call per diffusion step, one step's noise, and the class labels
of a call (shared with `MARInpaintPipeline`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers_mar.models.diffusion_head_mar import MARDiffusionHead


def mask_schedule(num_tokens: int, num_inference_steps: int) -> list[int]:
    """Tokens still unknown after each step: cosine schedule, clamped to predict at least one token per step.

    As in LTH14/mar `sample_tokens`: `max(1, min(unknown - 1, floor(L cos(pi/2 (k+1)/K))))`. The last entry is
    clamped to 1 as in the original, although the last step predicts every remaining token.
    """
    mask_lens = []
    unknown = num_tokens
    for step in range(num_inference_steps):
        target = np.floor(num_tokens * np.cos(math.pi / 2.0 * (step + 1) / num_inference_steps))
        unknown = int(max(1, min(unknown - 1, target)))
        mask_lens.append(unknown)
    return mask_lens


def guidance_schedule_values(
    guidance_scale: float, mask_lens: list[int], num_tokens: int, schedule: str = "linear"
) -> list[float]:
    """Guidance per step: 'linear' rises with the known-token ratio after the step (never reaching the scale)."""
    if schedule == "constant":
        return [float(np.float32(guidance_scale))] * len(mask_lens)
    # As in LTH14/mar sample_tokens: 1 + (cfg - 1) * (L - mask_len) / L, in float32.
    mask_len = torch.tensor(mask_lens, dtype=torch.float32)
    return (1 + (guidance_scale - 1) * (num_tokens - mask_len) / num_tokens).tolist()


def guide(model_output: torch.Tensor, scale: float | None, channels: int, keep_variance: bool) -> torch.Tensor:
    """Classifier-free guidance on eps (`scale` None: no guidance); the variance stays the conditional rows'."""
    if scale is not None:
        # As LTH14/mar diffloss.py forward_with_cfg: guide eps, keep the conditional half's variance.
        cond, uncond = model_output.chunk(2)
        eps = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
        model_output = torch.cat([eps, cond[:, channels:]], dim=1)
    return model_output if keep_variance else model_output[:, :channels]


def mask_by_order(num_unknown: int, orders: torch.Tensor) -> torch.Tensor:
    """Mask (1 = unknown) of the last `num_unknown` positions of each order, the tokens not made yet: (B, L) float;
    sampling's and training's."""
    mask = torch.zeros(orders.shape, device=orders.device)
    return mask.scatter(1, orders[:, orders.shape[1] - num_unknown :], 1.0)


def head_calls(
    diffusion_head: MARDiffusionHead, timesteps: torch.Tensor, condition_embedding: torch.Tensor, max_rows: int
) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """The diffusion head as a function of the noisy tokens, for each timestep in turn (`N` = the rows of a step).

    The AdaLN modulation depends on (timestep, condition) only. When a step has at most `max_rows / 2` rows, that of
    several steps is one matrix product per block (chunks of about `max_rows` rows: the weights are read once per
    chunk instead of once per step). Otherwise each step computes it block by block inside the head, holding one
    block's at a time as the original does (`forward_with_condition_embedding`).
    """
    steps_per_chunk = max_rows // condition_embedding.shape[0]
    if steps_per_chunk < 2:
        for t in timesteps:
            yield functools.partial(
                diffusion_head.forward_with_condition_embedding, timestep=t, condition_embedding=condition_embedding
            )
        return
    for start in range(0, len(timesteps), steps_per_chunk):
        chunk = diffusion_head.compute_modulation(timesteps[start : start + steps_per_chunk], condition_embedding)
        for modulation in chunk:
            yield functools.partial(diffusion_head.forward_with_modulation, modulation=modulation)


def check_num_images_per_label(num_images_per_label: int) -> None:
    if isinstance(num_images_per_label, bool) or not isinstance(num_images_per_label, int) or num_images_per_label < 1:
        raise ValueError(f"`num_images_per_label` must be an int >= 1; got {num_images_per_label!r}.")


def prepare_class_labels(
    class_labels: int | list[int] | torch.Tensor, num_images_per_label: int = 1, num_classes: int | None = None
) -> list[int]:
    """Class labels as a list, each repeated `num_images_per_label` times (next to each other). Names are refused
    with the ids allowed (`[0, num_classes]`) and the `get_label_ids` call that maps them."""
    check_num_images_per_label(num_images_per_label)
    names = [class_labels] if isinstance(class_labels, str) else class_labels
    if isinstance(names, (list, tuple)) and names and any(isinstance(label, str) for label in names):
        allowed = "ints" if num_classes is None else f"ints in [0, {num_classes}] ({num_classes} = unconditional)"
        raise ValueError(
            f"`class_labels` takes class ids, {allowed}, not names; got {class_labels!r}. Map names to ids with "
            f"`pipe.get_label_ids({[label for label in names if isinstance(label, str)]!r})` and pass those."
        )
    if isinstance(class_labels, torch.Tensor):
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.ndim > 1:
            raise ValueError(
                f"`class_labels` must be an int, a list of ints or a 0-D or 1-D integer tensor; got a "
                f"{class_labels.dtype} tensor of shape {tuple(class_labels.shape)}."
            )
        class_labels = class_labels.reshape(-1).tolist()
    elif isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
        class_labels = [class_labels]
    if (
        not isinstance(class_labels, (list, tuple))
        or len(class_labels) == 0
        or any(isinstance(label, bool) or not isinstance(label, (int, np.integer)) for label in class_labels)
    ):
        raise ValueError(
            f"`class_labels` must be an int, a non-empty list of ints or a 1-D integer tensor; got {class_labels!r}."
        )
    return [int(label) for label in class_labels for _ in range(num_images_per_label)]


def prepare_step_noise(
    num_steps: int,
    batch_size: int,
    num_predicted: int,
    token_dim: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One outer step's noise `(1 + num_steps, B * n, C)`: `[0]` the initial noise, `[1 + i]` that of scheduler
    step `i` (second-order and PNDM schedulers run more steps than `num_diffusion_steps`). One draw per image."""
    if noise is None:
        shape = (batch_size, 1 + num_steps, num_predicted, token_dim)
        noise = randn_tensor(shape, generator=generator, device=device).transpose(0, 1)  # (1 + S, B, n, C)
    noise = noise.to(device=device, dtype=torch.float32)
    return noise.reshape(1 + num_steps, batch_size * num_predicted, token_dim)
