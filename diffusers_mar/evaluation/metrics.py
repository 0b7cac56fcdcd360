"""Sample-quality metrics on feature arrays: Fréchet distance, Inception Score, improved precision / recall, and the
pixel-space diversity and near-copy distances of the digits benchmark.

Plain functions of NumPy arrays `(N, D)`, computed in float64. The FID follows the ADM evaluator and pytorch-fid
(`scipy.linalg.sqrtm` of the covariance product, a 1e-6 ridge when it is not finite); the Inception Score and
precision / recall follow torch-fidelity (`isc_features_to_metric`, `calculate_precision_recall_full`).
"""

from __future__ import annotations

import warnings

import numpy as np


def _as_features(features: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < min_rows:
        raise ValueError(f"`{name}` must be a 2-d array (N, D) with N >= {min_rows}; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` holds NaN or infinite values.")
    return array


def gaussian_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean `(D,)` and covariance `(D, D)` (unbiased, as `np.cov`) of `features` `(N, D)`, in float64."""
    features = _as_features(features, "features", min_rows=2)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """Fréchet distance between N(mu_1, sigma_1) and N(mu_2, sigma_2) in float64:
    `|mu_1 - mu_2|^2 + tr(sigma_1 + sigma_2 - 2 (sigma_1 sigma_2)^(1/2))`."""
    try:
        from scipy import linalg
    except ImportError:
        raise ImportError("The Fréchet distance needs scipy: pip install 'diffusers-mar[eval]'.") from None

    mu_1, mu_2 = np.atleast_1d(np.asarray(mu_1, np.float64)), np.atleast_1d(np.asarray(mu_2, np.float64))
    sigma_1, sigma_2 = np.atleast_2d(np.asarray(sigma_1, np.float64)), np.atleast_2d(np.asarray(sigma_2, np.float64))
    dim = mu_1.shape[0]
    for name, value, shape in (
        ("mu_2", mu_2, (dim,)),
        ("sigma_1", sigma_1, (dim, dim)),
        ("sigma_2", sigma_2, (dim, dim)),
    ):
        if value.shape != shape:
            raise ValueError(f"`{name}` must have shape {shape} to match `mu_1` {mu_1.shape}; got {value.shape}.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular covariances are common (dead ReLU units); handled below
        covmean = linalg.sqrtm(sigma_1 @ sigma_2)
        if not np.isfinite(covmean).all():
            offset = np.eye(dim) * 1e-6  # As in the ADM evaluator and pytorch-fid: a ridge for a singular product
            covmean = linalg.sqrtm((sigma_1 + offset) @ (sigma_2 + offset))
    covmean = np.real(covmean)
    distance = ((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2) - 2 * np.trace(covmean)
    return float(max(distance, 0.0))


def frechet_distance_of_features(features_1: np.ndarray, features_2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets `(N, D)` and `(M, D)`."""
    return frechet_distance(*gaussian_statistics(features_1), *gaussian_statistics(features_2))


def inception_score(
    logits: np.ndarray, splits: int = 10, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score (mean, std over `splits`) of classifier `logits` `(N, K)`: exp E[KL(p(y|x) || p(y))].

    As torch-fidelity: rows shuffled by `np.random.RandomState(seed)`, float64 softmax, `splits` near-equal chunks,
    population std of the per-chunk scores. torch-fidelity feeds Inception's `logits_unbiased` (no fc bias).
    """
    logits = _as_features(logits, "logits")
    if not isinstance(splits, int) or not 1 <= splits <= len(logits):
        raise ValueError(f"`splits` must be an integer in [1, {len(logits)}] (the number of rows); got {splits!r}.")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(len(logits))]
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))  # (N, K) log-softmax
    scores = []
    for i in range(splits):
        chunk = log_p[i * len(log_p) // splits : (i + 1) * len(log_p) // splits]
        p = np.exp(chunk)
        log_q = np.log(p.mean(axis=0, keepdims=True))
        scores.append(float(np.exp((p * (chunk - log_q)).sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))


def pairwise_distances(features_1: np.ndarray, features_2: np.ndarray) -> np.ndarray:
    """Euclidean distances `(N, M)` in float64, `sqrt(|x|^2 - 2 x.y + |y|^2)` clipped at 0 (as scikit-learn)."""
    x, y = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    squared = -2 * (x @ y.T)  # (N, M), summed in scikit-learn's order so the digits numbers stay the same
    squared += np.einsum("ij,ij->i", x, x)[:, None]
    squared += np.einsum("ij,ij->i", y, y)[None, :]
    if x is y:
        np.fill_diagonal(squared, 0.0)
    return np.sqrt(np.maximum(squared, 0.0))


def _kth_neighbour_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Per row, the distance to its k-th nearest other row (the row itself is the 0-th)."""
    radii = [
        np.partition(pairwise_distances(features[i : i + batch_size], features), k, axis=1)[:, k]
        for i in range(0, len(features), batch_size)
    ]
    return np.concatenate(radii)


def _inside_any_ball(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> np.ndarray:
    inside = [
        (pairwise_distances(points[i : i + batch_size], centres) <= radii[None, :]).any(axis=1)
        for i in range(0, len(points), batch_size)
    ]
    return np.concatenate(inside)


def precision_recall(
    real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = 10000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) with `k`-nearest-neighbour balls.

    Precision: the fraction of generated samples inside the ball of some real sample (radius: its distance to its
    k-th nearest real neighbour); recall: the same with the roles swapped. As torch-fidelity's `prc` (k = 3).
    """
    real = _as_features(real_features, "real_features", min_rows=2)
    fake = _as_features(fake_features, "fake_features", min_rows=2)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sizes differ: real {real.shape[1]}, generated {fake.shape[1]}.")
    if not isinstance(k, int) or not 1 <= k < min(len(real), len(fake)):
        raise ValueError(f"`k` must be an integer in [1, {min(len(real), len(fake)) - 1}]; got {k!r}.")
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _inside_any_ball(fake, real, real_radii, batch_size).mean()
    recall = _inside_any_ball(real, fake, fake_radii, batch_size).mean()
    return float(precision), float(recall)


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of distinct rows of `features` `(N, D)`."""
    if len(features) < 2:
        raise ValueError(f"`images` needs at least 2 images for a pairwise distance; got {len(features)}.")
    return float(pairwise_distances(features, features).sum() / (len(features) * (len(features) - 1)))


def nearest_neighbour_distances(features: np.ndarray, reference: np.ndarray, exclude_self: bool = False) -> np.ndarray:
    """Per row of `features`, the distance to its nearest row of `reference`; `exclude_self` when they are the same
    set (the diagonal is skipped)."""
    distances = pairwise_distances(features, reference)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    return distances.min(axis=1)
