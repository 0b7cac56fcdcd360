"""CPU inference for `MARTransformer2DModel`: large block intermediates go to buffers shared by every block of a call.

PyTorch's CPU allocator gives each tensor above glibc's mmap threshold (32 MB) fresh pages from the OS, and the page
faults cost about as much as writing the values (MAR-B's QKV and MLP hidden outputs are 47-63 MB per block at batch
8). Inside `cpu_inference(transformer)` every block of the model runs the same operations, but writes its QKV and MLP
hidden outputs into one buffer reused by all blocks (the QKV is consumed by the attention before the MLP runs), and
takes the GELU and the residual sums in place. The values
are identical to the plain forward (the same `addmm` that `F.linear` runs; `x + y == y + x` in floating point). The
buffer is released at the end of each forward of the model; on exit the blocks get their own forward back. The models themselves hold no trace of this.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from diffusers_mar.models.transformer_mar import MARTransformer2DModel, MARTransformerBlock


def is_plain_linear(layer: nn.Module) -> bool:
    """Whether `layer` is an `nn.Linear` (no subclass) whose forward nothing (e.g. an Accelerate hook) replaced."""
    return type(layer) is nn.Linear and "forward" not in layer.__dict__ and not hasattr(layer, "_hf_hook")


def _buffered_linear(layer: nn.Linear, x: torch.Tensor, buffers: dict, key: str) -> torch.Tensor:
    """`layer(x)` written into `buffers[key]` (grown when too small); the plain call when that cannot be exact."""
    if (
        layer.bias is None
        or not x.is_contiguous()
        or x.dtype != layer.weight.dtype
        or x.device != layer.weight.device
        or torch.is_autocast_enabled(x.device.type)
    ):
        return layer(x)
    numel = x.numel() // x.shape[-1] * layer.out_features
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel or buffer.dtype != x.dtype:
        buffer = buffers[key] = x.new_empty(numel)
    out = buffer[:numel].view(-1, layer.out_features)
    torch.addmm(layer.bias, x.reshape(-1, x.shape[-1]), layer.weight.t(), out=out)
    return out.view(*x.shape[:-1], layer.out_features)


def _buffered_block_forward(
    block: MARTransformerBlock, buffers: dict, hidden_states: torch.Tensor, query_indices: torch.Tensor | None = None
) -> torch.Tensor:
    # MARTransformerBlock.forward (eval mode: no dropout) with the QKV, then the MLP hidden output, in one buffer.
    attn = block.attn
    q, k, v = _buffered_linear(attn.to_qkv, block.norm1(hidden_states), buffers, "hidden").chunk(3, dim=-1)
    if query_indices is not None:
        q = torch.gather(q, 1, query_indices.unsqueeze(-1).expand(-1, -1, q.shape[-1]))
        index = query_indices.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
        hidden_states = torch.gather(hidden_states, 1, index)
    out = F.scaled_dot_product_attention(attn._heads(q), attn._heads(k), attn._heads(v))
    hidden_states = attn.to_out(out.transpose(1, 2).flatten(2)).add_(hidden_states)
    mlp_hidden = _buffered_linear(block.ff.fc1, block.norm2(hidden_states), buffers, "hidden")  # q, k, v are dead
    return block.ff.fc2(torch.ops.aten.gelu_(mlp_hidden)).add_(hidden_states)


def _eligible_blocks(model: nn.Module) -> list[MARTransformerBlock]:
    """The blocks of an eval-mode float32 CPU transformer that nothing (hooks, compilation) has wrapped."""
    if not isinstance(model, MARTransformer2DModel) or model.training or torch.compiler.is_compiling():
        return []
    if getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_hf_hook"):
        return []
    blocks = []
    for block in [*model.encoder_blocks, *model.decoder_blocks]:
        linears = [block.attn.to_qkv, block.attn.to_out, block.ff.fc1, block.ff.fc2]
        if "forward" in block.__dict__ or hasattr(block, "_hf_hook") or not all(map(is_plain_linear, linears)):
            continue
        if block.attn.to_qkv.weight.device.type == "cpu" and block.attn.to_qkv.weight.dtype == torch.float32:
            blocks.append(block)
    return blocks


@contextlib.contextmanager
def cpu_inference(*models: nn.Module):
    """Run the eligible blocks of the given transformers with shared buffers (see the module docstring).

    Applies only with gradients and CPU autocast off, to eval-mode float32 CPU models that no hook or compilation has
    wrapped; any other model (a diffusion head, a CUDA model) passes through unchanged. Yields the number of blocks
    switched.
    """
    # Under CPU autocast the in-place residual sums would keep the stream in bfloat16 (the plain `x + y` promotes it).
    plain = torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
    blocks = [] if plain else [block for model in models for block in _eligible_blocks(model)]
    buffers: dict = {}
    for block in blocks:
        block.forward = functools.partial(_buffered_block_forward, block, buffers)
    # The buffer lives for one forward of the model, not between calls: a sampler's other work (the diffusion head)
    # does not hold it, so the peak memory is no higher than without buffers.
    releases = [model.register_forward_hook(lambda *args: buffers.clear()) for model in models if blocks]
    try:
        yield len(blocks)
    finally:
        for block in blocks:
            del block.forward
        for release in releases:
            release.remove()
        buffers.clear()
