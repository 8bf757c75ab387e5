"""Linear probe on features with a known linear structure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from evaluation.linear_probe import linear_probe, search_C, split_validation


def _gaussians(means, n_per_class, sigma, rng):
    x = np.concatenate([m + sigma * rng.normal(size=(n_per_class, len(m))) for m in means])
    y = np.repeat(np.arange(len(means)), n_per_class)
    return x, y


def test_separable_classes_are_learned_exactly():
    rng = np.random.default_rng(0)
    means = 4.0 * np.eye(6, 8)
    train_x, train_y = _gaussians(means, 40, 0.3, rng)
    test_x, test_y = _gaussians(means, 50, 0.3, rng)
    result = linear_probe(train_x, train_y, test_x, test_y, seed=0)
    assert result.metrics["acc1"] == 1.0
    assert result.metrics["acc5"] == 1.0
    assert result.metrics["mean_per_class_recall"] == 1.0
    assert 1e-6 <= result.metrics["C"] <= 1e6


def test_two_gaussians_reach_the_bayes_accuracy():
    # Means at -1 and +1 on the first axis, unit noise: the best possible accuracy is Phi(1).
    rng = np.random.default_rng(1)
    means = np.array([[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    train_x, train_y = _gaussians(means, 1000, 1.0, rng)
    test_x, test_y = _gaussians(means, 2000, 1.0, rng)
    result = linear_probe(train_x, train_y, test_x, test_y, seed=0)
    bayes = 0.5 * (1.0 + math.erf(1.0 / math.sqrt(2.0)))  # 0.8413
    assert abs(result.metrics["acc1"] - bayes) < 0.02
    assert "acc5" not in result.metrics  # 2 classes
    assert result.metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(test_y, result.predictions))


def test_chosen_C_is_inside_the_searched_range_and_best_on_validation():
    # Few samples, many noise dimensions: too little and too much regularisation both hurt.
    rng = np.random.default_rng(2)
    d = 150
    means = np.zeros((3, d))
    means[0, 0], means[1, 1], means[2, 2] = 1.5, 1.5, 1.5
    train_x, train_y = _gaussians(means, 40, 1.0, rng)
    tr, va = split_validation(train_y, 0.25, seed=0)
    C, trials = search_C(train_x[tr], train_y[tr], train_x[va], train_y[va])
    exps = np.array([math.log10(t.C) for t in trials])
    assert 1e-6 < C < 1e6  # strictly inside
    assert exps.min() >= -6 - 1e-9 and exps.max() <= 6 + 1e-9
    assert np.allclose(exps[:7], [-6, -4, -2, 0, 2, 4, 6])
    assert len(trials) <= 7 + 2 * 4  # coarse grid, then 4 halvings down to 1/8 decade
    best_acc = max(t.val_acc1 for t in trials)
    chosen = next(t for t in trials if t.C == C)
    assert chosen.val_acc1 == best_acc
    # The search refined down to 1/8 decade around the chosen value.
    assert np.min(np.abs(np.delete(exps, np.argmin(np.abs(exps - math.log10(C)))) - math.log10(C))) == pytest.approx(
        0.125
    )


def test_validation_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(3), [10, 20, 1])
    tr, va = split_validation(y, 0.2, seed=7)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(y)))
    assert np.bincount(y[va], minlength=3).tolist() == [2, 4, 0]  # the single sample stays in train
    tr2, va2 = split_validation(y, 0.2, seed=7)
    assert np.array_equal(va, va2)


def test_probe_with_one_class_is_an_error():
    x = np.zeros((4, 2))
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe(x, np.zeros(4, int), x, np.zeros(4, int))
