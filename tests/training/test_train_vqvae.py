"""Training VAR's tokenizer (issue 26): the training-mode quantiser's losses, codebook health and dead-code restarts,
and train_vqvae.py's folder, card, exact resume and refused flags."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffusers_mar import VARVQModel
from tests.training.test_train_mar import fresh_accelerate_state  # noqa: F401
from tests.training.test_var_loss import TINY_VAR_VQ_CONFIG
from training import train_vqvae
from training.train_mar import list_checkpoints
from training.train_vqvae import parse_args
from training.vqvae_loss import (
    CodebookStats,
    PatchDiscriminator,
    VQVAETrainingModule,
    adaptive_weight,
    hinge_discriminator_loss,
    quantize_for_training,
    restart_dead_codes,
    scale_hits,
)

FAST = [
    "--dataset_name=digits",
    "--max_train_samples=40",
    "--train_batch_size=8",
    "--learning_rate=1e-3",
    "--lr_warmup_steps=2",
    "--override=ch=8",
    "--override=norm_num_groups=4",
    "--override=latent_channels=4",
    "--override=num_vq_embeddings=32",
    "--random_flip",
    "--report_to=none",
]


def run(tmp_path, *extra, name="out"):
    return train_vqvae.main(parse_args([*FAST, f"--output_dir={tmp_path / name}", *extra]))


def tiny_vqvae(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return VARVQModel(**TINY_VAR_VQ_CONFIG)


def test_the_vq_loss_is_the_originals_commitment_and_codebook_terms_with_straight_through():
    vqvae = tiny_vqvae()
    latents = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    z_q, vq, indices, residuals = quantize_for_training(vqvae, latents, beta=0.25)
    _, partial_sums = vqvae.quantize(latents.detach())
    expected = sum(0.25 * F.mse_loss(f, latents.detach()) + F.mse_loss(f, latents.detach()) for f in partial_sums) / 3
    torch.testing.assert_close(vq, expected)
    torch.testing.assert_close(z_q, partial_sums[-1].detach())  # the forward value is the quantised sum
    assert [tuple(r.shape) for r in residuals] == [(2, 4), (8, 4), (18, 4)]
    torch.testing.assert_close(residuals[0], F.interpolate(latents.detach(), size=(1, 1), mode="area").reshape(2, 4))
    # Straight-through: d z_q / d latents is the identity; the codebook learns only from the codebook term.
    (z_q * torch.arange(z_q.numel()).view_as(z_q)).sum().backward()
    torch.testing.assert_close(latents.grad, torch.arange(z_q.numel()).view_as(z_q).float())
    assert vqvae.embedding.weight.grad is None
    vqvae.zero_grad()
    latents.grad = None
    _, vq, _, _ = quantize_for_training(vqvae, latents, beta=0.25)
    vq.backward()
    assert vqvae.embedding.weight.grad.abs().sum() > 0 and latents.grad.abs().sum() > 0
    # The commitment term's gradient on the encoder is beta times the codebook term's on f_hat, summed over scales.
    expected_grad = sum(0.25 * 2 * (latents.detach() - f) / latents.numel() for f in partial_sums) / 3
    torch.testing.assert_close(latents.grad, expected_grad)


def test_the_training_module_adds_the_weighted_reconstruction():
    vqvae = tiny_vqvae()
    pixels = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for kind, power in (("l2", 2), ("l1", 1)):
        out = VQVAETrainingModule(vqvae, reconstruction_loss=kind, reconstruction_weight=2.0)(pixels)
        torch.testing.assert_close(out.reconstruction, (out.sample.detach() - pixels).abs().pow(power).mean())
        torch.testing.assert_close(out.loss.detach(), 2.0 * out.reconstruction + out.vq)
    with pytest.raises(ValueError, match="perceptual"):
        VQVAETrainingModule(vqvae, perceptual_weight=1.0)
    stub = VQVAETrainingModule(vqvae, perceptual_weight=0.5, perceptual=_Distance())
    out = stub(pixels)
    torch.testing.assert_close(out.perceptual, (out.sample.detach() - pixels).abs().mean())
    torch.testing.assert_close(out.loss.detach(), out.reconstruction + out.vq + 0.5 * out.perceptual)


class _Distance(torch.nn.Module):
    def forward(self, a, b):
        return (a - b).abs().mean(dim=(1, 2, 3))


def test_codebook_statistics_follow_the_originals_average_and_margin():
    stats = CodebookStats([1, 2], num_codes=4)
    hits = scale_hits([torch.tensor([[0], [0]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])], 4)
    assert hits.tolist() == [[2, 0, 0, 0], [1, 7, 0, 0]]
    stats.update(hits)
    torch.testing.assert_close(stats.hits, hits.double())  # the first step is copied
    stats.update(torch.zeros(2, 4))
    torch.testing.assert_close(stats.hits, 0.9 * hits.double())
    # Margins: 8% of a uniform share per scale (batch 2: 2 and 8 positions over 4 codes).
    torch.testing.assert_close(stats.margins(2), torch.tensor([0.04, 0.16], dtype=torch.float64))
    assert stats.dead(2).tolist() == [[False, True, True, True], [False, False, True, True]]
    summary = stats.summary(2)
    assert [row["dead"] for row in summary] == [3, 2] and [row["usage"] for row in summary] == [25.0, 50.0]
    assert summary[0]["perplexity"] == pytest.approx(1.0)
    p = torch.tensor([1 / 8, 7 / 8])
    assert summary[1]["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    for _ in range(200):  # after 100 updates the decay is 0.99
        stats.update(torch.zeros(2, 4))
    copy = CodebookStats([1, 2], 4)
    copy.load_state_dict(stats.state_dict())
    assert torch.equal(copy.hits, stats.hits) and copy.num_updates == 202


def test_dead_code_restart_changes_only_dead_codes():
    codebook = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    before = codebook.clone()
    dead = torch.tensor([False, True, False, False, True, False, False, True])
    candidates = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)) + 10
    restarted = restart_dead_codes(codebook, dead, candidates, torch.Generator().manual_seed(2))
    assert restarted.tolist() == [1, 4, 7]
    assert torch.equal(codebook[~dead], before[~dead])
    for row in codebook[dead]:
        assert any(torch.equal(row, c) for c in candidates)  # a residual, not noise
    assert restart_dead_codes(codebook, torch.zeros(8, dtype=torch.bool), candidates).numel() == 0


def test_a_tiny_run_writes_a_loadable_tokenizer_with_its_card(tmp_path):
    output_dir = run(tmp_path, "--max_train_steps=4", "--checkpointing_steps=2", "--restart_dead_codes_every=2")
    vqvae = VARVQModel.from_pretrained(output_dir)
    assert vqvae.config.patch_nums == [1, 2, 3, 4] and vqvae.config.num_vq_embeddings == 32
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    indices = vqvae.encode(images).indices
    assert [tuple(i.shape) for i in indices] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert vqvae.decode(indices).sample.shape == (2, 1, 8, 8)
    card = (output_dir / "README.md").read_text()
    assert "# VAR tokenizer trained on digits" in card and "## Codebook health" in card
    assert "| 4x4 |" in card and "| 1..4 (4x4) |" in card and "--restart_dead_codes_every=2" in card
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert VARVQModel.from_pretrained(output_dir / "checkpoint-4" / "vqvae").config.num_vq_embeddings == 32
    state = json.loads((output_dir / "checkpoint-4" / "training_state.json").read_text())
    assert state["global_step"] == 4 and len(state["recent_losses"]) == 4
    # The saved weights are the trained ones (no EMA by default).
    trained = load_file(output_dir / "checkpoint-4" / "model.safetensors")
    saved = vqvae.state_dict()
    for key in saved:  # up to the rounding of the EMA update with decay 0
        torch.testing.assert_close(saved[key], trained[f"vqvae.{key}"], rtol=0, atol=1e-6)


def test_resume_continues_exactly(tmp_path):
    # 6 steps straight == 3 steps, a stop, 3 more (epoch boundary at step 5), with restarts and EMA on.
    common = ["--checkpointing_steps=3", "--restart_dead_codes_every=2", "--ema_decay=0.5"]
    straight = run(tmp_path, "--max_train_steps=6", *common, name="straight")
    first = run(tmp_path, "--max_train_steps=3", *common, name="split")
    assert [p.name for p in list_checkpoints(first)] == ["checkpoint-3"]
    resumed = run(tmp_path, "--max_train_steps=6", *common, "--resume_from_checkpoint=latest", name="split")
    a, b = (
        load_file(straight / "checkpoint-6" / "model.safetensors"),
        load_file(resumed / "checkpoint-6" / "model.safetensors"),
    )
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    for index in (0, 1):  # the EMA and the codebook statistics
        x = torch.load(straight / "checkpoint-6" / f"custom_checkpoint_{index}.pkl", weights_only=False)
        y = torch.load(resumed / "checkpoint-6" / f"custom_checkpoint_{index}.pkl", weights_only=False)
        if index == 0:
            for p, q in zip(x["shadow_params"], y["shadow_params"]):
                torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(y["hits"], x["hits"], rtol=0, atol=1e-9)
            assert y["num_updates"] == x["num_updates"] == 6 and y["restarted"] == x["restarted"] > 0
    initial = load_file(first / "checkpoint-3" / "model.safetensors")
    assert any(not torch.equal(initial[k], a[k]) for k in a)


def test_downloaded_terms_are_refused_with_the_reason(tmp_path, monkeypatch):
    base = ["--dataset_name=digits", f"--output_dir={tmp_path / 'x'}"]
    monkeypatch.setattr(train_vqvae.huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--perceptual_weight needs .* HF_HUB_OFFLINE is set"):
        parse_args([*base, "--perceptual_weight=1"])
    monkeypatch.setattr(train_vqvae.huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setitem(__import__("sys").modules, "lpips", None)  # not installed
    with pytest.raises(ValueError, match="needs the `lpips` package"):
        parse_args([*base, "--perceptual_weight=1"])
    assert parse_args(base).perceptual_weight == 0.0


def test_patch_discriminator_shapes_and_the_layers_that_fit():
    assert PatchDiscriminator.output_size(256, 3) == 30  # pix2pix's 70x70 PatchGAN on 256 px: a 30x30 map
    assert PatchDiscriminator.output_size(8, 1) == 2 and PatchDiscriminator.output_size(8, 2) == 0
    for size, layers in ((256, 3), (8, 1), (16, 2)):
        logits = PatchDiscriminator(1, 8, layers)(torch.randn(2, 1, size, size))
        side = PatchDiscriminator.output_size(size, layers)
        assert logits.shape == (2, 1, side, side)
    # The norm is per image: one image's logits do not depend on the rest of the batch.
    d = PatchDiscriminator(1, 32, 1)
    images = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(d(images)[:1], d(images[:1]))


def test_hinge_loss_and_adaptive_weight_against_hand_computations():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = 0, 0.5, 2 -> mean 0.8333; relu(1 + fake) = 0, 1, 2.5 -> mean 1.1667
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 3.5 / 3)))
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    nll = (weight * torch.tensor([[3.0, 0.0], [4.0, 0.0]])).sum()  # gradient norm 5
    generator = (weight * torch.tensor([[0.0, 1.0], [0.0, 0.0]])).sum() * 2  # gradient norm 2
    value = adaptive_weight(nll, generator, weight)
    torch.testing.assert_close(value, torch.tensor(5.0 / (2.0 + 1e-4)))
    assert not value.requires_grad
    tiny = (weight * 1e-9).sum()
    assert adaptive_weight(nll, tiny, weight) == 1e4  # clamped


def test_the_adversarial_term_trains_a_discriminator_from_its_start_step_and_resumes_exactly(tmp_path):
    adversarial = ["--adversarial_weight=0.5", "--adversarial_start=2", "--discriminator_layers=1",
                   "--discriminator_channels=8", "--checkpointing_steps=1"]  # fmt: skip
    straight = run(tmp_path, "--max_train_steps=4", *adversarial, name="straight")

    def discriminator(step, folder=straight):
        return load_file(folder / f"checkpoint-{step}" / "model_1.safetensors")

    start = discriminator(1)
    assert all(torch.equal(start[k], discriminator(2)[k]) for k in start)  # no discriminator step before step 2
    assert any(not torch.equal(start[k], discriminator(3)[k]) for k in start)  # its first step
    card = (straight / "README.md").read_text()
    assert "adversarial x 0.5 (PatchGAN of 1 layers from step 2, hinge loss, adaptive weight)" in card
    # The adversarial term changes the tokenizer's training from its start on, not before.
    plain = run(tmp_path, "--max_train_steps=3", "--checkpointing_steps=1", name="plain")
    same = load_file(plain / "checkpoint-2" / "model.safetensors")
    after = load_file(plain / "checkpoint-3" / "model.safetensors")
    assert all(torch.equal(same[k], load_file(straight / "checkpoint-2" / "model.safetensors")[k]) for k in same)
    assert any(not torch.equal(after[k], load_file(straight / "checkpoint-3" / "model.safetensors")[k]) for k in after)
    # Resume: the discriminator and its optimizer are in the checkpoint.
    run(tmp_path, "--max_train_steps=3", *adversarial, name="split")
    resumed = run(tmp_path, "--max_train_steps=4", *adversarial, "--resume_from_checkpoint=latest", name="split")
    for name in ("model.safetensors", "model_1.safetensors"):
        a = load_file(straight / "checkpoint-4" / name)
        b = load_file(resumed / "checkpoint-4" / name)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=f"{name} {key}")


def test_bad_arguments_fail_while_parsing(tmp_path):
    base = [f"--output_dir={tmp_path / 'x'}"]
    cases = [
        (["--dataset_name=digits", "--override=bogus=1"], "Unknown VARVQModel config keys"),
        (["--dataset_name=digits", "--override=sample_size=16"], "sample_size"),
        (["--dataset_name=digits", "--model_config=vqvae-f99"], "--model_config"),
        (["--dataset_name=digits", "--restart_dead_codes_every=-1"], "restart_dead_codes_every"),
        (["--dataset_name=digits", "--adversarial_weight=-1"], "--adversarial_weight must be >= 0"),
        (["--dataset_name=digits", "--discriminator_layers=0"], "--discriminator_layers and"),
        (
            ["--dataset_name=digits", "--adversarial_weight=0.1", "--gradient_accumulation_steps=2"],
            "not supported: the generator's step",
        ),
        ([], "exactly one of"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            parse_args([*base, *args])
    with pytest.raises(ValueError, match="--discriminator_layers 3 leaves no patch of 8x8 images; use at most 1"):
        train_vqvae.main(parse_args([*base, "--dataset_name=digits", "--adversarial_weight=0.1"]))
    assert not (tmp_path / "x").exists()  # refused before any output
    with pytest.raises(ValueError, match="1-channel images but the data gives 3"):
        train_vqvae.main(parse_args([*base, f"--train_data_dir={_images(tmp_path)}", "--model_config=vqvae-digits"]))


def _images(tmp_path):
    from PIL import Image

    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a" / "0.png")
    return tmp_path / "images"


def test_the_presets_are_vars_tokenizer_and_the_digits_one():
    f16 = json.loads(train_vqvae.PRESETS["vqvae-f16"].read_text())
    assert VARVQModel().config.items() >= {k: tuple(v) if isinstance(v, list) else v for k, v in f16.items()}.items()
    digits = json.loads(train_vqvae.PRESETS["vqvae-digits"].read_text())
    assert digits["sample_size"] == 8 and digits["ch_mult"] == [1, 2] and digits["patch_nums"] == [1, 2, 3, 4]
