"""Conversion of the official FoundationVision/VAR checkpoints into VARPipeline folders
(conversion/convert_var_to_diffusers.py), on the tiny official checkpoints of tests/fixtures/var_tiny."""

from __future__ import annotations

import json
import math
import os
import pathlib

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

from conversion import convert_var_to_diffusers as convert
from diffusers_mar import VAR_PRESETS, VARPipeline, VARTransformer2DModel, get_preset_config
from tests.testing_utils import VAR_FIXTURES_DIR, var_fixture_config, var_fixture_io, var_sample_atol

VAE = VAR_FIXTURES_DIR / "vae_tiny.pth"
VAR = VAR_FIXTURES_DIR / "var_tiny.pth"
TINY = ["--patch_nums", "1", "2", "3", "4"]


def run_main(argv: list, capsys) -> tuple[int, str]:
    rc = convert.main([str(arg) for arg in argv])
    return rc, capsys.readouterr().err


def argv(output_dir: pathlib.Path, *extra, vae=VAE, var=VAR) -> list:
    return ["--vae_path", vae, "--var_path", var, "--output_dir", output_dir, *TINY, *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> pathlib.Path:
    output_dir = tmp_path_factory.mktemp("var") / "out"
    assert convert.main([str(arg) for arg in argv(output_dir, "--verify")]) == 0
    return output_dir


@pytest.mark.parity
@pytest.mark.parametrize("case", ["sample_cfg1.5", "sample_smooth"])
def test_a_converted_folder_samples_the_official_images(converted, case):
    # The recorded official `autoregressive_infer_cfg(g_seed=...)` run; guidance_scale = 1 + cfg (docs/var.md).
    settings = var_fixture_config()["sample_cases"][case]
    pipe = DiffusionPipeline.from_pretrained(converted)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, VARPipeline)
    images = pipe(
        class_labels=settings["label_B"],
        guidance_scale=1.0 + settings["cfg"],
        top_k=settings["top_k"],
        top_p=settings["top_p"],
        more_smooth=settings["more_smooth"],
        generator=torch.Generator().manual_seed(settings["g_seed"]),
        output_type="pt",
    ).images
    expected = var_fixture_io()[f"{case}.image"]  # (B, 3, H, W) in [0, 1]
    torch.testing.assert_close(images, expected, rtol=0, atol=var_sample_atol(case))


def test_the_folder_holds_the_recommended_settings_and_a_var_card(converted):
    index = json.loads((converted / "model_index.json").read_text())
    assert index["_class_name"] == "VARPipeline"
    assert index["sampling"] == {"guidance_scale": 2.5, "top_k": 64, "top_p": 0.96, "more_smooth": False}
    card = ModelCard.load(converted / "README.md")
    assert "VAR (custom size) for diffusers" in card.text and "tian2024visual" in card.text
    assert "li2024autoregressive" not in card.text and "var_tiny.pth" in card.text
    assert "var" in card.data.tags and "mar" not in card.data.tags


def test_official_schedules_are_inferred_from_the_token_count():
    assert convert.infer_patch_nums(680) == [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    assert convert.infer_patch_nums(2240) == [1, 2, 3, 4, 6, 9, 13, 18, 24, 32]
    assert convert.infer_patch_nums(30, [1, 2, 3, 4]) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="pass `--patch_nums`"):
        convert.infer_patch_nums(30)
    with pytest.raises(ValueError, match="make 14 tokens"):
        convert.infer_patch_nums(30, [1, 2, 3])


@pytest.mark.parametrize("name", sorted(VAR_PRESETS))
def test_presets_have_the_released_sizes(name):
    # Official README (model zoo): d16 310M, d20 600M, d24 1.0B, d30 2.0B, d36 2.3B parameters.
    config = get_preset_config(name)
    with init_empty_weights():
        transformer = VARTransformer2DModel.from_config(config["transformer"])
    parameters = sum(p.numel() for p in transformer.parameters())
    expected = {"310M": 310e6, "600M": 600e6, "1.0B": 1.0e9, "2.0B": 2.0e9, "2.3B": 2.3e9}[
        config["paper"]["num_parameters"]
    ]
    assert abs(parameters - expected) / expected < 0.04
    assert transformer.num_tokens == {256: 680, 512: 2240}[config["paper"]["resolution"]]
    assert convert.preset_of(transformer.config) == name
    assert config["transformer"]["shared_adaln"] == (name == "var-d36")


def test_swapped_or_foreign_files_are_refused_and_nothing_is_written(tmp_path, capsys):
    rc, err = run_main(argv(tmp_path / "out", vae=VAR, var=VAE), capsys)
    assert rc == 2 and "is not a VAR tokenizer" in err
    rc, err = run_main(argv(tmp_path / "out", "--model_type", "var-d16"), capsys)
    assert rc == 2 and "`--model_type var-d16` does not match" in err
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_normalised_attention_is_refused(tmp_path, capsys):
    state_dict = torch.load(VAR, map_location="cpu", weights_only=True)
    old = {key: value for key, value in state_dict.items() if not key.endswith("scale_mul_1H11")}
    torch.save(old, tmp_path / "var_old.pth")
    rc, err = run_main(argv(tmp_path / "out", var=tmp_path / "var_old.pth"), capsys)
    assert rc == 2 and "without normalised attention" in err and not (tmp_path / "out").exists()


def test_flags_are_checked_while_parsing(tmp_path, capsys):
    for extra, message in [
        (["--original_repo", str(tmp_path)], "`--original_repo` is used by `--verify`"),
        (["--verify", "--original_repo", str(tmp_path)], "is not a FoundationVision/VAR checkout"),
        (["--push_to_hub"], "`--push_to_hub` needs `--repo_id`"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            convert.parse_args([str(a) for a in argv(tmp_path / "out", *extra)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert.parse_args([str(a) for a in argv(tmp_path / "out")] + ["--patch_nums", "2", "1"])
    assert "increasing sides" in capsys.readouterr().err


def test_bfloat16_folders_store_bfloat16_and_verify(tmp_path, capsys):
    rc, err = run_main(argv(tmp_path / "out", "--dtype", "bf16", "--verify"), capsys)
    assert rc == 0, err
    pipe = VARPipeline.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vqvae.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.skipif(
    "VAR_ORIGINAL_REPO" not in os.environ, reason="set VAR_ORIGINAL_REPO to a FoundationVision/VAR checkout"
)
def test_checkpoints_made_by_the_official_code_with_another_config_and_seed_verify(tmp_path, capsys):
    """Official models of a size and seed the fixtures do not use, saved as the official code saves them, convert to
    a folder whose tokenizer, logits and sampled images equal the official code's (`--verify --original_repo`)."""
    from conversion.original_var import load_original_var

    official = load_original_var(os.environ["VAR_ORIGINAL_REPO"])
    torch.manual_seed(123)
    patch_nums = (1, 2, 3, 5)
    vqvae = official.VQVAE(
        vocab_size=96, z_channels=8, ch=32, test_mode=True, share_quant_resi=4, v_patch_nums=patch_nums
    )
    var = official.VAR(
        vae_local=vqvae, num_classes=7, depth=3, embed_dim=96, num_heads=3, mlp_ratio=2.0, drop_path_rate=0.0,
        shared_aln=True, attn_l2_norm=True, patch_nums=patch_nums, flash_if_available=False, fused_if_available=False,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(321)
    with torch.no_grad():
        for module in (vqvae, var):
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                scale = 1 / math.sqrt(param[0].numel()) if param.ndim >= 2 else 0.05
                param.copy_(math.log(4.0) + 0.3 * noise if name.endswith("scale_mul_1H11") else scale * noise)
    torch.save(vqvae.state_dict(), tmp_path / "vae.pth")
    torch.save(var.state_dict(), tmp_path / "var.pth")
    command = [
        "--vae_path",
        tmp_path / "vae.pth",
        "--var_path",
        tmp_path / "var.pth",
        "--output_dir",
        tmp_path / "out",
    ]
    command += ["--patch_nums", *map(str, patch_nums), "--verify", "--original_repo", os.environ["VAR_ORIGINAL_REPO"]]
    rc = convert.main([str(arg) for arg in command])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "the tokenizer, the transformer and the sampler reproduce the official code" in out
