"""Linear probe as the CLIP paper does it (section 3.2 / appendix A.3).

Features of the frozen image encoder (`encode_image`, projected, not normalised, as OpenAI's
linear-probe example feeds them) train scikit-learn's `LogisticRegression` (L-BFGS, up to 1000
iterations, L2 penalty). The regularisation strength is chosen on a validation split by the
paper's parametric binary search: start from 7 values spread evenly (in log10) over the range
(1e-6..1e6 gives 1e-6, 1e-4, ..., 1e6), then repeatedly halve the step and try both neighbours of
the best value so far, until the step is 1/8 of a decade (the paper's "8 steps per decade").
The best value is the highest validation accuracy; equal accuracies go to the lower validation
log-loss, then to the smaller C. The probe is then refit on train + validation with that C and
scored on the test split.

sklearn's `C` is the inverse regularisation strength; the search runs over C directly.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

from evaluation.classification import classification_metrics

DEFAULT_C_RANGE = (1e-6, 1e6)


@dataclass
class ProbeTrial:
    C: float
    val_acc1: float
    val_log_loss: float
    converged: bool


@dataclass
class LinearProbeResult:
    metrics: dict[str, float]  # acc1, acc5 (>= 5 classes), mean_per_class_recall, C
    C: float
    trials: list[ProbeTrial] = field(default_factory=list)
    predictions: Optional[np.ndarray] = None  # [N_test] class index
    scores: Optional[np.ndarray] = None  # [N_test, C] decision function
    converged: bool = True  # the final refit


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int) -> tuple[LogisticRegression, bool]:
    clf = LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return clf, converged


def _full_scores(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision scores [N, num_classes]; classes absent from the training labels score -inf."""
    raw = clf.decision_function(x)
    if raw.ndim == 1:  # binary: sklearn returns the score of classes_[1]
        raw = np.stack([-raw, raw], axis=1) / 2.0
    out = np.full((len(x), num_classes), -np.inf, dtype=np.float64)
    out[:, clf.classes_.astype(np.int64)] = raw
    return out


def search_C(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    c_range: Sequence[float] = DEFAULT_C_RANGE,
    steps_per_decade: int = 8,
    max_iter: int = 1000,
) -> tuple[float, list[ProbeTrial]]:
    """The paper's parametric binary search over log10(C); returns (best C, trials in order)."""
    lo, hi = (math.log10(c) for c in c_range)
    if not (c_range[0] > 0 and hi > lo):
        raise ValueError(f"the C search range must be two positive numbers, low < high; got {list(c_range)}")
    if steps_per_decade < 1:
        raise ValueError(f"steps_per_decade must be >= 1, got {steps_per_decade}")
    trials: dict[float, ProbeTrial] = {}
    labels = np.unique(np.concatenate([train_y, val_y]))

    def trial(exponent: float) -> None:
        key = round(exponent, 9)
        if key in trials or not (lo - 1e-9 <= exponent <= hi + 1e-9):
            return
        C = float(10.0**exponent)
        clf, converged = _fit(train_x, train_y, C, max_iter)
        acc = float(np.mean(clf.predict(val_x) == val_y))
        proba = np.zeros((len(val_x), len(labels)))
        proba[:, np.searchsorted(labels, clf.classes_)] = clf.predict_proba(val_x)
        loss = float(log_loss(val_y, proba, labels=labels))
        trials[key] = ProbeTrial(C=C, val_acc1=acc, val_log_loss=loss, converged=converged)

    def best() -> float:
        return min(trials, key=lambda e: (-trials[e].val_acc1, trials[e].val_log_loss, e))

    step = (hi - lo) / 6.0
    for i in range(7):
        trial(lo + i * step)
    resolution = 1.0 / steps_per_decade
    while step > resolution + 1e-12:
        step = max(step / 2.0, resolution)
        center = best()
        trial(center - step)
        trial(center + step)
    chosen = trials[best()]
    return chosen.C, list(trials.values())


def split_validation(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): a stratified random split; classes with one sample stay in train."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval.val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        n_val = int(round(len(members) * fraction)) if len(members) > 1 else 0
        n_val = min(n_val, len(members) - 1)
        val_idx.append(members[:n_val])
        train_idx.append(members[n_val:])
    train, val = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
    if len(val) == 0:
        raise ValueError(
            "the validation split is empty: give more training samples, a larger eval.val_fraction or eval.val_dataset"
        )
    return train, val


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    num_classes: Optional[int] = None,
    val_x: Optional[np.ndarray] = None,
    val_y: Optional[np.ndarray] = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    c_range: Sequence[float] = DEFAULT_C_RANGE,
    steps_per_decade: int = 8,
    max_iter: int = 1000,
) -> LinearProbeResult:
    """Search C on (train, val), refit on train + val, score on test.

    x: [N, D] float features; y: [N] int class indices in [0, num_classes). Without `val_x`, a
    stratified `val_fraction` of the training set (seeded) is the validation split.
    """
    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be [N, D] with the same D; got train {train_x.shape}, test {test_x.shape}")
    if len(np.unique(train_y)) < 2:
        raise ValueError("the linear probe needs at least 2 classes in its training split")
    num_classes = int(num_classes or max(train_y.max(), test_y.max()) + 1)
    if val_x is None:
        tr, va = split_validation(train_y, val_fraction, seed)
        fit_x, fit_y, val_x, val_y = train_x[tr], train_y[tr], train_x[va], train_y[va]
    else:
        val_x, val_y = np.asarray(val_x, dtype=np.float64), np.asarray(val_y, dtype=np.int64)
        fit_x, fit_y = train_x, train_y
    C, trials = search_C(
        fit_x, fit_y, val_x, val_y, c_range=c_range, steps_per_decade=steps_per_decade, max_iter=max_iter
    )
    clf, converged = _fit(np.concatenate([fit_x, val_x]), np.concatenate([fit_y, val_y]), C, max_iter)
    scores = _full_scores(clf, test_x, num_classes)
    finite = np.where(np.isfinite(scores), scores, np.finfo(np.float64).min)
    metrics = classification_metrics(finite, test_y)
    metrics["C"] = C
    return LinearProbeResult(
        metrics=metrics, C=C, trials=trials, predictions=finite.argmax(axis=1), scores=scores, converged=converged
    )


def evaluate_linear_probe(
    model,
    train_images: Sequence,
    train_labels: Sequence,
    test_images: Sequence,
    test_labels: Sequence,
    *,
    batch_size: int = 64,
    device: str = "cpu",
    **probe_kwargs,
):
    """Linear probe of in-memory images, in this process (no Ray); returns an `EvalResult`.

    Labels: class indices or names (classes = sorted distinct labels of both splits). Images that
    fail to decode are skipped and counted. `probe_kwargs` go to `linear_probe`.
    """
    from evaluation.classification import confusion_matrix
    from evaluation.datasets import resolve_classes
    from evaluation.embed import ImageEmbedder, embed_local, iter_slices
    from evaluation.results import EvalResult, skipped_summary

    classnames, idx, _ = resolve_classes(list(train_labels) + list(test_labels), need_names=False)
    was_training = model.training
    try:
        embedder = ImageEmbedder(model, device=device)
        outs = [
            embed_local(embedder, iter_slices({"image": imgs, "key": np.arange(len(imgs)).astype(str)}, batch_size))
            for imgs in (train_images, test_images)
        ]
    finally:
        model.train(was_training)
    ys = [idx[: len(train_images)], idx[len(train_images) :]]
    (trx, try_), (tex, tey) = [(o["image_features"][o["ok"]], y[o["ok"]]) for o, y in zip(outs, ys)]
    probe = linear_probe(trx, try_, tex, tey, num_classes=len(classnames), **probe_kwargs)
    bad = ~outs[1]["ok"]
    return EvalResult(
        task="linear_probe",
        metrics=probe.metrics,
        num_samples=len(tey),
        skipped=skipped_summary(list(outs[1]["key"][bad]), list(outs[1]["error"][bad])),
        details={"num_train": len(try_), "C_search": [vars(t) for t in probe.trials]},
        confusion=confusion_matrix(tey, probe.predictions, len(classnames)),
        classnames=classnames,
    )
