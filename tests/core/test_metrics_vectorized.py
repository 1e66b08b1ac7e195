import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core.metrics.classification import (
    METRICS,
    auc,
    binary_metrics,
    confusion_counts,
    metrics_from_counts,
    weighted_auc,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(3)
    truth = (rng.random(80) < 0.4).astype(int)
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * truth, 0.2), 0, 1), 1)  # rounded: many ties
    decisions = np.column_stack([scores >= 0.5, rng.random(80) < 0.4, np.zeros(80, bool)]).astype(int)
    weights = rng.integers(0, 4, (25, 80)).astype(float)
    return truth, scores, decisions, weights


def test_counts_and_metrics_match_binary_metrics_on_replicated_cases(data):
    truth, _, decisions, weights = data
    counts = confusion_counts(truth, decisions, weights)
    metrics = metrics_from_counts(**counts)
    assert counts["tp"].shape == (25, 3)
    for row, w in enumerate(weights.astype(int)):
        for column in range(3):
            expected = binary_metrics(np.repeat(truth, w), np.repeat(decisions[:, column], w), 0.5)
            for key in ("tp", "fp", "tn", "fn"):
                assert counts[key][row, column] == expected[key]
            for metric in METRICS:
                np.testing.assert_equal(metrics[metric][row, column], expected[metric])


def test_unweighted_and_single_rater_shapes_and_undefined_ratios(data):
    truth, _, decisions, _ = data
    counts = confusion_counts(truth, decisions[:, 0])
    assert np.ndim(counts["tp"]) == 0
    assert {k: int(v) for k, v in counts.items()} == {
        k: v for k, v in binary_metrics(truth, decisions[:, 0], 0.5).items() if k in counts
    }
    never_positive = metrics_from_counts(**confusion_counts(truth, decisions))
    assert np.isnan(never_positive["ppv"][2]) and never_positive["specificity"][2] == 1.0
    assert np.isnan(metrics_from_counts(0, 0, 0, 0)["accuracy"])


def test_weighted_auc_matches_sklearn_with_ties_and_weights(data):
    truth, scores, _, weights = data
    aucs = weighted_auc(truth, scores, weights)
    assert aucs.shape == (25,)
    for row, w in zip(aucs, weights, strict=True):
        assert row == pytest.approx(roc_auc_score(truth, scores, sample_weight=w), abs=1e-12)
        assert row == pytest.approx(auc(np.repeat(truth, w.astype(int)), np.repeat(scores, w.astype(int))), abs=1e-12)
    assert weighted_auc(truth, scores) == pytest.approx(auc(truth, scores), abs=1e-12)


def test_weighted_auc_is_nan_without_one_class():
    truth = np.array([1, 1, 0, 0])
    weights = np.array([[1.0, 2.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    aucs = weighted_auc(truth, np.array([0.9, 0.3, 0.3, 0.1]), weights)
    assert np.isnan(aucs[0]) and aucs[1] == 1.0
    assert weighted_auc(truth, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
