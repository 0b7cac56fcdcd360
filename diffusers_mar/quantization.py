"""Dynamic int8 quantization of a pipeline's linear layers for CPU inference (`quantize_int8`, `--dtype int8`).

Each linear layer of the transformer and of the diffusion head becomes PyTorch's `DynamicQuantizedLinear`
(`torch.ao.quantization.quantize_dynamic`): int8 weights with one scale per tensor (PyTorch's default dynamic
qconfig), and each input quantized to int8 at every call from its own range. The
products run in int8 with int32 accumulation (FBGEMM / oneDNN), which on a CPU without native bfloat16 (AVX2) is
the cheapest arithmetic there is: at batch 1 the weights are read four times less. Measured in `docs/benchmarks.md`.

What stays in float32:
- the input and output projections of every model (`proj_in`, `proj_out`): the noisy token and the prediction
  (the head), the logits over the codebook (VAR) keep float32 precision, and they are small;
- norms, embeddings, attention (the products of activations), the token canvas, the noise and the schedulers.
The diffusion head's AdaLN modulation (one `Linear` whose rows are cut per block) becomes one quantized layer per
block (`Int8AdaLNModulation`), so it is quantized as well.

This is not exact to the original code: int8 samples differ from float32's (`docs/usage.md`). It changes the models
in place, works on float32 CPU pipelines only, and a quantized pipeline cannot be saved (save before quantizing).
`torch.ao.quantization` is deprecated in PyTorch in favour of `torchao`, whose CPU int8 path runs eagerly through
dequantized float products (about 20x slower than float32 here, 2026-12-07, torchao 0.18): the `torch.ao` path is
the one that is fast on the CPU wheels today.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

# The layers left in float32 in every model (see the module docstring).
FLOAT32_LINEARS = ("proj_in", "proj_out")


def _quantize_linear(layer: nn.Linear) -> nn.Module:
    """`layer` as a `DynamicQuantizedLinear` (int8 weights, dynamic int8 inputs)."""
    with warnings.catch_warnings():
        # torch.ao.quantization's deprecation notices: the user chose this path knowingly (module docstring).
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)[0]


class Int8AdaLNModulation(nn.Module):
    """`MARAdaLNModulation` with one int8 layer per block: the same `forward(y, block=None)`, `block_rows` and
    `out_features`."""

    def __init__(self, modulation: nn.Linear):
        super().__init__()
        self.out_features = modulation.out_features
        self.block_rows = list(modulation.block_rows)
        blocks = []
        for rows in self.block_rows:
            layer = nn.Linear(modulation.in_features, rows.stop - rows.start)
            with torch.no_grad():
                layer.weight.copy_(modulation.weight[rows])
                layer.bias.copy_(modulation.bias[rows])
            blocks.append(_quantize_linear(layer))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, y: torch.Tensor, block: int | None = None) -> torch.Tensor:
        if block is not None:
            return self.blocks[block](y)
        return torch.cat([layer(y) for layer in self.blocks], dim=-1)


def _quantize_children(module: nn.Module, keep: tuple[str, ...] = ()) -> None:
    """Replace the plain `nn.Linear` layers below `module` (and its AdaLN modulation), except its children named in
    `keep`."""
    from diffusers_mar.models.diffusion_head_mar import MARAdaLNModulation

    for name, child in module.named_children():
        if name in keep:
            continue
        if isinstance(child, MARAdaLNModulation):
            setattr(module, name, Int8AdaLNModulation(child))
        elif type(child) is nn.Linear:
            setattr(module, name, _quantize_linear(child))
        else:
            _quantize_children(child)


def quantize_model_int8(model: nn.Module) -> None:
    """Quantize the linear layers of one float32 CPU model in place (module docstring)."""
    _quantize_children(model, keep=FLOAT32_LINEARS)
    model.int8_quantized = True
    model.eval()


def refuse_saving_int8(names: list[str], subject: str) -> None:
    """The save refusal of `save_pretrained` (pipeline and model): a `ValueError` when `names` (the quantized models)
    is not empty."""
    if names:
        raise ValueError(
            f"{subject} {', '.join(names)} is quantized to int8 (`quantize_int8`), which cannot be saved; save the "
            "float32 one, and quantize it after loading."
        )


def quantize_int8(pipe):
    r"""
    Quantize the linear layers of a pipeline's transformer and diffusion head to dynamic int8, in place, for CPU
    inference (`diffusers_mar.quantization`). VAR's tokenizer and any VAE stay in float32.

    Args:
        pipe (`MARPipeline`, `ARPipeline` or `VARPipeline`):
            A float32 pipeline on the CPU (`pipe.to("cpu", torch.float32)`), not yet quantized.

    Returns:
        The same pipeline. Sampling works as before; `save_pretrained` is refused.
    """
    from diffusers_mar.pipelines.pipeline_token_generator import TokenGeneratorPipeline

    if not isinstance(pipe, TokenGeneratorPipeline):
        raise TypeError(f"`pipe` must be a MARPipeline, ARPipeline or VARPipeline; got {type(pipe).__name__}.")
    models = {name: getattr(pipe, name, None) for name in ("transformer", "diffusion_head")}
    models = {name: model for name, model in models.items() if model is not None}
    for name, model in models.items():
        if getattr(model, "int8_quantized", False):
            raise ValueError(f"`pipe.{name}` is already quantized to int8; quantize a float32 pipeline once.")
        parameter = next(model.parameters())
        if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
            raise ValueError(
                f"int8 quantization needs a float32 pipeline on the CPU; `pipe.{name}` is {parameter.dtype} on "
                f"{parameter.device}. Load it with dtype float32 and device cpu (`pipe.to('cpu', torch.float32)`)."
            )
    if not ({"x86", "fbgemm", "onednn", "qnnpack"} & set(torch.backends.quantized.supported_engines)):
        raise RuntimeError("This PyTorch build has no quantized CPU engine; int8 quantization is not available.")
    for model in models.values():
        quantize_model_int8(model)
    return pipe
