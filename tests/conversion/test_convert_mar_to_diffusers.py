"""Conversion of LTH14/mar checkpoints and the KL VAE into MARPipeline folders (conversion/convert_mar_to_diffusers.py)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import stat
import subprocess
import sys

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DiffusionPipeline
from huggingface_hub import HfApi, ModelCard
from safetensors.torch import load_file

from conversion import card as conversion_card
from conversion import checkpoints, kl_vae
from conversion import convert_mar_to_diffusers as convert
from conversion.verify import VerificationError, verify_pipeline_folder
from diffusers_mar import MARDiffusionHead, MARPipeline, MARTransformer2DModel, get_preset_config
from diffusers_mar.pipelines.sampling_settings import PAPER_SAMPLING
from tests.testing_utils import (
    FIXTURE_HEAD_CONFIG,
    FIXTURE_TRANSFORMER_CONFIG,
    FIXTURES_DIR,
    REPO_ROOT,
    fixture_checkpoint,
    fixture_io,
    fixtures_or_skip,
    requires_fixtures,
)

CHECKPOINT = FIXTURES_DIR / "checkpoint-last.pth"
VAE = FIXTURES_DIR / "vae_tiny.ckpt"
# The fixture model has 4 heads (not visible in the shapes) and a VAE with 4 GroupNorm groups (KL-16 has 32).
FIXTURE_FLAGS = ["--num_attention_heads", "4", "--vae_norm_num_groups", "4"]
# Original LTH14/mar README: FID-50K / IS with guidance and cfg per model; parameter counts of the original models.
PAPER = {
    "mar-base": {"fid": "2.31", "is": "281.7", "cfg": 2.9, "params": "207.9M", "title": "MAR-B"},
    "mar-large": {"fid": "1.78", "is": "296.0", "cfg": 3.0, "params": "478.3M", "title": "MAR-L"},
    "mar-huge": {"fid": "1.55", "is": "303.7", "cfg": 3.2, "params": "942.4M", "title": "MAR-H"},
}


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    rc = convert.main([str(arg) for arg in argv])
    return rc, capsys.readouterr().err


def fixture_argv(output_dir: pathlib.Path, *extra, checkpoint=CHECKPOINT, vae=VAE) -> list:
    argv = ["--checkpoint_path", checkpoint, "--output_dir", output_dir, *FIXTURE_FLAGS, *extra]
    return argv + (["--vae_path", vae] if vae is not None else [])


def assert_nothing_written(folder: pathlib.Path, output_name: str = "out") -> None:
    """No output folder and no temporary sibling remain."""
    assert not (folder / output_name).exists()
    assert not [path.name for path in folder.iterdir() if path.name.startswith(f".{output_name}.")]


def mapped_weights(weights: str) -> tuple[dict, dict]:
    return convert.convert_mar_state_dict(fixture_checkpoint()[weights])


def save_checkpoint(path: pathlib.Path, **entries) -> pathlib.Path:
    torch.save(entries, path)
    return path


@pytest.fixture(scope="module")
def converted_fixture(tmp_path_factory, stand_in_checkout) -> pathlib.Path | None:
    """The fixture checkpoint and VAE converted by `main()` with `--verify --original_repo`."""
    if not fixtures_or_skip():
        return None
    output_dir = tmp_path_factory.mktemp("converted") / "mar-tiny"
    argv = fixture_argv(output_dir, "--verify", "--original_repo", stand_in_checkout)
    assert convert.main([str(arg) for arg in argv]) == 0
    return output_dir


@pytest.mark.slow
@requires_fixtures
def test_command_line_script_runs(tmp_path):
    """`python conversion/convert_mar_to_diffusers.py ...` as the README shows it (subprocesses: slow imports)."""
    # No PYTHONPATH: the script finds the `conversion` modules beside it itself.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    argv = [str(arg) for arg in fixture_argv(tmp_path / "out", vae=None)]
    script = REPO_ROOT / "conversion" / "convert_mar_to_diffusers.py"
    run = {"env": env, "capture_output": True, "text": True, "timeout": 300, "cwd": REPO_ROOT}
    result = subprocess.run([sys.executable, script, *argv], **run)
    assert result.returncode == 0, result.stderr
    assert "Converted `model_ema`" in result.stdout and "no VAE" in result.stdout
    assert (tmp_path / "out" / "model_index.json").is_file()
    result = subprocess.run([sys.executable, script, *argv], **run)
    assert result.returncode == 2  # bad input
    assert "exists and is not empty; pass `--overwrite`" in result.stderr


def load_pipeline(folder: pathlib.Path) -> MARPipeline:
    pipe = MARPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------------------------------
# The tiny fixture: parity with the original's recorded outputs
# ----------------------------------------------------------------------------------------------------------------------


@requires_fixtures
@pytest.mark.parity
def test_converted_transformer_and_head_reproduce_original_outputs(converted_fixture):
    io = fixture_io()
    pipe = load_pipeline(converted_fixture)
    assert pipe.transformer.config.num_attention_heads == 4
    with torch.no_grad():
        for case in ("cond", "mixed", "allmasked"):
            tokens, mask = io["transformer.x"], io["transformer.mask"]
            if case == "allmasked":
                tokens, mask = torch.zeros_like(tokens), torch.ones_like(mask)
            z = pipe.transformer(tokens, mask, io[f"transformer.{case}.labels"]).sample
            torch.testing.assert_close(z, io[f"transformer.{case}.z"], rtol=0, atol=1e-5)
        out = pipe.diffusion_head(io["mlp.x_t"], io["mlp.t"], io["mlp.c"]).sample
    torch.testing.assert_close(out, io["mlp.out"], rtol=0, atol=1e-5)


@requires_fixtures
@pytest.mark.parity
def test_converted_vae_reproduces_original_outputs(converted_fixture):
    io = fixture_io()
    vae = load_pipeline(converted_fixture).vae
    assert isinstance(vae, AutoencoderKL)
    assert vae.config.scaling_factor == 0.2325
    assert list(vae.config.down_block_types) == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    with torch.no_grad():
        posterior = vae.encode(io["vae.image"]).latent_dist
        decoded = vae.decode(io["vae.mean"]).sample
    torch.testing.assert_close(posterior.parameters, io["vae.moments"], rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.mean, io["vae.mean"], rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, io["vae.logvar"], rtol=0, atol=1e-5)
    # float32 rounding on values up to 3.6: observed 9.8e-6 (the original itself is 5.5e-6 from its float64 result).
    torch.testing.assert_close(decoded, io["vae.decoded"], rtol=0, atol=1e-5)


@requires_fixtures
def test_conversion_takes_the_ema_weights(converted_fixture):
    pipe = load_pipeline(converted_fixture)
    ema_transformer, ema_head = mapped_weights("model_ema")
    raw_transformer, _ = mapped_weights("model")
    saved = pipe.transformer.state_dict()
    for key, value in ema_transformer.items():
        assert torch.equal(saved[key], value), key
        assert not torch.equal(saved[key], raw_transformer[key]), key  # the fixture's EMA differs everywhere
    for key, value in ema_head.items():
        assert torch.equal(pipe.diffusion_head.state_dict()[key], value), key
    card = ModelCard.load(converted_fixture / "README.md")
    assert "| Weights | EMA (`model_ema`), the ones the paper's results are measured with |" in card.text


@requires_fixtures
def test_use_non_ema_converts_the_training_weights(tmp_path, capsys):
    rc, err = run_main(fixture_argv(tmp_path / "out", "--use_non_ema", vae=None), capsys)
    assert rc == 0, err
    pipe = load_pipeline(tmp_path / "out")
    assert pipe.vae is None
    raw_transformer, raw_head = mapped_weights("model")
    for key, value in raw_transformer.items():
        assert torch.equal(pipe.transformer.state_dict()[key], value), key
    for key, value in raw_head.items():
        assert torch.equal(pipe.diffusion_head.state_dict()[key], value), key
    io = fixture_io()
    with torch.no_grad():
        z = pipe.transformer(io["transformer.x"], io["transformer.mask"], io["transformer.cond.labels"]).sample
    assert (z - io["transformer.cond.z"]).abs().max() > 1e-3  # the fixture's outputs are the EMA model's
    assert "| Weights | training, non-EMA (`model`)" in ModelCard.load(tmp_path / "out" / "README.md").text


@requires_fixtures
def test_folder_layout_and_model_card_metadata(converted_fixture):
    index = json.loads((converted_fixture / "model_index.json").read_text())
    assert index["_class_name"] == "MARPipeline"
    assert index["transformer"] == ["diffusers_mar", "MARTransformer2DModel"]
    assert index["diffusion_head"] == ["diffusers_mar", "MARDiffusionHead"]
    assert index["scheduler"] == ["diffusers_mar", "MARDDPMScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert isinstance(DiffusionPipeline.from_pretrained(converted_fixture), MARPipeline)
    # The folder was a private temporary folder before its rename; it must end with the umask's usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(converted_fixture.stat().st_mode) == 0o777 & ~umask
    for component in ("transformer", "diffusion_head", "vae"):
        assert (converted_fixture / component / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((converted_fixture / "transformer" / "config.json").read_text())
    assert {key: config[key] for key in FIXTURE_TRANSFORMER_CONFIG} == FIXTURE_TRANSFORMER_CONFIG
    config = json.loads((converted_fixture / "diffusion_head" / "config.json").read_text())
    assert {key: config[key] for key in FIXTURE_HEAD_CONFIG} == FIXTURE_HEAD_CONFIG

    card = ModelCard.load(converted_fixture / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "mit"
    assert data["library_name"] == "diffusers"
    assert {"mar", "class-conditional"} <= set(data["tags"])
    assert "mar_sampling" not in data  # the settings live in the pipeline's config
    assert f"`checkpoint-last.pth`, epoch {fixture_checkpoint()['epoch']} |" in card.text
    assert "4 / 4 heads" in card.text and "| VAE | `vae_tiny.ckpt` as a diffusers `AutoencoderKL` |" in card.text
    assert "@article{li2024autoregressive" in card.text
    assert "no published numbers" in card.text


@requires_fixtures
def test_recommended_sampling_settings_are_in_the_pipeline_config(converted_fixture):
    # A custom size: the settings come from the checkpoint's args (cfg 3.0, temperature 0.9, num_iter 4).
    args = vars(fixture_checkpoint()["args"])
    expected = {
        "guidance_scale": args["cfg"],
        "guidance_schedule": args["cfg_schedule"],
        "temperature": args["temperature"],
        "num_inference_steps": args["num_iter"],
        "num_diffusion_steps": int(args["num_sampling_steps"]),
    }
    assert json.loads((converted_fixture / "model_index.json").read_text())["sampling"] == expected
    assert load_pipeline(converted_fixture).sampling_defaults == expected
    text = ModelCard.load(converted_fixture / "README.md").text
    assert "`guidance_scale=3.0`, `guidance_schedule='linear'`" in text and "`temperature=0.9`" in text


def test_recommended_sampling_falls_back_to_the_paper_clipped():
    # Unusable or missing values in `args` take the paper's, clipped to the model's 16 tokens.
    args = {"cfg": -1.0, "cfg_schedule": "cosine", "num_iter": 200, "num_sampling_steps": "abc"}
    assert conversion_card.recommended_sampling(None, args, num_tokens=16) == {
        **PAPER_SAMPLING,
        "num_inference_steps": 16,
    }
    assert conversion_card.recommended_sampling("mar-large", {}, num_tokens=256) == {
        **PAPER_SAMPLING,
        "guidance_scale": 3.0,
    }


@requires_fixtures
@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_is_stored_and_verified(tmp_path, capsys, dtype, torch_dtype, stand_in_checkout):
    argv = fixture_argv(tmp_path / "out", "--dtype", dtype, "--verify", "--original_repo", stand_in_checkout)
    rc, err = run_main(argv, capsys)
    assert rc == 0, err
    for component in ("transformer", "diffusion_head", "vae"):
        tensors = load_file(tmp_path / "out" / component / "diffusion_pytorch_model.safetensors")
        assert {tensor.dtype for tensor in tensors.values()} == {torch_dtype}, component
    ema_transformer, _ = mapped_weights("model_ema")
    pipe = load_pipeline(tmp_path / "out")
    expected = ema_transformer["class_embedding.weight"].to(torch_dtype)
    assert torch.equal(pipe.transformer.class_embedding.weight, expected)


@requires_fixtures
def test_no_safe_serialization_writes_torch_files(tmp_path, capsys):
    rc, err = run_main(fixture_argv(tmp_path / "out", "--no-safe_serialization", vae=None), capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.bin").is_file()
    assert not (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert load_pipeline(tmp_path / "out").transformer.config.num_layers == 2


@requires_fixtures
def test_verification_fails_when_the_folder_differs(converted_fixture):
    pipe = load_pipeline(converted_fixture)
    assert set(verify_pipeline_folder(converted_fixture, pipe)) == {
        "transformer",
        "diffusion_head",
        "vae.encode",
        "vae.decode",
    }
    with torch.no_grad():
        pipe.diffusion_head.proj_out.bias.add_(1e-3)
    with pytest.raises(VerificationError, match=r"tensors differ .*\['diffusion_head.proj_out.bias'\]"):
        verify_pipeline_folder(converted_fixture, pipe)
    with pytest.raises(VerificationError, match=r"stores \['torch.float32'\], asked for torch.float16"):
        verify_pipeline_folder(converted_fixture, pipe, dtype=torch.float16)
    # Same tensors, other head split (as if the saved config were wrong): the outputs differ.
    pipe = load_pipeline(converted_fixture)
    for block in pipe.transformer.encoder_blocks:
        block.attn.num_heads, block.attn.head_dim = 2, 32
    with pytest.raises(
        VerificationError, match="reloaded outputs differ from the converted weights by {'transformer'"
    ):
        verify_pipeline_folder(converted_fixture, pipe)


# ----------------------------------------------------------------------------------------------------------------------
# Full-size MAR-B in the original layout
# ----------------------------------------------------------------------------------------------------------------------


def _layout(keys) -> set[str]:
    return {pattern for key in keys for pattern in [__import__("re").sub(r"\.\d+\.", ".N.", key)]}


def original_state_dict(preset: str, device: str = "meta", std: float = 0.02, seed: int = 0) -> dict:
    """A preset's weights in the original LTH14/mar key layout (the inverse mapping), on `meta` or random fp32."""
    config = get_preset_config(preset)
    with init_empty_weights():
        transformer = MARTransformer2DModel.from_config(config["transformer"])
        head = MARDiffusionHead.from_config(config["diffusion_head"])
    original = convert.convert_diffusers_to_mar_state_dict(transformer.state_dict(), head.state_dict())
    if device == "meta":
        return original
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(value.shape, generator=generator) * std for key, value in original.items()}


@requires_fixtures
@pytest.mark.parametrize("preset", ["mar-base", "mar-large", "mar-huge"])
def test_full_size_checkpoint_converts_strictly_on_meta(preset):
    state_dict = original_state_dict(preset)
    # The inverse mapping gives the original's layout: the same key patterns as the fixture's original checkpoint.
    assert _layout(state_dict) == _layout(fixture_checkpoint()["model_ema"])
    transformer_config, head_config, found = convert.infer_configs_from_checkpoint(state_dict, {})
    assert found == preset  # widths 768/1024/1280 give the heads, the rest comes from the shapes
    transformer, head = convert.build_mar_models(state_dict, transformer_config, head_config)
    assert transformer.class_embedding.weight.device.type == "meta"
    num_parameters = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in head.parameters())
    assert num_parameters == get_preset_config(preset)["paper"]["num_parameters"]
    assert num_parameters == sum(value.numel() for value in state_dict.values())


@requires_fixtures
def test_model_type_must_match_the_checkpoint():
    state_dict = original_state_dict("mar-base")
    _, _, found = convert.infer_configs_from_checkpoint(state_dict, {}, model_type="mar-base")
    assert found == "mar-base"
    with pytest.raises(ValueError, match=r"--model_type mar-large` does not match the checkpoint: num_layers 12"):
        convert.infer_configs_from_checkpoint(state_dict, {}, model_type="mar-large")
    # `args.model` of the official checkpoints names the factory, which gives the heads of an odd width too.
    fixture_sd = fixture_checkpoint()["model_ema"]
    with pytest.raises(ValueError, match="width 64 is not one of MAR-B/L/H .* Pass `--num_attention_heads`"):
        convert.infer_configs_from_checkpoint(fixture_sd, {})
    transformer_config, _, found = convert.infer_configs_from_checkpoint(fixture_sd, {}, num_attention_heads=4)
    assert found is None and transformer_config["attention_head_dim"] == 16


@pytest.mark.slow
def test_full_size_mar_base_fp32_command_line(tmp_path, capsys):
    state_dict = original_state_dict("mar-base", device="cpu")
    args = argparse.Namespace(model="mar_base", vae_embed_dim=16, patch_size=1, num_sampling_steps="100")
    checkpoint = save_checkpoint(tmp_path / "checkpoint-last.pth", model=state_dict, model_ema=state_dict, args=args)
    del state_dict
    rc = convert.main(
        [str(arg) for arg in ["--checkpoint_path", checkpoint, "--output_dir", tmp_path / "out", "--verify"]]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    pipe = load_pipeline(tmp_path / "out")
    num_parameters = sum(p.numel() for p in pipe.transformer.parameters())
    num_parameters += sum(p.numel() for p in pipe.diffusion_head.parameters())
    assert num_parameters == 207_924_768
    assert pipe.get_label_ids(["golden retriever"]) == [207]
    assert pipe.sampling_defaults == {**PAPER_SAMPLING, "guidance_scale": 2.9}
    assert "Verified: the folder reloads to the converted weights and outputs." in out  # heads from args.model


# ----------------------------------------------------------------------------------------------------------------------
# The production KL-16 VAE structure
# ----------------------------------------------------------------------------------------------------------------------


def original_vae_shapes(ch: int, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=16, attn_levels=(4,)) -> dict:
    """Key -> shape of LTH14/mar models/vae.py `AutoencoderKL` (LDM KL VAE) for a width `ch`."""
    shapes = {}

    def conv(name, c_in, c_out, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, k, k), (c_out,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, c_in, c_out):
        norm(f"{name}.norm1", c_in), conv(f"{name}.conv1", c_in, c_out, 3)
        norm(f"{name}.norm2", c_out), conv(f"{name}.conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(f"{name}.nin_shortcut", c_in, c_out, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c), attn(f"{prefix}.mid.attn_1", c), resnet(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", 3, ch, 3)
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for block in range(num_res_blocks):
            resnet(f"encoder.down.{level}.block.{block}", block_in, ch * mult)
            block_in = ch * mult
            if level in attn_levels:
                attn(f"encoder.down.{level}.attn.{block}", block_in)
        if level != len(ch_mult) - 1:
            conv(f"encoder.down.{level}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", block_in, 2 * z_channels, 3)
    conv("decoder.conv_in", z_channels, block_in, 3)
    mid("decoder", block_in)
    for level in reversed(range(len(ch_mult))):
        for block in range(num_res_blocks + 1):
            resnet(f"decoder.up.{level}.block.{block}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", block_in, 3, 3)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, 1), conv("post_quant_conv", z_channels, z_channels, 1)
    return shapes


@requires_fixtures
def test_production_kl16_vae_structure_converts_strictly():
    # The shape generator reproduces the fixture's original tiny VAE (ch 8) exactly...
    tiny = torch.load(VAE, weights_only=True)["model"]
    assert {key: tuple(value.shape) for key, value in tiny.items()} == original_vae_shapes(8)
    # ...and at ch 128 gives the production KL-16 layout, which maps onto the expected diffusers config.
    with torch.device("meta"):
        state_dict = {key: torch.empty(shape) for key, shape in original_vae_shapes(128).items()}
    config = kl_vae.infer_vae_config(state_dict)
    assert config["block_out_channels"] == [128, 128, 256, 256, 512]
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["UpDecoderBlock2D"] * 5
    assert (config["layers_per_block"], config["latent_channels"], config["norm_num_groups"]) == (2, 16, 32)
    assert config["scaling_factor"] == 0.2325 and config["mid_block_add_attention"]
    vae = kl_vae.build_vae(state_dict, config)
    assert sum(p.numel() for p in vae.parameters()) == sum(value.numel() for value in state_dict.values())
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 66.5  # the fixture README's KL-16 size


def test_vae_group_count_must_divide_the_widths():
    with torch.device("meta"):
        state_dict = {key: torch.empty(shape) for key, shape in original_vae_shapes(8).items()}
    with pytest.raises(ValueError, match="--vae_norm_num_groups` 32 does not divide the VAE widths"):
        kl_vae.infer_vae_config(state_dict)
    assert kl_vae.infer_vae_config(state_dict, norm_num_groups=4)["norm_num_groups"] == 4


# ----------------------------------------------------------------------------------------------------------------------
# Model card, labels, Hub upload
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["mar-base", "mar-large", "mar-huge"])
def test_preset_model_card_renders_paper_numbers_and_sampling(preset):
    config = get_preset_config(preset)
    with init_empty_weights():
        transformer = MARTransformer2DModel.from_config(config["transformer"])
        head = MARDiffusionHead.from_config(config["diffusion_head"])
    sampling = conversion_card.recommended_sampling(preset, {"num_sampling_steps": "100"}, transformer.num_tokens)
    assert sampling == {**PAPER_SAMPLING, "guidance_scale": PAPER[preset]["cfg"]}
    card = conversion_card.conversion_model_card(
        transformer, head, preset, sampling, "model_ema", "checkpoint-last.pth", "kl16.ckpt", repo_id="user/mar"
    )
    reloaded = ModelCard(str(card))  # what `ModelCard.load` of the saved README gives
    data = reloaded.data.to_dict()
    assert data["license"] == "mit" and data["library_name"] == "diffusers"
    assert {"mar", "class-conditional"} <= set(data["tags"])
    assert data["datasets"] == ["imagenet-1k"]
    assert "mar_sampling" not in data
    text = reloaded.text
    paper = PAPER[preset]
    assert f"# {paper['title']} for diffusers" in text
    assert f"| {paper['title']} | {paper['params']} |" in text
    assert f"| {paper['fid']} | {paper['is']} |" in text
    assert str(config["paper"]["fid_no_guidance"]) in text
    assert f"`guidance_scale={PAPER[preset]['cfg']}`" in text
    assert 'MARPipeline.from_pretrained("user/mar")' in text and "class_labels=[207]" in text
    assert "@article{li2024autoregressive" in text and "EMA (`model_ema`)" in text


def test_bundled_imagenet_labels():
    id2label = checkpoints.load_id2label(None, 1000)
    assert len(id2label) == 1000
    assert (id2label[0], id2label[207], id2label[999]) == ("tench", "golden retriever", "toilet tissue")
    assert checkpoints.load_id2label(None, 10) is None


@requires_fixtures
def test_id2label_path_is_saved_and_checked(tmp_path, capsys):
    names = {str(i): f"class {i}" for i in range(10)}
    (tmp_path / "labels.json").write_text(json.dumps(names))
    rc, err = run_main(fixture_argv(tmp_path / "out", "--id2label_path", tmp_path / "labels.json", vae=None), capsys)
    assert rc == 0, err
    assert load_pipeline(tmp_path / "out").get_label_ids(["class 7", "class 2"]) == [7, 2]
    (tmp_path / "bad.json").write_text(json.dumps({"0": "only one"}))
    rc, err = run_main(fixture_argv(tmp_path / "out2", "--id2label_path", tmp_path / "bad.json", vae=None), capsys)
    assert rc == 2 and "must map every class id 0..9" in err
    assert_nothing_written(tmp_path, "out2")


@requires_fixtures
def test_push_to_hub_uploads_the_output_folder(tmp_path, capsys, monkeypatch):
    calls = []

    def fake_create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://hub.example/{repo_id}"

    def fake_upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", fake_upload_folder)
    argv = fixture_argv(tmp_path / "out", "--push_to_hub", "--repo_id", "user/mar-tiny", "--private", vae=None)
    rc, err = run_main(argv, capsys)
    assert rc == 0, err
    (_, repo, create_kwargs), (_, upload_repo, upload_kwargs) = calls
    assert repo == upload_repo == "user/mar-tiny"
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True
    assert pathlib.Path(upload_kwargs["folder_path"]) == (tmp_path / "out").resolve()
    assert upload_kwargs.get("repo_type", "model") == "model"
    assert 'MARPipeline.from_pretrained("user/mar-tiny")' in (tmp_path / "out" / "README.md").read_text()


def test_push_to_hub_needs_a_repo_id(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        convert.main(["--checkpoint_path", "x.pth", "--output_dir", str(tmp_path / "out"), "--push_to_hub"])
    assert error.value.code == 2
    assert "`--push_to_hub` needs `--repo_id`" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: a clear error and no output folder
# ----------------------------------------------------------------------------------------------------------------------


@requires_fixtures
def test_file_that_is_not_a_mar_checkpoint(tmp_path, capsys):
    other = save_checkpoint(tmp_path / "other.pth", state_dict={"weight": torch.ones(2)})
    rc, err = run_main(fixture_argv(tmp_path / "out", checkpoint=other), capsys)
    assert rc == 2 and "`--checkpoint_path` is not a MAR training checkpoint" in err
    rc, err = run_main(fixture_argv(tmp_path / "out", checkpoint=VAE), capsys)  # the VAE file: {"model": vae weights}
    assert rc == 2 and "Not a MAR checkpoint: `model` lacks the MAR keys" in err
    rc, err = run_main(fixture_argv(tmp_path / "out", checkpoint=tmp_path / "missing.pth"), capsys)
    assert rc == 2 and "does not exist" in err
    assert_nothing_written(tmp_path)


@requires_fixtures
def test_truncated_checkpoint(tmp_path, capsys):
    data = CHECKPOINT.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    rc, err = run_main(fixture_argv(tmp_path / "out", checkpoint=tmp_path / "truncated.pth"), capsys)
    assert rc == 2 and "is not a readable torch checkpoint: it is a zip archive that torch cannot read" in err
    assert "(truncated or corrupted?)" in err
    assert_nothing_written(tmp_path)


@requires_fixtures
def test_checkpoint_without_ema_needs_use_non_ema(tmp_path, capsys):
    source = fixture_checkpoint()
    checkpoint = save_checkpoint(tmp_path / "no_ema.pth", model=source["model"], args=source["args"])
    rc, err = run_main(fixture_argv(tmp_path / "out", checkpoint=checkpoint), capsys)
    assert rc == 2 and "no EMA weights (`model_ema`)" in err and "--use_non_ema" in err
    assert_nothing_written(tmp_path)
    with pytest.warns(UserWarning, match="no EMA weights"):
        rc, err = run_main(fixture_argv(tmp_path / "out", "--use_non_ema", checkpoint=checkpoint), capsys)
    assert rc == 0, err
    assert "| Weights | training, non-EMA (`model`)" in ModelCard.load(tmp_path / "out" / "README.md").text


@requires_fixtures
def test_non_empty_output_dir_needs_overwrite(tmp_path, capsys, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("user data")
    rc, err = run_main(fixture_argv(tmp_path / "out", vae=None), capsys)
    assert rc == 2 and "exists and is not empty; pass `--overwrite`" in err
    # --overwrite replaces only a pipeline folder: a folder of other files is never deleted.
    rc, err = run_main(fixture_argv(tmp_path / "out", "--overwrite", vae=None), capsys)
    assert rc == 2 and "is not a pipeline folder (no `model_index.json`)" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "user data"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    # A previous conversion is replaced (only once the new one is complete).
    (tmp_path / "out" / "keep.txt").unlink()
    rc, err = run_main(fixture_argv(tmp_path / "out", vae=None), capsys)
    assert rc == 0, err
    (tmp_path / "out" / "stale.txt").write_text("from the previous conversion")
    rc, err = run_main(fixture_argv(tmp_path / "out", "--overwrite", vae=None), capsys)
    assert rc == 0, err
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert (tmp_path / "out" / "model_index.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # no temporary folders left
    # --overwrite never replaces a folder that holds an input file or the current folder.
    checkpoint = save_checkpoint(tmp_path / "out" / "checkpoint-last.pth", **fixture_checkpoint())
    rc, err = run_main(fixture_argv(tmp_path / "out", "--overwrite", vae=None, checkpoint=checkpoint), capsys)
    assert rc == 2 and "holds the current folder or an input file" in err and checkpoint.is_file()
    monkeypatch.chdir(tmp_path / "out")
    rc, err = run_main(fixture_argv(pathlib.Path("."), "--overwrite", vae=None), capsys)
    assert rc == 2 and "holds the current folder or an input file" in err
    assert (tmp_path / "out" / "model_index.json").is_file()
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    rc, err = run_main(fixture_argv(tmp_path / "empty", vae=None), capsys)
    assert rc == 0, err


def _tiny_vae_state_dict() -> dict:
    return dict(torch.load(VAE, weights_only=True)["model"])


@requires_fixtures
@pytest.mark.parametrize(
    "case, message",
    [
        ("inconsistent", "The VAE shapes are inconsistent"),
        ("wrong_tensor", "shape mismatches (converted vs model) ['decoder.up_blocks.4.resnets.0.conv1.weight"),
        ("latent_channels", "The VAE has 8 latent channels but the MAR checkpoint was trained on 16"),
        ("not_a_vae", "is not an LDM-style KL VAE"),
    ],
)
def test_vae_with_wrong_shapes(tmp_path, capsys, case, message):
    state_dict = _tiny_vae_state_dict()
    if case == "inconsistent":
        state_dict["post_quant_conv.weight"] = state_dict["post_quant_conv.weight"][:8, :8]
    elif case == "wrong_tensor":
        state_dict["decoder.up.0.block.0.conv1.weight"] = state_dict["decoder.up.0.block.0.conv1.weight"][:, :4]
    elif case == "latent_channels":  # a consistent VAE with 8 latent channels (MAR-tiny was trained on 16)
        mean_and_logvar = torch.cat([torch.arange(8), torch.arange(16, 24)])
        state_dict["encoder.conv_out.weight"] = state_dict["encoder.conv_out.weight"][mean_and_logvar]
        state_dict["encoder.conv_out.bias"] = state_dict["encoder.conv_out.bias"][mean_and_logvar]
        state_dict["quant_conv.weight"] = state_dict["quant_conv.weight"][mean_and_logvar][:, mean_and_logvar]
        state_dict["quant_conv.bias"] = state_dict["quant_conv.bias"][mean_and_logvar]
        state_dict["post_quant_conv.weight"] = state_dict["post_quant_conv.weight"][:8, :8]
        state_dict["post_quant_conv.bias"] = state_dict["post_quant_conv.bias"][:8]
        state_dict["decoder.conv_in.weight"] = state_dict["decoder.conv_in.weight"][:, :8]
    else:
        state_dict = {"model.layer.weight": torch.ones(2)}
    vae = save_checkpoint(tmp_path / "vae.ckpt", model=state_dict)
    rc, err = run_main(fixture_argv(tmp_path / "out", vae=vae), capsys)
    assert rc == 2, err
    assert message in err
    assert_nothing_written(tmp_path)


@requires_fixtures
def test_untrusted_pickle_needs_trust_checkpoint(tmp_path, capsys):
    source = fixture_checkpoint()
    checkpoint = save_checkpoint(
        tmp_path / "custom.pth", model=source["model"], model_ema=source["model_ema"], extra=pathlib.PurePosixPath("x")
    )
    rc, err = run_main(fixture_argv(tmp_path / "out", vae=None, checkpoint=checkpoint), capsys)
    assert rc == 2 and "pickles `pathlib.PurePosixPath`" in err and "--trust_checkpoint" in err
    assert_nothing_written(tmp_path)
    rc, err = run_main(fixture_argv(tmp_path / "out", "--trust_checkpoint", vae=None, checkpoint=checkpoint), capsys)
    assert rc == 0, err


@requires_fixtures
def test_failed_verification_exits_non_zero_and_leaves_no_folder(tmp_path, capsys, monkeypatch, stand_in_checkout):
    from_pretrained = MARPipeline.from_pretrained.__func__

    def reload_with_a_changed_weight(cls, *args, **kwargs):  # as if the saved folder had a wrong tensor
        pipe = from_pretrained(cls, *args, **kwargs)
        with torch.no_grad():
            pipe.transformer.mask_token.add_(1e-2)  # a constant shift: invisible after the LayerNorms
        return pipe

    monkeypatch.setattr(MARPipeline, "from_pretrained", classmethod(reload_with_a_changed_weight))
    rc, err = run_main(
        fixture_argv(tmp_path / "out", "--verify", "--original_repo", stand_in_checkout, vae=None), capsys
    )
    assert rc == 1 and "reloaded tensors differ from the converted weights: ['transformer.mask_token']" in err
    assert_nothing_written(tmp_path)


@requires_fixtures
def test_failure_while_writing_leaves_no_folder(tmp_path, capsys, monkeypatch):
    def failing_save(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(ModelCard, "save", failing_save)
    rc, err = run_main(fixture_argv(tmp_path / "out"), capsys)
    assert rc == 1 and "error: disk full" in err  # a failure while running, not bad input
    assert_nothing_written(tmp_path)
    # With --overwrite, the previous pipeline folder survives a failed conversion.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_index.json").write_text("{}")
    (tmp_path / "out" / "keep.txt").write_text("previous")
    rc, err = run_main(fixture_argv(tmp_path / "out", "--overwrite"), capsys)
    assert rc == 1 and "error: disk full" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
