import numpy as np
import pytest

from core.metrics.classification import auc, binary_metrics
from core.stats.thresholds import choose_threshold


@pytest.fixture
def scores():
    rng = np.random.default_rng(0)
    truth = np.r_[np.ones(60, int), np.zeros(40, int)]
    return truth, np.clip(np.r_[rng.normal(0.7, 0.15, 60), rng.normal(0.4, 0.15, 40)], 0, 1)


def test_sens90_is_the_highest_threshold_reaching_the_target(scores):
    truth, s = scores
    chosen = choose_threshold(truth, s, "sens90")
    assert chosen.sensitivity >= 0.9
    higher = np.unique(s[s > chosen.value])
    assert all((s[truth == 1] >= t).mean() < 0.9 for t in higher)


def test_youden_and_closest_are_optimal_over_all_cut_points(scores):
    truth, s = scores

    def point(t):
        return (s[truth == 1] >= t).mean(), (s[truth == 0] < t).mean()

    cuts = np.unique(s)
    youden = choose_threshold(truth, s, "youden")
    assert youden.sensitivity + youden.specificity - 1 == pytest.approx(max(sum(point(t)) - 1 for t in cuts))
    closest = choose_threshold(truth, s, "closest")
    best = min((1 - se) ** 2 + (1 - sp) ** 2 for se, sp in map(point, cuts))
    assert (1 - closest.sensitivity) ** 2 + (1 - closest.specificity) ** 2 == pytest.approx(best)


def test_fixed_policy_and_bad_input():
    truth = np.array([0, 1, 1, 0])
    assert choose_threshold(truth, np.array([0.1, 0.8, 0.6, 0.3]), "fixed", value=0.5).sensitivity == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        choose_threshold(np.ones(3, int), np.array([0.2, 0.5, 0.9]))
    with pytest.raises(ValueError, match="unknown threshold policy"):
        choose_threshold(truth, np.array([0.1, 0.8, 0.6, 0.3]), "magic")


def test_binary_metrics_by_hand():
    truth = np.array([1, 1, 1, 0, 0])
    m = binary_metrics(truth, np.array([0.9, 0.6, 0.2, 0.7, 0.1]), 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(0.5)
    assert m["ppv"] == pytest.approx(2 / 3) and m["npv"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(0.6)
    assert np.isnan(auc(np.ones(3), np.array([0.1, 0.2, 0.3])))
