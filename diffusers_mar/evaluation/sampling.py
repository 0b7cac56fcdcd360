"""Balanced sampling for evaluation: a fixed list of (class label, seed) pairs, cut into fixed batches that are dealt
to the processes of an `accelerate launch`, written as numbered PNGs that a later run resumes.

The sample list is `images_per_class` images of each class in class order (as LTH14/mar's evaluation: 50 per class
for ImageNet); image `i` has seed `seed + i` and its own `torch.Generator`. The batches are fixed ranges of indices
(`batch_size` long), and batch `b` goes to process `b % num_processes`, so every batch holds the same images whatever
the number of processes, and an image is the same bytes on the CPU for 1 or N processes. A batch whose files all
exist is skipped; a batch with some missing is generated again whole (its images do not change) and only the
missing files are written, each to a temporary file renamed into place, so a killed run leaves no partial PNG.

`run.json` in the output folder records what the images are (model hash, settings, list); a folder that holds
images of another run is refused.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusers_mar.atomic_files import atomic_write, publish, temporary_beside

RUN_FILE = "run.json"
IMAGE_PATTERN = "{index:06d}.png"


def sample_list(num_classes: int, images_per_class: int, seed: int = 0) -> list[tuple[int, int]]:
    """`(class label, seed)` of every image: `images_per_class` of each class in class order, seeds `seed + i`."""
    for name, value in (("num_classes", num_classes), ("images_per_class", images_per_class)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}.")
    return [(index // images_per_class, seed + index) for index in range(num_classes * images_per_class)]


def process_batches(num_images: int, batch_size: int, process_index: int, num_processes: int) -> list[range]:
    """The index ranges that process `process_index` of `num_processes` generates: fixed batches, dealt in turn."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an integer >= 1; got {batch_size!r}.")
    batches = [range(first, min(first + batch_size, num_images)) for first in range(0, num_images, batch_size)]
    return batches[process_index::num_processes]


def image_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / IMAGE_PATTERN.format(index=index)


def folder_hash(folder: str | Path) -> str:
    """SHA-256 of a pipeline folder: every file's relative path and bytes, the model card (README.md) excepted."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = path.relative_to(folder).as_posix()
        if relative == "README.md":
            continue  # the card changes when results are added to it
        digest.update(relative.encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def check_output_folder(folder: str | Path, run: dict) -> bool:
    """Refuse a folder that holds another run's images; True when `run.json` matches (a resume), False when new."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`output_dir` {str(folder)!r} exists and is not a folder.")
    run_file = folder / RUN_FILE
    if run_file.is_file():
        try:
            stored = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"`output_dir` has an unreadable {RUN_FILE} ({error}); use another folder.") from None
        differences = sorted(key for key in set(stored) | set(run) if stored.get(key) != run.get(key))
        if differences:
            raise ValueError(
                f"`output_dir` {str(folder)!r} holds the images of another run (its {RUN_FILE} differs in "
                f"{', '.join(differences)}); use another folder, or delete it to start again."
            )
        return True
    if folder.is_dir() and any(folder.glob("*.png")):
        raise ValueError(
            f"`output_dir` {str(folder)!r} holds PNG files but no {RUN_FILE}: images of another run or program; "
            "use an empty or new folder."
        )
    return False


def write_run_file(folder: str | Path, run: dict) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / RUN_FILE, lambda file: file.write(json.dumps(run, indent=2).encode()))


def discard_new_run(folder: str | Path, created: bool) -> None:
    """Undo `write_run_file` for a run that failed before writing any image: remove its run file, and the folder when
    the run created it, so that the folder does not claim a run it does not hold."""
    folder = Path(folder)
    if not folder.is_dir() or any(folder.glob("*.png")):
        return
    (folder / RUN_FILE).unlink(missing_ok=True)
    if created and not any(folder.iterdir()):
        folder.rmdir()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """`(N, H, W, C)` floats in [0, 1] -> uint8, rounded (as LTH14/mar: `np.round(np.clip(x * 255, 0, 255))`)."""
    return np.round(np.clip(images * 255, 0, 255)).astype(np.uint8)


def save_png(array: np.ndarray, path: Path) -> None:
    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    atomic_write(path, lambda file: image.save(file, format="PNG"))


def generate_samples(
    pipe,
    samples: list[tuple[int, int]],
    output_dir: str | Path,
    batch_size: int,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
    **sampling,
) -> int:
    """Generate this process's missing images of `samples` into `output_dir`; returns how many it generated.

    `sampling` are the pipeline's sampling arguments (its `sampling_keys`). The progress bar (when `show_progress`)
    counts the images of all processes, estimated from this one's.
    """
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    batches = process_batches(len(samples), batch_size, process_index, num_processes)
    missing = [batch for batch in batches if not all(image_path(output_dir, i).exists() for i in batch)]
    done = len(samples) - sum(len(batch) for batch in missing) * num_processes
    bar = tqdm(
        total=len(samples),
        initial=max(done, 0),
        unit="img",
        disable=not show_progress,
        dynamic_ncols=True,
        smoothing=0,
    )
    generated = 0
    for batch in missing:
        labels = [samples[i][0] for i in batch]
        generators = [torch.Generator().manual_seed(samples[i][1]) for i in batch]
        images = to_uint8(pipe(class_labels=labels, generator=generators, output_type="np", **sampling).images)
        for index, image in zip(batch, images):
            path = image_path(output_dir, index)
            if not path.exists():
                save_png(image, path)
        generated += len(batch)
        bar.update(min(len(batch) * num_processes, bar.total - bar.n))
    bar.close()
    return generated


def read_images(output_dir: str | Path, num_images: int, batch_size: int) -> Iterator[np.ndarray]:
    """The PNGs `0..num_images-1` of `output_dir` as uint8 `(B, H, W, C)` batches, in index order."""
    for first in range(0, num_images, batch_size):
        arrays = []
        for index in range(first, min(first + batch_size, num_images)):
            path = image_path(output_dir, index)
            if not path.is_file():
                raise FileNotFoundError(f"{str(path)!r} is missing: the sampling did not finish.")
            array = np.asarray(Image.open(path))
            arrays.append(array[..., None] if array.ndim == 2 else array)
        yield np.stack(arrays)


class NpzWriter:
    """Writes `arr_0` (uint8 NHWC, the ADM evaluator's sample format) into an `.npz` batch by batch, without holding
    the whole array: a zip entry streamed to a temporary file renamed into place at `close()`."""

    def __init__(self, path: str | Path, shape: tuple[int, ...]):
        self.path = Path(path)
        self.shape = tuple(shape)
        self.written = 0
        self.temporary = temporary_beside(self.path)
        self.zip = zipfile.ZipFile(self.temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.entry = self.zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": "|u1", "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self.entry, header)

    def write(self, batch: np.ndarray) -> None:
        if batch.dtype != np.uint8 or batch.shape[1:] != self.shape[1:]:
            raise ValueError(f"batch must be uint8 (B, {self.shape[1:]}); got {batch.dtype} {batch.shape}.")
        self.entry.write(np.ascontiguousarray(batch).tobytes())
        self.written += len(batch)

    def close(self) -> None:
        self.entry.close()
        self.zip.close()
        if self.written != self.shape[0]:
            self.abort()
            raise ValueError(f"wrote {self.written} images into {self.path.name}, expected {self.shape[0]}.")
        publish(self.temporary, self.path)

    def abort(self) -> None:
        if self.zip.fp is not None:
            self.entry.close()
            self.zip.close()
        self.temporary.unlink(missing_ok=True)
