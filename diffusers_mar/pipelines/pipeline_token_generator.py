"""TokenGeneratorPipeline: the family-agnostic base of the class-conditional token generators.

The families differ in how they make an image's tokens: MAR and causal AR (`AutoregressivePipeline`) sample
continuous tokens with a per-token diffusion head, VAR (`VARPipeline`) samples codebook indices scale by scale. This
base holds what they do the same way: the transformer's family check (a folder of another family is refused with
the class that loads it), class labels and their names, the recommended sampling settings of the folder
(`sampling_keys`, checked and resolved by `sampling_settings.py`), the doubled batch of classifier-free guidance and
its properties, the callback tensor names, the common input checks and saving with the model card
(`docs/new_family.md`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from diffusers_mar.pipelines.model_card import copy_model_card
from diffusers_mar.pipelines.sampling_settings import check_sampling_settings, resolve_sampling_settings
from diffusers_mar.quantization import refuse_saving_int8

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class TokenGeneratorPipeline(DiffusionPipeline):
    r"""
    Base of the class-conditional pipelines that generate an image's tokens with a transformer.

    This model inherits from [`DiffusionPipeline`]. A family subclasses it (or [`AutoregressivePipeline`], for a
    transformer with a per-token diffusion head), sets `_transformer_class`, `sampling_keys`, `paper_sampling` and
    `sampling_limits`, calls `check_transformer` and `register_labels_and_sampling` in its `__init__`, and writes its
    loop in `__call__`; see `docs/new_family.md`.

    Its config holds `id2label` (class names, comma-separated synonyms allowed, as `DiTPipeline`, for
    `get_label_ids`) and `sampling` (the recommended sampling settings of the model, the defaults of `__call__`;
    keys among `sampling_keys`, those not stored take `paper_sampling` clipped to the model).
    """

    _transformer_class: type[ModelMixin] | None = None  # a family's transformer class
    sampling_keys: tuple[str, ...] = ()  # the `__call__` arguments a family's folder may recommend
    paper_sampling: dict = {}  # their values when a folder stores none (clipped by `sampling_limits`)
    _callback_tensor_inputs = ["latents"]
    _default_callback_tensor_inputs = ["latents"]  # what a callback gets when it names none

    @classmethod
    def _get_signature_types(cls) -> dict:
        # diffusers reads the components' types from `__init__`'s annotations (`from_pipe` switches a model over only
        # if its type is listed); a family's transformer is its `_transformer_class`.
        signature_types = super()._get_signature_types()
        if cls._transformer_class is not None:
            signature_types["transformer"] = (cls._transformer_class,)
        return signature_types

    @classmethod
    def extract_init_dict(cls, config_dict: dict, **kwargs) -> tuple:
        # `cls.from_pretrained(folder)` builds `cls` from the folder's components whatever class the folder names, so
        # a folder of another family (other components) would fail on a missing one, or load a transformer that
        # this family cannot run. Refuse it before any weight loads, naming the class that loads the folder.
        owner = _pipeline_class_named(config_dict.get("_class_name"))
        if owner is not None and None not in (owner._transformer_class, cls._transformer_class):
            if owner._transformer_class is not cls._transformer_class:
                got = (config_dict.get("transformer") or [None, owner._transformer_class.__name__])[1]
                raise ValueError(_wrong_family_message(cls, got, _family_of(owner._transformer_class)))
        return super().extract_init_dict(config_dict, **kwargs)

    def check_transformer(self, transformer: ModelMixin) -> None:
        """Refuse a transformer of another family, naming the pipeline class that runs it."""
        if not isinstance(transformer, self._transformer_class):
            owner = _family_of(type(transformer))
            raise ValueError(_wrong_family_message(type(self), type(transformer).__name__, owner))

    def register_labels_and_sampling(
        self, id2label: dict[int, str] | dict[str, str] | None, sampling: dict | None
    ) -> None:
        """Check `sampling` against the model (after `register_modules`) and register both in the config; build the
        name -> id map of `get_label_ids`."""
        id2label = {int(key): value for key, value in id2label.items()} if id2label else None
        if sampling is not None:
            check_sampling_settings(sampling, name="sampling", keys=self.sampling_keys, **self.sampling_limits())
        self.register_to_config(id2label=id2label, sampling=dict(sampling) if sampling else None)
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = key
        self.labels = dict(sorted(self.labels.items()))

    def sampling_limits(self) -> dict:
        """The model's bounds on the sampling settings, keyword arguments of `check_sampling_settings`
        (`num_tokens`, `num_train_timesteps`, `vocab_size`)."""
        raise NotImplementedError(f"{type(self).__name__} must define `sampling_limits`.")

    @property
    def id2label(self) -> dict[int, str]:
        return dict(self.config.id2label or {})

    @property
    def sampling_defaults(self) -> dict:
        """The defaults of `__call__`'s sampling arguments: the folder's `sampling`, else the paper's (clipped)."""
        stored = self.config.get("sampling")
        settings = resolve_sampling_settings(stored, paper=self.paper_sampling, **self.sampling_limits())
        return {key: settings[key] for key in self.sampling_keys}

    def set_sampling_defaults(self, **settings) -> None:
        """Store recommended sampling settings (keys among `sampling_keys`) in the config; `save_pretrained` saves
        them. Keys not given keep their stored value."""
        check_sampling_settings(settings, keys=self.sampling_keys, **self.sampling_limits())
        self.register_to_config(sampling={**(self.config.get("sampling") or {}), **settings})

    def resolve_sampling_settings(self, **given) -> dict:
        """The sampling arguments of a call (`sampling_keys`): those given (not None), else `sampling_defaults`."""
        return {
            **self.sampling_defaults,
            **{key: given[key] for key in self.sampling_keys if given.get(key) is not None},
        }

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`, keeping the model card (`README.md`) of the folder loaded from. A pipeline
        quantized with `diffusers_mar.quantization.quantize_int8` is refused before anything is written."""
        quantized = [name for name, model in self.components.items() if getattr(model, "int8_quantized", False)]
        refuse_saving_int8(quantized, "This pipeline's")
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_model_card(self.config.get("_name_or_path"), save_directory)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        r"""
        Map class names to class ids.

        Args:
            label (`str` or `list[str]`):
                Class names known to `id2label` (any of the comma-separated synonyms).

        Returns:
            `list[int]`: the class ids.
        """
        labels = [label] if isinstance(label, str) else list(label)
        if not self.labels:
            raise ValueError("This pipeline has no `id2label`; pass integer `class_labels` instead of names.")
        unknown = [name for name in labels if name not in self.labels]
        if unknown:
            raise ValueError(f"`label` has unknown names {unknown}; allowed names are: {list(self.labels)}.")
        return [self.labels[name] for name in labels]

    def callback_tensor_inputs(
        self,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> list[str]:
        """The tensors a call puts in `callback_kwargs`: a callback class's own, else those given, else the family's
        default (`_default_callback_tensor_inputs`)."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        return callback_on_step_end_tensor_inputs or list(self._default_callback_tensor_inputs)

    def check_common_inputs(
        self,
        class_labels: list[int],
        generator: torch.Generator | list[torch.Generator] | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        """Validate the arguments every family's `__call__` takes."""
        num_classes = self.transformer.config.num_classes
        batch_size = len(class_labels)
        bad = [label for label in class_labels if not 0 <= label <= num_classes]
        if bad:
            raise ValueError(
                f"`class_labels` must be in [0, {num_classes}] ({num_classes} = unconditional); got {bad}."
            )
        generators = generator if isinstance(generator, list) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in generators) or generators == []:
            raise ValueError(
                f"`generator` must be a `torch.Generator`, a list of them (one per image) or None; got {generator!r}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators but the effective batch size is {batch_size} "
                "(class labels times `num_images_per_label`); pass one generator per image or a single generator."
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}; got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` has {sorted(unknown)}; allowed: {self._callback_tensor_inputs}."
            )

    def prepare_labels(self, class_labels: list[int], guidance_scale: float, device: torch.device) -> torch.Tensor:
        """The transformer's class labels `(B',)`; under guidance the null label's half follows the conditional one.
        Starts the call's guidance (`guidance_scale`, which a callback may change between steps)."""
        self._guidance_scale = guidance_scale
        self._guided = self.do_classifier_free_guidance  # the batch is doubled for the whole call
        labels = torch.tensor(class_labels, device=device)
        if self._guided:
            labels = torch.cat([labels, torch.full_like(labels, self.transformer.config.num_classes)])
        return labels


def _wrong_family_message(pipeline_class: type, got: str, owner: str) -> str:
    expected = pipeline_class._transformer_class.__name__
    return (
        f"`transformer` of a {pipeline_class.__name__} must be a {expected}, got a {got}: the folder holds a "
        f"{owner}. Load it with `{owner}.from_pretrained(folder)` or `DiffusionPipeline.from_pretrained(folder)`."
    )


def _families() -> list[type]:
    """Every subclass of `TokenGeneratorPipeline`, breadth first (a family before its variants)."""
    found, pending = [], list(TokenGeneratorPipeline.__subclasses__())
    while pending:
        family = pending.pop(0)
        found.append(family)
        pending.extend(family.__subclasses__())
    return found


def _pipeline_class_named(name: object) -> type | None:
    return next((family for family in _families() if family.__name__ == name), None)


def _family_of(transformer_class: type) -> str:
    """The pipeline a folder with this transformer holds: the first family (breadth first) whose transformer it is."""
    return next((f.__name__ for f in _families() if f._transformer_class is transformer_class), "other pipeline")
