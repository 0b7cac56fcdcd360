"""What diffusers checks on each of its own models (`ModelTesterMixin`, `TrainingTesterMixin`, `MemoryTesterMixin` in
diffusers' `tests/models/testing_utils/`), run on our four (the MAR, AR and VAR transformers, the head) with tiny
configs on the CPU (issues 12 and 15).

Each test takes a `case`: the model class, a tiny config and the inputs the pipeline or the training loss passes.
Weights are perturbed (`perturb_`) because the original initialisation zeroes the head's output, which would make
every comparison of head outputs hold trivially.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.training_utils import EMAModel

from diffusers_mar import ARTransformer2DModel, MARDiffusionHead, MARTransformer2DModel, VARTransformer2DModel
from diffusers_mar.models.diffusion_head_mar import MARDiffusionHeadOutput
from tests.testing_utils import (
    TINY_AR_TRANSFORMER_CONFIG,
    TINY_PIXEL_HEAD_CONFIG,
    TINY_PIXEL_TRANSFORMER_CONFIG,
    TINY_VAR_TRANSFORMER_CONFIG,
    perturb_,
)

CPU = torch.device("cpu")


@dataclass
class ModelCase:
    model_class: type
    config: dict
    output_class: type
    num_blocks: int  # blocks that gradient checkpointing wraps
    uncast_linears: int = 2  # linears that layerwise casting keeps (diffusers' skip patterns: proj_in, proj_out, norm)

    def make(self, seed: int = 0) -> torch.nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return perturb_(self.model_class(**self.config), seed).eval()

    def inputs(self, predict: bool = True, seed: int = 0) -> dict:
        """The inputs of one sampling step (`predict=True`: the transformer computes the predicted rows only, as in
        the pipeline) or of the training loss (`predict=False`: all rows)."""
        g = torch.Generator().manual_seed(seed)
        if self.model_class is MARDiffusionHead:
            return {
                "sample": torch.randn(6, 4, generator=g),
                "timestep": torch.randint(0, 1000, (6,), generator=g),
                "condition": torch.randn(6, 16, generator=g),
            }
        if self.model_class is VARTransformer2DModel:  # teacher forcing: the input of every scale after the first
            return {"class_labels": torch.tensor([3, 10]), "hidden_states": torch.randn(2, 13, 4, generator=g)}
        orders = torch.stack([torch.randperm(16, generator=g) for _ in range(2)])
        if self.model_class is ARTransformer2DModel:  # every row at once, in a random order (sampling or training)
            tokens = torch.randn(2, 16, 4, generator=g)
            return {"hidden_states": tokens, "class_labels": torch.tensor([3, 10]), "orders": orders}
        mask = torch.zeros(2, 16).scatter(1, orders[:, :10], 1.0)  # 10 unknown tokens per row
        inputs = {
            "hidden_states": torch.randn(2, 16, 4, generator=g),
            "mask": mask,
            "class_labels": torch.tensor([3, 10]),
        }
        if predict:
            inputs["predict_indices"] = orders[:, 7:10].sort(dim=1).values  # 3 of the unknown tokens
        return inputs

    def output_shape(self, predict: bool = True) -> tuple[int, ...]:
        if self.model_class is MARDiffusionHead:
            return (6, 8)
        if self.model_class is ARTransformer2DModel:
            return (2, 16, 16)
        if self.model_class is VARTransformer2DModel:
            return (2, 14, 32)  # logits of the 1 + 4 + 9 tokens over the 32 codes
        return (2, 3 if predict else 16, 16)


CASES = {
    "transformer": ModelCase(MARTransformer2DModel, TINY_PIXEL_TRANSFORMER_CONFIG, Transformer2DModelOutput, 2),
    "head": ModelCase(MARDiffusionHead, TINY_PIXEL_HEAD_CONFIG, MARDiffusionHeadOutput, 1),
    "ar_transformer": ModelCase(ARTransformer2DModel, TINY_AR_TRANSFORMER_CONFIG, Transformer2DModelOutput, 2),
    "var_transformer": ModelCase(VARTransformer2DModel, TINY_VAR_TRANSFORMER_CONFIG, Transformer2DModelOutput, 2, 3),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request) -> ModelCase:
    return CASES[request.param]


@torch.no_grad()
def _output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


@torch.no_grad()
def _sampler_output(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """What the pipeline calls: the transformer's forward (the AR one row by row with its KV cache), or the head's fast
    path (not its `forward`)."""
    if isinstance(model, ARTransformer2DModel):
        cache = model.make_kv_cache(inputs["hidden_states"].shape[0])
        return torch.cat([model(**inputs, kv_cache=cache, return_dict=False)[0] for _ in range(4)], dim=1)
    if isinstance(model, VARTransformer2DModel):  # scale by scale with its KV cache
        labels, hidden_states = inputs["class_labels"], inputs["hidden_states"]
        cache = model.make_kv_cache(labels.shape[0])
        scale_inputs = [None, hidden_states[:, :4], hidden_states[:, 4:]]
        return torch.cat([model(labels, x, kv_cache=cache, return_dict=False)[0] for x in scale_inputs], dim=1)
    if not isinstance(model, MARDiffusionHead):
        return _output(model, inputs)
    modulation = model.compute_modulation(inputs["timestep"][:2], model.embed_condition(inputs["condition"]))
    return torch.stack([model.forward_with_modulation(inputs["sample"], m) for m in modulation])


def _assert_same_weights(model: torch.nn.Module, other: torch.nn.Module) -> None:
    state, other_state = model.state_dict(), other.state_dict()
    assert state.keys() == other_state.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, other_state[name]), name


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def test_outputs_are_dataclasses_and_tuples_with_the_same_tensor(case):
    model, inputs = case.make(), case.inputs()
    with torch.no_grad():
        as_dict = model(**inputs)
        as_tuple = model(**inputs, return_dict=False)
    assert isinstance(as_dict, case.output_class) and isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert as_dict.sample.shape == case.output_shape()
    assert torch.equal(as_dict.sample, as_tuple[0]) and torch.equal(as_dict[0], as_tuple[0])
    assert torch.count_nonzero(as_tuple[0]) > 0


def test_determinism_and_input_dependence(case):
    model = case.make()
    first, second = _output(model, case.inputs()), _output(model, case.inputs())
    assert torch.equal(first, second)
    assert not torch.allclose(first, _output(model, case.inputs(seed=1)))


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_save_load_round_trip(case, tmp_path, safe_serialization):
    model = case.make()
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    loaded = case.model_class.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    _assert_same_weights(model, loaded)
    assert torch.equal(_output(loaded, case.inputs()), _output(model, case.inputs()))
    _assert_same_weights(model, case.model_class.from_pretrained(tmp_path, low_cpu_mem_usage=False))


def test_save_load_variant(case, tmp_path):
    model = case.make()
    model.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    with pytest.raises(OSError, match="diffusion_pytorch_model"):
        case.model_class.from_pretrained(tmp_path)  # no variant-less weights in the folder
    loaded = case.model_class.from_pretrained(tmp_path, variant="fp16").eval()
    assert torch.equal(_output(loaded, case.inputs()), _output(model, case.inputs()))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_sharded_checkpoints(case, tmp_path, variant):
    model = case.make()
    size_kb = sum(p.numel() * p.element_size() for p in model.parameters()) // 1024
    model.save_pretrained(tmp_path, max_shard_size=f"{max(1, size_kb // 3)}KB", variant=variant)
    suffix = f".{variant}" if variant else ""
    index = json.loads((tmp_path / f"diffusion_pytorch_model.safetensors.index{suffix}.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and shards == {p.name for p in tmp_path.glob("*.safetensors")}
    loaded = case.model_class.from_pretrained(tmp_path, variant=variant).eval()
    _assert_same_weights(model, loaded)
    assert torch.equal(_output(loaded, case.inputs()), _output(model, case.inputs()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_from_pretrained_torch_dtype(case, tmp_path, dtype):
    model = case.make()
    model.save_pretrained(tmp_path)
    loaded = case.model_class.from_pretrained(tmp_path, torch_dtype=dtype).eval()
    assert loaded.dtype == dtype and all(p.dtype == dtype for p in loaded.parameters())
    _assert_same_weights(model.to(dtype), loaded)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs().items()}
    output = _output(loaded, inputs)
    assert output.dtype == dtype and torch.isfinite(output).all()


# ---------------------------------------------------------------------------------------------------------------------
# Training


def _training_loss(model: torch.nn.Module, case: ModelCase, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # the same dropout masks in runs that are compared
    output = model(**case.inputs(predict=False), return_dict=False)[0]
    target = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    return torch.nn.functional.mse_loss(output.float(), target)


def test_training_step_reaches_every_parameter_and_lowers_the_loss(case):
    model = case.make().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = _training_loss(model, case)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"
    optimizer.step()
    optimizer.zero_grad()
    assert _training_loss(model, case) < loss


def test_training_with_ema_model_and_its_round_trip(case, tmp_path):
    model = case.make().train()
    ema = EMAModel(model.parameters(), model_cls=case.model_class, model_config=model.config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        _training_loss(model, case, seed=step).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(model.parameters())
    # The first EMA step copies the weights; the second one averages with the warm-up decay (1 + 1) / (10 + 1).
    decay = ema.get_decay(ema.optimization_step)
    assert decay == pytest.approx(2 / 11)
    for shadow, old, new in zip(ema.shadow_params, before, model.parameters()):
        assert not torch.equal(old, new)
        torch.testing.assert_close(shadow, decay * old + (1 - decay) * new.detach(), rtol=1e-6, atol=1e-7)

    # As diffusers' training examples: save the EMA model, load it back as a model of our class.
    ema.save_pretrained(tmp_path / "ema")
    loaded = case.model_class.from_pretrained(tmp_path / "ema")
    for shadow, param in zip(ema.shadow_params, loaded.parameters()):
        assert torch.equal(shadow, param)
    restored = EMAModel.from_pretrained(tmp_path / "ema", model_cls=case.model_class)
    assert restored.optimization_step == 2
    for shadow, other in zip(ema.shadow_params, restored.shadow_params):
        assert torch.equal(shadow, other)


def test_mixed_precision_training_step(case):
    model = case.make().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**case.inputs(predict=False), return_dict=False)[0]
    assert torch.isfinite(output).all()  # float32 after a final LayerNorm, which autocast runs in float32
    torch.nn.functional.mse_loss(output.float(), torch.zeros(output.shape)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_gradient_checkpointing_on_off_is_equivalent_and_applied(case):
    model = case.make().train()
    assert not model.is_gradient_checkpointing
    loss = _training_loss(model, case)
    loss.backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}

    checkpointed = case.make().train()  # same seed, same weights
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    calls = []
    wrapped = checkpointed._gradient_checkpointing_func
    checkpointed._gradient_checkpointing_func = lambda block, *args: calls.append(block) or wrapped(block, *args)
    loss_2 = _training_loss(checkpointed, case)  # dropout on: the checkpoint replays the same RNG state
    loss_2.backward()
    assert len(calls) == case.num_blocks  # every block, each once
    torch.testing.assert_close(loss_2, loss, rtol=0, atol=1e-6)
    for name, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)

    checkpointed.disable_gradient_checkpointing()
    assert not checkpointed.is_gradient_checkpointing
    calls.clear()
    _training_loss(checkpointed, case).backward()
    assert calls == []


# ---------------------------------------------------------------------------------------------------------------------
# Hooks: layerwise casting and group offloading (every hook kind works on the CPU too)


@pytest.mark.parametrize("storage_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
def test_layerwise_casting_inference_is_close_to_the_compute_dtype(case, storage_dtype):
    def bf16(inputs: dict) -> dict:
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}

    model = case.make().to(torch.bfloat16)
    reference = _output(model, bf16(case.inputs())).float()
    other_input = _output(model, bf16(case.inputs(seed=1))).float()
    footprint = model.get_memory_footprint()
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.bfloat16)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.dtype == storage_dtype for m in linears) >= len(linears) - case.uncast_linears
    assert model.get_memory_footprint() < footprint
    output = _output(model, bf16(case.inputs())).float()
    assert output.shape == case.output_shape() and torch.isfinite(output).all()
    # float8 keeps 2-3 mantissa bits: the output moves (by 0.01-0.23 of the distance to another input's output on
    # the tiny models), but stays closer to its bfloat16 value than to another input's.
    assert (output - reference).abs().mean() < 0.5 * (other_input - reference).abs().mean()


@pytest.mark.parametrize(
    "storage_dtype, compute_dtype",
    [(torch.float16, torch.float32), (torch.float8_e4m3fn, torch.float32), (torch.float8_e4m3fn, torch.bfloat16)],
    ids=["fp16-fp32", "e4m3-fp32", "e4m3-bf16"],
)
def test_layerwise_casting_training_step(case, storage_dtype, compute_dtype):
    model = case.make().to(compute_dtype)
    model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype)
    model.train()
    inputs = {k: v.to(compute_dtype) if v.is_floating_point() else v for k, v in case.inputs(predict=False).items()}
    output = model(**inputs, return_dict=False)[0]
    assert output.dtype == compute_dtype
    loss = torch.nn.functional.mse_loss(output.float(), torch.zeros(output.shape))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_group_offloading_gives_the_same_output(case, tmp_path, offload_type):
    # Offloading to disk: an offloaded layer's weights are not its values until the hook loads them back, so a layer
    # that runs without its hook (a bypassed forward) changes the output even with both devices the CPU.
    inputs = case.inputs()
    expected = _output(case.make(), inputs)
    expected_sampler = _sampler_output(case.make(), inputs)
    model = case.make()
    kwargs = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    model.enable_group_offload(CPU, CPU, offload_type=offload_type, offload_to_disk_path=str(tmp_path), **kwargs)
    assert list(Path(tmp_path).glob("*.safetensors"))
    hooked = [m for m in model.modules() if getattr(m, "_diffusers_hook", None) is not None]
    assert hooked and all(m._diffusers_hook.get_hook("group_offloading") is not None for m in hooked)
    assert torch.equal(_sampler_output(model, inputs), expected_sampler)
    assert torch.equal(_output(model, inputs), expected)
    assert torch.equal(_sampler_output(model, inputs), expected_sampler)  # and again, after offloading


def test_group_offloading_with_layerwise_casting(case):
    inputs = case.inputs()
    model = case.make()
    model.enable_group_offload(CPU, CPU, offload_type="block_level", num_blocks_per_group=1)
    model.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    reference = case.make()
    reference.enable_layerwise_casting(storage_dtype=torch.float16, compute_dtype=torch.float32)
    assert torch.equal(_output(model, inputs), _output(reference, inputs))
