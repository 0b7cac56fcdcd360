import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_mar import MARDDPMScheduler
from tests.testing_utils import fixture_io, fixture_models, relative_error, requires_fixtures

STOCK_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "variance_type": "learned_range",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "timestep_spacing": "linspace",
}


def _run_loop(scheduler, head, x_t, condition, noises, temperature=1.0):
    x = x_t.clone()
    for i, t in enumerate(scheduler.timesteps):
        out = head(x, t, condition).sample
        x = scheduler.step(out, t, x, variance_noise=noises[i], temperature=temperature).prev_sample
    return x


@requires_fixtures
@pytest.mark.parity
def test_respaced_timesteps_and_float64_tables_match_original():
    io = fixture_io()
    scheduler = MARDDPMScheduler()
    scheduler.set_timesteps(100)
    assert torch.equal(scheduler.timesteps.flip(0), io["diffusion.gen.timestep_map"])
    np.testing.assert_array_equal(scheduler.betas_float64, io["diffusion.train.betas"].numpy())
    np.testing.assert_array_equal(scheduler.alphas_cumprod_float64, io["diffusion.train.alphas_cumprod"].numpy())
    for name in [
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_log_variance_clipped",
        "log_betas",
    ]:
        np.testing.assert_allclose(scheduler._tables[name], io[f"diffusion.gen.{name}"].numpy(), rtol=1e-12, atol=0)


@requires_fixtures
@pytest.mark.parity
def test_single_steps_match_original_p_sample():
    io = fixture_io()
    _, head = fixture_models()
    scheduler = MARDDPMScheduler()
    scheduler.set_timesteps(100)
    timestep_map = io["diffusion.gen.timestep_map"]
    x, t_index = io["sampler.step.x_t"], io["sampler.step.t_index"]
    with torch.no_grad():
        model_out = head(x, timestep_map[t_index], io["sampler.step.c"]).sample
    torch.testing.assert_close(model_out, io["sampler.step.model_out"], rtol=0, atol=1e-5)
    for row in range(x.shape[0]):
        rows = slice(row, row + 1)
        out = scheduler.step(
            io["sampler.step.model_out"][rows],
            int(timestep_map[t_index[row]]),
            x[rows],
            variance_noise=io["sampler.step.noise"][rows],
        )
        # Row 0 sits at t = 999 where x0_hat ~ 1e4: compare relatively.
        assert relative_error(out.pred_original_sample, io["sampler.step.pred_xstart"][rows]) < 1e-6
        assert relative_error(out.prev_sample, io["sampler.step.sample"][rows]) < 1e-6


@requires_fixtures
@pytest.mark.parity
@pytest.mark.parametrize("temperature", ["0.5", "1.0"])
def test_sampling_loop_matches_original(temperature):
    io = fixture_io()
    _, head = fixture_models()
    scheduler = MARDDPMScheduler()
    scheduler.set_timesteps(100)
    with torch.no_grad():
        x0 = _run_loop(scheduler, head, io["sampler.x_T"], io["sampler.c"], io["sampler.noise"], float(temperature))
    assert relative_error(x0, io[f"sampler.x0_T{temperature}"]) < 1e-5


@requires_fixtures
@pytest.mark.parity
@pytest.mark.parametrize("temperature", ["0.5", "1.0"])
def test_sampling_loop_with_well_conditioned_head_matches_original(temperature):
    # The fixture's "oracle" head keeps samples O(1), so the small-t steps (t = 0 and the index-1 variance rule)
    # are visible at 1e-5 absolute.
    io = fixture_io()
    _, head = fixture_models()
    scheduler = MARDDPMScheduler()
    scheduler.set_timesteps(100)
    abar = io["diffusion.train.alphas_cumprod"]
    x = io["sampler.x_T"].clone()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            out = head(x, t, io["sampler.c"]).sample
            eps = torch.sqrt(1 - abar[t]).float() * x + 0.1 * out[:, :16]
            model_output = torch.cat([eps, torch.tanh(out[:, 16:])], dim=1)
            x = scheduler.step(
                model_output, t, x, variance_noise=io["sampler.noise"][i], temperature=float(temperature)
            ).prev_sample
    torch.testing.assert_close(x, io[f"sampler_oracle.x0_T{temperature}"], rtol=0, atol=1e-5)


@requires_fixtures
@pytest.mark.parity
def test_guided_sampling_loop_matches_original():
    io = fixture_io()
    _, head = fixture_models()
    scheduler = MARDDPMScheduler()
    scheduler.set_timesteps(100)
    condition, scale, x = io["sampler_cfg.c"], float(io["sampler_cfg.cfg_scale"]), io["sampler_cfg.x_T"].clone()
    n = x.shape[0]
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            cond, uncond = head(torch.cat([x, x]), t, condition).sample.chunk(2)
            eps = uncond[:, :16] + scale * (cond[:, :16] - uncond[:, :16])
            model_output = torch.cat([eps, cond[:, 16:]], dim=1)
            x = scheduler.step(model_output, t, x, variance_noise=io["sampler_cfg.noise"][i][:n]).prev_sample
    assert relative_error(x, io["sampler_cfg.x0"][:n]) < 1e-5


@requires_fixtures
@pytest.mark.parity
def test_add_noise_matches_original_q_sample():
    # The noising of training/mar_loss.py (it calls `add_noise`); its whole loss is compared in tests/training.
    io = fixture_io()
    scheduler = MARDDPMScheduler()
    noisy = scheduler.add_noise(io["loss.target"], io["loss.noise"], io["loss.t"])
    torch.testing.assert_close(noisy, io["loss.x_t"], rtol=0, atol=1e-6)


def test_temperature_one_equals_stock_ddpm_scheduler():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(6, 16, generator=generator)
    model_output = torch.randn(6, 32, generator=generator).clamp(-1, 1)
    ours, stock = MARDDPMScheduler(), DDPMScheduler(**STOCK_CONFIG)
    stock_float64 = DDPMScheduler(**STOCK_CONFIG)
    stock_float64.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod_float64)
    for scheduler in (ours, stock, stock_float64):
        scheduler.set_timesteps(100)
    assert torch.equal(ours.timesteps, stock.timesteps)
    for t in ours.timesteps[[0, 1, 50, 98, 99]]:
        expected = stock.step(model_output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        expected64 = stock_float64.step(model_output, t, sample, generator=torch.Generator().manual_seed(1))
        actual = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
        assert relative_error(actual, expected64.prev_sample) < 2e-6
        assert relative_error(actual, expected) < 5e-4  # stock tables are float32 cumulative products


def test_temperature_scales_only_the_noise():
    scheduler = MARDDPMScheduler()
    scheduler.set_timesteps(10)
    sample, model_output, noise = torch.randn(4, 3), torch.randn(4, 6).clamp(-1, 1), torch.randn(4, 3)
    t = scheduler.timesteps[2]
    mean = scheduler.step(model_output, t, sample, variance_noise=torch.zeros(4, 3)).prev_sample
    hot = scheduler.step(model_output, t, sample, variance_noise=noise, temperature=1.0).prev_sample
    cold = scheduler.step(model_output, t, sample, variance_noise=noise, temperature=0.5).prev_sample
    torch.testing.assert_close(cold - mean, 0.5 * (hot - mean), rtol=1e-5, atol=1e-6)
    last = scheduler.timesteps[-1]
    no_noise = scheduler.step(model_output, last, sample, variance_noise=noise).prev_sample
    torch.testing.assert_close(
        no_noise, scheduler.step(model_output, last, sample, variance_noise=0 * noise).prev_sample
    )


def test_config_round_trip_and_validation(tmp_path):
    scheduler = MARDDPMScheduler()
    scheduler.save_pretrained(tmp_path)
    loaded = MARDDPMScheduler.from_pretrained(tmp_path)
    assert loaded.config.beta_schedule == "squaredcos_cap_v2" and loaded.config.variance_type == "learned_range"
    assert DDPMScheduler.from_pretrained(tmp_path).config.timestep_spacing == "linspace"
    with pytest.raises(ValueError, match="variance_type"):
        MARDDPMScheduler(variance_type="learned")
    with pytest.raises(ValueError, match="prediction_type"):
        MARDDPMScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="timestep"):
        scheduler.set_timesteps(10)
        scheduler.step(torch.zeros(1, 2), 3, torch.zeros(1, 1))
