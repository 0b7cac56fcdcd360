"""A model served by the demo: the pipeline loaded by the command line's code, its family adapter, its inpainting
pipeline, its model card and the lock that keeps one call at a time on it."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from diffusers import DiffusionPipeline
from huggingface_hub import try_to_load_from_cache

from diffusers_mar import DEFAULT_MODEL
from diffusers_mar.cli.model import check_can_decode, load_pipeline, model_summary
from diffusers_mar.demo.families import FamilyAdapter, family_for
from diffusers_mar.hub import hub_unreachable_reason
from diffusers_mar.threads import resolve_num_threads


@dataclass
class DemoModel:
    """One model of the demo. `lock` is held by every pipeline call on it (the pipelines share its modules)."""

    source: str  # --model as given
    device: str
    dtype: str
    pipe: DiffusionPipeline
    adapter: FamilyAdapter
    inpaint_pipe: DiffusionPipeline | None
    card: str
    folder: Path | None  # the local folder, or None for a Hub id
    num_threads: int = 1  # CPU threads of its calls (`--num-threads`, resolved)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return "shipped digits model" if self.is_default else self.source

    @property
    def is_default(self) -> bool:
        return self.folder is not None and self.folder == Path(DEFAULT_MODEL).resolve()

    def summary(self) -> dict:
        return model_summary(self.pipe, self.source)


def pipeline_class_name(model: str) -> str | None:
    """`_class_name` of the folder's `model_index.json` (a local folder, or a Hub id through the cache or a
    download); None when it cannot be read, and loading will say why."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            return json.loads((path / "model_index.json").read_text()).get("_class_name")
        if path.exists():
            return None
        config = DiffusionPipeline.load_config(model, local_files_only=hub_unreachable_reason() is not None)
        return config.get("_class_name")
    except Exception:  # not a folder or id we can read: `load_pipeline` reports it
        return None


def read_card(model: str, folder: Path | None) -> str:
    """The model card (`README.md`) without its YAML header, or a line saying there is none."""
    if folder is not None:
        path = folder / "README.md"
    else:
        cached = try_to_load_from_cache(model, "README.md")
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return "This model folder has no model card (README.md)."
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.startswith("---"):
        end = text.find("\n---", 3)
        text = text[end + 4 :] if end != -1 else text
    return text.strip()


def load_model(model: str, device: str = "cpu", dtype: str = "float32", num_threads: int | str = "auto") -> DemoModel:
    """Load `model` (a folder or a Hub id) with the command line's `load_pipeline`; `CLIError`s as it raises them, and
    one for a family the demo does not know (checked before the weights load when `model_index.json` can be read)."""
    class_name = pipeline_class_name(model)
    if class_name is not None:
        family_for(class_name, model)
    pipe = load_pipeline(model, device, dtype)
    adapter = family_for(type(pipe).__name__ if class_name is None else class_name, model)
    check_can_decode(pipe, model)
    pipe.set_progress_bar_config(disable=True)
    inpaint_pipe = adapter.inpaint(pipe) if adapter.inpaint is not None else None
    if inpaint_pipe is not None:
        inpaint_pipe.set_progress_bar_config(disable=True)
    path = Path(model).expanduser()
    folder = path.resolve() if path.is_dir() else None
    threads = resolve_num_threads(num_threads, pipe, device)
    return DemoModel(model, device, dtype, pipe, adapter, inpaint_pipe, read_card(model, folder), folder, threads)
