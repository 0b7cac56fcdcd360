"""Generation orders and outer-step schedules of `MARPipeline`: which tokens are predicted at which outer step.

An order is one permutation of the token positions per image, in generation order: `orders[:, k]` is the `k`-th
token made, by MAR, AR, inpainting and training alike, and when `n` tokens are still unknown they are the last `n`
entries (`mask_by_order`). LTH14/mar lists an order the other way round (its first entries stay masked longest);
`orders_from_original` converts one of its orders. The outer schedule says how many tokens stay unknown
after each step: MAR's cosine schedule (the original's), or a skeleton-first one in the spirit of GtR ("generation
then reconstruction"), which spends all steps but the last on the first half of the order and fills in the rest at
once. With the checkerboard order that first half is a checkerboard skeleton of the grid.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from diffusers_mar.pipelines.schedules import mask_schedule

ORDER_NAMES = ("random", "raster", "checkerboard")
OUTER_SCHEDULES = ("cosine", "skeleton")


def are_permutations(orders: torch.Tensor, batch_size: int, num_tokens: int) -> bool:
    """Whether `orders` is a `(batch_size, num_tokens)` integer tensor whose rows are permutations of the positions."""
    expected = torch.arange(num_tokens).expand(batch_size, -1)
    return (
        isinstance(orders, torch.Tensor)
        and orders.shape == expected.shape
        and not orders.dtype.is_floating_point
        and torch.equal(orders.sort(dim=1).values.cpu().long(), expected)
    )


def check_orders(orders: torch.Tensor, batch_size: int, num_tokens: int, name: str = "orders") -> None:
    """A `ValueError` naming `name` unless `orders` is a `(batch_size, num_tokens)` tensor of permutations."""
    if not are_permutations(orders, batch_size, num_tokens):
        shape = tuple(orders.shape) if isinstance(orders, torch.Tensor) else type(orders).__name__
        raise ValueError(
            f"`{name}` must be a ({batch_size}, {num_tokens}) integer tensor whose rows are permutations "
            f"of 0..{num_tokens - 1}; got {shape}."
        )


def check_order(order: str | torch.Tensor, orders: torch.Tensor | None, batch_size: int, num_tokens: int) -> None:
    """Check the `order` (a name or a permutation tensor) and `orders` arguments of a call."""
    if isinstance(order, torch.Tensor):
        check_orders(order, batch_size, num_tokens, "order")
    elif not isinstance(order, str) or order not in ORDER_NAMES:
        raise ValueError(f"`order` must be one of {ORDER_NAMES} or a permutation tensor; got {order!r}.")
    if orders is not None:
        check_orders(orders, batch_size, num_tokens)
        if not (isinstance(order, str) and order == "random"):
            raise ValueError("Pass either `order` or `orders` (the same thing as a tensor), not both.")


def check_fast_sampling(
    options: dict, orders: torch.Tensor | None, batch_size: int, num_tokens: int, num_unknown: int, steps: int
) -> None:
    """Check a call's `order`, `outer_schedule` and cache intervals (`options`; keys not given: their defaults)."""
    check_order(options.get("order", "random"), orders, batch_size, num_tokens)
    check_outer_schedule(options.get("outer_schedule", "cosine"), num_unknown, steps)
    for name in ("guidance_cache_interval", "feature_cache_interval"):
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(
                f"`{name}` must be None (no cache) or an int >= 1 (refresh every that many steps); got {value!r}."
            )


def orders_from_original(orders: torch.Tensor) -> torch.Tensor:
    """An order of LTH14/mar (`sample_orders`: its first `mask_len` entries are masked, so it ends with the tokens made
    first) in our generation order: the same masks at every step."""
    return orders.flip(-1)


def _randperm(n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(n, generator=generator, device=generator.device if generator else "cpu")


def make_orders(
    order: str | torch.Tensor,
    batch_size: int,
    grid_size: int,
    generator: torch.Generator | list[torch.Generator] | None,
) -> torch.Tensor:
    """Orders `(B, L)` for an `order` name (drawn with `generator`, one per image) or the given tensor.

    `"random"`: one `torch.randperm` per image (the original's). `"raster"`: the top-left token first, row by row (the
    same for every image, no randomness). `"checkerboard"`: the cells with `(row + col)` even first, in a random
    order, then the others in a random order.
    """
    if isinstance(order, torch.Tensor):
        return order
    num_tokens = grid_size**2
    if order == "raster":
        return torch.arange(num_tokens).expand(batch_size, -1)
    generators = generator if isinstance(generator, list) else [generator] * batch_size
    if order == "random":
        return torch.stack([_randperm(num_tokens, g) for g in generators])
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    skeleton = ((rows + cols) % 2 == 0).flatten()
    first, rest = skeleton.nonzero().flatten(), (~skeleton).nonzero().flatten()  # skeleton: ceil(L / 2) cells
    orders = []
    for g in generators:
        first_order = first[_randperm(len(first), g).cpu()]
        rest_order = rest[_randperm(len(rest), g).cpu()]
        orders.append(torch.cat([first_order, rest_order]))
    return torch.stack(orders)


def prepare_orders(
    order: str | torch.Tensor,
    orders: torch.Tensor | None,
    batch_size: int,
    grid_size: int,
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """A call's orders `(B, L)`: `orders` if given, else `make_orders(order, ...)`; with `mask`, the tokens to keep
    move (stably) to the start, as if already made, so the order of the others is kept."""
    if orders is None:
        orders = make_orders(order, batch_size, grid_size, generator)
    orders = orders.to(device=device, dtype=torch.long)
    if mask is not None:
        unknown = (mask.to(device).gather(1, orders) != 0).to(torch.uint8)
        orders = orders.gather(1, torch.argsort(unknown, dim=1, stable=True))
    return orders


def skeleton_schedule(num_tokens: int, num_inference_steps: int) -> list[int]:
    """Tokens still unknown after each step: the first `ceil(L / 2)` tokens of the order over all steps but the last
    (cosine schedule, at least one token per step), the other half in the last step. One step: all tokens at once."""
    if num_inference_steps == 1:
        return [0]
    skeleton, skeleton_steps = math.ceil(num_tokens / 2), num_inference_steps - 1
    mask_lens, unknown = [], skeleton
    for step in range(skeleton_steps):
        target = np.floor(skeleton * np.cos(math.pi / 2.0 * (step + 1) / skeleton_steps))
        unknown = int(max(0, min(unknown - 1, target)))
        mask_lens.append(num_tokens - skeleton + unknown)
    return mask_lens + [0]


def max_outer_steps(outer_schedule: str, num_tokens: int, tokens_per_step: int = 1) -> int:
    """The most outer steps `outer_schedule` can spend on `num_tokens` unknown tokens when each step predicts at least
    one token, and on average at least `tokens_per_step` (a sampling preset's): `num_tokens` with the cosine schedule,
    `ceil(num_tokens / 2) + 1` (at most `num_tokens`) with the skeleton one."""
    high = num_tokens if outer_schedule != "skeleton" else min(num_tokens, math.ceil(num_tokens / 2) + 1)
    return min(high, max(1, num_tokens // tokens_per_step))


def outer_mask_schedule(outer_schedule: str, num_tokens: int, num_inference_steps: int) -> list[int]:
    """Tokens still unknown after each outer step for a schedule in `OUTER_SCHEDULES` (checked by the caller)."""
    if outer_schedule == "cosine":
        return mask_schedule(num_tokens, num_inference_steps)
    return skeleton_schedule(num_tokens, num_inference_steps)


def check_outer_schedule(outer_schedule: str, num_tokens: int, num_inference_steps: int) -> None:
    if not isinstance(outer_schedule, str) or outer_schedule not in OUTER_SCHEDULES:
        raise ValueError(f"`outer_schedule` must be one of {OUTER_SCHEDULES}; got {outer_schedule!r}.")
    high = max_outer_steps(outer_schedule, num_tokens)
    if num_inference_steps > high:
        raise ValueError(
            f'`num_inference_steps` must be in [1, {high}] with `outer_schedule="{outer_schedule}"` on '
            f"{num_tokens} tokens (every step predicts at least one token); got {num_inference_steps}."
        )
