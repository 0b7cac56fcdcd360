"""The metrics of `diffusers_mar.evaluation.metrics` against closed forms and constructed inputs."""

from __future__ import annotations

import numpy as np
import pytest

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
from tests.evaluation.independent_metrics import (
    frechet_distance_by_eigendecomposition,
    inception_score_by_definition,
    precision_recall_by_brute_force,
)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # Diagonal covariances commute: d = |mu_1 - mu_2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)).
    mu_1, mu_2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, 1.0, 0.0])
    s_1, s_2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 0.25 + 4.0 + (1 + 9 - 6) + (4 + 1 - 4) + 0.0
    assert frechet_distance(mu_1, np.diag(s_1), mu_2, np.diag(s_2)) == pytest.approx(expected, rel=1e-12)
    # One dimension: (m1 - m2)^2 + (std1 - std2)^2.
    assert frechet_distance([1.0], [[4.0]], [-1.0], [[1.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_frechet_distance_with_a_full_covariance_is_the_closed_form():
    # sigma_1 = a I: tr((a sigma_2)^(1/2)) = sqrt(a) * sum sqrt(eig(sigma_2)).
    rng = np.random.default_rng(0)
    a_matrix = rng.normal(size=(6, 6))
    sigma_2 = a_matrix @ a_matrix.T + 0.1 * np.eye(6)
    a = 2.5
    expected = (
        np.trace(a * np.eye(6)) + np.trace(sigma_2) - 2 * np.sqrt(a) * np.sqrt(np.linalg.eigvalsh(sigma_2)).sum()
    )
    assert frechet_distance(np.zeros(6), a * np.eye(6), np.zeros(6), sigma_2) == pytest.approx(expected, rel=1e-10)


def random_covariance(rng: np.random.Generator, dim: int) -> np.ndarray:
    a_matrix = rng.normal(size=(dim, dim))
    return a_matrix @ a_matrix.T + 0.1 * np.eye(dim)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_of_full_covariances_matches_the_symmetric_form(seed):
    # Issue 29: for covariances that do not commute, tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), but not
    # tr S1^(1/2) S2^(1/2). Seed 0: 24.45 here, 26.11 with that wrong cross term.
    rng = np.random.default_rng(seed)
    mu_1, mu_2 = rng.normal(size=6), rng.normal(size=6)
    sigma_1, sigma_2 = random_covariance(rng, 6), random_covariance(rng, 6)
    assert not np.allclose(sigma_1 @ sigma_2, sigma_2 @ sigma_1)  # they do not commute
    expected = frechet_distance_by_eigendecomposition(mu_1, sigma_1, mu_2, sigma_2)
    assert frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu_2, sigma_2, mu_1, sigma_1) == pytest.approx(expected, rel=1e-9)  # symmetric
    features_1 = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    features_2 = rng.normal(1.0, 1.0, size=(200, 6)) @ rng.normal(size=(6, 6))
    expected = frechet_distance_by_eigendecomposition(
        features_1.mean(axis=0), np.cov(features_1.T), features_2.mean(axis=0), np.cov(features_2.T)
    )
    assert frechet_distance_of_features(features_1, features_2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_computed_in_float64():
    # A 1e-5 shift of a mean gives 1e-10 per dimension: lost in float32 rounding of values around 1e3.
    mu = np.full(4, 1000.0, dtype=np.float32)
    shifted = mu.astype(np.float64) + 1e-5
    assert frechet_distance(mu, np.eye(4), shifted, np.eye(4)) == pytest.approx(4e-10, rel=1e-3)


def test_frechet_distance_of_features_matches_the_gaussians_fitted_to_them():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(400, 5)), rng.normal(1.0, 2.0, size=(300, 5))
    mu_x, sigma_x = gaussian_statistics(x)
    np.testing.assert_allclose(mu_x, x.mean(axis=0))
    np.testing.assert_allclose(sigma_x, np.cov(x, rowvar=False))
    assert frechet_distance_of_features(x, y) == pytest.approx(
        frechet_distance(mu_x, sigma_x, *gaussian_statistics(y))
    )
    assert frechet_distance_of_features(x, x) == pytest.approx(0.0, abs=1e-8)
    # Correlated features (a full covariance): a shift alone adds the squared distance of the means, a wider
    # covariance adds more (merged from tests/benchmarks/test_eval_digits.py, whose metrics are these).
    features = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    shift = np.full(8, 0.5)
    assert frechet_distance_of_features(features, features + shift) == pytest.approx((shift**2).sum(), rel=1e-6)
    distances = [frechet_distance_of_features(features, features + k * shift) for k in (1, 2, 4)]
    assert distances == pytest.approx([k**2 * (shift**2).sum() for k in (1, 2, 4)], rel=1e-6)
    # 2x the features: the same shape, twice the spread: tr(S + 4 S - 2 * 2 S) = tr S (plus 0 for the means here).
    centred = features - features.mean(axis=0)
    assert frechet_distance_of_features(centred, 2 * centred) == pytest.approx(np.trace(np.cov(centred.T)), rel=1e-6)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="sigma_2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_statistics(np.full((3, 3), np.nan))


def one_hot_logits(labels: np.ndarray, num_classes: int, scale: float = 60.0) -> np.ndarray:
    return scale * np.eye(num_classes)[labels]


def test_inception_score_of_a_stub_classifier():
    labels = np.repeat(np.arange(8), 25)  # (200,) confident and balanced over 8 classes
    mean, std = inception_score(one_hot_logits(labels, 8), splits=1)
    assert mean == pytest.approx(8.0, rel=1e-6) and std == 0.0
    # Confident but always the same class, or not confident at all: no diversity, score 1.
    assert inception_score(one_hot_logits(np.zeros(200, int), 8), splits=1)[0] == pytest.approx(1.0)
    assert inception_score(np.zeros((200, 8)), splits=4)[0] == pytest.approx(1.0)
    # Ten splits of a balanced, shuffled set: each split near 8, never above it.
    mean, std = inception_score(one_hot_logits(labels, 8), splits=10)
    assert 6.5 < mean <= 8.0 + 1e-9 and std > 0


def test_inception_score_is_exp_of_the_mean_kl_divergence():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0)
    expected = np.exp((p * (np.log(p) - np.log(marginal))).sum(axis=1).mean())
    assert inception_score(logits, splits=1, shuffle=False)[0] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="splits"):
        inception_score(logits, splits=51)


@pytest.mark.parametrize(("num_rows", "splits"), [(53, 10), (40, 3), (7, 1)])
def test_inception_score_follows_torch_fidelitys_protocol(num_rows, splits):
    # Uneven chunks (53 rows in 10 splits: 5 or 6 rows each), a seeded shuffle, population std: all of it counts.
    logits = np.random.default_rng(num_rows).normal(0.0, 3.0, size=(num_rows, 6))
    expected_mean, expected_std = inception_score_by_definition(logits, splits)
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(expected_mean, rel=1e-12) and std == pytest.approx(expected_std, rel=1e-9, abs=1e-15)
    mean, std = inception_score(logits, splits=splits, shuffle=False)
    assert (mean, std) == pytest.approx(inception_score_by_definition(logits, splits, seed=None), rel=1e-9)
    # Another seed is another shuffle, so other chunks (a check that the comparison above can fail).
    if splits > 1:
        assert inception_score(logits, splits=splits, seed=0)[0] != pytest.approx(expected_mean, rel=1e-6)


def grid(offset: float, shift: float = 0.0) -> np.ndarray:
    """A 5 x 6 grid of points 1 apart, at `offset` along both axes, moved by `shift`."""
    xs, ys = np.meshgrid(np.arange(5.0), np.arange(6.0))
    return np.stack([xs.ravel(), ys.ravel()], axis=1) + offset + shift


def test_precision_recall_on_constructed_point_sets():
    real = np.concatenate([grid(0.0), grid(100.0)])  # two separate clusters; k = 3 radii are 1 or sqrt(2)
    # Generated points within 0.36 of the first real cluster only: all realistic, half the real data missed.
    assert precision_recall(real, grid(0.0, shift=0.25)) == (1.0, 0.5)
    # Half of the generated points far from any real point; the other half cover both clusters.
    mixed = np.concatenate([grid(0.0, 0.25), grid(100.0, 0.25), grid(1000.0), grid(2000.0)])
    assert precision_recall(real, mixed) == (0.5, 1.0)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 10_000.0) == (0.0, 0.0)
    assert precision_recall(real, mixed, batch_size=7) == (0.5, 1.0)  # batched: the same


def test_precision_recall_neighbourhood_and_errors():
    # Points on a line, 1 apart: the last one's k-th neighbour is k away, so a point 1.5 past it is inside its
    # ball for k = 3 but not for k = 1.
    real = np.arange(10, dtype=float)[:, None]
    fake = np.concatenate([real[:9], [[10.5]]])
    assert precision_recall(real, fake, k=3)[0] == 1.0
    assert precision_recall(real, fake, k=1)[0] == 0.9
    # A point exactly on the ball's boundary is inside (<=): 10.0 is 1 from 9, whose k = 1 radius is 1.
    assert precision_recall(real, np.concatenate([real[:9], [[10.0]]]), k=1)[0] == 1.0
    with pytest.raises(ValueError, match="`k`"):
        precision_recall(real, fake, k=10)
    with pytest.raises(ValueError, match="feature sizes"):
        precision_recall(real, np.zeros((5, 2)))


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_of_random_sets_matches_a_brute_force_count(k):
    # A narrower generated cloud off the real one: neither metric is 0 or 1, and precision != recall.
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(40, 3)), rng.normal(1.0, 0.6, size=(30, 3))
    expected = precision_recall_by_brute_force(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1 and expected[0] != expected[1]
    assert precision_recall(real, fake, k=k) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(real, fake, k=k, batch_size=7) == pytest.approx(expected, abs=1e-12)


def test_pairwise_and_nearest_neighbour_distances():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    np.testing.assert_allclose(pairwise_distances(points, points), [[0, 5, 10], [5, 0, 5], [10, 5, 0]])
    assert mean_pairwise_distance(points) == pytest.approx(20 / 3)
    assert mean_pairwise_distance(points[:2]) == pytest.approx(5.0)
    assert mean_pairwise_distance(np.zeros((5, 64))) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(np.zeros((1, 64)))
    np.testing.assert_allclose(nearest_neighbour_distances(points, points, exclude_self=True), [5, 5, 5])
    np.testing.assert_allclose(nearest_neighbour_distances(points[:1] + 1, points), [np.sqrt(2)])
