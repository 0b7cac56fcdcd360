import fcntl
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from diffusers.models import AutoencoderKL
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file

from diffusers_mar import MARPipeline, MARTransformer2DModel
from tests.testing_utils import REPO_ROOT, TINY_PIXEL_TRANSFORMER_CONFIG
from training import cache_latents, launch, train_mar
from training.data import center_crop_arr, image_to_tensor
from training.train_mar import DIGITS_CONFIG, learning_rate_at, list_checkpoints, parse_args

# A digits run of a few seconds: 40 images, batch 8 -> 5 steps per epoch; dropout, flips and label drop all on so
# that every source of training randomness is exercised.
FAST = [
    "--dataset_name=digits",
    "--train_batch_size=8",
    "--max_train_samples=40",
    "--lr_warmup_steps=2",
    "--learning_rate=1e-3",
    "--override=transformer.num_layers=1",
    "--override=transformer.dropout=0.1",
    "--override=diffusion_head.model_channels=32",
    "--diffusion_batch_mul=2",
    "--random_flip",
    "--report_to=none",
    "--sample_steps=0",
    "--num_sample_images=2",
    "--sample_num_inference_steps=2",
    "--sample_num_diffusion_steps=3",
]


@pytest.fixture(autouse=True)
def fresh_accelerate_state(monkeypatch):
    # Each in-process run builds its own Accelerator; the state is a process-wide singleton.
    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    rng = torch.get_rng_state()
    yield
    torch.set_rng_state(rng)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run(tmp_path, *extra, name="out"):
    output_dir = tmp_path / name
    return train_mar.main(parse_args([*FAST, f"--output_dir={output_dir}", *extra]))


def child_env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update({"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_process_launch() -> list[str]:
    """`accelerate launch` of two CPU processes (gloo); `--cpu` alone starts one process in accelerate 1.x."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
        f"--main_process_port={free_port()}",
    ]


def run_two_processes(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """Run `accelerate launch` of two processes with `args` (output captured); on a timeout, kill every process of the
    launch (the workers too, so they cannot slow the next tests or hold the output open) and fail with what they
    printed.

    Launches run one at a time across pytest-xdist workers (a lock file): two at once on a 2-core machine can pick
    the same port between `free_port` and the bind, and then four processes wait on each other's collectives (a CI
    run hung that way for 300 s)."""
    marker = f"{os.getpid()}-{time.monotonic_ns()}"  # in the environment of the launcher and of every worker
    with open(Path(tempfile.gettempdir()) / "diffusers-mar-tests-launch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        process = subprocess.Popen(
            [*_two_process_launch(), *args],
            env={**child_env(), LAUNCH_MARKER: marker},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # torch's launcher starts each worker in a session of its own, and a worker whose launcher died keeps the
            # output pipes open: kill every process of this launch, found by the marker in its environment.
            kill_marked_processes(marker)
            stdout, stderr = process.communicate(timeout=60)
            pytest.fail(
                f"Two launched processes ran past {timeout} s; they printed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
            )
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


LAUNCH_MARKER = "DIFFUSERS_MAR_TEST_LAUNCH"


def kill_marked_processes(marker: str) -> list[int]:
    """SIGKILL every process whose environment holds `LAUNCH_MARKER=marker`; returns their pids."""
    needle, killed = f"{LAUNCH_MARKER}={marker}".encode(), []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                os.kill(int(environ.parent.name), signal.SIGKILL)
                killed.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return killed


def test_a_timed_out_launch_kills_workers_in_sessions_of_their_own():
    # torch's launcher starts workers with start_new_session; one left behind kept a mutation-check run waiting on
    # its output pipes until the 20-minute limit.
    marker = f"test-{time.monotonic_ns()}"
    env = {**os.environ, LAUNCH_MARKER: marker}
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env, start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        assert kill_marked_processes(marker) == [sleeper.pid]
        assert sleeper.wait(timeout=10) == -signal.SIGKILL and other.poll() is None
    finally:
        other.kill()
        sleeper.kill()


def test_two_cpu_processes_train_digits_and_write_a_loadable_pipeline(tmp_path):
    output_dir = tmp_path / "out"
    command = [
        str(REPO_ROOT / "training" / "train_mar.py"),
        *[arg for arg in FAST if arg != "--report_to=none"],
        "--report_to=tensorboard",
        "--max_train_steps=3",
        "--checkpointing_steps=2",
        f"--output_dir={output_dir}",
    ]
    result = run_two_processes(command)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Num processes: 2" in result.stderr + result.stdout
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert {p.name for p in (output_dir / "checkpoint-2").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The scalars are in the run's own event file; the sub-folders hold the hyper-parameter summaries.
    (event_file,) = (output_dir / "logs" / "train_mar").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "images_per_second", "epoch"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert "samples" in events.Tags()["images"]
    assert (output_dir / "samples" / "step-0000003.png").is_file()

    # The model card records the launch as given, launcher flags and environment included.
    card = (output_dir / "README.md").read_text()
    assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes=2 --num_machines=1" in card
    assert "training/train_mar.py --dataset_name=digits" in card

    pipe = MARPipeline.from_pretrained(output_dir)
    assert pipe.vae is None and pipe.transformer.config.num_classes == 10 and pipe.id2label[3] == "3"
    image = pipe([3], num_inference_steps=2, num_diffusion_steps=3, generator=torch.manual_seed(0)).images[0]
    assert image.size == (8, 8) and image.mode == "L"


def test_resume_continues_exactly(tmp_path):
    # 6 steps straight == 3 steps, a stop, and 3 more after a resume (crossing an epoch boundary at step 5).
    straight = run(tmp_path, "--max_train_steps=6", "--checkpointing_steps=3", name="straight")
    first = run(tmp_path, "--max_train_steps=3", "--checkpointing_steps=3", name="split")
    assert [p.name for p in list_checkpoints(first)] == ["checkpoint-3"]
    resumed = run(
        tmp_path, "--max_train_steps=6", "--checkpointing_steps=3", "--resume_from_checkpoint=latest", name="split"
    )

    for name in ("model.safetensors",):
        a, b = load_file(straight / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    for index in (0, 1):  # EMA of the transformer and of the head
        a = torch.load(straight / "checkpoint-6" / f"custom_checkpoint_{index}.pkl", weights_only=False)
        b = torch.load(resumed / "checkpoint-6" / f"custom_checkpoint_{index}.pkl", weights_only=False)
        assert a["optimization_step"] == b["optimization_step"] == 6
        for x, y in zip(a["shadow_params"], b["shadow_params"]):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-6)
    a = load_file(straight / "transformer" / "diffusion_pytorch_model.safetensors")
    b = load_file(resumed / "transformer" / "diffusion_pytorch_model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    # The weights moved: the comparison is not between two untouched initialisations.
    initial = load_file(first / "checkpoint-3" / "model.safetensors")
    final = load_file(straight / "checkpoint-6" / "model.safetensors")
    assert any(not torch.equal(initial[k], final[k]) for k in final)


def test_checkpoints_are_pruned_and_an_interrupted_save_leaves_the_last_good_one(tmp_path, monkeypatch):
    output_dir = run(tmp_path, "--max_train_steps=4", "--checkpointing_steps=1", "--checkpoints_total_limit=2")
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-3", "checkpoint-4"]

    # Kill the next run while it writes its first checkpoint: only a .tmp folder is left behind.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mar, "save_pipeline", crash)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--max_train_steps=6", "--checkpointing_steps=1", "--resume_from_checkpoint=latest")
    assert (output_dir / "checkpoint-5.tmp").is_dir()
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-3", "checkpoint-4"]
    monkeypatch.undo()

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    run(tmp_path, "--max_train_steps=5", "--checkpointing_steps=1", "--resume_from_checkpoint=latest")
    assert not (output_dir / "checkpoint-5.tmp").exists()
    state = json.loads((output_dir / "checkpoint-5" / "training_state.json").read_text())
    assert state["global_step"] == 5
    assert MARPipeline.from_pretrained(output_dir / "checkpoint-5" / "pipeline").transformer.config.num_classes == 10


def test_sampling_settings_in_the_pipeline_config_and_a_model_card_from_the_template(tmp_path):
    output_dir = run(tmp_path, "--max_train_steps=2", "--sample_guidance_scale=1.5")
    expected = {
        "guidance_scale": 1.5,
        "guidance_schedule": "linear",
        "temperature": 1.0,
        "num_inference_steps": 2,
        "num_diffusion_steps": 3,
    }
    # The recommended settings live in model_index.json (the pipeline's config), not in the card.
    assert json.loads((output_dir / "model_index.json").read_text())["sampling"] == expected
    pipe = MARPipeline.from_pretrained(output_dir)
    assert pipe.sampling_defaults == expected
    assert pipe.scheduler.config.clip_sample  # pixel space: x0_hat is clipped to [-1, 1]
    pipe.set_progress_bar_config(disable=True)
    # No argument: the stored settings are the defaults (2 outer steps on 16 tokens, 3 diffusion steps).
    steps = []
    pipe([1], generator=torch.manual_seed(0), callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    assert steps == [0, 1]

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "mit"
    assert "diffusers-mar" in card.data.tags and "mar_sampling" not in card.data.to_dict()
    assert "`guidance_scale=1.5`" in card.text  # the template's usage section lists the stored settings
    assert "--dataset_name=digits" in card.text and "2 optimizer steps" in card.text
    assert "## Citation" in card.text
    # The checkpoint's pipeline is a complete pipeline folder too, with the same settings.
    checkpoint = MARPipeline.from_pretrained(output_dir / "checkpoint-2" / "pipeline")
    assert checkpoint.sampling_defaults == expected


def test_mixed_precision_gradient_checkpointing_and_accumulation(tmp_path):
    output_dir = run(
        tmp_path,
        "--max_train_steps=2",
        "--mixed_precision=bf16",
        "--gradient_checkpointing",
        "--gradient_accumulation_steps=2",
    )
    state = json.loads((output_dir / "checkpoint-2" / "training_state.json").read_text())
    assert state["global_batch"] == 16 and state["global_step"] == 2
    assert "global batch 16" in (output_dir / "README.md").read_text()
    weights = load_file(output_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_dataset_with_other_column_names(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8), "L") for _ in range(6)]
    data = datasets.Dataset.from_dict({"picture": images, "digit": [0, 1, 2, 0, 1, 2]})
    data.to_parquet(str(tmp_path / "data" / "train.parquet"))
    args = [a for a in FAST if a not in ("--dataset_name=digits", "--max_train_samples=40")]
    args += [f"--dataset_name={tmp_path / 'data'}", "--image_column=picture", "--label_column=digit"]
    args += [
        "--resolution=8",
        "--image_mode=L",
        "--train_batch_size=2",
        "--max_train_steps=1",
        f"--model_config={DIGITS_CONFIG}",
    ]
    args += [f"--cache_dir={tmp_path / 'hf'}", f"--output_dir={tmp_path / 'out'}"]
    pipe = MARPipeline.from_pretrained(train_mar.main(parse_args(args)))
    assert pipe.transformer.config.num_classes == 3 and pipe.transformer.config.in_channels == 1
    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="--image_column 'image' is not a column"):
        bad = [a for a in args if not a.startswith("--image_column")]
        train_mar.main(parse_args([*bad, "--overwrite_output_dir"]))
    # Bad input is found before --overwrite_output_dir removes anything: the finished run is intact.
    assert MARPipeline.from_pretrained(tmp_path / "out").transformer.config.num_classes == 3
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-1"]


def test_push_to_hub_uploads_the_pipeline_folder(tmp_path, monkeypatch):
    calls = {}

    class Repo:
        repo_id = "user/mar-digits"

    monkeypatch.setattr(train_mar, "create_repo", lambda name, **kwargs: calls.setdefault("create", name) and Repo)
    monkeypatch.setattr(train_mar, "upload_folder", lambda **kwargs: calls.setdefault("upload", kwargs))
    output_dir = run(tmp_path, "--max_train_steps=1", "--push_to_hub", "--hub_model_id=user/mar-digits")
    assert calls["create"] == "user/mar-digits"
    assert calls["upload"]["repo_id"] == "user/mar-digits" and calls["upload"]["folder_path"] == str(output_dir)
    assert "checkpoint-*" in calls["upload"]["ignore_patterns"]


def test_fine_tuning_with_more_classes_reinitialises_the_class_embedding(tmp_path):
    base = run(tmp_path, "--max_train_steps=1", name="base")
    pretrained = MARPipeline.from_pretrained(base)
    AcceleratorState._reset_state(reset_partial_state=True)
    output_dir = tmp_path / "tuned"
    args = [a for a in FAST if not a.startswith("--override")]
    train_mar.main(
        parse_args(
            [
                *args,
                f"--pretrained_model={base}",
                "--num_classes=12",
                "--max_train_steps=1",
                f"--output_dir={output_dir}",
            ]
        )
    )
    tuned = MARPipeline.from_pretrained(output_dir)
    assert tuned.transformer.config.num_classes == 12
    assert tuned.transformer.class_embedding.weight.shape == (13, pretrained.transformer.encoder_dim)
    with pytest.raises(ValueError, match="fixes the architecture"):
        parse_args([*FAST, f"--pretrained_model={base}", "--output_dir=x"])


def test_reinit_class_embedding_keeps_every_other_weight():
    old = MARTransformer2DModel(**TINY_PIXEL_TRANSFORMER_CONFIG)
    new = train_mar.reinit_class_embedding(old, 4)
    assert new.class_embedding.weight.shape == (5, old.encoder_dim)
    torch.testing.assert_close(new.class_embedding.weight[-1], old.class_embedding.weight[-1])
    old_state, new_state = old.state_dict(), new.state_dict()
    for key in old_state:
        if key != "class_embedding.weight":
            assert torch.equal(old_state[key], new_state[key]), key


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--override=transformer.sample_size=4"], "sample_size=4"),
        (["--override=transformer.patch_size=3"], "token count does not match"),
        (["--override=diffusion_head.in_channels=7"], "diffusion_head.in_channels"),
        (["--override=transformer.bogus=1"], "Unknown transformer config keys"),
        (["--num_classes=5"], "outside \\[0, 5\\)"),
        (["--train_batch_size=64", "--max_train_samples=40"], "fewer than one batch"),
    ],
)
def test_bad_configs_fail_before_training(tmp_path, extra, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, "--max_train_steps=1", *extra)
    assert not list(tmp_path.rglob("checkpoint-*"))


def test_bad_arguments_fail_while_parsing(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cats").mkdir(parents=True)
    (empty / "cats" / "notes.txt").write_text("no image here")
    cases = [
        (["--train_data_dir", str(tmp_path / "missing")], "does not exist"),
        (["--train_data_dir", str(empty)], "holds no image"),
        (["--dataset_name=digits", "--resume_from_checkpoint", str(tmp_path / "nope")], "not a checkpoint folder"),
        (["--dataset_name=digits", "--train_data_dir", str(empty)], "exactly one of"),
        (["--dataset_name=digits", "--model_config=mar-giant"], "--model_config"),
        (["--dataset_name=digits", "--pretrained_vae=./no/such/vae"], "does not exist"),
        (["--dataset_name=digits", "--mask_ratio_min=1.5"], "mask_ratio_min"),
        (["--dataset_name=digits", "--train_batch_size=0"], "train_batch_size"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            parse_args(args)


def test_cpu_flag_with_several_processes_explains_the_launch_command(tmp_path, monkeypatch):
    # `accelerate launch --cpu --num_processes 2` starts one process (no mpirun) with these variables set.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(RuntimeError, match="--multi_gpu --num_processes"):
        run(tmp_path, "--max_train_steps=1")


def test_processes_that_do_not_form_a_group_are_refused(monkeypatch):
    # `accelerate launch --multi_gpu` on a CPU-only machine without ACCELERATE_USE_CPU: N lonely processes.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="do not form a group"):
        launch.check_launch(1)
    launch.check_launch(2)


@pytest.mark.slow
def test_two_cpu_processes_share_the_latent_cache(tmp_path):
    data = _image_folder(tmp_path / "data")
    vae = _tiny_vae(tmp_path / "vae")
    command = [
        str(REPO_ROOT / "training" / "cache_latents.py"),
        f"--train_data_dir={data}",
        f"--pretrained_vae={tmp_path / 'vae'}",
        "--resolution=16",
        "--batch_size=2",
        f"--cache_dir={tmp_path / 'hf'}",
        f"--output_dir={tmp_path / 'cache'}",
    ]
    result = run_two_processes(command)
    assert result.returncode == 0, result.stderr[-4000:]
    moments = np.load(tmp_path / "cache" / "moments.npy")
    files = sorted((data).glob("*/*.png"))
    for row, path in enumerate(files):  # rows written by both processes, in dataset order
        pixels = image_to_tensor(center_crop_arr(Image.open(path).convert("RGB"), 16))[None]
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.parameters[0].numpy()
        np.testing.assert_allclose(moments[row], expected, rtol=0, atol=1e-5)


def _image_folder(root, sizes=((20, 30), (33, 17), (16, 16))):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def _tiny_vae(path):
    vae = AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
    )
    vae.save_pretrained(path)
    return vae.eval()


VAE_RUN = [
    "--resolution=16",
    "--train_batch_size=2",
    "--max_train_steps=2",
    f"--model_config={DIGITS_CONFIG}",
    "--override=transformer.num_layers=1",
    "--override=diffusion_head.model_channels=16",
    "--report_to=none",
    "--num_sample_images=2",
    "--sample_num_inference_steps=2",
    "--sample_num_diffusion_steps=2",
]


def test_image_folder_in_latent_space_and_from_cached_latents(tmp_path):
    data = _image_folder(tmp_path / "data")
    vae = _tiny_vae(tmp_path / "vae")
    common = [*VAE_RUN, f"--pretrained_vae={tmp_path / 'vae'}", f"--cache_dir={tmp_path / 'hf'}"]
    # A config that says 16x16 latents; this VAE gives 8x8 at resolution 16.
    with pytest.raises(ValueError, match="sample_size=16 but the data gives 8"):
        bad = [*common, "--override=transformer.sample_size=16", f"--train_data_dir={data}", "--output_dir=x"]
        train_mar.main(parse_args(bad))

    AcceleratorState._reset_state(reset_partial_state=True)
    out = train_mar.main(parse_args([*common, f"--train_data_dir={data}", f"--output_dir={tmp_path / 'pixels'}"]))
    pipe = MARPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.id2label == {0: "cat", 1: "dog"}
    assert not pipe.scheduler.config.clip_sample  # latents are unbounded, as the original
    assert pipe.transformer.config.in_channels == 4 and pipe.transformer.num_tokens == 16

    # The cache holds the posterior moments of the cropped image and of its mirror image.
    cache = cache_latents.main(
        cache_latents.parse_args(
            [
                f"--train_data_dir={data}",
                f"--pretrained_vae={tmp_path / 'vae'}",
                "--resolution=16",
                "--batch_size=4",
                f"--cache_dir={tmp_path / 'hf'}",
                f"--output_dir={tmp_path / 'cache'}",
            ]
        )
    )
    info = json.loads((cache / "cache_info.json").read_text())
    assert info["num_images"] == 6 and info["grid_size"] == 8 and info["scaling_factor"] == 0.5
    moments, flipped = np.load(cache / "moments.npy"), np.load(cache / "moments_flip.npy")
    image = Image.open(data / "dog" / "1.png").convert("RGB")
    pixels = image_to_tensor(center_crop_arr(image, 16))[None]
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.parameters
        expected_flip = vae.encode(pixels.flip(-1)).latent_dist.parameters
    row = 4  # cat/0, cat/1, cat/2, dog/0, dog/1
    np.testing.assert_allclose(moments[row], expected[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(flipped[row], expected_flip[0].numpy(), rtol=0, atol=1e-5)
    assert np.load(cache / "labels.npy").tolist() == [0, 0, 0, 1, 1, 1]

    AcceleratorState._reset_state(reset_partial_state=True)
    cached_run = [a for a in common if not a.startswith(("--pretrained_vae", "--cache_dir"))]
    out = train_mar.main(parse_args([*cached_run, f"--cached_latents_dir={cache}", f"--output_dir={tmp_path / 'c'}"]))
    assert MARPipeline.from_pretrained(out).vae.config.scaling_factor == 0.5
    with pytest.raises(ValueError, match="exists"):
        cache_latents.parse_args(
            [f"--train_data_dir={data}", f"--pretrained_vae={tmp_path / 'vae'}", f"--output_dir={cache}"]
        )


def test_unreadable_images_stop_the_run_or_are_skipped_with_a_count(tmp_path, caplog):
    data = _image_folder(tmp_path / "data", sizes=((16, 16), (16, 16)))
    (data / "dog" / "broken.png").write_bytes(b"not a png")
    args = [
        "--resolution=8",
        f"--train_data_dir={data}",
        f"--cache_dir={tmp_path / 'hf'}",
        f"--model_config={DIGITS_CONFIG}",
        "--max_train_steps=1",
        "--train_batch_size=2",
        "--report_to=none",
        "--num_sample_images=1",
        "--sample_num_inference_steps=1",
        "--sample_num_diffusion_steps=2",
        "--image_mode=L",
    ]
    with pytest.raises(ValueError, match="1 unreadable image.*broken.png"):
        train_mar.main(parse_args([*args, f"--output_dir={tmp_path / 'a'}"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    with caplog.at_level("WARNING"):
        out = train_mar.main(parse_args([*args, "--bad_images=skip", f"--output_dir={tmp_path / 'b'}"]))
    assert "Skipping 1 unreadable image" in caplog.text
    assert MARPipeline.from_pretrained(out).transformer.config.in_channels == 1


def test_learning_rate_schedule_follows_the_original():
    # LTH14/mar util/lr_sched.py with epoch = step / steps_per_epoch, 10 steps per epoch, 2 warm-up epochs.
    def original(step, lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10, schedule="cosine"):
        epoch = step / 10
        if epoch < warmup_epochs:
            return lr * epoch / warmup_epochs
        if schedule == "constant":
            return lr
        return min_lr + (lr - min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))
        )

    for step in range(0, 100, 7):
        assert learning_rate_at(step, 1e-3, 20, 100, "cosine", 1e-5) == pytest.approx(original(step), rel=1e-12)
        assert learning_rate_at(step, 1e-3, 20, 100, "constant") == pytest.approx(original(step, schedule="constant"))
    assert learning_rate_at(0, 1e-3, 20, 100) == 0.0
    assert learning_rate_at(100, 1e-3, 20, 100, "cosine", 1e-5) == pytest.approx(1e-5)


def test_sample_grids_run_on_one_thread_for_a_small_model_and_say_so_first(tmp_path, monkeypatch, caplog):
    # The command line's `--num-threads auto`: a small model samples on one CPU thread; the training's count is back.
    threads, call = [], MARPipeline.__call__

    def recording_call(pipe, *args, **kwargs):
        threads.append(torch.get_num_threads())
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(MARPipeline, "__call__", recording_call)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO):
            output_dir = run(tmp_path, "--max_train_steps=1")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert threads == [1]
    assert f"Sampling 2 images for {output_dir / 'samples' / 'step-0000001.png'} (1 CPU thread(s)) ..." in caplog.text
    assert (output_dir / "samples" / "step-0000001.png").is_file()


def test_learning_rate_schedule_hand_computed_values():
    # base 1e-3, 4 warm-up steps of 12: linear from 0, then constant, or cosine down to min_lr 1e-4.
    constant = [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3]
    for step, expected in enumerate(constant):
        assert learning_rate_at(step, 1e-3, 4, 12) == pytest.approx(expected, abs=1e-15)
    # progress (step - 4) / 8: 0 -> 1e-3, 1/4 -> 1e-4 + 9e-4 * (1 + cos(pi / 4)) / 2, 1/2 -> 5.5e-4, 1 -> 1e-4
    cosine = {2: 5e-4, 4: 1e-3, 6: 1e-4 + 4.5e-4 * (1 + 0.5**0.5), 8: 5.5e-4, 12: 1e-4}
    for step, expected in cosine.items():
        assert learning_rate_at(step, 1e-3, 4, 12, "cosine", 1e-4) == pytest.approx(expected, rel=1e-12)
    assert learning_rate_at(3, 1e-3, 0, 12) == 1e-3  # no warm-up


def test_the_script_sets_the_learning_rate_of_each_step(tmp_path):
    # --blr 0.064 at global batch 8: lr 2e-3; 0.4 warm-up epochs of 5 steps: 2 steps; cosine over 4 steps to 1e-4.
    argv = [arg for arg in FAST if not arg.startswith(("--learning_rate", "--lr_warmup_steps"))]
    output_dir = tmp_path / "out"
    extra = ["--blr=0.064", "--lr_warmup_epochs=0.4", "--lr_scheduler=cosine", "--min_lr=1e-4"]
    train_mar.main(
        parse_args([*argv, *extra, "--max_train_steps=4", "--checkpointing_steps=1", f"--output_dir={output_dir}"])
    )
    expected = [0.0, 1e-3, 2e-3, 1e-4 + 1.9e-3 * 0.5]  # steps 0..3; step 3 is half-way through the cosine
    for step, lr in enumerate(expected):
        optimizer = torch.load(output_dir / f"checkpoint-{step + 1}" / "optimizer.bin", weights_only=True)
        assert [group["lr"] for group in optimizer["param_groups"]] == pytest.approx([lr, lr], abs=1e-15), step


class RecordingEMA(train_mar.EMAModel):
    """The script's EMAModel, built and stepped by `main` as usual; it records the weights and the average."""

    instances = []

    def __init__(self, parameters, **kwargs):
        self.parameters_ = list(parameters)
        self.history = [([p.detach().clone() for p in self.parameters_], None)]  # (weights, shadow) per step
        super().__init__(self.parameters_, **kwargs)
        RecordingEMA.instances.append(self)

    def step(self, parameters):
        super().step(parameters)
        self.history.append(([p.detach().clone() for p in self.parameters_], [s.clone() for s in self.shadow_params]))


@pytest.mark.parametrize(
    "flags, decays",
    [
        # The original's constant decay from the first step: shadow = decay * p0 + (1 - decay) * p1.
        (["--ema_decay=0.5"], [0.5, 0.5]),
        # diffusers' warm-up (inv_gamma 1, power 1): the first step copies, then 1 - (1 + 1)^-1 = 0.5 (cap 0.9).
        (["--ema_warmup", "--ema_decay=0.9", "--ema_inv_gamma=1", "--ema_power=1"], [0.0, 0.5]),
    ],
)
def test_the_scripts_ema_update_of_each_step(tmp_path, monkeypatch, flags, decays):
    RecordingEMA.instances = []
    monkeypatch.setattr(train_mar, "EMAModel", RecordingEMA)
    run(tmp_path, *flags, "--lr_warmup_steps=0", "--max_train_steps=2", "--checkpointing_steps=100")
    assert len(RecordingEMA.instances) == 2  # the transformer's and the head's
    for ema in RecordingEMA.instances:
        assert len(ema.history) == 3
        shadow = ema.history[0][0]  # the average starts at the initial weights
        for (weights, new_shadow), decay in zip(ema.history[1:], decays):
            for p, s, new in zip(weights, shadow, new_shadow):
                torch.testing.assert_close(new, decay * s + (1 - decay) * p, rtol=1e-6, atol=1e-7)
            shadow = new_shadow
        # The weights moved at each step: the update is not checked on unchanged weights.
        assert all(
            any(not torch.equal(a, b) for a, b in zip(ema.history[i][0], ema.history[i + 1][0])) for i in (0, 1)
        )


def test_center_crop_is_adm_box_halving_then_bicubic_then_center():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 255, (300, 520, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    out = center_crop_arr(image, 64)
    # Box halvings while the short side is >= 128: 520x300 -> 260x150 -> 130x75; bicubic to round(130 * 64 / 75) = 111.
    expected = image.resize((260, 150), resample=Image.BOX).resize((130, 75), resample=Image.BOX)
    expected = expected.resize((111, 64), resample=Image.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected)[:, 23:87])
    assert out.size == (64, 64)
    # A left/right split image keeps its split in the middle.
    halves = np.zeros((100, 200), dtype=np.uint8)
    halves[:, 100:] = 255
    cropped = np.asarray(center_crop_arr(Image.fromarray(halves), 10))
    assert cropped[:, :4].max() < 128 and cropped[:, 6:].min() > 127
    pixels = image_to_tensor(Image.fromarray(np.array([[0, 255]], dtype=np.uint8)))
    assert pixels.tolist() == [[[-1.0, 1.0]]]
