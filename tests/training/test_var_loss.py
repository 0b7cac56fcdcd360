"""The VAR objective (issue 26): label-smoothed cross-entropy of every token under teacher forcing, the label drop,
the per-token weights and progressive training, the optimiser's groups and schedule, as FoundationVision/VAR."""

import math

import pytest
import torch

from diffusers_mar import VARTransformer2DModel, VARVQModel
from tests.testing_utils import TINY_VAR_TRANSFORMER_CONFIG, perturb_
from training.var_loss import (
    VARTrainingModule,
    progressive_stage,
    token_loss_weights,
    var_learning_rate_factor,
    var_loss,
    var_weight_decay_at,
    var_weight_decay_param_groups,
)

# A one-channel 6x6 tokenizer with the tiny transformer's scales (1, 2, 3), 32 codes of 4 channels.
TINY_VAR_VQ_CONFIG = {
    "in_channels": 1,
    "out_channels": 1,
    "sample_size": 6,
    "ch": 8,
    "ch_mult": (1, 2),
    "num_res_blocks": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "num_vq_embeddings": 32,
    "share_quant_resi": 0,
    "patch_nums": (1, 2, 3),
}


def tiny_models(seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = perturb_(VARTransformer2DModel(**TINY_VAR_TRANSFORMER_CONFIG), seed).eval()
        vqvae = perturb_(VARVQModel(**TINY_VAR_VQ_CONFIG), seed + 1, std=0.2).eval()
    return transformer, vqvae


def tiny_batch(batch: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    indices = [torch.randint(0, 32, (batch, side * side), generator=g) for side in (1, 2, 3)]
    return indices, torch.randint(0, 10, (batch,), generator=g)


def hand_cross_entropy(logits, targets, smoothing):
    # -(1 - eps) log p[target] - eps / V * sum_v log p[v], per token
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    nll = -log_probs.gather(-1, targets[..., None])[..., 0]
    return (1 - smoothing) * nll - smoothing * log_probs.mean(dim=-1)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_is_the_mean_label_smoothed_cross_entropy_of_every_token(smoothing):
    transformer, vqvae = tiny_models()
    indices, labels = tiny_batch()
    out = var_loss(transformer, vqvae, indices, labels, label_smoothing=smoothing, label_drop_prob=0.0)
    with torch.no_grad():
        logits = transformer(labels, vqvae.teacher_forcing_input(indices)).sample  # (4, 14, 32)
    expected = hand_cross_entropy(logits, torch.cat(indices, dim=1), smoothing).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert out.logits.shape == (4, 14, 32) and torch.equal(out.class_labels, labels)
    # The targets are the indices of every scale, in order.
    assert torch.equal(out.targets, torch.cat(indices, dim=1))


def test_label_smoothing_moves_the_loss_towards_the_uniform_target():
    transformer, vqvae = tiny_models()
    indices, labels = tiny_batch()
    plain = var_loss(transformer, vqvae, indices, labels, label_smoothing=0.0, label_drop_prob=0.0).token_losses
    smooth = var_loss(transformer, vqvae, indices, labels, label_smoothing=0.1, label_drop_prob=0.0).token_losses
    out = var_loss(transformer, vqvae, indices, labels, label_smoothing=1.0, label_drop_prob=0.0).token_losses
    uniform = -torch.log_softmax(
        transformer(labels, vqvae.teacher_forcing_input(indices)).sample.detach().double(), dim=-1
    ).mean(dim=-1)
    torch.testing.assert_close(smooth.double(), 0.9 * plain.double() + 0.1 * uniform, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), uniform, rtol=1e-5, atol=1e-6)


def test_label_drop_replaces_labels_by_the_unconditional_class_in_training_only():
    transformer, vqvae = tiny_models()
    indices, labels = tiny_batch(batch=4)
    all_dropped = var_loss(transformer, vqvae, indices, labels, label_drop_prob=1.0).class_labels
    assert all_dropped.tolist() == [10] * 4
    # The dropped batch is the unconditional one: the same loss as labels = num_classes given directly.
    dropped = var_loss(transformer, vqvae, indices, labels, label_smoothing=0.0, label_drop_prob=1.0).loss
    with torch.no_grad():
        logits = transformer(torch.full_like(labels, 10), vqvae.teacher_forcing_input(indices)).sample
    expected = hand_cross_entropy(logits, torch.cat(indices, dim=1), 0.0).mean()
    torch.testing.assert_close(dropped.double(), expected, rtol=1e-5, atol=1e-6)
    big = torch.zeros(4000, dtype=torch.long)
    from training.mar_loss import drop_labels

    dropped = drop_labels(big, 10, 0.1, generator=torch.Generator().manual_seed(0))
    assert 0.08 < (dropped == 10).float().mean().item() < 0.12
    # The training module drops in train mode only.
    module = VARTrainingModule(transformer, vqvae, label_drop_prob=1.0).eval()
    pixels = torch.rand(4, 1, 6, 6) * 2 - 1
    eval_loss = module(pixels, labels)
    expected = var_loss(transformer, vqvae, vqvae.encode(pixels).indices, labels, label_drop_prob=0.0).loss
    torch.testing.assert_close(eval_loss, expected)


def test_progressive_training_leaves_scales_out_in_train_mode_only():
    # The validation loss (eval mode) covers every scale whatever the progressive stage of the step.
    transformer, vqvae = tiny_models()
    module = VARTrainingModule(transformer, vqvae, label_drop_prob=0.0, prog_fraction=0.5, prog_start=1)
    module.total_steps, module.warmup_steps, module.step = 100, 10, 0
    assert module.stage[0] == 1  # the first stage of training: scales 1 and 2 of 3
    pixels = torch.rand(4, 1, 6, 6) * 2 - 1
    labels = torch.arange(4)
    transformer.eval()
    indices = vqvae.encode(pixels).indices
    full = var_loss(transformer, vqvae, indices, labels, label_drop_prob=0.0).loss
    staged = var_loss(transformer, vqvae, indices, labels, label_drop_prob=0.0, prog_si=1, prog_wp=1.0).loss
    assert not torch.allclose(full, staged)
    torch.testing.assert_close(module.eval()(pixels, labels), full)
    module.train()
    transformer.eval()  # no dropout in the tiny model either way; the module's mode alone decides the stage
    torch.testing.assert_close(module(pixels, labels), staged)


def test_token_weights_are_one_over_all_tokens_and_progressive_training_weights_the_newest_scale():
    torch.testing.assert_close(token_loss_weights([1, 2, 3]), torch.full((14,), 1 / 14))
    expected = torch.tensor([1 / 14] + [0.25 / 14] * 4)
    torch.testing.assert_close(token_loss_weights([1, 2, 3], prog_si=1, prog_wp=0.25), expected)
    assert token_loss_weights([1, 2, 3], prog_si=0).tolist() == pytest.approx([1 / 14])
    torch.testing.assert_close(token_loss_weights([1, 2, 3], prog_si=2, prog_wp=0.1), torch.full((14,), 1 / 14))
    # The loss of a progressive stage: only the scales up to prog_si, with those weights.
    transformer, vqvae = tiny_models()
    indices, labels = tiny_batch()
    out = var_loss(
        transformer, vqvae, indices, labels, label_smoothing=0.1, label_drop_prob=0.0, prog_si=1, prog_wp=0.25
    )
    with torch.no_grad():
        logits = transformer(labels, vqvae.teacher_forcing_input(indices)).sample
    ce = hand_cross_entropy(logits[:, :5], torch.cat(indices, dim=1)[:, :5], 0.1)
    torch.testing.assert_close(out.loss.double(), (ce * expected.double()).sum(dim=1).mean(), rtol=1e-5, atol=1e-6)


def original_progressive_stages(total, warmup, num_scales, pg, pg0, pgwp_it):
    """FoundationVision/VAR train.py train_one_ep and VARTrainer.train_step, stateful, transcribed."""
    prog_it, last_prog_si, first_prog, out = 0, -1, True, []
    for g_it in range(total):
        if g_it <= warmup:
            prog_si = pg0
        elif g_it >= total * pg:
            prog_si = num_scales - 1
        else:
            delta = num_scales - 1 - pg0
            progress = min(max((g_it - warmup) / (total * pg - warmup), 0), 1)
            prog_si = pg0 + round(progress * delta)
        if last_prog_si != prog_si:
            if last_prog_si != -1:
                first_prog = False
            last_prog_si = prog_si
            prog_it = 0
        prog_it += 1
        prog_wp = max(min(prog_it / pgwp_it, 1), 0.01)
        if first_prog:
            prog_wp = 1
        if prog_si == num_scales - 1:
            prog_si = -1
        out.append((prog_si, prog_wp))
    return out


def test_progressive_stages_follow_the_original_from_the_step_alone():
    expected = original_progressive_stages(total=60, warmup=5, num_scales=6, pg=0.8, pg0=1, pgwp_it=4)
    ours = [progressive_stage(step, 60, 5, 6, 0.8, 1, 4) for step in range(60)]
    assert [s for s, _ in ours] == [s for s, _ in expected]
    assert [w for _, w in ours] == pytest.approx([w for _, w in expected])
    assert {s for s, _ in ours} == {1, 2, 3, 4, -1} and any(w < 1 for _, w in ours)
    assert progressive_stage(7, 60, 5, 6, 0.0) == (-1, 1.0)


def test_the_loss_falls_on_a_fixed_batch():
    transformer, vqvae = tiny_models()
    transformer.train()
    module = VARTrainingModule(transformer, vqvae, label_drop_prob=0.0)
    pixels = torch.rand(8, 1, 6, 6, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.arange(8) % 10
    optimizer = torch.optim.AdamW(var_weight_decay_param_groups(transformer, 0.05), lr=1e-2, betas=(0.9, 0.95))
    losses = []
    for _ in range(20):
        loss = module(pixels, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert {"loss_mean", "loss_tail", "accuracy_mean", "accuracy_tail"} <= set(module.metrics)
    # The tokenizer is frozen and no sub-module: it is not trained nor saved with the module.
    assert not any(name.startswith("vqvae") for name, _ in module.named_parameters())


def test_no_weight_decay_on_vectors_biases_positions_levels_and_attention_scales():
    transformer, _ = tiny_models()
    no_decay, decay = var_weight_decay_param_groups(transformer, 0.05)
    names = {id(p): n for n, p in transformer.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"start_pos_embed", "pos_embed", "level_embedding.weight", "blocks.0.attn.log_scale"} <= skipped
    assert "blocks.0.attn.q_bias" in skipped and "proj_out.bias" in skipped
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"class_embedding.weight", "proj_in.weight", "blocks.0.attn.to_qkv.weight", "proj_out.weight"} <= decayed
    assert (no_decay["wd_sc"], decay["wd_sc"]) == (0.0, 1.0)
    assert len(skipped) + len(decayed) == len(names)
    # Shared AdaLN (d36-s): the per-block tables are the original's ada_gss, without decay; the projection decays.
    shared = VARTransformer2DModel(**{**TINY_VAR_TRANSFORMER_CONFIG, "shared_adaln": True})
    no_decay, decay = var_weight_decay_param_groups(shared, 0.05)
    names = {id(p): n for n, p in shared.named_parameters()}
    assert "blocks.1.adaln_table" in {names[id(p)] for p in no_decay["params"]}
    assert "shared_adaln_proj.weight" in {names[id(p)] for p in decay["params"]}


def original_lr(sche_type, peak_lr, cur_it, wp_it, max_it, wp0=0.005, wpe=0.001):
    """FoundationVision/VAR utils/lr_control.py lr_wd_annealing, the learning-rate part, transcribed."""
    wp_it = round(wp_it)
    if cur_it < wp_it:
        cur_lr = wp0 + (1 - wp0) * cur_it / wp_it
    else:
        pasd = (cur_it - wp_it) / (max_it - 1 - wp_it)
        rest = 1 - pasd
        if sche_type == "cos":
            cur_lr = wpe + (1 - wpe) * (0.5 + 0.5 * math.cos(math.pi * pasd))
        elif sche_type == "lin":
            cur_lr = 1 if pasd < 0.15 else wpe + (1 - wpe) * rest / 0.85
        elif sche_type == "lin0":
            cur_lr = 1 if pasd < 0.05 else wpe + (1 - wpe) * rest / 0.95
        elif sche_type == "lin00":
            cur_lr = wpe + (1 - wpe) * rest
        elif sche_type.startswith("lin"):
            T = float(sche_type[3:])
            max_rest = 1 - T
            wpe_mid = (1 + wpe + (1 - wpe) * max_rest) / 2
            cur_lr = 1 + (wpe_mid - 1) * pasd / T if pasd < T else wpe + (wpe_mid - wpe) * rest / max_rest
        else:  # exp
            cur_lr = 1 if pasd < 0.15 else math.exp((pasd - 0.15) / 0.85 * math.log(wpe))
    return cur_lr * peak_lr


@pytest.mark.parametrize("schedule", ["lin0", "lin", "lin00", "cos", "exp", "lin0.8"])
def test_learning_rate_schedules_follow_the_original(schedule):
    for step in range(0, 200, 3):
        ours = 3e-4 * var_learning_rate_factor(schedule, step, 20.4, 200, wp0=0.005, wpe=0.1)
        assert ours == pytest.approx(original_lr(schedule, 3e-4, step, 20.4, 200, wpe=0.1), rel=1e-12), step
    assert var_learning_rate_factor("lin0", 0, 10, 100) == 0.005
    assert var_learning_rate_factor("lin0", 99, 10, 100, wpe=0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        var_learning_rate_factor("step", 50, 10, 100)
    assert var_weight_decay_at(0, 100, 0.05, 0.08) == pytest.approx(0.05)
    assert var_weight_decay_at(99, 100, 0.05, 0.08) == pytest.approx(0.08)
    assert var_weight_decay_at(40, 100, 0.05, 0.05) == pytest.approx(0.05)
