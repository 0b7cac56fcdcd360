"""Training the causal AR family (issue 15): the order schedule, the teacher-forced loss, the script's AR flags, a
two-process run and an exact resume with the order annealing active."""

import json
import shutil

import pytest
import torch
from accelerate import init_empty_weights
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.testing_utils import CaptureLogger
from safetensors.torch import load_file

from diffusers_mar import ARPipeline, ARTransformer2DModel, MARDDPMScheduler, MARTransformer2DModel, get_preset_config
from tests.testing_utils import REPO_ROOT, TINY_AR_TRANSFORMER_CONFIG, perturb_
from tests.training.test_train_mar import (  # noqa: F401
    FAST,
    child_env,
    fresh_accelerate_state,
    run_two_processes,
)
from training import train_mar
from training.ar_loss import ar_loss, random_order_probability, sample_ar_orders
from training.mar_loss import diffusion_loss, sample_orders
from training.train_mar import parse_args

AR_FAST = [
    *[arg for arg in FAST if arg != "--override=transformer.num_layers=1" and "num_inference_steps" not in arg],
    "--model_family=ar",
    "--override=transformer.num_layers=2",
]


def run(tmp_path, *extra, name="out"):
    return train_mar.main(parse_args([*AR_FAST, f"--output_dir={tmp_path / name}", *extra]))


def test_random_order_probability_follows_rars_schedule():
    anneal = [random_order_probability("anneal", p, 0.25, 0.75) for p in (0.0, 0.2, 0.25, 0.5, 0.7, 0.75, 1.0)]
    assert anneal == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.1, 0.0, 0.0])
    assert random_order_probability("raster", 0.1) == 0.0 and random_order_probability("random", 0.9) == 1.0
    with pytest.raises(ValueError, match="order"):
        random_order_probability("zigzag", 0.5)
    with pytest.raises(ValueError, match="anneal_start"):
        random_order_probability("anneal", 0.5, 0.8, 0.2)


def test_orders_are_raster_or_random_per_image_with_the_same_draws():
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(sample_ar_orders(64, 16, 0.0, g()), torch.arange(16).expand(64, -1))
    assert torch.equal(sample_ar_orders(64, 16, 1.0, g()), sample_orders(64, 16, g()))
    mixed = sample_ar_orders(64, 16, 0.5, g())
    is_raster = (mixed == torch.arange(16)).all(dim=1)
    assert 10 < int(is_raster.sum()) < 54  # about half
    assert torch.equal(mixed[~is_raster], sample_orders(64, 16, g())[~is_raster])
    # The stream after the draw does not depend on r (a resumed run draws what an uninterrupted one draws).
    after = []
    for r in (0.0, 0.3, 1.0):
        generator = g()
        sample_ar_orders(8, 16, r, generator)
        after.append(torch.rand(3, generator=generator))
    assert torch.equal(after[0], after[1]) and torch.equal(after[0], after[2])


def test_ar_loss_is_the_diffusion_loss_of_every_token_under_teacher_forcing():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformer = perturb_(ARTransformer2DModel(**TINY_AR_TRANSFORMER_CONFIG)).eval()
        from diffusers_mar import MARDiffusionHead
        from tests.testing_utils import TINY_PIXEL_HEAD_CONFIG

        head = perturb_(MARDiffusionHead(**TINY_PIXEL_HEAD_CONFIG), 1).eval()
    scheduler = MARDDPMScheduler()
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randn(3, 16, 4, generator=g), torch.tensor([1, 2, 3])
    orders = torch.stack([torch.randperm(16, generator=g) for _ in range(3)])
    timesteps = torch.randint(0, 1000, (3 * 16 * 2,), generator=g)
    noise = torch.randn(3 * 16 * 2, 4, generator=g)
    out = ar_loss(
        transformer, head, scheduler, tokens, labels, label_drop_prob=0.0, diffusion_batch_mul=2,
        orders=orders, timesteps=timesteps, noise=noise,
    )  # fmt: skip
    condition = transformer(tokens, labels, orders).sample.reshape(48, -1).repeat(2, 1)
    expected = diffusion_loss(head, scheduler, tokens.reshape(48, 4).repeat(2, 1), condition, None, timesteps, noise)
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)
    assert out.diffusion.rows.shape == (96,)  # every token, twice: no mask
    with pytest.raises(ValueError, match="random_prob"):
        ar_loss(transformer, head, scheduler, tokens, labels, random_prob=1.5)


def test_ar_presets_have_the_mar_presets_parameter_budget():
    for size in ("base", "large", "huge"):
        ar, mar = get_preset_config(f"ar-{size}"), get_preset_config(f"mar-{size}")
        assert ar["transformer"]["num_layers"] == 2 * mar["transformer"]["num_layers"]
        assert ar["diffusion_head"] == mar["diffusion_head"]
        with init_empty_weights():
            count_ar = sum(p.numel() for p in ARTransformer2DModel.from_config(ar["transformer"]).parameters())
            count_mar = sum(p.numel() for p in MARTransformer2DModel.from_config(mar["transformer"]).parameters())
        assert abs(count_ar / count_mar - 1) < 0.01


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--order=random"], "--order applies to --model_family ar"),
        (["--model_family=ar", "--order=random", "--anneal_start=0.1"], "--order anneal only"),
        (["--model_family=ar", "--order=anneal", "--anneal_start=0.8", "--anneal_end=0.2"], "--anneal_start"),
        (["--model_family=ar", "--sample_num_inference_steps=2"], "one token per step"),
        (["--model_family=ar", "--model_config=mar-base"], "ar-base"),
        (["--model_family=ar", "--override=transformer.buffer_size=4"], "buffer_size"),
        (["--model_family=ar", "--override=sampling.num_inference_steps=4"], "num_inference_steps"),
    ],
)
def test_bad_ar_arguments_fail_while_parsing(tmp_path, extra, match):
    base = ["--dataset_name=digits", f"--output_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=match):
        parse_args([*base, *extra])


def test_resume_continues_exactly_with_the_order_annealing_active(tmp_path):
    # r falls from 1 to 0 over the 6 steps (it depends on --max_train_steps, so the run is stopped, not shortened):
    # a run of 6 steps, then its checkpoint-6 removed and steps 4-6 run again from checkpoint-3, at r = 0.5-0.17.
    anneal = ["--order=anneal", "--anneal_start=0", "--anneal_end=1", "--checkpointing_steps=3", "--max_train_steps=6"]
    output_dir = run(tmp_path, *anneal)
    straight = load_file(output_dir / "checkpoint-6" / "model.safetensors")
    initial = load_file(output_dir / "checkpoint-3" / "model.safetensors")
    shutil.rmtree(output_dir / "checkpoint-6")
    resumed_dir = run(tmp_path, *anneal, "--resume_from_checkpoint=latest")
    resumed = load_file(resumed_dir / "checkpoint-6" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)
    assert any(not torch.equal(initial[k], straight[k]) for k in straight)  # the weights moved after the resume point
    pipe = ARPipeline.from_pretrained(resumed_dir)
    assert isinstance(pipe.transformer, ARTransformer2DModel) and "num_inference_steps" not in pipe.config.sampling
    assert "ARPipeline.from_pretrained" in (resumed_dir / "README.md").read_text()


def test_an_ar_run_records_its_order_and_warns_of_no_mar_only_config_key(tmp_path):
    # diffusers' loggers all propagate to "diffusers": its output during the run is captured whole.
    with CaptureLogger(diffusers_logging.get_logger("diffusers")) as captured:
        output_dir = run(tmp_path, "--order=raster", "--max_train_steps=1")
    assert "were passed to ARTransformer2DModel" not in captured.out, captured.out
    assert json.loads((output_dir / "model_index.json").read_text())["training_order"] == "raster"
    assert ARPipeline.from_pretrained(output_dir).config.training_order == "raster"
    assert "trained with --order raster" in (output_dir / "README.md").read_text()


@pytest.mark.slow  # about 20 s: two processes start, import torch and train
def test_two_cpu_processes_train_the_ar_family(tmp_path):
    output_dir = tmp_path / "out"
    command = [
        str(REPO_ROOT / "training" / "train_mar.py"),
        *AR_FAST,
        "--order=anneal",
        "--max_train_steps=2",
        "--checkpointing_steps=2",
        f"--output_dir={output_dir}",
    ]
    result = run_two_processes(command)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Num processes: 2" in result.stderr + result.stdout
    assert {p.name for p in (output_dir / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    pipe = ARPipeline.from_pretrained(output_dir)
    image = pipe([3], num_diffusion_steps=3, order="random", generator=torch.manual_seed(0)).images[0]
    assert image.size == (8, 8) and image.mode == "L"
