"""The metrics written a second way, from their definitions, without `diffusers_mar.evaluation` (issue 29): the tests
compare the package's metrics with these on inputs where a wrong formula gives another number.

- Fréchet distance: the cross term as `tr sqrt(sqrt(S1) S2 sqrt(S1))` by eigendecompositions (no `scipy.linalg.sqrtm`
  of the product `S1 S2`).
- Inception Score: torch-fidelity's protocol spelled out (rows permuted by `RandomState(seed)`, chunk `k` holds rows
  `floor(k N / splits)` to `floor((k + 1) N / splits)`, population std), softmax and KL by `scipy.special`.
- Precision / recall: every pair visited in a Python loop, the k-th neighbour radius from a sorted list.
"""

from __future__ import annotations

import numpy as np
from scipy.special import rel_entr, softmax


def frechet_distance_by_eigendecomposition(mu_1, sigma_1, mu_2, sigma_2) -> float:
    """`|mu_1 - mu_2|^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1))` for symmetric PSD `S1`, `S2`."""
    eigenvalues, eigenvectors = np.linalg.eigh(sigma_1)
    root_1 = (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T  # sqrt(S1), symmetric
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_1 @ sigma_2 @ root_1), 0, None)).sum()
    return float(((mu_1 - mu_2) ** 2).sum() + np.trace(sigma_1) + np.trace(sigma_2) - 2 * cross)


def inception_score_by_definition(logits: np.ndarray, splits: int = 10, seed: int | None = 2020) -> tuple:
    """exp(mean_x KL(p(y|x) || p(y))) per chunk; mean and population std over the chunks (`seed=None`: no shuffle)."""
    logits = np.asarray(logits, np.float64)
    if seed is not None:
        logits = logits[np.random.RandomState(seed).permutation(len(logits))]
    n = len(logits)
    scores = []
    for k in range(splits):
        p = softmax(logits[k * n // splits : (k + 1) * n // splits], axis=1)
        marginal = p.mean(axis=0)
        scores.append(np.exp(np.mean([rel_entr(row, marginal).sum() for row in p])))
    mean = sum(scores) / splits
    return mean, (sum((s - mean) ** 2 for s in scores) / splits) ** 0.5


def precision_recall_by_brute_force(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: a sample counts when it lies within (<=) the k-NN radius of some sample of the other
    set; precision for the generated samples against the real balls, recall the other way round."""

    def distance(a, b) -> float:
        return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum()))

    def radii(points) -> list[float]:  # the distance to the k-th nearest OTHER point
        return [sorted(distance(p, q) for j, q in enumerate(points) if j != i)[k - 1] for i, p in enumerate(points)]

    def covered(points, centres) -> float:
        balls = radii(centres)
        inside = [any(distance(p, c) <= r for c, r in zip(centres, balls)) for p in points]
        return sum(inside) / len(points)

    return covered(fake, real), covered(real, fake)
