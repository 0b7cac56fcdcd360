"""`--verify` against the original model (head counts), head-count flags, latent folders without a VAE, and the
converter's error messages and exit codes (2: bad input, 1: a failure while running)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import shutil

import pytest
import torch

from conversion import convert_mar_to_diffusers as convert
from conversion.verify import build_original_mar
from diffusers_mar import MARPipeline
from tests.conversion.conftest import STAND_IN_MAR
from tests.conversion.test_convert_mar_to_diffusers import (
    CHECKPOINT,
    assert_nothing_written,
    original_state_dict,
    run_main,
    save_checkpoint,
)
from tests.testing_utils import (
    FIXTURE_HEAD_CONFIG,
    FIXTURE_TRANSFORMER_CONFIG,
    fixture_checkpoint,
    fixture_io,
    requires_fixtures,
)


def heads_argv(output_dir: pathlib.Path, encoder: int, decoder: int | None = None, *extra) -> list:
    """The fixture checkpoint without VAE and with the given head counts instead of the true 4 / 4."""
    argv = ["--checkpoint_path", CHECKPOINT, "--output_dir", output_dir, "--num_attention_heads", encoder, *extra]
    return argv + (["--decoder_num_attention_heads", decoder] if decoder is not None else [])


# ----------------------------------------------------------------------------------------------------------------------
# Head counts: not in the weights, so `--verify` checks them against the original model
# ----------------------------------------------------------------------------------------------------------------------


@requires_fixtures
@pytest.mark.parametrize("encoder, decoder", [(2, None), (4, 2), (8, 4)])
def test_verify_catches_wrong_head_counts_against_the_original(tmp_path, capsys, stand_in_checkout, encoder, decoder):
    argv = heads_argv(tmp_path / "out", encoder, decoder, "--verify", "--original_repo", stand_in_checkout)
    rc, err = run_main(argv, capsys)
    assert rc == 1, err  # a failure while running, not bad input
    assert "differs from the original LTH14/mar model by {'transformer'" in err
    assert (
        f"The original has 4 encoder / 4 decoder attention heads, the conversion {encoder} / {decoder or encoder}"
        in err
    )
    assert_nothing_written(tmp_path)


@requires_fixtures
def test_verify_with_the_right_head_counts_says_what_it_proved(tmp_path, capsys, stand_in_checkout):
    argv = heads_argv(tmp_path / "out", 4, 4, "--verify", "--original_repo", stand_in_checkout)
    assert convert.main([str(arg) for arg in argv]) == 0
    out = capsys.readouterr().out
    assert (
        "Verified: the folder reloads to the converted weights and outputs; the transformer and diffusion head " in out
    )
    assert f"reproduce the original `mar_tiny_fixture` of {stand_in_checkout}" in out
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["decoder_num_attention_heads"]) == (4, 4)


@requires_fixtures
def test_verify_without_the_original_refuses_head_counts_it_cannot_check(tmp_path, capsys):
    rc, err = run_main(heads_argv(tmp_path / "out", 2, None, "--verify"), capsys)
    assert rc == 1
    assert "`--verify` cannot check head counts given by `--num_attention_heads`" in err
    assert "Pass `--original_repo path/to/LTH14-mar`" in err and "`mar_tiny_fixture`" in err
    assert_nothing_written(tmp_path)
    # Without --verify the flags are taken as given.
    rc, err = run_main(heads_argv(tmp_path / "out", 4, 2), capsys)
    assert rc == 0, err
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert (config["decoder_num_attention_heads"], config["decoder_attention_head_dim"]) == (2, 32)
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (4, 16)


@requires_fixtures
def test_verify_needs_the_factory_in_the_original_checkout(tmp_path, capsys):
    empty_checkout = tmp_path / "LTH14-mar"
    (empty_checkout / "models").mkdir(parents=True)
    (empty_checkout / "models" / "mar.py").write_text("def mar_base(**kwargs):\n    raise AssertionError\n")
    rc, err = run_main(heads_argv(tmp_path / "out", 4, None, "--verify", "--original_repo", empty_checkout), capsys)
    assert rc == 1 and "models/mar.py has no factory `mar_tiny_fixture`" in err
    assert_nothing_written(tmp_path)


def _class_embedding(original, labels: torch.Tensor, num_classes: int = 10) -> torch.Tensor:
    rows = original.class_emb(labels.clamp(max=num_classes - 1))  # label `num_classes`: the original's fake_latent
    return torch.where((labels == num_classes)[:, None], original.fake_latent.expand_as(rows), rows)


@requires_fixtures
def test_the_stand_in_original_reproduces_the_recorded_outputs(stand_in_checkout):
    """The stand-in checkout (conftest.py), built as `--verify` builds it, gives the outputs recorded from LTH14/mar:
    it can stand for the original in CI, where the real code cannot be fetched. It shares no code with the converter.
    """
    assert "diffusers_mar" not in STAND_IN_MAR and "conversion" not in STAND_IN_MAR
    io = fixture_io()
    original = build_original_mar(
        stand_in_checkout,
        "mar_tiny_fixture",
        fixture_checkpoint()["model_ema"],  # the original keys, loaded strictly with no mapping
        FIXTURE_TRANSFORMER_CONFIG,
        FIXTURE_HEAD_CONFIG,
    )
    with torch.no_grad():
        for case in ("cond", "mixed", "allmasked"):
            tokens, mask = io["transformer.x"], io["transformer.mask"]
            if case == "allmasked":
                tokens, mask = torch.zeros_like(tokens), torch.ones_like(mask)
            labels = _class_embedding(original, io[f"transformer.{case}.labels"])
            encoded = original.forward_mae_encoder(tokens, mask, labels)
            torch.testing.assert_close(encoded, io[f"transformer.{case}.encoder_out"], rtol=0, atol=1e-5)
            z = original.forward_mae_decoder(encoded, mask)
            torch.testing.assert_close(z, io[f"transformer.{case}.z"], rtol=0, atol=1e-5)
        out = original.diffloss.net(io["mlp.x_t"], io["mlp.t"], io["mlp.c"])
    torch.testing.assert_close(out, io["mlp.out"], rtol=0, atol=1e-5)


def _blocks(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(tensor.split(sizes))


def _adaln_blocks_reversed(transformer: dict, head: dict) -> None:  # res block 1's rows before res block 0's
    for kind in ("weight", "bias"):
        res_0, res_1, final = _blocks(head[f"adaln_modulation.{kind}"], [192, 192, 128])
        head[f"adaln_modulation.{kind}"] = torch.cat([res_1, res_0, final])


def _shift_and_scale_swapped(transformer: dict, head: dict) -> None:  # (scale, shift, gate) in every res block
    for kind in ("weight", "bias"):
        chunks = _blocks(head[f"adaln_modulation.{kind}"], [64] * 6 + [128])
        chunks[0], chunks[1], chunks[3], chunks[4] = chunks[1], chunks[0], chunks[4], chunks[3]
        head[f"adaln_modulation.{kind}"] = torch.cat(chunks)


def _fake_latent_first(transformer: dict, head: dict) -> None:  # the null class as row 0 instead of the last row
    rows = transformer["class_embedding.weight"]
    transformer["class_embedding.weight"] = torch.cat([rows[-1:], rows[:-1]])


def _query_and_key_swapped(transformer: dict, head: dict) -> None:  # [k; q; v] in the first decoder block
    for kind in ("weight", "bias"):
        q, k, v = _blocks(transformer[f"decoder_blocks.0.attn.to_qkv.{kind}"], [64, 64, 64])
        transformer[f"decoder_blocks.0.attn.to_qkv.{kind}"] = torch.cat([k, q, v])


@requires_fixtures
@pytest.mark.parametrize(
    "break_mapping, component",
    [
        (_adaln_blocks_reversed, "diffusion_head"),
        (_shift_and_scale_swapped, "diffusion_head"),
        (_fake_latent_first, "transformer"),
        (_query_and_key_swapped, "transformer"),
    ],
)
def test_verify_catches_a_broken_key_mapping(
    tmp_path, capsys, monkeypatch, stand_in_checkout, break_mapping, component
):
    """A converter bug that keeps every shape (so every strict load passes) is caught by `--verify --original_repo`:
    the stand-in original maps no keys, so it does not share the bug (issue 29: it used the converter's mapping)."""
    mapping = convert.convert_mar_state_dict

    def broken(state_dict):
        transformer, head = mapping(state_dict)
        break_mapping(transformer, head)
        return transformer, head

    monkeypatch.setattr(convert, "convert_mar_state_dict", broken)
    rc, err = run_main(heads_argv(tmp_path / "out", 4, None, "--verify", "--original_repo", stand_in_checkout), capsys)
    assert rc == 1, err
    assert f"differs from the original LTH14/mar model by {{'{component}'" in err
    assert "The head counts agree (4 / 4), so the weight mapping of the converter or the model code differs" in err
    assert_nothing_written(tmp_path)


def test_original_repo_flag_is_checked(tmp_path, capsys):
    argv = ["--checkpoint_path", "x.pth", "--output_dir", str(tmp_path / "out")]
    for extra, message in [
        (["--original_repo", str(tmp_path)], "`--original_repo` is used by `--verify`; add `--verify`"),
        (["--verify", "--original_repo", str(tmp_path)], "is not a LTH14/mar checkout (no models/mar.py)"),
        (["--decoder_num_attention_heads", "0"], "`--decoder_num_attention_heads` must be >= 1; got 0"),
    ]:
        with pytest.raises(SystemExit) as error:
            convert.main(argv + extra)
        assert error.value.code == 2
        assert message in capsys.readouterr().err


def test_head_counts_come_from_the_checkpoints_factory():
    state_dict = original_state_dict("mar-base")  # meta tensors, the original layout
    assert convert.attention_heads(state_dict, {"model": "mar_base"}) == (12, 12, "args.model")
    assert convert.attention_heads(state_dict, {}) == (12, 12, "width")
    assert convert.attention_heads(state_dict, {}, num_attention_heads=12) == (12, 12, "width")
    assert convert.attention_heads(state_dict, {}, num_attention_heads=8) == (8, 8, "flags")
    assert convert.attention_heads(state_dict, {}, "mar-base") == (12, 12, "model_type")
    with pytest.raises(
        ValueError, match=r"`--num_attention_heads` 8 contradicts the checkpoint's `args.model` mar_base, "
    ):
        convert.attention_heads(state_dict, {"model": "mar_base"}, num_attention_heads=8)
    with pytest.raises(ValueError, match="`--decoder_num_attention_heads` 6 contradicts `--model_type mar-base`"):
        convert.attention_heads(state_dict, {}, "mar-base", decoder_num_attention_heads=6)
    # A factory of one's own at a MAR-B width: the width says nothing about its heads.
    with pytest.raises(
        ValueError, match=r"`args.model` is `my_mar`, not a factory of LTH14/mar .* Pass `--num_attention_heads`"
    ):
        convert.attention_heads(state_dict, {"model": "my_mar"})
    assert convert.attention_heads(state_dict, {"model": "my_mar"}, None, 6, 8) == (6, 8, "flags")


@requires_fixtures
def test_head_count_messages_name_the_flag(tmp_path, capsys):
    rc, err = run_main(["--checkpoint_path", CHECKPOINT, "--output_dir", tmp_path / "out"], capsys)
    assert rc == 2 and "Pass `--num_attention_heads`." in err
    rc, err = run_main(heads_argv(tmp_path / "out", 3), capsys)
    assert rc == 2 and "`--num_attention_heads` 3 does not divide the width 64." in err
    rc, err = run_main(heads_argv(tmp_path / "out", 4, 5), capsys)
    assert rc == 2 and "`--decoder_num_attention_heads` 5 does not divide the width 64." in err
    assert_nothing_written(tmp_path)


@pytest.mark.parity
@pytest.mark.skipif("MAR_ORIGINAL_REPO" not in os.environ, reason="set MAR_ORIGINAL_REPO to a LTH14/mar checkout")
@requires_fixtures
def test_verify_against_the_official_code(tmp_path, capsys):
    """The official LTH14/mar code (needs timm 0.9.12), with the fixture's factory added as the fixture's README says
    it was built: `MAR(...)` 64 wide, 2+2 blocks, 4 heads, LayerNorm eps 1e-6."""
    checkout = tmp_path / "LTH14-mar"
    for folder in ("models", "diffusion"):
        shutil.copytree(pathlib.Path(os.environ["MAR_ORIGINAL_REPO"]) / folder, checkout / folder)
    with open(checkout / "models" / "mar.py", "a") as mar:
        mar.write(
            "\n\ndef mar_tiny_fixture(**kwargs):\n    return MAR(encoder_embed_dim=64, encoder_depth=2, "
            "encoder_num_heads=4, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4, "
            "norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)\n"
        )
    rc, err = run_main(heads_argv(tmp_path / "good", 4, None, "--verify", "--original_repo", checkout), capsys)
    assert rc == 0, err
    rc, err = run_main(heads_argv(tmp_path / "bad", 2, None, "--verify", "--original_repo", checkout), capsys)
    assert rc == 1 and "The original has 4 encoder / 4 decoder attention heads, the conversion 2 / 2" in err


# ----------------------------------------------------------------------------------------------------------------------
# A folder without a VAE is a latent model
# ----------------------------------------------------------------------------------------------------------------------


@requires_fixtures
def test_folder_without_vae_says_its_tokens_are_latents(tmp_path, capsys):
    rc, err = run_main(heads_argv(tmp_path / "out", 4), capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["token_space"] == "latent"
    pipe = MARPipeline.from_pretrained(tmp_path / "out")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae is None and pipe.config.token_space == "latent"
    call = {"class_labels": [1], "num_inference_steps": 2, "num_diffusion_steps": 2}
    with pytest.raises(ValueError, match='output_type="latent"'):
        pipe(**call, output_type="np")
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 16, 4, 4)
    assert 'it samples with `output_type="latent"` only' in (tmp_path / "out" / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# Messages and exit codes
# ----------------------------------------------------------------------------------------------------------------------


@requires_fixtures
@pytest.mark.parametrize(
    "content, message",
    [
        ("hello world\n", "it is a text file (a torch checkpoint is the binary file `torch.save` writes"),
        (b"", "it is empty"),
        (b"\x00\x01\x02binary", "it has an unknown format"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_gets_a_clear_message(tmp_path, capsys, content, message):
    path = tmp_path / "checkpoint.pth"
    path.write_text(content) if isinstance(content, str) else path.write_bytes(content)
    rc, err = run_main(["--checkpoint_path", path, "--output_dir", tmp_path / "out"], capsys)
    assert rc == 2
    assert f"error: `--checkpoint_path` {str(path)!r} is not a readable torch checkpoint: {message}" in err
    # No raw errno (101) in the message; the temporary folder's own name may hold "101" (pytest-of-root/pytest-101).
    assert "101" not in err.replace(str(tmp_path), "")
    assert_nothing_written(tmp_path)


@requires_fixtures
def test_no_safe_serialization_verify_prints_no_fetch_error(tmp_path, capsys, stand_in_checkout):
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        argv = heads_argv(tmp_path / "out", 4, None, "--no-safe_serialization", "--verify")
        rc, err = run_main(argv + ["--original_repo", stand_in_checkout], capsys)
    finally:
        logger.removeHandler(handler)
    assert rc == 0, err
    assert (tmp_path / "out" / "transformer" / "diffusion_pytorch_model.bin").is_file()
    assert [record.getMessage() for record in records] == []  # was "An error occurred while trying to fetch ..."


@requires_fixtures
def test_bad_input_exits_2_before_reading_the_checkpoint(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    rc, err = run_main(heads_argv(tmp_path / "out", 4, None, "--overwrite"), capsys)
    assert rc == 2 and "is not a pipeline folder" in err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    source = fixture_checkpoint()
    no_ema = save_checkpoint(tmp_path / "no_ema.pth", model=source["model"], args=argparse.Namespace(model="x"))
    rc, err = run_main(["--checkpoint_path", no_ema, "--output_dir", tmp_path / "new"], capsys)
    assert rc == 2 and "--use_non_ema" in err


@pytest.mark.parametrize(
    "error, exit_code",
    [
        (ValueError("`--vae_path` 'kl16.ckpt' is wrong:\n  two lines"), 2),
        (convert.VerificationError("Verification failed:\nthe outputs differ"), 1),
        (OSError("disk full\n"), 1),
    ],
)
def test_errors_are_one_line_starting_with_the_program_name(tmp_path, capsys, monkeypatch, error, exit_code):
    def fail(args):
        raise error

    monkeypatch.setattr(convert, "convert", fail)
    rc, err = run_main(["--checkpoint_path", "x.pth", "--output_dir", tmp_path / "out"], capsys)
    message = " ".join(error.args[0].split())
    assert (rc, err) == (exit_code, f"convert_mar_to_diffusers.py: error: {message}\n")
    # argparse's own errors name the same program, whatever the script was started as.
    with pytest.raises(SystemExit):
        convert.main(["--checkpoint_path", "x.pth"])
    assert "convert_mar_to_diffusers.py: error: the following arguments are required: --output_dir" in (
        capsys.readouterr().err
    )


def test_a_real_error_is_reported_with_the_program_name(tmp_path, capsys):
    rc, err = run_main(["--checkpoint_path", tmp_path / "missing.pth", "--output_dir", tmp_path / "out"], capsys)
    assert rc == 2 and err.startswith("convert_mar_to_diffusers.py: error: `--checkpoint_path` ")
    assert err.count("\n") == 1
