import math
import time

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import roc_auc_score

from core.metrics.classification import METRICS, binary_metrics
from core.stats.compare import (
    READERS_MEAN,
    bootstrap_ci,
    bootstrap_counts,
    bootstrap_indices,
    compare_model_with_readers,
    delong_test,
    error_analysis,
    mcnemar_exact,
    paired_permutation_test,
    rater_metrics,
    swap_masks,
)
from core.stats.thresholds import choose_threshold


def study(n: int, readers: int = 3, seed: int = 0, accuracy: float = 0.85):
    rng = np.random.default_rng(seed)
    truth = (rng.random(n) < 0.6).astype(int)
    scores = np.clip(rng.normal(0.35 + 0.35 * truth, 0.2), 0, 1)
    labels = {f"r{i}": np.where(rng.random(n) < accuracy, truth, 1 - truth) for i in range(readers)}
    return truth, scores, labels


# Straightforward per-resample / per-permutation loops, the reference for the vectorized code.


def finite_percentiles(values, level=0.95):
    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    tail = 50 * (1 - level)
    return np.percentile(values, [tail, 100 - tail]) if values.size else np.array([np.nan, np.nan])


def loop_p_value(observed, permuted):
    permuted = np.asarray(permuted)[np.isfinite(permuted)]
    if not np.isfinite(observed):
        return math.nan
    return (1 + sum(abs(d) >= abs(observed) - 1e-9 for d in permuted)) / (1 + len(permuted))


def loop_compare(truth, scores, threshold, readers, ratings, resamples, permutations, seed):
    boot_rng, perm_rng = np.random.default_rng(seed).spawn(2)
    indices = bootstrap_indices(truth, resamples, boot_rng)
    masks = swap_masks(truth.size, permutations, perm_rng)
    model = (scores >= threshold).astype(int)
    raters = {"model": model, **readers}
    boot = {name: {m: [] for m in METRICS} for name in raters}
    boot_auc = {name: [] for name in ["model", *ratings]}
    for rows in indices:
        for name, decisions in raters.items():
            result = binary_metrics(truth[rows], decisions[rows], 0.5)
            for metric in METRICS:
                boot[name][metric].append(result[metric])
        boot_auc["model"].append(roc_auc_score(truth[rows], scores[rows]))
        for name, values in ratings.items():
            boot_auc[name].append(roc_auc_score(truth[rows], values[rows]))
    perm = {name: {m: [] for m in METRICS} for name in readers}
    for mask in masks:
        for name, decisions in readers.items():
            a = binary_metrics(truth, np.where(mask, decisions, model), 0.5)
            b = binary_metrics(truth, np.where(mask, model, decisions), 0.5)
            for metric in METRICS:
                perm[name][metric].append(a[metric] - b[metric])
    out = {"ci": {}, "auc_ci": {}, "diff_ci": {}, "p": {}}
    for name in raters:
        for metric in METRICS:
            out["ci"][name, metric] = finite_percentiles(boot[name][metric])
    for name, values in boot_auc.items():
        out["auc_ci"][name] = finite_percentiles(values)
    point = {name: binary_metrics(truth, d, 0.5) for name, d in raters.items()}
    for metric in METRICS:
        reader_boot = np.array([boot[name][metric] for name in readers])
        out["ci"][READERS_MEAN, metric] = finite_percentiles(reader_boot.mean(axis=0))
        for name in readers:
            diff = np.array(boot["model"][metric]) - np.array(boot[name][metric])
            out["diff_ci"][name, metric] = finite_percentiles(diff)
            observed = point["model"][metric] - point[name][metric]
            out["p"][name, metric] = loop_p_value(observed, perm[name][metric])
        mean_diff = np.array(boot["model"][metric]) - reader_boot.mean(axis=0)
        out["diff_ci"][READERS_MEAN, metric] = finite_percentiles(mean_diff)
        observed = point["model"][metric] - np.mean([point[name][metric] for name in readers])
        permuted = np.mean([perm[name][metric] for name in readers], axis=0)
        out["p"][READERS_MEAN, metric] = loop_p_value(observed, permuted)
    return out


def assert_matches_loop(result, reference):
    raters = result["raters"]
    for (name, metric), interval in reference["ci"].items():
        np.testing.assert_allclose(raters[name][metric]["ci"], interval, atol=1e-12)
    for name, interval in reference["auc_ci"].items():
        np.testing.assert_allclose(raters[name]["auc"]["ci"], interval, atol=1e-12)
    rows = {(row["b"], row["metric"]): row for row in result["comparisons"]}
    for key, interval in reference["diff_ci"].items():
        np.testing.assert_allclose(rows[key]["ci"], interval, atol=1e-12)
        np.testing.assert_equal(rows[key]["p_value"], reference["p"][key])


def direct_delong(truth, a, b):
    """DeLong et al. 1988 with the O(m n) kernel psi(x, y) = [x > y] + 0.5 [x = y]."""
    components = []
    for s in (a, b):
        x, y = s[truth == 1], s[truth == 0]
        psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])
        components.append((psi.mean(), psi.mean(axis=1), psi.mean(axis=0)))
    m, n = (truth == 1).sum(), (truth == 0).sum()
    s10 = np.cov([components[0][1], components[1][1]])
    s01 = np.cov([components[0][2], components[1][2]])
    covariance = s10 / m + s01 / n
    difference = components[0][0] - components[1][0]
    se = np.sqrt(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    return components[0][0], components[1][0], difference, se, 2 * norm.sf(abs(difference / se))


def test_bootstrap_indices_are_stratified_and_seeded():
    truth = np.array([1, 0, 0, 1, 0, 1, 1, 0, 0, 0])
    indices = bootstrap_indices(truth, 200, 7)
    assert indices.shape == (200, 10)
    assert (truth[indices] == truth).all()  # every position draws within its own class
    assert np.array_equal(indices, bootstrap_indices(truth, 200, 7))
    assert not np.array_equal(indices, bootstrap_indices(truth, 200, 8))
    assert len(np.unique(indices[:, 0])) == 4  # position 0 draws among all four positives
    free = bootstrap_indices(truth, 200, 7, stratify=False)
    assert (truth[free].sum(axis=1) != truth.sum()).any()


def test_bootstrap_counts_match_bincount_per_row():
    indices = bootstrap_indices(np.r_[np.ones(30, int), np.zeros(20, int)], 40, 1)
    counts = bootstrap_counts(indices, 50)
    assert counts.shape == (40, 50) and (counts.sum(axis=1) == 50).all()
    for row, rows in zip(counts, indices, strict=True):
        assert np.array_equal(row, np.bincount(rows, minlength=50))


def test_rater_metrics_on_counts_match_metrics_of_resampled_cases():
    truth, scores, labels = study(120, seed=2)
    decisions = np.column_stack([(scores >= 0.5).astype(int), *labels.values()])
    indices = bootstrap_indices(truth, 30, 3)
    resampled = rater_metrics(truth, decisions, bootstrap_counts(indices, truth.size))
    for b, rows in enumerate(indices):
        for column in range(decisions.shape[1]):
            expected = binary_metrics(truth[rows], decisions[rows, column], 0.5)
            for metric in METRICS:
                assert resampled[metric][b, column] == pytest.approx(expected[metric], abs=1e-12)


def test_bootstrap_ci_is_the_percentile_interval_of_finite_resamples():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(1000, 3))
    samples[:100, 1] = np.nan
    samples[:, 2] = np.nan
    interval = bootstrap_ci(samples, 0.9)
    np.testing.assert_allclose(interval[0], np.percentile(samples[:, 0], [5, 95]))
    np.testing.assert_allclose(interval[1], np.percentile(samples[100:, 1], [5, 95]))
    assert np.isnan(interval[2]).all()
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci(samples, 1.5)


def test_bootstrap_ci_covers_a_known_sensitivity_about_95_percent_of_the_time():
    rng = np.random.default_rng(11)
    true_sensitivity, covered, studies = 0.8, 0, 300
    truth = np.r_[np.ones(100, int), np.zeros(50, int)]
    for seed in range(studies):
        decisions = np.r_[rng.random(100) < true_sensitivity, rng.random(50) < 0.1].astype(int)
        weights = bootstrap_counts(bootstrap_indices(truth, 500, seed), truth.size)
        low, high = bootstrap_ci(rater_metrics(truth, decisions, weights)["sensitivity"])
        covered += low <= true_sensitivity <= high
    assert 0.90 <= covered / studies <= 0.985


def test_paired_permutation_test_matches_a_loop_with_the_same_swaps():
    truth, scores, labels = study(90, seed=4)
    model = (scores >= 0.5).astype(int)
    reader = labels["r0"]
    masks = swap_masks(truth.size, 400, 5)
    for metric in ("sensitivity", "ppv", "f1"):
        result = paired_permutation_test(truth, model, reader, metric, permutations=400, seed=5)
        observed = binary_metrics(truth, model, 0.5)[metric] - binary_metrics(truth, reader, 0.5)[metric]
        permuted = [
            binary_metrics(truth, np.where(m, reader, model), 0.5)[metric]
            - binary_metrics(truth, np.where(m, model, reader), 0.5)[metric]
            for m in masks
        ]
        assert result["difference"] == pytest.approx(observed)
        assert result["p_value"] == loop_p_value(observed, permuted)


def test_permutation_p_values_identical_raters_different_raters_and_bounds():
    truth, scores, labels = study(200, seed=6)
    reader = labels["r0"]
    same = paired_permutation_test(truth, reader, reader.copy(), "accuracy", permutations=999)
    assert same == {"difference": 0.0, "p_value": 1.0, "permutations": 999}
    flipped = paired_permutation_test(truth, truth, 1 - truth, "accuracy", permutations=999)
    assert flipped["difference"] == 1.0 and flipped["p_value"] == pytest.approx(1 / 1000)
    both = np.column_stack([labels["r1"], labels["r2"]])
    mean = paired_permutation_test(truth, (scores >= 0.5).astype(int), both, "specificity", permutations=999)
    assert 1 / 1000 <= mean["p_value"] <= 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        paired_permutation_test(truth, reader, reader, "auc")


def test_permutation_p_values_hold_their_size_under_the_null():
    rng = np.random.default_rng(12)
    truth = np.r_[np.ones(60, int), np.zeros(60, int)]
    p_values = []
    for seed in range(300):
        a, b = np.where(rng.random((2, 120)) < 0.8, truth, 1 - truth)
        p_values.append(paired_permutation_test(truth, a, b, "accuracy", permutations=500, seed=seed)["p_value"])
    assert 0.01 <= np.mean(np.array(p_values) <= 0.05) <= 0.09


def test_mcnemar_exact_matches_scipy_binomtest():
    rng = np.random.default_rng(8)
    for _ in range(30):
        a, b = rng.random((2, int(rng.integers(5, 60)))) < rng.uniform(0.3, 0.95, 2)[:, None]
        result = mcnemar_exact(a, b)
        assert (result.a_only, result.b_only) == ((a & ~b).sum(), (b & ~a).sum())
        expected = binomtest(result.a_only, result.a_only + result.b_only, 0.5).pvalue
        assert result.p_value == pytest.approx(expected, rel=1e-10)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]).p_value == 1.0
    assert mcnemar_exact(np.ones(6), np.zeros(6)) == (6, 0, pytest.approx(2 / 64))


def test_delong_matches_the_direct_quadratic_form_with_ties():
    rng = np.random.default_rng(9)
    truth = (rng.random(150) < 0.45).astype(int)
    a = rng.normal(truth * 1.2, 1.0)
    b = np.clip(np.round(2 + truth + rng.normal(0, 1.0, 150)), 1, 5)  # 1-5 ratings: heavy ties
    test = delong_test(truth, a, b)
    auc_a, auc_b, difference, se, p_value = direct_delong(truth, a, b)
    assert test.auc_a == pytest.approx(roc_auc_score(truth, a)) == pytest.approx(auc_a)
    assert test.auc_b == pytest.approx(roc_auc_score(truth, b)) == pytest.approx(auc_b)
    assert (test.difference, test.se, test.p_value) == pytest.approx((difference, se, p_value), rel=1e-10)
    assert test.z == pytest.approx(difference / se)
    assert test.ci == pytest.approx((difference - 1.959964 * se, difference + 1.959964 * se), rel=1e-6)
    same = delong_test(truth, a, 2 * a + 1)  # the same ranking: no difference and no variance
    assert (same.difference, same.z, same.p_value) == (0.0, 0.0, 1.0)


def test_error_analysis_counts_by_hand():
    truth = np.array([1, 1, 1, 0, 0, 0])
    model = np.array([1, 1, 0, 0, 0, 1])
    result = error_analysis(truth, model, {"a": [0, 0, 1, 1, 0, 1], "b": truth.copy(), 7: [1, 1, 0, 0, 0, 1]})
    # reader a misses cases 0, 1, 3 and 5; the model gets 0, 1 and 3 right
    assert result["per_reader"]["a"] == {"errors": 4, "corrected_by_model": 3, "fraction": 0.75}
    assert result["per_reader"]["b"]["errors"] == 0 and math.isnan(result["per_reader"]["b"]["fraction"])
    assert result["per_reader"]["7"] == {"errors": 2, "corrected_by_model": 0, "fraction": 0.0}
    assert result["pooled"] == {"errors": 6, "corrected_by_model": 3, "fraction": 0.5}


def test_compare_matches_loop_reference_with_an_undefined_ppv_and_ratings():
    truth, scores, labels = study(70, readers=2, seed=10)
    labels["silent"] = np.zeros(70, int)  # never calls positive: PPV undefined
    rng = np.random.default_rng(1)
    ratings = {"r0": np.clip(np.round(1 + 3 * labels["r0"] + rng.normal(0, 1, 70)), 1, 5)}
    result = compare_model_with_readers(
        truth, scores, 0.5, labels, reader_ratings=ratings, resamples=150, permutations=300, seed=3
    )
    reference = loop_compare(truth, scores, 0.5, labels, ratings, 150, 300, 3)
    assert_matches_loop(result, reference)
    assert math.isnan(result["raters"]["silent"]["ppv"]["estimate"])
    assert np.isnan(result["raters"]["silent"]["ppv"]["ci"]).all()
    assert math.isnan(result["raters"][READERS_MEAN]["ppv"]["estimate"])
    rows = {(row["b"], row["metric"]): row for row in result["comparisons"]}
    assert math.isnan(rows["silent", "ppv"]["p_value"])
    assert (
        rows["silent", "specificity"]["mcnemar_p"]
        == mcnemar_exact(scores[truth == 0] < 0.5, np.ones((truth == 0).sum(), bool)).p_value
    )


def test_compare_result_shape_and_threshold_report():
    truth, scores, labels = study(120, seed=13)
    ratings = {"r1": labels["r1"] * 2 + np.round(scores * 3)}
    validation = choose_threshold(*study(200, seed=14)[:2], "youden")
    result = compare_model_with_readers(
        truth, scores, validation, labels, reader_ratings=ratings, resamples=100, permutations=200
    )
    assert result["threshold"] == {
        "value": validation.value,
        "policy": "youden",
        "description": "maximal Youden index on validation",
        "chosen_on_evaluated_cases": False,
    }
    assert (result["n_cases"], result["n_positive"] + result["n_negative"]) == (120, 120)
    assert set(result["raters"]) == {"model", "r0", "r1", "r2", READERS_MEAN}
    for rater in result["raters"].values():
        for metric in METRICS:
            low, high = rater[metric]["ci"]
            assert low <= rater[metric]["estimate"] <= high
    model = result["raters"]["model"]
    assert model["auc"]["estimate"] == pytest.approx(roc_auc_score(truth, scores))
    assert model["counts"] == {
        k: v for k, v in binary_metrics(truth, scores, validation.value).items() if k in ("tp", "fp", "tn", "fn")
    }
    roc = model["roc"]
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0, 0, 1, 1)
    assert roc["thresholds"][0] > scores.max() and all(map(math.isfinite, roc["thresholds"]))
    assert "auc" in result["raters"]["r1"] and "auc" not in result["raters"]["r0"]
    assert len(result["comparisons"]) == len(METRICS) * 4 + 1
    for row in result["comparisons"]:
        assert row["a"] == "model" and 0 < row["p_value"] <= 1
        assert set(row) >= {"b", "metric", "difference", "ci", "p_value", "method"}
        assert ("mcnemar_p" in row) == (row["metric"] in ("sensitivity", "specificity"))
        assert (row["mcnemar_p"] is None) == (row["b"] == READERS_MEAN) if "mcnemar_p" in row else True
    delong = [row for row in result["comparisons"] if row["metric"] == "auc"]
    assert [(row["b"], row["method"]) for row in delong] == [("r1", "DeLong")]
    assert set(result["error_analysis"]["per_reader"]) == {"r0", "r1", "r2"}
    chosen_here = compare_model_with_readers(truth, scores, "sens90", labels, resamples=10, permutations=10)
    assert chosen_here["threshold"]["chosen_on_evaluated_cases"] is True
    assert chosen_here["raters"]["model"]["sensitivity"]["estimate"] >= 0.9


def test_compare_is_reproducible_with_a_seed():
    truth, scores, labels = study(80, seed=15)
    first = compare_model_with_readers(truth, scores, 0.5, labels, resamples=50, permutations=50, seed=4)
    again = compare_model_with_readers(truth, scores, 0.5, labels, resamples=50, permutations=50, seed=4)
    other = compare_model_with_readers(truth, scores, 0.5, labels, resamples=50, permutations=50, seed=5)
    assert first["comparisons"] == again["comparisons"] and first["raters"]["r0"] == again["raters"]["r0"]
    assert first["raters"]["model"]["ppv"]["ci"] != other["raters"]["model"]["ppv"]["ci"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"truth": [1, 0, 2, 1, 0, 1]}, "truth must be 0/1"),
        ({"truth": [1, 1, 1, 1, 1, 1]}, "both positive and negative"),
        ({"truth": [[1, 0, 1, 0, 1, 0]]}, "1-D"),
        ({"model_scores": [0.1, 0.9, 0.2]}, "model_scores has shape"),
        ({"model_scores": [0.1, np.nan, 0.2, 0.8, 0.3, 0.9]}, "finite"),
        ({"reader_labels": {"a": [1, 0, 1]}}, "shape"),
        ({"reader_labels": {"a": [1, 0, 3, 0, 1, 0]}}, "must be 0/1 decisions"),
        ({"reader_labels": {}}, "at least one reader"),
        ({"reader_labels": {"model": [1, 0, 1, 0, 1, 0]}}, "reserved"),
        ({"reader_labels": {1: [1, 0, 1, 0, 1, 0], "1": [1, 0, 1, 0, 1, 0]}}, "distinct"),
        ({"reader_ratings": {"b": [1, 2, 3, 4, 5, 1]}}, "without labels"),
        ({"threshold": math.inf}, "threshold must be finite"),
        ({"resamples": 0}, "resamples must be a positive integer"),
        ({"permutations": 2.5}, "permutations must be a positive integer"),
    ],
)
def test_bad_input_is_refused(change, message):
    arguments = {
        "truth": [1, 0, 1, 0, 1, 0],
        "model_scores": [0.9, 0.2, 0.7, 0.4, 0.6, 0.1],
        "threshold": 0.5,
        "reader_labels": {"a": [1, 0, 0, 0, 1, 1]},
        "resamples": 10,
        "permutations": 10,
    }
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        compare_model_with_readers(**arguments)


def test_timing_608_cases_three_readers_against_the_loop(capsys):
    """A figure, not a pass/fail timing: the full comparison at the paper's size, vectorized vs the loop."""
    truth, scores, labels = study(608, seed=20)
    ratings = {"r0": np.clip(np.round(1 + 3 * labels["r0"] + np.random.default_rng(2).normal(0, 1, 608)), 1, 5)}
    compare_model_with_readers(truth, scores, 0.5, labels, resamples=10, permutations=10)
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        result = compare_model_with_readers(truth, scores, 0.5, labels, reader_ratings=ratings)
        runs.append(time.perf_counter() - start)
    start = time.perf_counter()
    reference = loop_compare(truth, scores, 0.5, labels, ratings, 1000, 10000, 0)
    loop = time.perf_counter() - start
    assert_matches_loop(result, reference)
    with capsys.disabled():
        print(
            f"\n608 cases, 3 readers, 1,000 resamples, 10,000 permutations: vectorized {min(runs) * 1e3:.0f} ms "
            f"(best of 3), loop {loop:.1f} s, ratio {loop / min(runs):.0f}x"
        )
