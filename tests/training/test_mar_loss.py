import math

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers.training_utils import EMAModel

from diffusers_mar import MARDDPMScheduler, MARDiffusionHead, MARTransformer2DModel, orders_from_original
from tests.testing_utils import (
    TINY_PIXEL_HEAD_CONFIG,
    TINY_PIXEL_TRANSFORMER_CONFIG,
    fixture_checkpoint,
    fixture_io,
    fixture_models,
    perturb_,
    requires_fixtures,
)
from training.mar_loss import (
    DiffusionLossTables,
    MARTrainingModule,
    diffusion_loss,
    drop_labels,
    mar_loss,
    mask_from_orders,
    sample_mask_ratio,
    sample_orders,
    weight_decay_param_groups,
)


def _tiny_models(seed=0):
    transformer = perturb_(MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG), seed)
    head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG), seed + 1)
    return transformer, head


@requires_fixtures
@pytest.mark.parity
def test_diffusion_loss_matches_original_fixture():
    io = fixture_io()
    _, head = fixture_models()
    with torch.no_grad():
        out = diffusion_loss(
            head,
            MARDDPMScheduler(),
            io["loss.target"],
            io["loss.z"],
            mask=io["loss.mask"],
            timesteps=io["loss.t"],
            noise=io["loss.noise"],
        )
    assert (io["loss.t"] == 0).any() and (io["loss.t"] == 999).any()
    torch.testing.assert_close(out.mse, io["loss.mse"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.vb, io["loss.vb"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.rows, io["loss.rows"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, io["loss.scalar"][0], rtol=0, atol=1e-5)


@requires_fixtures
@pytest.mark.parity
def test_full_training_loss_matches_original_fixture():
    # MAR.forward in eval mode (no dropout, no label drop) with the recorded orders, mask ratio, timesteps and noise.
    io = fixture_io()
    transformer, head = fixture_models()
    tokens = transformer.patchify(io["train.latents"])
    with torch.no_grad():
        out = mar_loss(
            transformer,
            head,
            MARDDPMScheduler(),
            tokens,
            io["train.labels"],
            label_drop_prob=0.0,
            diffusion_batch_mul=4,
            orders=orders_from_original(io["train.orders"]),
            mask_ratio=float(io["train.mask_rate"][0]),
            timesteps=io["train.t"],
            noise=io["train.noise"],
        )
    torch.testing.assert_close(out.mask, io["train.mask"], rtol=0, atol=0)
    assert int(out.mask[0].sum()) == int(io["train.num_masked"][0])
    torch.testing.assert_close(out.diffusion.rows, io["train.rows"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.loss, io["train.loss"][0], rtol=0, atol=1e-5)


@requires_fixtures
@pytest.mark.parity
def test_weight_decay_groups_match_original_add_weight_decay():
    # The original's rule on its own parameter names, mapped through the converter element by element.
    from conversion.convert_mar_to_diffusers import convert_mar_state_dict

    original = fixture_checkpoint()["model"]
    decays = {
        name: torch.full_like(value, 0.0 if value.ndim == 1 or name.endswith(".bias") or "diffloss" in name else 1.0)
        for name, value in original.items()
    }
    transformer_flags, head_flags = convert_mar_state_dict(decays)
    transformer, head = fixture_models()
    groups = weight_decay_param_groups(transformer, head, weight_decay=0.02)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.02]
    decayed = {id(p) for p in groups[1]["params"]}
    for name, param in transformer.named_parameters():
        expected = transformer_flags[name]
        assert torch.all(expected == expected.flatten()[0]), name
        assert (id(param) in decayed) == bool(expected.flatten()[0] == 1.0), name
    assert not any(id(p) in decayed for p in head.parameters())
    assert all(float(v.max()) == 0.0 for v in head_flags.values())
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(v.numel() for v in original.values())


def test_mask_ratio_matches_scipy_truncnorm_quantiles():
    dist = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    for u in [1e-9, 0.01, 0.25, 0.5, 0.75, 0.99, 1 - 1e-9]:
        assert sample_mask_ratio(0.7, quantile=u) == pytest.approx(dist.ppf(u), abs=1e-9)


def test_mask_ratio_range_and_distribution():
    generator = torch.Generator().manual_seed(0)
    ratios = np.array([sample_mask_ratio(0.7, generator=generator) for _ in range(4000)])
    assert ratios.min() >= 0.7 and ratios.max() <= 1.0
    dist = scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25)
    assert abs(ratios.mean() - dist.mean()) < 0.005
    assert scipy.stats.kstest(ratios, dist.cdf).pvalue > 1e-3
    assert sample_mask_ratio(1.0, generator=generator) == 1.0
    with pytest.raises(ValueError, match="mask_ratio_min"):
        sample_mask_ratio(1.5)


def test_orders_are_permutations_and_mask_takes_the_last_ceil_entries():
    orders = sample_orders(6, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(6, -1))
    assert len({tuple(o) for o in orders.tolist()}) == 6
    for ratio, expected in [(0.7, 12), (0.75, 12), (0.7501, 13), (1.0, 16)]:
        mask = mask_from_orders(orders, ratio)
        assert mask.sum(dim=1).tolist() == [expected] * 6 == [math.ceil(16 * ratio)] * 6
        masked = mask.gather(1, orders)
        assert torch.equal(masked[:, 16 - expected :], torch.ones(6, expected))
        assert torch.equal(masked[:, : 16 - expected], torch.zeros(6, 16 - expected))


def test_label_dropout_uses_the_unconditional_class_at_the_given_rate():
    labels = torch.randint(0, 10, (20000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, 10, 0.1, generator=torch.Generator().manual_seed(1))
    changed = dropped != labels
    assert torch.all(dropped[changed] == 10)
    assert abs(changed.float().mean().item() - 0.1) < 0.01
    assert torch.equal(drop_labels(labels, 10, 0.0), labels)


def test_training_module_drops_labels_in_train_mode_only(monkeypatch):
    transformer, head = _tiny_models()
    module = MARTrainingModule(transformer, head, MARDDPMScheduler(), label_drop_prob=1.0)
    seen = []
    forward = transformer.forward
    monkeypatch.setattr(
        transformer, "forward", lambda t, m, labels, **kw: seen.append(labels.clone()) or forward(t, m, labels, **kw)
    )
    latents, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    module.train()(latents, labels)
    module.eval()(latents, labels)
    assert seen[0].tolist() == [10, 10, 10] and seen[1].tolist() == [1, 2, 3]


def test_diffusion_batch_mul_repeats_all_tokens_with_own_timesteps_and_noise():
    transformer, head = _tiny_models()
    transformer.eval()
    scheduler = MARDDPMScheduler()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([3, 7])
    orders = sample_orders(2, 16, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    t1, noise1 = torch.randint(0, 1000, (32,), generator=generator), torch.randn(32, 4, generator=generator)
    kwargs = dict(label_drop_prob=0.0, orders=orders, mask_ratio=0.8)
    with torch.no_grad():
        single = mar_loss(
            transformer, head, scheduler, tokens, labels, diffusion_batch_mul=1, timesteps=t1, noise=noise1, **kwargs
        )
        # Layout [all tokens] x 3: repeating the draws of one copy gives the same rows three times.
        tiled = mar_loss(
            transformer,
            head,
            scheduler,
            tokens,
            labels,
            diffusion_batch_mul=3,
            timesteps=t1.repeat(3),
            noise=noise1.repeat(3, 1),
            **kwargs,
        )
        drawn = mar_loss(
            transformer, head, scheduler, tokens, labels, diffusion_batch_mul=3, generator=generator, **kwargs
        )
    torch.testing.assert_close(tiled.diffusion.rows, single.diffusion.rows.repeat(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(tiled.loss, single.loss, rtol=1e-6, atol=1e-6)
    assert drawn.diffusion.rows.shape == (96,)
    assert not torch.allclose(drawn.diffusion.rows[:32], drawn.diffusion.rows[32:64])
    with pytest.raises(ValueError, match="diffusion_batch_mul"):
        mar_loss(transformer, head, scheduler, tokens, labels, diffusion_batch_mul=0)
    with pytest.raises(ValueError, match="class_labels"):
        mar_loss(transformer, head, scheduler, tokens, torch.tensor([3, 10]))


def test_only_masked_tokens_count_and_vb_does_not_train_the_noise_prediction():
    _, head = _tiny_models()
    scheduler = MARDDPMScheduler()
    generator = torch.Generator().manual_seed(0)
    target, condition = torch.randn(8, 4, generator=generator), torch.randn(8, 16, generator=generator)
    timesteps, noise = torch.tensor([0, 1, 5, 100, 400, 700, 998, 999]), torch.randn(8, 4, generator=generator)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 0])
    out = diffusion_loss(head, scheduler, target, condition, mask, timesteps, noise)
    torch.testing.assert_close(out.loss, out.rows[mask == 1].mean())

    # The VB term reaches v only: its gradient with respect to eps_hat is zero (the frozen-mean trick).
    model_output = {}
    hook = head.proj_out.register_forward_hook(lambda m, i, o: model_output.setdefault("out", o))
    out = diffusion_loss(head, scheduler, target, condition, mask, timesteps, noise)
    hook.remove()
    grad = torch.autograd.grad(out.vb.sum(), model_output["out"])[0]
    assert torch.all(grad[:, :4] == 0) and grad[:, 4:].abs().sum() > 0


def test_loss_tables_are_the_schedulers_full_process_tables():
    scheduler = MARDDPMScheduler()
    tables = DiffusionLossTables.from_scheduler(scheduler)
    # The original's GaussianDiffusion.__init__ formulas on the float64 betas (the reference, kept in the test only).
    betas = scheduler.betas_float64
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    expected = {
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        "posterior_log_variance_clipped": np.log(np.append(posterior_variance[1], posterior_variance[1:])),
        "log_betas": np.log(betas),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
    }
    full = scheduler.process_tables()
    for name, value in expected.items():
        np.testing.assert_allclose(full[name], value, rtol=1e-12, atol=0, err_msg=name)
        assert torch.equal(getattr(tables, name), torch.from_numpy(full[name]).float()), name
    # The same tables whatever timesteps the scheduler was last set to (sampling respaces only its own copy).
    scheduler.set_timesteps(10)
    assert torch.equal(DiffusionLossTables.from_scheduler(scheduler).log_betas, tables.log_betas)
    assert tables.log_betas.shape == (1000,)


def test_ema_settings_give_the_original_constant_decay_update():
    # LTH14/mar engine_mar.update_ema every step from step 1: ema = ema * rate + p * (1 - rate), ema starts at p.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    ema = EMAModel(params, decay=0.9999, min_decay=0.9999, update_after_step=-1, use_ema_warmup=False)
    reference = [p.detach().clone() for p in params]
    for _ in range(5):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        ema.step(params)
        assert ema.cur_decay_value == 0.9999
        for r, p in zip(reference, params):
            r.mul_(0.9999).add_(p.detach(), alpha=1 - 0.9999)
    for shadow, r in zip(ema.shadow_params, reference):
        torch.testing.assert_close(shadow, r, rtol=1e-6, atol=1e-7)
    # diffusers' defaults would copy the weights on the first step and warm the decay up: not the original.
    default = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.9999)
    default.step([torch.nn.Parameter(torch.ones(1))])
    assert default.cur_decay_value == 0.0
