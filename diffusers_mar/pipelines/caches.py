"""The transformer pass of `MARPipeline`'s outer loop, with two optional caches (both off by default).

- **Guidance cache** (`guidance_cache_interval=k`): classifier-free guidance runs the transformer on the conditional
  and the unconditional batch. Every `k`-th outer step (from the first) both run on every position and the
  difference of their conditions (conditional minus unconditional) is kept; the steps between run the conditional
  half only and take the unconditional conditions as `conditional - kept difference` (LazyMAR's condition reuse).
- **Feature cache** (`feature_cache_interval=k`): every `k`-th outer step the transformer computes the conditions
  of every position; the steps between skip it and reuse those of the tokens they predict, which were unknown then
  and still are (their own inputs did not change; LazyMAR-style, at the granularity of the whole pass).

An interval of 1 refreshes at every step: exactly the pass without a cache. Refresh steps of an active cache compute
every position instead of only the predicted ones (the same numbers up to float rounding).
"""

from __future__ import annotations

import torch

from diffusers_mar.models.transformer_mar import MARTransformer2DModel


def _gather(features: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    return features.gather(1, predict.unsqueeze(-1).expand(-1, -1, features.shape[-1]))  # (B, n, D)


class TransformerPass:
    """Conditions `(B', n, D)` of the tokens predicted at an outer step (the unconditional rows after the conditional
    ones under guidance), through the caches that are on."""

    def __init__(
        self,
        transformer: MARTransformer2DModel,
        labels: torch.Tensor,
        do_guidance: bool,
        guidance_cache_interval: int | None = None,
        feature_cache_interval: int | None = None,
    ):
        self.transformer, self.labels, self.do_guidance = transformer, labels, do_guidance
        self.guidance_interval = (guidance_cache_interval or 1) if do_guidance else 1
        self.feature_interval = feature_cache_interval or 1
        self.difference = None  # (B, L, D): conditional minus unconditional conditions at the last refresh
        self.features = None  # (B', L, D): every position's conditions at the last refresh
        self.transformer_calls = 0

    def _run(self, tokens: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, predict: torch.Tensor | None):
        self.transformer_calls += 1
        tokens = tokens.to(self.transformer.dtype)
        return self.transformer(tokens, mask, labels, predict_indices=predict, return_dict=False)[0]

    def __call__(self, step: int, tokens: torch.Tensor, mask: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
        predict_in = torch.cat([predict, predict]) if self.do_guidance else predict
        if self.feature_interval > 1 and step % self.feature_interval != 0:
            return _gather(self.features, predict_in)
        reuse_difference = self.guidance_interval > 1 and step % self.guidance_interval != 0
        every_position = self.feature_interval > 1 or (self.guidance_interval > 1 and not reuse_difference)
        indices = None if every_position else predict
        batch_size = tokens.shape[0]
        if reuse_difference:
            condition = self._run(tokens, mask, self.labels[:batch_size], indices)
            difference = self.difference if every_position else _gather(self.difference, predict)
            condition = torch.cat([condition, condition - difference])
        elif self.do_guidance:
            condition = self._run(
                torch.cat([tokens, tokens]),
                torch.cat([mask, mask]),
                self.labels,
                None if every_position else predict_in,
            )
            if self.guidance_interval > 1:
                self.difference = condition[:batch_size] - condition[batch_size:]
        else:
            condition = self._run(tokens, mask, self.labels, indices)
        if not every_position:
            return condition
        if self.feature_interval > 1:
            self.features = condition
        return _gather(condition, predict_in)
