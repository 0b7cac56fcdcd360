"""Training the VAR family with train_mar.py (issue 26): a tiny run writes a VARPipeline folder, resume is exact, the
loss falls on a fixed batch, the optimiser follows FoundationVision/VAR's recipe, two processes train together."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from diffusers_mar import VARPipeline, VARTransformer2DModel, VARVQModel
from tests.testing_utils import REPO_ROOT
from tests.training.test_train_mar import FAST, fresh_accelerate_state, run_two_processes  # noqa: F401
from training import train_mar
from training.train_mar import list_checkpoints, parse_args
from training.var_loss import var_learning_rate_factor

# The 8x8 digits through a random 2x tokenizer on scales 1, 2, 3, 4 (30 tokens) of 32 codes.
TINY_DIGITS_VQ = {
    "in_channels": 1,
    "out_channels": 1,
    "sample_size": 8,
    "ch": 8,
    "ch_mult": (1, 2),
    "num_res_blocks": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "num_vq_embeddings": 32,
    "share_quant_resi": 0,
    "patch_nums": (1, 2, 3, 4),
}
VAR_FAST = [
    *[a for a in FAST if not a.startswith(("--override", "--diffusion_batch_mul", "--sample_num"))],
    "--model_family=var",
    "--override=transformer.num_layers=2",
    "--override=transformer.dropout=0.1",
    "--override=transformer.drop_path_rate=0.1",
]


@pytest.fixture
def vqvae_dir(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        VARVQModel(**TINY_DIGITS_VQ).save_pretrained(tmp_path / "vq")
    return tmp_path / "vq"


def run(tmp_path, vqvae_dir, *extra, name="out"):
    argv = [*VAR_FAST, f"--pretrained_vqvae={vqvae_dir}", f"--output_dir={tmp_path / name}", *extra]
    return train_mar.main(parse_args(argv))


def test_a_tiny_run_writes_a_var_pipeline_folder_with_the_frozen_tokenizer(tmp_path, vqvae_dir):
    output_dir = run(tmp_path, vqvae_dir, "--max_train_steps=2")
    index = json.loads((output_dir / "model_index.json").read_text())
    assert index["_class_name"] == "VARPipeline"
    assert index["transformer"] == ["diffusers_mar", "VARTransformer2DModel"]
    assert index["vqvae"] == ["diffusers_mar", "VARVQModel"]
    assert index["sampling"] == {"guidance_scale": 2.5} and index["id2label"]["3"] == "3"
    transformer = VARTransformer2DModel.from_pretrained(output_dir / "transformer")
    assert transformer.config.patch_nums == [1, 2, 3, 4] and transformer.config.vocab_size == 32
    assert transformer.config.vq_embed_dim == 4 and transformer.config.num_classes == 10
    # The tokenizer is saved as given: frozen, not trained.
    saved, given = VARVQModel.from_pretrained(output_dir / "vqvae"), VARVQModel.from_pretrained(vqvae_dir)
    for (name, a), (_, b) in zip(saved.state_dict().items(), given.state_dict().items()):
        assert torch.equal(a, b), name
    card = (output_dir / "README.md").read_text()
    assert "VAR trained on digits" in card and "from diffusers_mar import VARPipeline" in card
    assert "tian2024visual" in card and "--model_family=var" in card
    assert "the trained weights (no EMA)" in card and "tokenizer" in card
    # The training checkpoint holds the transformer only (the tokenizer is no sub-module).
    weights = load_file(output_dir / "checkpoint-2" / "model.safetensors")
    assert weights and all(key.startswith("transformer.") for key in weights)


def test_resume_continues_exactly(tmp_path, vqvae_dir, monkeypatch):
    # Dropout, drop-path, label drop, flips and progressive stages on; 6 steps straight == 3, a Ctrl-C, 3 more after
    # a resume (an epoch ends at step 5). The schedules span the 6 steps in both runs.
    common = ["--max_train_steps=6", "--checkpointing_steps=100", "--ema_decay=0.5", "--prog_fraction=0.8"]
    common += ["--prog_start=1", "--lr_warmup_epochs=0.2", "--prog_warmup_epochs=0.4"]
    straight = run(tmp_path, vqvae_dir, *common, name="straight")
    calls = []
    monkeypatch.setattr(train_mar, "stop_requested", lambda *args: calls.append(1) or len(calls) == 3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, vqvae_dir, *common, name="split")
    first = tmp_path / "split"
    assert [p.name for p in list_checkpoints(first)] == ["checkpoint-3"]
    monkeypatch.undo()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    resumed = run(tmp_path, vqvae_dir, *common, "--resume_from_checkpoint=latest", name="split")
    a, b = (
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    ema_a = torch.load(straight / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=False)
    ema_b = torch.load(resumed / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=False)
    for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    initial = load_file(first / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(initial[k], a[k]) for k in a)


def test_the_loss_falls_on_a_fixed_batch(tmp_path, vqvae_dir):
    # One batch of 8 images, no label drop, no flips: every step sees the same data.
    output_dir = run(
        tmp_path,
        vqvae_dir,
        "--max_train_samples=8",
        "--no-random_flip",
        "--label_drop_prob=0",
        "--learning_rate=3e-3",
        "--lr_scheduler=lin00",
        "--lr_warmup_epochs=0",
        "--lr_end=1",
        "--max_train_steps=25",
        "--checkpointing_steps=25",
    )
    losses = json.loads((output_dir / "checkpoint-25" / "training_state.json").read_text())["recent_losses"]
    assert len(losses) == 25 and losses[-1] < 0.75 * losses[0], losses


def test_the_optimiser_follows_the_original_recipe(tmp_path, vqvae_dir):
    # blr 0.064 at global batch 8: peak 2e-3; warm-up of 0.4 epochs = 2 steps from 0.005x; lin0 to 0.1x over 4 steps;
    # weight decay 0.05 cosine to 0.09 on the decayed group only.
    argv = [a for a in VAR_FAST if not a.startswith(("--learning_rate", "--lr_warmup_steps"))]
    extra = ["--blr=0.064", "--lr_warmup_epochs=0.4", "--lr_end=0.1", "--weight_decay_end=0.09"]
    output_dir = tmp_path / "out"
    train_mar.main(
        parse_args(
            [*argv, *extra, f"--pretrained_vqvae={vqvae_dir}", "--max_train_steps=4", "--checkpointing_steps=1"]
            + [f"--output_dir={output_dir}"]
        )
    )
    expected_lr = [2e-3 * f for f in (0.005, 0.5025, 1.0, 0.1 + 0.9 * (1 - 1 / 1) / 0.95)]
    assert expected_lr == pytest.approx(
        [2e-3 * var_learning_rate_factor("lin0", s, 2, 4, 0.005, 0.1) for s in range(4)]
    )
    for step, lr in enumerate(expected_lr):
        state = torch.load(output_dir / f"checkpoint-{step + 1}" / "optimizer.bin", weights_only=True)
        groups = state["param_groups"]
        assert [g["lr"] for g in groups] == pytest.approx([lr, lr], abs=1e-15), step
        decay = 0.09 + (0.05 - 0.09) * (0.5 + 0.5 * math.cos(math.pi * step / 3))
        assert [g["weight_decay"] for g in groups] == pytest.approx([0.0, decay], abs=1e-12), step
        assert [g["betas"] for g in groups] == [(0.9, 0.95)] * 2 and groups[0]["wd_sc"] == 0.0
    config = json.loads((output_dir / "checkpoint-4" / "training_state.json").read_text())
    assert config["global_batch"] == 8


def test_var_flags_are_checked_before_any_work(tmp_path, vqvae_dir):
    base = ["--dataset_name=digits", f"--output_dir={tmp_path / 'x'}"]
    cases = [
        (["--model_family=var"], "needs a tokenizer"),
        (["--label_smoothing=0.1"], "applies to --model_family var only"),
        (["--pretrained_vqvae", str(vqvae_dir)], "applies to --model_family var only"),
        (["--model_family=var", f"--pretrained_vqvae={vqvae_dir}", "--lr_scheduler=step"], "not a VAR schedule"),
        (["--model_family=var", f"--pretrained_vqvae={vqvae_dir}", "--model_config=var-d99"], "--model_config"),
        (["--model_family=var", f"--pretrained_vqvae={vqvae_dir}", "--sample_temperature=1"], "does not apply"),
        (["--model_family=var", f"--pretrained_vqvae={vqvae_dir}", "--override=diffusion_head.x=1"], "COMPONENT"),
        (["--model_family=var", f"--pretrained_vqvae={vqvae_dir}", "--lr_scheduler=constant"], "not a VAR"),
        (["--model_family=mar", "--lr_scheduler=lin0"], "constant or cosine"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            parse_args([*base, *args])
    args = parse_args([*base, "--model_family=var", f"--pretrained_vqvae={vqvae_dir}"])
    assert (args.adam_weight_decay, args.max_grad_norm, args.ema_decay, args.num_epochs) == (0.05, 2.0, 0.0, 250)
    assert (args.lr_scheduler, args.lr_warmup_epochs, args.label_smoothing) == ("lin0", 5.0, 0.1)
    assert (
        parse_args(
            [*base, "--model_family=var", f"--pretrained_vqvae={vqvae_dir}", "--prog_fraction=0.8"]
        ).lr_scheduler
        == "lin0.8"
    )
    mar = parse_args(base)
    assert (mar.adam_weight_decay, mar.max_grad_norm, mar.ema_decay, mar.lr_scheduler) == (
        0.02,
        3.0,
        0.9999,
        "constant",
    )
    with pytest.raises(ValueError, match="resolution 16 differs"):
        run(tmp_path, vqvae_dir, "--resolution=16", "--max_train_steps=1")
    with pytest.raises(ValueError, match="the tokenizer gives"):
        run(tmp_path, vqvae_dir, "--override=transformer.vocab_size=64", "--max_train_steps=1", name="y")


def test_the_presets_are_the_original_sizes():
    for depth in (16, 20, 24, 30, 36):
        name = f"var-d{depth}" + ("-s" if depth == 36 else "")
        config = train_mar.load_model_config(name)
        transformer = config["transformer"]
        assert transformer["num_layers"] == transformer["num_attention_heads"] == depth
        assert transformer["attention_head_dim"] == 64 and transformer["shared_adaln"] == (depth == 36)
        assert transformer["drop_path_rate"] == pytest.approx(0.1 * depth / 24)
    assert "var-digits" not in train_mar.VAR_PRESETS
    assert train_mar.load_model_config("var-d16")["initialization"]["init_adaln_gamma"] == 1e-3


def test_the_training_presets_agree_with_the_package_presets():
    # The sizes and recommended settings live twice: the package's `VAR_PRESETS` (conversion, docs) and the training
    # JSONs (which add the initialisation and dropout); this keeps them from drifting apart.
    from diffusers_mar import get_preset_config

    for name in train_mar.VAR_PRESETS:
        package = get_preset_config(name.removesuffix("-s"))
        config = train_mar.load_model_config(name)
        for key, value in config["transformer"].items():
            if key in package["transformer"]:
                assert value == pytest.approx(package["transformer"][key]), (name, key)
        assert config["sampling"] == package["sampling"], name


@pytest.mark.slow
def test_two_cpu_processes_train_var_on_digits(tmp_path, vqvae_dir):
    output_dir = tmp_path / "out"
    command = [
        str(REPO_ROOT / "training" / "train_mar.py"),
        *VAR_FAST,
        f"--pretrained_vqvae={vqvae_dir}",
        "--max_train_steps=3",
        "--checkpointing_steps=2",
        f"--output_dir={output_dir}",
    ]
    result = run_two_processes(command)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-3"]
    state = json.loads((output_dir / "checkpoint-3" / "training_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_batch"] == 16
    assert VARTransformer2DModel.from_pretrained(output_dir / "transformer").config.patch_nums == [1, 2, 3, 4]


def test_the_folder_loads_as_a_var_pipeline_that_samples(tmp_path, vqvae_dir):
    output_dir = run(tmp_path, vqvae_dir, "--max_train_steps=2", "--num_sample_images=2")
    pipe = VARPipeline.from_pretrained(output_dir)
    assert isinstance(pipe.transformer, VARTransformer2DModel) and isinstance(pipe.vqvae, VARVQModel)
    assert pipe.id2label[3] == "3"
    pipe.set_progress_bar_config(disable=True)
    image = pipe([3], generator=torch.manual_seed(0)).images[0]
    assert image.size == (8, 8)
    assert (output_dir / "samples" / "step-0000002.png").is_file()


def test_fine_tuning_a_var_pipeline_with_more_classes(tmp_path, vqvae_dir):
    base = run(tmp_path, vqvae_dir, "--max_train_steps=1", name="base")
    AcceleratorState._reset_state(reset_partial_state=True)
    argv = [a for a in VAR_FAST if not a.startswith("--override")]
    extra = [f"--pretrained_model={base}", "--num_classes=12", "--max_train_steps=1", f"--output_dir={tmp_path / 't'}"]
    output_dir = train_mar.main(parse_args([*argv, *extra]))
    tuned, pretrained = VARPipeline.from_pretrained(output_dir), VARPipeline.from_pretrained(base)
    assert tuned.transformer.config.num_classes == 12 and tuned.transformer.class_embedding.weight.shape[0] == 13
    assert tuned.sampling_defaults == pretrained.sampling_defaults
    for (name, a), (_, b) in zip(tuned.vqvae.state_dict().items(), pretrained.vqvae.state_dict().items()):
        assert torch.equal(a, b), name  # the pipeline's own tokenizer, frozen
    with pytest.raises(ValueError, match="holds a VARPipeline; --model_family mar fine-tunes a MARPipeline"):
        AcceleratorState._reset_state(reset_partial_state=True)
        mar = [a for a in FAST if not a.startswith("--override")]
        train_mar.main(parse_args([*mar, f"--pretrained_model={base}", f"--output_dir={tmp_path / 'm'}"]))
