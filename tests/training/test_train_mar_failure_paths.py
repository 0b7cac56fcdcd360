"""What a user meets off the happy path of `train_mar.py`: a used output folder, bad input, Ctrl-C, fine-tuning a
model of another resolution, a mistyped `--override`, the recorded command and the docs' output folder."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_mar import MARPipeline
from tests.testing_utils import REPO_ROOT, make_tiny_pipeline, make_tiny_vae
from training import launch, train_mar
from training.train_mar import apply_overrides, list_checkpoints, load_model_config, parse_args

from .test_train_mar import FAST, child_env, run

SCRIPT = str(REPO_ROOT / "training" / "train_mar.py")


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def reset_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# (a) A used output folder -------------------------------------------------------------------------------------------


def test_a_used_output_folder_is_refused_unless_resuming_or_overwriting(tmp_path):
    output_dir = run(tmp_path, "--max_train_steps=3", "--checkpointing_steps=1", "--checkpoints_total_limit=2")
    (output_dir / "notes.txt").write_text("mine")
    before = sorted(p.name for p in output_dir.iterdir())
    with pytest.raises(ValueError, match="--output_dir .* is not empty.*--resume_from_checkpoint latest.*--overwrite"):
        parse_args([*FAST, f"--output_dir={output_dir}", "--max_train_steps=1"])
    assert sorted(p.name for p in output_dir.iterdir()) == before
    with pytest.raises(ValueError, match="do not combine it with --resume_from_checkpoint"):
        parse_args([*FAST, f"--output_dir={output_dir}", "--overwrite_output_dir", "--resume_from_checkpoint=latest"])
    # A folder holding only an unrelated file is not this script's to fill either.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "data.csv").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        parse_args([*FAST, f"--output_dir={tmp_path / 'other'}"])
    # Resuming from another run's checkpoint into a folder with checkpoints would mix two runs.
    second = run(tmp_path, "--max_train_steps=1", name="second")
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        parse_args([*FAST, f"--output_dir={second}", f"--resume_from_checkpoint={output_dir / 'checkpoint-3'}"])

    # --overwrite_output_dir: a new run whose checkpoints are the only ones; unrelated files stay.
    reset_state()
    run(tmp_path, "--max_train_steps=1", "--checkpointing_steps=1", "--overwrite_output_dir")
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-1"]
    assert (output_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (output_dir / "samples").iterdir()) == ["step-0000001.png"]
    # `latest` now resumes the new run, never the old run's checkpoint-3.
    reset_state()
    run(tmp_path, "--max_train_steps=2", "--checkpointing_steps=1", "--resume_from_checkpoint=latest")
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-1", "checkpoint-2"]


# (b) Errors: the message alone, exit 2 for bad input -----------------------------------------------------------------


def test_b_errors_print_the_message_alone_with_the_exit_code(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.zeros((16, 16), dtype=np.uint8), "L").save(data / "cat" / f"{i}.png")
    (data / "cat" / "broken.png").write_bytes(b"not a png")
    argv = [
        f"--train_data_dir={data}",
        f"--cache_dir={tmp_path / 'hf'}",
        "--image_mode=L",
        "--resolution=8",
        f"--model_config={train_mar.DIGITS_CONFIG}",
        f"--output_dir={tmp_path / 'out'}",
        "--report_to=none",
    ]
    # A corrupt image is found while loading the data (inside main): exit 2, one line, nothing written.
    assert launch.run_script("train_mar.py", parse_args, train_mar.main, argv=argv) == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the progress bars of `datasets`
    assert re.fullmatch(r"train_mar.py: error: 1 unreadable image\(s\), e.g. \[.*broken.png'\]; .*", last), err
    assert "Traceback" not in err and err.count("error:") == 1
    assert not (tmp_path / "out" / "model_index.json").exists() and not list_checkpoints(tmp_path / "out")

    # A failure while running (not bad input) exits 1, also without a traceback.
    reset_state()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert (
        launch.run_script("train_mar.py", parse_args, train_mar.main, argv=[*FAST, f"--output_dir={tmp_path / 'b'}"])
        == 1
    )
    assert capsys.readouterr().err.startswith("train_mar.py: error: `accelerate launch --cpu --num_processes N`")

    # Run as a script, as the docs say: no traceback, exit 2, for an empty folder and a bad resume path.
    (tmp_path / "empty").mkdir()
    for bad in (
        [f"--train_data_dir={tmp_path / 'empty'}"],
        ["--dataset_name=digits", "--resume_from_checkpoint=nope"],
    ):
        result = subprocess.run(
            [sys.executable, SCRIPT, *bad, f"--output_dir={tmp_path / 'c'}"],
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and result.stderr.count("train_mar.py: error: ") == 1, result.stderr


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--pretrained_model", "expected a MARPipeline or ARPipeline folder (with model_index.json"),
        ("--pretrained_vae", "expected an AutoencoderKL folder (config.json and weights"),
        ("--resume_from_checkpoint", "not a checkpoint folder of this script (a checkpoint-N folder with training_st"),
    ],
)
def test_b_an_image_given_as_a_model_or_checkpoint_says_what_it_is_and_what_was_expected(tmp_path, flag, expected):
    image = tmp_path / "sample.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), "L").save(image)
    with pytest.raises(ValueError) as error:
        parse_args(["--dataset_name=digits", f"{flag}={image}", f"--output_dir={tmp_path / 'out'}"])
    assert str(error.value).startswith(f"{flag} {str(image)!r} is a PNG image, not ")
    assert expected in str(error.value) and "weights_only" not in str(error.value)


def test_b_an_unknown_dataset_name_stops_at_once_naming_the_flag_and_the_choices(tmp_path):
    # Offline (child_env sets HF_HUB_OFFLINE=1) and not cached: exit 2 with one message, no retries.
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, SCRIPT, "--dataset_name=mnistt", f"--output_dir={tmp_path / 'out'}", "--report_to=none"],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "error" in line.lower() or "retry" in line.lower()]
    assert line.startswith("train_mar.py: error: --dataset_name 'mnistt' is not a local folder and is not in the")
    assert "HF_HUB_OFFLINE is set" in line and "'digits'" in line and "local dataset folder" in line
    assert elapsed < 60, f"{elapsed:.0f} s"  # the Hub client's retries alone took 23 s
    assert not (tmp_path / "out").exists()


def test_b_an_unreachable_hub_fails_after_one_request(monkeypatch):
    # Online but without network: one request, then the message (load_dataset, which retries, is never called).
    from huggingface_hub.errors import RepositoryNotFoundError

    from training import data

    requests = []

    def no_network(name, timeout=None):
        requests.append(name)
        raise OSError("[Errno -2] Name or service not known")

    def not_called(*args, **kwargs):
        raise AssertionError("load_dataset was called")

    monkeypatch.setattr(data.datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data.huggingface_hub.HfApi, "dataset_info", lambda self, name, timeout=None: no_network(name))
    monkeypatch.setattr(data.datasets, "load_dataset", not_called)
    args = parse_args(["--dataset_name=mnistt", "--output_dir=unused"])
    with pytest.raises(
        ValueError, match=r"--dataset_name 'mnistt' is not a local folder and the Hugging Face Hub can"
    ):
        data.load_image_dataset(args)
    assert requests == ["mnistt"]

    def not_found(self, name, timeout=None):
        raise RepositoryNotFoundError("404", response=mock.MagicMock())

    monkeypatch.setattr(data.huggingface_hub.HfApi, "dataset_info", not_found)
    with pytest.raises(
        ValueError, match=r"'mnistt' is not a local folder and there is no such dataset on the Hug.*'digits'"
    ):
        data.load_image_dataset(args)


# (c) Ctrl-C --------------------------------------------------------------------------------------------------------


def complete(checkpoint):
    return (checkpoint / "training_state.json").is_file() and (checkpoint / "pipeline" / "model_index.json").is_file()


def start_child(tmp_path, argv):
    """The script in a child process, its output in files (a full pipe would block it)."""
    out, err = (tmp_path / "stdout.txt").open("w"), (tmp_path / "stderr.txt").open("w")
    return subprocess.Popen([sys.executable, SCRIPT, *argv], env=child_env(), stdout=out, stderr=err)


def stop_child(child):
    if child.poll() is None:
        child.kill()
        child.wait(timeout=60)


def wait_for_checkpoint(child, output_dir, timeout=120):
    deadline = time.monotonic() + timeout
    while not list_checkpoints(output_dir) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.2)
    assert list_checkpoints(output_dir), f"no checkpoint within {timeout} s (exit code {child.poll()})"


def interrupt_training_child(tmp_path, presses: int) -> tuple[subprocess.Popen, Path, str]:
    """Start a long training run in a child, press Ctrl-C `presses` times (50 ms apart) once its first checkpoint is
    saved, and wait for it to end; the child is killed in any case. Returns it, its output folder and its stderr."""
    output_dir = tmp_path / "out"
    argv = [*FAST, "--max_train_steps=100000", "--checkpointing_steps=1", f"--output_dir={output_dir}"]
    child = start_child(tmp_path, argv)
    try:
        wait_for_checkpoint(child, output_dir)
        for press in range(presses):
            time.sleep(0.05 if press else 0.0)
            child.send_signal(signal.SIGINT)  # what Ctrl-C sends
        child.wait(timeout=120)
    finally:
        stop_child(child)
    return child, output_dir, (tmp_path / "stderr.txt").read_text()


def test_c_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes(tmp_path):
    child, output_dir, err = interrupt_training_child(tmp_path, presses=1)
    assert child.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Ctrl-C: stopping after this step (Ctrl-C again to stop at once)." in err
    match = re.search(
        r"train_mar.py: interrupted\. The last complete checkpoint is (\S+)\. Resume with:\n  (.+)\n", err
    )
    assert match, err[-3000:]
    checkpoints = list_checkpoints(output_dir)
    assert match.group(1) == str(checkpoints[-1]) and all(complete(c) for c in checkpoints)
    step = int(checkpoints[-1].name.split("-")[1])
    assert f"Stopped at step {step} (Ctrl-C)." in err  # at a step boundary, the checkpoint of that step
    assert not list(output_dir.glob("*.tmp")) and not (output_dir / "model_index.json").exists()
    command = shlex.split(match.group(2))
    # The child ran as `ACCELERATE_USE_CPU=1 python <script>` (child_env): the hint repeats it.
    assert command[:3] == ["ACCELERATE_USE_CPU=1", "python", "training/train_mar.py"]
    resumed = parse_args(command[3:])  # the command parses and continues this run
    assert resumed.resume_from_checkpoint == "latest" and resumed.output_dir == str(output_dir)
    assert resumed.max_train_steps == 100000


def test_c_a_second_ctrl_c_stops_at_once_and_leaves_only_complete_checkpoints(tmp_path):
    # Most of a step's time here is the checkpoint save: the second Ctrl-C mostly lands inside one.
    child, output_dir, err = interrupt_training_child(tmp_path, presses=2)
    # 130, or killed by the signal (what a shell also reports as 130) when it came while the interpreter exits.
    assert child.returncode in (130, -signal.SIGINT), err[-3000:]
    assert "train_mar.py: interrupted. The last complete checkpoint is" in err, err[-3000:]
    checkpoints = list_checkpoints(output_dir)
    assert checkpoints and all(complete(c) for c in checkpoints)


@pytest.fixture
def own_sigint_handler():
    """A SIGINT handler of the test's own (it must be back after `main`); signals need the main thread."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be set in the main thread")

    def handler(signum, frame):
        raise AssertionError("the test's own SIGINT handler was called")

    previous = signal.signal(signal.SIGINT, handler)
    yield handler
    signal.signal(signal.SIGINT, previous)


def test_c_ctrl_c_in_process_stops_at_the_step_boundary_with_its_checkpoint(
    tmp_path, monkeypatch, capfd, own_sigint_handler
):
    learning_rate_at, sent = train_mar.learning_rate_at, []

    def ctrl_c_during_step_2(step, *args):  # called once per parameter group
        if step == 1 and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGINT)
        return learning_rate_at(step, *args)

    monkeypatch.setattr(train_mar, "learning_rate_at", ctrl_c_during_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--max_train_steps=5", "--checkpointing_steps=100")
    output_dir = tmp_path / "out"
    # Step 2 ran to its end and was saved (not a checkpointing step); nothing after it; the handler is back.
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2"]
    assert complete(output_dir / "checkpoint-2")
    assert json.loads((output_dir / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2
    assert not (output_dir / "model_index.json").exists() and not (output_dir / "samples").exists()
    assert signal.getsignal(signal.SIGINT) is own_sigint_handler
    assert "train_mar.py: Ctrl-C: stopping after this step" in capfd.readouterr().err


def test_c_a_second_ctrl_c_in_process_stops_inside_a_save_and_leaves_no_checkpoint_half_written(
    tmp_path, monkeypatch, own_sigint_handler
):
    save_pipeline, reached = train_mar.save_pipeline, []

    def two_ctrl_c_during_the_second_save(path, *args):
        if path.parent.name == "checkpoint-2.tmp":
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            reached.append(path)  # not reached: the second Ctrl-C raised at once
        save_pipeline(path, *args)

    monkeypatch.setattr(train_mar, "save_pipeline", two_ctrl_c_during_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--max_train_steps=5", "--checkpointing_steps=1")
    output_dir = tmp_path / "out"
    assert not reached
    assert (output_dir / "checkpoint-2.tmp").is_dir() and not complete(output_dir / "checkpoint-2.tmp")
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-1"]  # what `latest` resumes
    assert signal.getsignal(signal.SIGINT) is own_sigint_handler


# (d) Fine-tuning a model of another resolution ---------------------------------------------------------------------


def test_d_fine_tuning_takes_the_resolution_from_the_model(tmp_path):
    # A latent model on 8x8 grids of a VAE that halves the side: its images are 16 px (the 64 px model on
    # 4x4 grids of a VAE that divides by 16, in small). The docs' command gives no --resolution.
    base = make_tiny_pipeline(vae=make_tiny_vae())
    base.set_sampling_defaults(num_inference_steps=3, num_diffusion_steps=4, guidance_scale=2.0)
    base.save_pretrained(tmp_path / "base")
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (data / label).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(data / label / f"{i}.png")
    argv = [
        f"--pretrained_model={tmp_path / 'base'}",
        f"--train_data_dir={data}",
        f"--cache_dir={tmp_path / 'hf'}",
        "--train_batch_size=2",
        "--max_train_steps=1",
        "--report_to=none",
        "--num_sample_images=2",
    ]
    with pytest.raises(ValueError, match="works on 1-channel 8\\^2 grids .* 16\\^2 ones; pass --resolution 16"):
        train_mar.main(parse_args([*argv, "--resolution=32", f"--output_dir={tmp_path / 'x'}"]))
    reset_state()
    out = train_mar.main(parse_args([*argv, f"--output_dir={tmp_path / 'tuned'}"]))
    tuned = MARPipeline.from_pretrained(out)
    assert tuned.transformer.config.sample_size == 8 and tuned.vae is not None
    assert "| resolution | 16 |" in (out / "README.md").read_text()
    # The base model's recommended sampling settings (its model_index.json) carry over.
    assert tuned.sampling_defaults == base.sampling_defaults


# (e) A mistyped --override -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, match",
    [
        ("transformer.num_layers=abc", "--override: transformer.num_layers must be an int; got 'abc'"),
        ("transformer.num_layers=1.5", "--override: transformer.num_layers must be an int; got 1.5"),
        ("transformer.dropout=true", "--override: transformer.dropout must be a float; got True"),
        ("diffusion_head.out_channels=x", "--override: diffusion_head.out_channels must be an int or null"),
        ("sampling.num_inference_steps=0", "--override: `sampling\\['num_inference_steps'\\]` must be an int"),
    ],
)
def test_e_override_values_of_the_wrong_type_name_the_flag_and_the_type(override, match):
    with pytest.raises(ValueError, match=match):
        parse_args(["--dataset_name=digits", f"--override={override}", "--output_dir=unused"])


def test_e_override_values_of_the_right_type_pass():
    config = apply_overrides(
        load_model_config(str(train_mar.DIGITS_CONFIG)),
        ["transformer.mlp_ratio=4", "transformer.decoder_num_layers=null", "diffusion_head.model_channels=64"],
    )
    assert config["transformer"]["mlp_ratio"] == 4 and config["transformer"]["decoder_num_layers"] is None
    assert config["diffusion_head"]["model_channels"] == 64


# (f) The recorded command keeps the launcher's flags ----------------------------------------------------------------


def test_f_model_card_records_the_launch_flags(tmp_path, monkeypatch):
    parent = ["/usr/bin/python3", "/usr/local/bin/accelerate", "launch", "--cpu", "training/train_mar.py", "--x"]
    monkeypatch.setattr(launch, "_parent_command", lambda: parent)
    output_dir = run(tmp_path, "--max_train_steps=1")
    card = ModelCard.load(output_dir / "README.md").text
    assert "accelerate launch --cpu training/train_mar.py --dataset_name=digits" in card

    module_form = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=2", SCRIPT]
    monkeypatch.setattr(launch, "_parent_command", lambda: module_form)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    assert launch.launch_command("training/train_mar.py", ["--a", "b c"]) == (
        "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes=2 training/train_mar.py --a 'b c'"
    )
    monkeypatch.setattr(launch, "_parent_command", lambda: ["/bin/bash"])
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert launch.launch_command("training/train_mar.py", ["--a"]) == "python training/train_mar.py --a"


# (g) The docs' output folder is ignored by git ----------------------------------------------------------------------


def test_g_the_training_readmes_digits_output_folder_is_gitignored():
    readme = (REPO_ROOT / "training" / "README.md").read_text()
    folder = re.search(r"--dataset_name digits --output_dir (\S+)", readme).group(1)
    assert folder == "mar-digits"
    ignored = [line.strip().strip("/") for line in (REPO_ROOT / ".gitignore").read_text().splitlines()]
    assert folder in ignored, f"{folder}/ is not in .gitignore"
