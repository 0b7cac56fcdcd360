"""Balanced sampling: the fixed sample list, batches dealt to processes, resume and atomic files, the ADM `.npz`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffusers_mar.evaluation.sampling import (
    NpzWriter,
    check_output_folder,
    folder_hash,
    generate_samples,
    image_path,
    process_batches,
    read_images,
    sample_list,
    write_run_file,
)
from tests.testing_utils import make_tiny_pipeline

SAMPLING = {"num_inference_steps": 2, "num_diffusion_steps": 3, "guidance_scale": 2.0}


@pytest.fixture(scope="module")
def pipe():
    return make_tiny_pipeline()


def folder_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


def test_sample_list_is_class_ordered_with_one_seed_per_image():
    assert sample_list(3, 2, seed=10) == [(0, 10), (0, 11), (1, 12), (1, 13), (2, 14), (2, 15)]
    with pytest.raises(ValueError, match="images_per_class"):
        sample_list(3, 0)


@pytest.mark.parametrize("num_processes", [1, 2, 3, 8])
def test_batches_are_the_same_ranges_for_any_number_of_processes(num_processes):
    dealt = [process_batches(23, 5, rank, num_processes) for rank in range(num_processes)]
    assert sorted((b for batches in dealt for b in batches), key=lambda b: b.start) == process_batches(23, 5, 0, 1)
    assert [list(b) for b in process_batches(23, 5, 0, 1)][-1] == [20, 21, 22]


def test_two_processes_write_the_same_images_as_one(pipe, tmp_path):
    samples = sample_list(10, 2)
    generate_samples(pipe, samples, tmp_path / "one", 3, show_progress=False, **SAMPLING)
    for rank in (1, 0):  # the two processes of a launch, one after the other, into one folder
        generate_samples(pipe, samples, tmp_path / "two", 3, rank, 2, show_progress=False, **SAMPLING)
    one = folder_bytes(tmp_path / "one")
    assert len(one) == 20 and one == folder_bytes(tmp_path / "two")
    arrays = [np.asarray(Image.open(image_path(tmp_path / "one", i))) for i in range(20)]
    assert len({a.tobytes() for a in arrays}) == 20  # one seed per image: no two alike


class Interrupt(Exception):
    pass


class CountingPipe:
    """Wraps a pipeline: counts the calls and the images; raises `Interrupt` at call `fail_at` (1-based)."""

    def __init__(self, pipe, fail_at: int | None = None):
        self.pipe, self.fail_at, self.calls, self.images = pipe, fail_at, 0, 0

    def __call__(self, class_labels, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt
        self.images += len(class_labels)
        return self.pipe(class_labels=class_labels, **kwargs)


def test_resume_after_an_interruption_generates_only_the_missing_batches(pipe, tmp_path):
    samples = sample_list(10, 2)  # 20 images, batches of 4: 5 calls
    with pytest.raises(Interrupt):
        generate_samples(CountingPipe(pipe, fail_at=3), samples, tmp_path / "run", 4, show_progress=False, **SAMPLING)
    assert len(folder_bytes(tmp_path / "run")) == 8
    image_path(tmp_path / "run", 5).unlink()  # the second batch lost one image
    resumed = CountingPipe(pipe)
    assert generate_samples(resumed, samples, tmp_path / "run", 4, show_progress=False, **SAMPLING) == 16
    assert resumed.calls == 4  # batches 2 (one file missing), 3, 4 and 5; batch 1 was complete
    generate_samples(pipe, samples, tmp_path / "clean", 4, show_progress=False, **SAMPLING)
    assert folder_bytes(tmp_path / "run") == folder_bytes(tmp_path / "clean")
    assert not list((tmp_path / "run").glob(".*"))  # no temporary file left


def test_an_interrupted_write_leaves_no_file(pipe, tmp_path, monkeypatch):
    def broken_save(self, file, format=None, **kwargs):
        file.write(b"\x89PNG half")
        raise Interrupt

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(Interrupt):
        generate_samples(pipe, sample_list(10, 1), tmp_path, 4, show_progress=False, **SAMPLING)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_of_another_run_is_refused(tmp_path):
    run = {"model_hash": "abc", "seed": 0, "images_per_class": 50}
    assert check_output_folder(tmp_path / "new", run) is False
    write_run_file(tmp_path / "new", run)
    assert check_output_folder(tmp_path / "new", run) is True
    with pytest.raises(ValueError, match="another run.*differs in seed"):
        check_output_folder(tmp_path / "new", {**run, "seed": 1})
    (tmp_path / "foreign").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "foreign" / "x.png")
    with pytest.raises(ValueError, match="PNG files but no run.json"):
        check_output_folder(tmp_path / "foreign", run)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        check_output_folder(tmp_path / "file", run)


def test_npz_writer_streams_the_adm_format(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 4, 5, 3), dtype=np.uint8)
    writer = NpzWriter(tmp_path / "samples.npz", images.shape)
    writer.write(images[:3])
    writer.write(images[3:])
    writer.close()
    with np.load(tmp_path / "samples.npz") as data:
        assert data.files == ["arr_0"] and data["arr_0"].dtype == np.uint8
        np.testing.assert_array_equal(data["arr_0"], images)
    short = NpzWriter(tmp_path / "short.npz", images.shape)
    short.write(images[:2])
    with pytest.raises(ValueError, match="expected 7"):
        short.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]


def test_read_images_in_index_order_and_missing_files(pipe, tmp_path):
    generate_samples(pipe, sample_list(10, 1), tmp_path, 10, show_progress=False, **SAMPLING)
    batches = list(read_images(tmp_path, 10, 4))
    assert [b.shape for b in batches] == [(4, 8, 8, 1), (4, 8, 8, 1), (2, 8, 8, 1)]
    np.testing.assert_array_equal(batches[0][1, ..., 0], np.asarray(Image.open(image_path(tmp_path, 1))))
    image_path(tmp_path, 5).unlink()
    with pytest.raises(FileNotFoundError, match="000005.png"):
        list(read_images(tmp_path, 10, 4))


def test_folder_hash_ignores_the_model_card(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    first = folder_hash(tmp_path)
    (tmp_path / "README.md").write_text("results")
    assert folder_hash(tmp_path) == first
    (tmp_path / "config.json").write_text('{"a": 1}')
    assert folder_hash(tmp_path) != first


def test_metrics_and_reference_entry_points_validate_their_numbers(tmp_path):
    from diffusers_mar.evaluation import compute_metrics, compute_reference

    with pytest.raises(ValueError, match="`num_images` must be an integer >= 1"):
        compute_metrics(tmp_path, 0, None)
    with pytest.raises(ValueError, match="`resolution` must be an integer >= 1"):
        compute_reference(str(tmp_path), tmp_path / "r.npz", None, 0, "inception")
    with pytest.raises(ValueError, match="`batch_size` must be an integer >= 1"):
        process_batches(10, 0, 0, 1)


def test_too_few_images_for_comparable_metrics_are_flagged():
    from diffusers_mar.evaluation import MIN_COMPARABLE_IMAGES, comparability_warnings

    assert MIN_COMPARABLE_IMAGES == 1_000
    assert comparability_warnings(1_000, 10) == [] and comparability_warnings(50_000, 1008) == []
    assert comparability_warnings(1_000) == []  # no logits: no IS
    [few] = comparability_warnings(999)
    assert few.startswith("metrics of 999 images are not comparable with published numbers")
    # IS splits: a split of n images cannot score above n; 10,000 Inception images give splits of 1,000 < 1,008.
    [splits] = comparability_warnings(10_000, 1008)
    assert "10 splits hold 1,000 images each, fewer than the classifier's 1,008 classes" in splits
    assert comparability_warnings(10_080, 1008) == []
    assert len(comparability_warnings(50, 10)) == 2  # the 5 images per class: both


def test_compute_metrics_warns_about_a_small_run(tmp_path):
    from diffusers_mar.evaluation import compute_metrics
    from tests.evaluation.stub_extractor import make

    rng = np.random.default_rng(0)
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)).save(tmp_path / f"{index:06d}.png")
    with pytest.warns(UserWarning) as record:
        metrics = compute_metrics(tmp_path, 12, make())
    assert "inception_score" in metrics
    assert [str(warning.message)[:40] for warning in record] == [
        "metrics of 12 images are not comparable ",
        "the Inception Score's 10 splits hold 1 i",
    ]
    received = []
    compute_metrics(tmp_path, 12, make(), warn=received.append)
    assert len(received) == 2 and "splits hold 1 image each" in received[1]
