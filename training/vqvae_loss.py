"""The tokenizer's training objective: VAR's multi-scale residual quantisation in training mode, and codebook health.

FoundationVision/VAR never released its tokenizer training; its training-mode quantiser is `models/quant.py`
`VectorQuantizer2.forward`, which this follows, with the reconstruction and perceptual terms of the VQGAN recipe
(Esser et al. 2021) around it. With `latents = quant_conv(encoder(x))` and `f_hat_k` the partial sum after scale `k`
(`VARVQModel.quantize`: the nearest codes of the detached residual; `f_hat_k` carries gradients into the codebook and
the phi convolutions only):

    vq    = mean_k [ beta * mse(sg(f_hat_k), latents) + mse(f_hat_k, sg(latents)) ]   (commitment + codebook)
    z_q   = sg(f_hat_K - latents) + latents                                          (straight-through)
    x_hat = decoder(post_quant_conv(z_q))                                            (not clamped)
    nll   = w_rec * |x - x_hat|_p + w_lpips * LPIPS(x, x_hat)
    loss  = nll + vq [+ lambda * w_adv * -mean(D(x_hat))   from --adversarial_start on]

The adversarial term is the VQGAN recipe's: a PatchGAN discriminator `D` (`PatchDiscriminator`) trained with the hinge
loss `mean(relu(1 - D(x))) + mean(relu(1 + D(sg(x_hat))))` by its own optimizer, and the generator term
`-mean(D(x_hat))` scaled by the adaptive weight `lambda = |grad nll| / (|grad g| + 1e-4)` (gradients with respect to
the decoder's last convolution, clamped to [0, 1e4], detached), so that it neither drowns nor vanishes next to the
reconstruction.

Codebook health (`CodebookStats`): each scale's code hits, averaged as the original's `ema_vocab_hit_SV` (copied at
the first step, then decay 0.9 for 100 steps, then 0.99); a code is *dead* at a scale when its average hits fall
below 8% of a uniform share of that scale's positions (the original's `margin`, per scale), and dead overall when it
is dead at every scale. `restart_dead_codes` re-initialises the dead codes from the residuals that were quantised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_mar import VARVQModel

# As the original's `margin`: a code is used when its average hits reach 8% of a uniform share.
USAGE_MARGIN = 0.08


@dataclass
class VQLossOutput:
    """The scalar loss of a batch, its terms, and what the codebook statistics need."""

    loss: torch.Tensor
    nll: torch.Tensor  # the weighted reconstruction + perceptual terms, with gradients (the adaptive weight's)
    reconstruction: torch.Tensor
    vq: torch.Tensor
    perceptual: torch.Tensor
    indices: list[torch.LongTensor]  # one (B, side * side) tensor per scale
    residuals: list[torch.Tensor]  # the vectors each scale quantised, (B * side * side, C), detached
    sample: torch.Tensor  # the reconstruction (B, C, H, W)


def quantize_for_training(
    vqvae: VARVQModel, latents: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, list[torch.LongTensor], list[torch.Tensor]]:
    """Training-mode multi-scale quantisation (as `VectorQuantizer2.forward`): `(z_q, vq_loss, indices, residuals)`,
    `z_q` the straight-through partial sum of every scale, `residuals` the vectors each scale quantised."""
    indices, partial_sums = vqvae.quantize(latents)
    detached = latents.detach()
    vq = latents.new_zeros((), dtype=torch.float32)
    residuals, previous = [], torch.zeros_like(detached)
    for side, f_hat in zip(vqvae.patch_nums, partial_sums):
        # As in FoundationVision/VAR models/quant.py: beta * commitment on the encoder + codebook on the codes.
        vq = vq + beta * F.mse_loss(f_hat.detach(), latents.float()) + F.mse_loss(f_hat, detached.float())
        rest = detached - previous
        if side != vqvae.patch_nums[-1]:
            rest = F.interpolate(rest, size=(side, side), mode="area")
        residuals.append(rest.permute(0, 2, 3, 1).reshape(-1, rest.shape[1]).float())
        previous = f_hat.detach()
    vq = vq / len(partial_sums)
    z_q = (partial_sums[-1].detach() - detached) + latents  # gradients reach the encoder straight through
    return z_q, vq, indices, residuals


class VQVAETrainingModule(nn.Module):
    """The tokenizer under a module whose `forward(pixels)` returns the `VQLossOutput` (one module for distributed
    data parallel). `perceptual` is an optional `(x, x_hat) -> (B, ...)` perceptual distance (LPIPS), frozen."""

    def __init__(
        self,
        vqvae: VARVQModel,
        beta: float | None = None,
        reconstruction_loss: str = "l2",
        reconstruction_weight: float = 1.0,
        perceptual_weight: float = 0.0,
        perceptual: nn.Module | None = None,
    ):
        super().__init__()
        if reconstruction_loss not in ("l1", "l2"):
            raise ValueError(f"`reconstruction_loss` must be 'l1' or 'l2'; got {reconstruction_loss!r}.")
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("`perceptual_weight` > 0 needs a `perceptual` model.")
        self.vqvae = vqvae
        self.beta = vqvae.config.beta if beta is None else beta
        self.reconstruction_loss = reconstruction_loss
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        if perceptual is not None:
            object.__setattr__(self, "perceptual", perceptual.requires_grad_(False).eval())  # frozen, not saved
        else:
            self.perceptual = None

    def forward(self, pixels: torch.Tensor) -> VQLossOutput:
        vqvae = self.vqvae
        latents = vqvae.quant_conv(vqvae.encoder(pixels))  # (B, C, h, w)
        z_q, vq, indices, residuals = quantize_for_training(vqvae, latents, self.beta)
        sample = vqvae.decoder(vqvae.post_quant_conv(z_q))  # (B, C_img, H, W)
        error = (sample.float() - pixels.float()).abs()
        reconstruction = (error if self.reconstruction_loss == "l1" else error.square()).mean()
        perceptual = reconstruction.new_zeros(())
        if self.perceptual_weight > 0:
            perceptual = self.perceptual(sample.float(), pixels.float()).mean()
        nll = self.reconstruction_weight * reconstruction + self.perceptual_weight * perceptual
        return VQLossOutput(
            nll + vq, nll, reconstruction.detach(), vq.detach(), perceptual.detach(), indices, residuals, sample
        )


class PatchDiscriminator(nn.Module):
    """VQGAN's PatchGAN discriminator (Isola et al. 2017, as taming-transformers' `NLayerDiscriminator`): a 4x4
    convolution of stride 2 and LeakyReLU(0.2), `num_layers - 1` more of stride 2 with a norm, one of stride 1 with a
    norm, and a 4x4 convolution to one logit per patch. GroupNorm replaces VQGAN's BatchNorm, so that a logit does not
    depend on the rest of the batch (the same on one process or many); weights are initialised N(0, 0.02), as
    VQGAN's `weights_init`."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"`num_layers` must be >= 1; got {num_layers}.")
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1
            wider = channels * min(2**n, 8)
            layers += [
                nn.Conv2d(width, wider, 4, stride, 1, bias=False),
                nn.GroupNorm(32 if wider % 32 == 0 else 1, wider),
                nn.LeakyReLU(0.2),
            ]
            width = wider
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @staticmethod
    def output_size(size: int, num_layers: int) -> int:
        """The side of the logit map for images of side `size` (below 1: too many layers for the images)."""
        for _ in range(num_layers):  # stride 2: (s + 2 - 4) // 2 + 1
            size = (size - 2) // 2 + 1
        return size - 1 - 1  # two convolutions of stride 1: s + 2 - 4 + 1 each

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """VQGAN's `hinge_d_loss`: `(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2`."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, generator_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN's `calculate_adaptive_weight`: `|d nll / d W| / (|d g / d W| + 1e-4)` for the decoder's last weight `W`,
    clamped to [0, 1e4] and detached (the graphs are kept for the backward of the total)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    generator_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (generator_grad.norm() + 1e-4)
    return weight.clamp(0.0, 1e4).detach()


class CodebookStats:
    """Average code hits per scale (the original's `ema_vocab_hit_SV`), for usage, dead codes and restarts; a
    checkpointable object (`state_dict` / `load_state_dict`) so that a resumed run restarts the same codes."""

    def __init__(self, patch_nums: list[int] | tuple[int, ...], num_codes: int):
        self.patch_nums = list(patch_nums)
        self.num_codes = num_codes
        self.hits = torch.zeros(len(self.patch_nums), num_codes, dtype=torch.float64)
        self.num_updates = 0
        self.restarted = 0  # codes restarted so far

    def update(self, hits: torch.Tensor) -> None:
        """Fold in one step's hits `(num_scales, num_codes)` (summed over every process)."""
        hits = hits.detach().to(self.hits)
        if self.num_updates == 0:
            self.hits.copy_(hits)
        else:
            decay = 0.9 if self.num_updates < 100 else 0.99
            self.hits.mul_(decay).add_(hits * (1 - decay))
        self.num_updates += 1

    def margins(self, batch_size: int) -> torch.Tensor:
        """Per scale: the hits below which a code counts as unused, 8% of a uniform share of the scale's positions."""
        positions = torch.tensor([side * side for side in self.patch_nums], dtype=torch.float64) * batch_size
        return positions / self.num_codes * USAGE_MARGIN

    def dead(self, batch_size: int) -> torch.Tensor:
        """`(num_scales, num_codes)` booleans: the code is unused at that scale."""
        return self.hits < self.margins(batch_size)[:, None]

    def summary(self, batch_size: int) -> list[dict[str, float]]:
        """Per scale: `usage` (% of codes used), `perplexity` (of the average hits) and `dead` (count)."""
        dead = self.dead(batch_size)
        rows = []
        for k, side in enumerate(self.patch_nums):
            probs = self.hits[k] / self.hits[k].sum().clamp_min(1e-12)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
            rows.append(
                {
                    "side": side,
                    "usage": 100.0 * (1 - dead[k].double().mean().item()),
                    "perplexity": float(entropy.exp()),
                    "dead": int(dead[k].sum()),
                }
            )
        return rows

    def state_dict(self) -> dict:
        return {"hits": self.hits.clone(), "num_updates": self.num_updates, "restarted": self.restarted}

    def load_state_dict(self, state: dict) -> None:
        self.hits.copy_(state["hits"])
        self.num_updates, self.restarted = int(state["num_updates"]), int(state["restarted"])


def scale_hits(indices: list[torch.LongTensor], num_codes: int) -> torch.Tensor:
    """`(num_scales, num_codes)` float: how often each code was chosen at each scale."""
    return torch.stack([idx.reshape(-1).bincount(minlength=num_codes).float() for idx in indices])


@torch.no_grad()
def restart_dead_codes(
    codebook: torch.Tensor, dead: torch.Tensor, candidates: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Re-initialise the rows of `codebook` `(V, C)` where `dead` `(V,)` is true with rows of `candidates` `(N, C)`
    (recent encoder residuals) drawn uniformly with replacement; every other row is left as it is. Returns the
    indices of the restarted codes."""
    restarted = dead.nonzero().flatten()
    if restarted.numel() == 0 or candidates.shape[0] == 0:
        return restarted[:0]
    picks = torch.randint(0, candidates.shape[0], (restarted.numel(),), generator=generator)
    codebook[restarted.to(codebook.device)] = candidates[picks.to(candidates.device)].to(codebook)
    return restarted
