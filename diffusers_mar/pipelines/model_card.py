"""The model card of a MAR pipeline folder: one Markdown template (`model_card_template.md`) for every writer.

The converter and the training script fill it with what they know; `MARPipeline.save_pretrained` carries the card of
the folder a pipeline was loaded from into the new folder.
"""

from __future__ import annotations

import shutil
import string
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
TAGS = ["diffusers", "diffusers-mar", "mar", "image-generation", "class-conditional", "autoregressive"]
MAR_CITATION = """@article{li2024autoregressive,
  title={Autoregressive Image Generation without Vector Quantization},
  author={Li, Tianhong and Tian, Yonglong and Li, He and Deng, Mingyang and He, Kaiming},
  journal={arXiv preprint arXiv:2406.11838},
  year={2024}
}"""
VAR_CITATION = """@inproceedings{tian2024visual,
  title={Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction},
  author={Tian, Keyu and Jiang, Yi and Yuan, Zehuan and Peng, Bingyue and Wang, Liwei},
  booktitle={Advances in Neural Information Processing Systems},
  year={2024}
}"""


def make_model_card(
    title: str,
    description: str,
    details: dict[str, str],
    sampling: dict,
    repo_id: str = "path/to/this-folder",
    sections: str = "",
    example_label: int = 0,
    license: str = "mit",
    base_model: str | None = None,
    datasets: list[str] | None = None,
    pipeline_class: str = "MARPipeline",
    citation: str = MAR_CITATION,
    tags: list[str] | None = None,
) -> ModelCard:
    """A `ModelCard` from the template: YAML metadata, title, description, a details table, usage, `sections`
    (Markdown, e.g. evaluation results or the training command) and the citation (BibTeX, the MAR paper's by
    default); the usage loads `pipeline_class`. `tags` replace the default ones."""
    metadata = ModelCardData(
        license=license, library_name="diffusers", tags=list(tags or TAGS), base_model=base_model, datasets=datasets
    )
    text = string.Template(TEMPLATE_PATH.read_text()).substitute(
        metadata=metadata.to_yaml(),
        title=title,
        description=description.strip(),
        details="\n".join(f"| {key} | {value} |" for key, value in details.items()),
        repo_id=repo_id,
        pipeline_class=pipeline_class,
        example_label=example_label,
        sampling=", ".join(f"`{key}={value!r}`" for key, value in sampling.items()),
        sections=f"\n{sections.strip()}\n\n" if sections.strip() else "\n",
        citation=citation,
    )
    return ModelCard(text)


def copy_model_card(source: str | None, target: str | Path) -> bool:
    """Copy `README.md` of the local folder `source` into `target` unless `target` has one; whether it copied."""
    if not source or not (Path(source).expanduser() / "README.md").is_file():
        return False
    destination = Path(target) / "README.md"
    if destination.exists():
        return False
    shutil.copyfile(Path(source).expanduser() / "README.md", destination)
    return True
