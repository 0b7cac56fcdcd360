"""Evaluation like the paper: balanced sampling across processes, FID / IS / precision-recall against reference
statistics (`diffusers-mar evaluate`; docs/evaluation.md). Needs the `[eval]` extra (scipy; datasets for
`--compute-reference` on a dataset)."""

from diffusers_mar.evaluation.evaluate import (
    MIN_COMPARABLE_IMAGES,
    comparability_warnings,
    compute_metrics,
    compute_reference,
    write_json,
)
from diffusers_mar.evaluation.features import InceptionExtractor, extract, load_feature_extractor, to_rgb_tensor
from diffusers_mar.evaluation.inception import InceptionV3Features, load_inception_v3
from diffusers_mar.evaluation.metrics import (
    frechet_distance,
    frechet_distance_of_features,
    gaussian_statistics,
    inception_score,
    mean_pairwise_distance,
    nearest_neighbour_distances,
    pairwise_distances,
    precision_recall,
)
from diffusers_mar.evaluation.reference import ReferenceStatistics, center_crop_arr, load_reference
from diffusers_mar.evaluation.sampling import (
    NpzWriter,
    check_output_folder,
    discard_new_run,
    folder_hash,
    generate_samples,
    process_batches,
    read_images,
    sample_list,
    write_run_file,
)

__all__ = [
    "MIN_COMPARABLE_IMAGES",
    "InceptionExtractor",
    "InceptionV3Features",
    "NpzWriter",
    "ReferenceStatistics",
    "center_crop_arr",
    "check_output_folder",
    "comparability_warnings",
    "compute_metrics",
    "compute_reference",
    "discard_new_run",
    "extract",
    "folder_hash",
    "frechet_distance",
    "frechet_distance_of_features",
    "gaussian_statistics",
    "generate_samples",
    "inception_score",
    "load_feature_extractor",
    "load_inception_v3",
    "load_reference",
    "mean_pairwise_distance",
    "nearest_neighbour_distances",
    "pairwise_distances",
    "precision_recall",
    "process_batches",
    "read_images",
    "sample_list",
    "to_rgb_tensor",
    "write_json",
    "write_run_file",
]
