"""`cpu_inference`: the transformer's blocks with shared buffers give the plain forward's values, and leave hooks alone."""

import pytest
import torch

from diffusers_mar import MARTransformer2DModel
from diffusers_mar.models.cpu_inference import cpu_inference
from tests.testing_utils import TINY_PIXEL_TRANSFORMER_CONFIG, perturb_, tiny_transformer_inputs


def _model():
    return perturb_(MARTransformer2DModel(**{**TINY_PIXEL_TRANSFORMER_CONFIG, "num_layers": 2})).eval()


def test_buffered_blocks_equal_the_plain_forward_and_are_restored():
    model = _model()
    tokens, mask, labels, predict = tiny_transformer_inputs()
    with torch.no_grad():
        expected_full = model(tokens, mask, labels).sample
        expected_part = model(tokens, mask, labels, predict_indices=predict).sample
        with cpu_inference(model) as switched, torch.profiler.profile() as profile:
            assert switched == 4  # 2 encoder + 2 decoder blocks
            full = model(tokens, mask, labels).sample
            part = model(tokens, mask, labels, predict_indices=predict).sample
    assert "aten::gelu_" in {event.name for event in profile.events()}  # the buffered path ran
    torch.testing.assert_close(full, expected_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(part, expected_part, rtol=0, atol=1e-6)
    assert not any("forward" in block.__dict__ for block in [*model.encoder_blocks, *model.decoder_blocks])


def test_restored_after_an_error_and_inactive_with_gradients_or_in_training():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), cpu_inference(model):
        raise RuntimeError("boom")
    assert not any("forward" in block.__dict__ for block in model.encoder_blocks)
    with cpu_inference(model) as switched:  # gradients on
        assert switched == 0
    with torch.no_grad(), cpu_inference(model.train()) as switched:
        assert switched == 0
    with torch.no_grad(), cpu_inference(model.eval().to(torch.bfloat16)) as switched:
        assert switched == 0


def test_replaced_linear_forwards_stay_in_charge():
    # An Accelerate hook (offload, quantisation) replaces a layer's forward: the buffers must not bypass it.
    model = _model()
    calls = []
    layer = model.encoder_blocks[0].ff.fc1
    layer.forward = lambda x: calls.append("fc1") or torch.nn.Linear.forward(layer, x)
    with torch.no_grad(), cpu_inference(model) as switched:
        model(*tiny_transformer_inputs()[:3])
    assert switched == 3 and calls == ["fc1"]


def test_the_buffer_lives_for_one_forward_only():
    # Between transformer calls (while a sampler runs the diffusion head) no buffer may stay allocated.
    model = _model()
    seen = []
    with torch.no_grad(), cpu_inference(model):
        block = model.encoder_blocks[0]
        buffers = block.forward.args[1]
        model.decoder_blocks[-1].register_forward_hook(
            lambda *args: seen.append(sum(b.numel() for b in buffers.values()))
        )
        model(*tiny_transformer_inputs()[:3])
        assert seen[0] > 0 and buffers == {}
    assert model._forward_hooks == {}  # the release hook is removed on exit
