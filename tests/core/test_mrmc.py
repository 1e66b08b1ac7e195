"""MRMC OR analysis: the Van Dyke benchmark against the printed Iowa OR-DBM MRMC 2.51 output, the covariance
estimators against loop implementations and an exact enumeration, three modalities and binary decisions against a
loop reference of the OR formulas, refusals, and the model-vs-readers test (equivalence and size by simulation)."""

import json
import math
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.polynomial.hermite_e import hermegauss
from scipy import stats

from core.stats.mrmc import auc_covariance, model_vs_readers, mrmc_binary, mrmc_or

VANDYKE = Path(__file__).resolve().parents[1] / "data" / "vandyke.csv"  # a copy of ../shared/data/mrmc/


@pytest.fixture(scope="module")
def vandyke() -> pd.DataFrame:
    if not VANDYKE.exists():
        pytest.skip(f"Van Dyke benchmark not found at {VANDYKE}")
    return pd.read_csv(VANDYKE)


@pytest.fixture(scope="module")
def vd(vandyke):
    return mrmc_or(vandyke)


def _printed(value: float, text: str) -> None:
    """``value`` shows as ``text`` at the printed number of decimals."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    assert round(value, decimals) == float(text), f"{value!r} prints as {round(value, decimals)}, not {text}"


# Every figure of the Iowa output (VanDyke_ORDBM_2.51_output.txt); treatment 1/2 = modality 0/1, reader j = j - 1.
_AUCS = [
    ["0.91964573", "0.85877617", "0.90386473", "0.97310789", "0.82979066"],
    ["0.94782609", "0.90531401", "0.92173913", "0.99935588", "0.92995169"],
]
PRINTED = [(f"auc t{t} r{r}", lambda v, t=t, r=r: v.auc[t, r], _AUCS[t][r]) for t, r in product(range(2), range(5))]
PRINTED += [
    ("mean auc t0", lambda v: v.mean_auc[0], "0.89703704"),
    ("mean auc t1", lambda v: v.mean_auc[1], "0.94083736"),
    ("difference", lambda v: v.rrrc.comparisons[0].difference, "-0.04380032"),
    ("SS(T)", lambda v: v.components.ms_t * 1, "0.00479617"),
    ("SS(R)", lambda v: v.components.ms_r * 4, "0.01534480"),
    ("SS(T*R)", lambda v: v.components.ms_tr * 4, "0.00220412"),
    ("MS(R)", lambda v: v.components.ms_r, "0.00383620"),
    ("MS(T*R)", lambda v: v.components.ms_tr, "0.00055103"),
    ("MS(R) t0", lambda v: v.components.ms_r_by_modality[0], "0.00308263"),
    ("MS(R) t1", lambda v: v.components.ms_r_by_modality[1], "0.00130460"),
    ("Var(R)", lambda v: v.components.var_r, "0.00153500"),
    ("Var(T*R)", lambda v: v.components.var_tr, "0.00020040"),
    ("Cov1", lambda v: v.components.cov1, "0.00034661"),
    ("Cov2", lambda v: v.components.cov2, "0.00034407"),
    ("Cov3", lambda v: v.components.cov3, "0.00023903"),
    ("Var(Error)", lambda v: v.components.var, "0.00080229"),
    ("r1", lambda v: v.components.correlations[0], "0.43203138"),
    ("r2", lambda v: v.components.correlations[1], "0.42886683"),
    ("r3", lambda v: v.components.correlations[2], "0.29793328"),
    ("DBM Var(R)", lambda v: v.dbm_components()["var_r"], "0.00153500"),
    ("DBM Var(C)", lambda v: v.dbm_components()["var_c"], "0.02724923"),
    ("DBM Var(T*R)", lambda v: v.dbm_components()["var_tr"], "0.00020040"),
    ("DBM Var(T*C)", lambda v: v.dbm_components()["var_tc"], "0.01197530"),
    ("DBM Var(R*C)", lambda v: v.dbm_components()["var_rc"], "0.01226473"),
    ("DBM Var(T*R*C)+Var(Error)", lambda v: v.dbm_components()["var_trc_error"], "0.03997160"),
    # Analysis 1: random readers, random cases
    ("rrrc F", lambda v: v.rrrc.statistic, "4.46"),
    ("rrrc p", lambda v: v.rrrc.p_value, "0.0517"),
    ("rrrc ddf", lambda v: v.rrrc.ddf, "15.26"),
    ("rrrc error term", lambda v: v.rrrc.error_term, "0.00107626"),
    ("rrrc difference", lambda v: v.rrrc.comparisons[0].difference, "-0.04380"),
    ("rrrc se", lambda v: v.rrrc.comparisons[0].se, "0.02075"),
    ("rrrc df", lambda v: v.rrrc.comparisons[0].df, "15.26"),
    ("rrrc t", lambda v: v.rrrc.comparisons[0].statistic, "-2.11"),
    ("rrrc p(t)", lambda v: v.rrrc.comparisons[0].p_value, "0.0517"),
    ("rrrc ci low", lambda v: v.rrrc.comparisons[0].ci[0], "-0.08796"),
    ("rrrc ci high", lambda v: v.rrrc.comparisons[0].ci[1], "0.00036"),
    ("rrrc t0 se", lambda v: v.rrrc.modalities[0].se, "0.03317360"),
    ("rrrc t0 df", lambda v: v.rrrc.modalities[0].df, "12.74"),
    ("rrrc t0 ci low", lambda v: v.rrrc.modalities[0].ci[0], "0.82522360"),
    ("rrrc t0 ci high", lambda v: v.rrrc.modalities[0].ci[1], "0.96885048"),
    ("rrrc t0 Cov2", lambda v: v.components.cov2_by_modality[0], "0.00048396"),
    ("rrrc t1 se", lambda v: v.rrrc.modalities[1].se, "0.02156637"),
    ("rrrc t1 df", lambda v: v.rrrc.modalities[1].df, "12.71"),
    ("rrrc t1 ci low", lambda v: v.rrrc.modalities[1].ci[0], "0.89413783"),
    ("rrrc t1 ci high", lambda v: v.rrrc.modalities[1].ci[1], "0.98753689"),
    ("rrrc t1 Cov2", lambda v: v.components.cov2_by_modality[1], "0.00020419"),
    # Analysis 2: fixed readers, random cases
    ("frrc X2", lambda v: v.frrc.statistic, "5.47595"),
    ("frrc df", lambda v: v.frrc.ndf, "1"),
    ("frrc p", lambda v: v.frrc.p_value, "0.0193"),
    ("frrc se", lambda v: v.frrc.comparisons[0].se, "0.01872"),
    ("frrc z", lambda v: v.frrc.comparisons[0].statistic, "-2.34"),
    ("frrc p(z)", lambda v: v.frrc.comparisons[0].p_value, "0.0193"),
    ("frrc ci low", lambda v: v.frrc.comparisons[0].ci[0], "-0.08049"),
    ("frrc ci high", lambda v: v.frrc.comparisons[0].ci[1], "-0.00711"),
    ("frrc t0 se", lambda v: v.frrc.modalities[0].se, "0.02428971"),
    ("frrc t0 ci low", lambda v: v.frrc.modalities[0].ci[0], "0.84943008"),
    ("frrc t0 ci high", lambda v: v.frrc.modalities[0].ci[1], "0.94464399"),
    ("frrc t1 se", lambda v: v.frrc.modalities[1].se, "0.01677632"),
    ("frrc t1 ci low", lambda v: v.frrc.modalities[1].ci[0], "0.90795637"),
    ("frrc t1 ci high", lambda v: v.frrc.modalities[1].ci[1], "0.97371835"),
    ("frrc t0 Var(Error)", lambda v: v.components.var_by_modality[0], "0.00101410"),
    ("frrc t1 Var(Error)", lambda v: v.components.var_by_modality[1], "0.00059047"),
    # Analysis 3: random readers, fixed cases
    ("rrfc F", lambda v: v.rrfc.statistic, "8.70"),
    ("rrfc ddf", lambda v: v.rrfc.ddf, "4"),
    ("rrfc p", lambda v: v.rrfc.p_value, "0.0420"),
    ("rrfc error term", lambda v: v.rrfc.error_term, "0.00055103"),
    ("rrfc se", lambda v: v.rrfc.comparisons[0].se, "0.01485"),
    ("rrfc t", lambda v: v.rrfc.comparisons[0].statistic, "-2.95"),
    ("rrfc p(t)", lambda v: v.rrfc.comparisons[0].p_value, "0.0420"),
    ("rrfc ci low", lambda v: v.rrfc.comparisons[0].ci[0], "-0.08502"),
    ("rrfc ci high", lambda v: v.rrfc.comparisons[0].ci[1], "-0.00258"),
    ("rrfc t0 se", lambda v: v.rrfc.modalities[0].se, "0.02482994"),
    ("rrfc t0 df", lambda v: v.rrfc.modalities[0].df, "4"),
    ("rrfc t0 ci low", lambda v: v.rrfc.modalities[0].ci[0], "0.82809808"),
    ("rrfc t0 ci high", lambda v: v.rrfc.modalities[0].ci[1], "0.96597599"),
    ("rrfc t1 se", lambda v: v.rrfc.modalities[1].se, "0.01615303"),
    ("rrfc t1 ci low", lambda v: v.rrfc.modalities[1].ci[0], "0.89598936"),
    ("rrfc t1 ci high", lambda v: v.rrfc.modalities[1].ci[1], "0.98568536"),
]
# Analysis 2 (d): single-reader differences: difference, StdErr, z, p, CI, Var(Error), Cov1
_READERS = [
    ("-0.02818", "0.02551", "-1.10", "0.2693", "-0.07818", "0.02182", "0.00069890", "0.00037347"),
    ("-0.04654", "0.02630", "-1.77", "0.0768", "-0.09809", "0.00501", "0.00110605", "0.00076016"),
    ("-0.01787", "0.03121", "-0.57", "0.5668", "-0.07904", "0.04330", "0.00084234", "0.00035532"),
    ("-0.02625", "0.01729", "-1.52", "0.1290", "-0.06014", "0.00764", "0.00015058", "0.00000108"),
    ("-0.10016", "0.04406", "-2.27", "0.0230", "-0.18651", "-0.01381", "0.00121357", "0.00024304"),
]
for _r, _row in enumerate(_READERS):
    PRINTED += [
        (f"frrc reader {_r} {name}", lambda v, r=_r, get=get: get(v, r), text)
        for (name, get), text in zip(
            [
                ("difference", lambda v, r: v.frrc.readers[r].difference),
                ("se", lambda v, r: v.frrc.readers[r].se),
                ("z", lambda v, r: v.frrc.readers[r].statistic),
                ("p", lambda v, r: v.frrc.readers[r].p_value),
                ("ci low", lambda v, r: v.frrc.readers[r].ci[0]),
                ("ci high", lambda v, r: v.frrc.readers[r].ci[1]),
                ("Var(Error)", lambda v, r: v.components.var_by_reader[r]),
                ("Cov1", lambda v, r: v.components.cov1_by_reader[r]),
            ],
            _row,
            strict=True,
        )
    ]


@pytest.mark.parametrize(("name", "get", "text"), PRINTED, ids=[p[0] for p in PRINTED])
def test_vandyke_reproduces_the_iowa_output(vd, name, get, text):
    _printed(get(vd), text)


def test_vandyke_design_labels_and_report(vd, vandyke):
    assert (vd.n_normal, vd.n_abnormal, vd.modalities, vd.readers) == (69, 45, (0, 1), (0, 1, 2, 3, 4))
    assert [r.reader for r in vd.frrc.readers] == [0, 1, 2, 3, 4]
    report = json.loads(json.dumps(vd.to_dict(), allow_nan=False))
    assert report["auc"]["0"]["0"] == pytest.approx(0.91964573, abs=5e-9)
    assert report["mean_auc"]["1"] == pytest.approx(0.94083736, abs=5e-9)
    assert set(report["rrrc"]) >= {"difference", "se", "f", "ndf", "ddf", "p_value", "ci"}
    assert set(report["frrc"]) >= {"difference", "se", "chi2", "df", "p_value", "ci"}
    assert set(report["rrfc"]) >= {"difference", "se", "f", "ndf", "ddf", "p_value", "ci"}
    assert report["rrrc"]["ddf"] == pytest.approx(15.26, abs=0.005)
    # row order, label types and the array form do not matter
    shuffled = vandyke.sample(frac=1.0, random_state=3)
    shuffled = shuffled.assign(modality=shuffled["modality"].map({0: "cine", 1: "spin-echo"}))
    again = mrmc_or(shuffled)
    assert again.modalities == ("cine", "spin-echo")
    np.testing.assert_allclose(again.covariance, vd.covariance, rtol=1e-12, atol=1e-15)
    cube = vandyke.sort_values(["modality", "reader", "case"])["rating"].to_numpy().reshape(2, 5, 114)
    truth = vandyke.drop_duplicates("case").sort_values("case")["truth"].to_numpy()
    assert mrmc_or(cube, truth).rrrc.p_value == pytest.approx(vd.rrrc.p_value, rel=1e-12)
    with pytest.raises(AttributeError, match="use .fom"):
        _ = mrmc_binary(vandyke, threshold=3).auc


# Loop implementations, written from the papers' definitions, for small data.
def _psi(x: float, y: float) -> float:
    return 1.0 if y > x else 0.5 if y == x else 0.0


def _loop_auc(ratings, truth) -> float:
    neg = [x for x, d in zip(ratings, truth, strict=True) if d == 0]
    pos = [y for y, d in zip(ratings, truth, strict=True) if d == 1]
    return sum(_psi(x, y) for x in neg for y in pos) / (len(neg) * len(pos))


def _loop_jackknife(ratings, truth) -> np.ndarray:
    g, k = ratings.shape
    deleted = np.array([[_loop_auc(np.delete(row, i), np.delete(truth, i)) for i in range(k)] for row in ratings])
    out = np.zeros((g, g))
    for a, b in product(range(g), range(g)):
        ma, mb = deleted[a].mean(), deleted[b].mean()
        out[a, b] = (k - 1) / k * sum((deleted[a, i] - ma) * (deleted[b, i] - mb) for i in range(k))
    return out


def _loop_delong(ratings, truth) -> np.ndarray:
    g = ratings.shape[0]
    neg, pos = np.flatnonzero(truth == 0), np.flatnonzero(truth == 1)
    v10 = [[np.mean([_psi(ratings[a, i], ratings[a, j]) for i in neg]) for j in pos] for a in range(g)]
    v01 = [[np.mean([_psi(ratings[a, i], ratings[a, j]) for j in pos]) for i in neg] for a in range(g)]
    auc = [_loop_auc(row, truth) for row in ratings]
    out = np.zeros((g, g))
    for a, b in product(range(g), range(g)):
        s10 = sum((v10[a][j] - auc[a]) * (v10[b][j] - auc[b]) for j in range(len(pos))) / (len(pos) - 1)
        s01 = sum((v01[a][i] - auc[a]) * (v01[b][i] - auc[b]) for i in range(len(neg))) / (len(neg) - 1)
        out[a, b] = s10 / len(pos) + s01 / len(neg)
    return out


def _loop_unbiased(ratings, truth) -> np.ndarray:
    """E[AUC_a AUC_b] - mu_a mu_b with every moment replaced by its U-statistic over distinct case indices."""
    g = ratings.shape[0]
    neg, pos = np.flatnonzero(truth == 0), np.flatnonzero(truth == 1)
    k0, k1 = len(neg), len(pos)
    out = np.zeros((g, g))
    for a, b in product(range(g), range(g)):
        sums = {"both": [], "normal": [], "abnormal": [], "neither": []}
        for i, i2, j, j2 in product(neg, neg, pos, pos):
            kind = {(True, True): "both", (True, False): "normal", (False, True): "abnormal"}.get(
                (i == i2, j == j2), "neither"
            )
            sums[kind].append(_psi(ratings[a, i], ratings[a, j]) * _psi(ratings[b, i2], ratings[b, j2]))
        m = {kind: np.mean(values) for kind, values in sums.items()}
        moment = (
            m["both"] + (k1 - 1) * m["normal"] + (k0 - 1) * m["abnormal"] + (k0 - 1) * (k1 - 1) * m["neither"]
        ) / (k0 * k1)
        out[a, b] = moment - m["neither"]
    return out


@pytest.fixture
def small():
    """4 raters x 13 cases (6 normal, 7 abnormal) of 1-5 ratings, with ties and correlated raters."""
    rng = np.random.default_rng(11)
    truth = np.array([0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1])
    latent = rng.normal(size=13) + 1.2 * truth
    ratings = np.clip(np.round(latent + rng.normal(scale=0.8, size=(4, 13)) + 3), 1, 5)
    return ratings, truth


@pytest.mark.parametrize(
    ("method", "reference"), [("jackknife", _loop_jackknife), ("delong", _loop_delong), ("unbiased", _loop_unbiased)]
)
def test_covariance_estimators_match_loop_implementations(small, method, reference):
    ratings, truth = small
    auc, cov = auc_covariance(ratings, truth, method)
    np.testing.assert_allclose(auc, [_loop_auc(row, truth) for row in ratings], rtol=0, atol=1e-14)
    np.testing.assert_allclose(cov, reference(ratings, truth), rtol=1e-10, atol=1e-15)


def test_unbiased_estimator_is_exactly_unbiased_and_the_others_are_not():
    """Draw 3 normal and 2 abnormal cases with replacement from a tiny population (i.i.d. draws): averaged over all
    4^3 x 3^2 equally likely samples, the unbiased estimate equals the exact covariance of the two AUCs."""
    normals = np.array([[1.0, 2.0, 2.0, 4.0], [2.0, 1.0, 3.0, 3.0]])  # two raters x 4 normal cases
    abnormals = np.array([[2.0, 3.0, 5.0], [3.0, 4.0, 2.0]])
    truth = np.array([0, 0, 0, 1, 1])
    aucs, estimates = [], {m: [] for m in ("jackknife", "delong", "unbiased")}
    for i in product(range(4), repeat=3):
        for j in product(range(3), repeat=2):
            sample = np.hstack([normals[:, list(i)], abnormals[:, list(j)]])
            for method, store in estimates.items():
                auc, cov = auc_covariance(sample, truth, method)
                store.append(cov)
            aucs.append(auc)
    exact = np.cov(np.array(aucs).T, ddof=0)
    np.testing.assert_allclose(np.mean(estimates["unbiased"], axis=0), exact, rtol=1e-12, atol=1e-15)
    for method in ("jackknife", "delong"):
        assert np.all(np.diag(np.mean(estimates[method], axis=0)) > np.diag(exact) * 1.05)


def _reference_or(fom: np.ndarray, cov: np.ndarray, alpha: float = 0.05) -> dict:
    """The Iowa output's printed formulas, by loops over the T x R table."""
    t, r = fom.shape
    c = cov.reshape(t, r, t, r)
    cells = list(product(range(t), range(r)))
    groups = {"var": [], "cov1": [], "cov2": [], "cov3": []}
    for (t1, r1), (t2, r2) in product(cells, cells):
        key = {(True, True): "var", (False, True): "cov1", (True, False): "cov2"}.get((t1 == t2, r1 == r2), "cov3")
        groups[key].append(c[t1, r1, t2, r2])
    var, cov1, cov2, cov3 = (np.mean(groups[k]) for k in ("var", "cov1", "cov2", "cov3"))
    grand = np.mean(fom)
    mt = [np.mean(fom[i]) for i in range(t)]
    mr = [np.mean(fom[:, j]) for j in range(r)]
    ms_t = r * sum((m - grand) ** 2 for m in mt) / (t - 1)
    ms_tr = sum((fom[i, j] - mt[i] - mr[j] + grand) ** 2 for i, j in cells) / ((t - 1) * (r - 1))
    error = ms_tr + r * max(cov2 - cov3, 0)
    ddf = error**2 / (ms_tr**2 / ((t - 1) * (r - 1)))
    fixed = var - cov1 + (r - 1) * max(cov2 - cov3, 0)
    return {
        "var": var,
        "cov1": cov1,
        "cov2": cov2,
        "cov3": cov3,
        "rrrc": (ms_t / error, ddf, stats.f.sf(ms_t / error, t - 1, ddf)),
        "rrrc_se": math.sqrt(2 / r * error),
        "frrc": ((t - 1) * ms_t / fixed, stats.chi2.sf((t - 1) * ms_t / fixed, t - 1)),
        "frrc_se": math.sqrt(2 / r * fixed),
        "rrfc": (ms_t / ms_tr, stats.f.sf(ms_t / ms_tr, t - 1, (t - 1) * (r - 1))),
        "pairs": [(a, b, mt[a] - mt[b]) for a in range(t) for b in range(a + 1, t)],
    }


def _check_against_reference(result, reference) -> None:
    c = result.components
    np.testing.assert_allclose([c.var, c.cov1, c.cov2, c.cov3], [reference[k] for k in ("var", "cov1", "cov2", "cov3")])
    np.testing.assert_allclose([result.rrrc.statistic, result.rrrc.ddf, result.rrrc.p_value], reference["rrrc"])
    np.testing.assert_allclose([result.frrc.statistic, result.frrc.p_value], reference["frrc"])
    np.testing.assert_allclose([result.rrfc.statistic, result.rrfc.p_value], reference["rrfc"])
    pairs = [(result.modalities.index(x.first), result.modalities.index(x.second)) for x in result.rrrc.comparisons]
    assert pairs == [(a, b) for a, b, _ in reference["pairs"]]
    np.testing.assert_allclose([x.difference for x in result.rrrc.comparisons], [d for *_, d in reference["pairs"]])
    for x in result.rrrc.comparisons:
        assert x.se == pytest.approx(reference["rrrc_se"])
        half = stats.t.ppf(0.975, reference["rrrc"][1]) * reference["rrrc_se"]
        assert x.ci == pytest.approx((x.difference - half, x.difference + half))
    for x in result.frrc.comparisons:
        assert x.se == pytest.approx(reference["frrc_se"])


def _long(cube: np.ndarray, truth: np.ndarray, modalities=("a", "b", "c")) -> pd.DataFrame:
    t, r, k = cube.shape
    rows = [
        {"reader": f"R{j}", "modality": modalities[i], "case": 100 + c, "truth": truth[c], "rating": cube[i, j, c]}
        for i, j, c in product(range(t), range(r), range(k))
    ]
    return pd.DataFrame(rows)


def test_three_modalities_global_tests_and_pairs_match_the_loop_reference():
    rng = np.random.default_rng(5)
    truth = rng.permutation(np.r_[np.zeros(9, int), np.ones(8, int)])
    latent = rng.normal(size=17) + truth * np.array([[0.8], [1.3], [1.8]])[:, None]
    cube = np.clip(np.round(latent + rng.normal(scale=0.7, size=(3, 4, 17)) + 3), 1, 5)
    result = mrmc_or(_long(cube, truth))
    assert result.modalities == ("a", "b", "c") and len(result.rrrc.comparisons) == 3
    assert len(result.frrc.readers) == 4 * 3
    flat = cube.reshape(12, 17)
    fom = np.array([_loop_auc(row, truth) for row in flat]).reshape(3, 4)
    np.testing.assert_allclose(result.auc, fom)
    _check_against_reference(result, _reference_or(fom, _loop_jackknife(flat, truth)))
    report = result.to_dict()
    assert "difference" not in report["rrrc"] and len(report["rrrc"]["comparisons"]) == 3


@pytest.mark.parametrize("fom", ["sensitivity", "specificity"])
def test_binary_mrmc_matches_the_loop_reference(fom):
    rng = np.random.default_rng(8)
    truth = rng.permutation(np.r_[np.zeros(15, int), np.ones(12, int)])
    scores = rng.normal(size=27) + truth + rng.normal(scale=0.8, size=(2, 3, 27))
    decisions = (scores > 0.5).astype(float)
    result = mrmc_binary(_long(decisions, truth, ("x", "y")), fom=fom)
    assert result.figure_of_merit == fom and set(result.to_dict()) >= {fom, f"mean_{fom}", "rrrc"}
    keep = truth == (1 if fom == "sensitivity" else 0)
    hits = (decisions if fom == "sensitivity" else 1 - decisions)[..., keep].reshape(6, -1)
    n = hits.shape[1]
    value = np.array([sum(row) / n for row in hits])
    deleted = np.array([[(sum(row) - row[i]) / (n - 1) for i in range(n)] for row in hits])
    dev = deleted - deleted.mean(axis=1, keepdims=True)
    jackknife = (n - 1) / n * dev @ dev.T
    np.testing.assert_allclose(result.fom, value.reshape(2, 3))
    np.testing.assert_allclose(result.covariance, jackknife, atol=1e-15)
    np.testing.assert_allclose(result.covariance, np.cov(hits) / n, atol=1e-15)  # = DeLong = unbiased for a share
    _check_against_reference(result, _reference_or(value.reshape(2, 3), jackknife))
    by_threshold = mrmc_binary(_long(scores, truth, ("x", "y")), fom=fom, threshold=0.5 + 1e-12)
    np.testing.assert_allclose(by_threshold.fom, result.fom)


def _valid() -> pd.DataFrame:
    truth = np.array([0, 1, 0, 1, 1, 0])
    cube = np.arange(2 * 3 * 6, dtype=float).reshape(2, 3, 6) % 5
    return _long(cube, truth, ("a", "b"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d.drop(index=d.index[(d.reader == "R1") & (d.case == 103) & (d.modality == "b")]),
            "reader R1 has no rating for case 103 in modality b",
        ),
        (lambda d: d.assign(rating=d.rating.where(d.index != 4)), "reader R0 has no rating for case 104 in modality a"),
        (lambda d: pd.concat([d, d.iloc[[7]]]), "reader R1 rated case 101 more than once in modality a"),
        (lambda d: d.assign(truth=np.where(d.index == 8, 1, d.truth)), r"case 102 has conflicting truth \(0 and 1\)"),
        (lambda d: d.assign(truth=d.truth * 2), "truth must be 0 or 1; case 101 has 2"),
        (lambda d: d.assign(truth=np.where(d.case.isin([101, 103]), 0, d.truth)), "at least two diseased and two"),
        (lambda d: d[d.modality == "a"], "at least two modalities"),
        (lambda d: d[d.reader == "R0"], "at least two readers"),
        (lambda d: d.drop(columns="truth"), "missing truth"),
        (lambda d: d.assign(rating=d.rating.astype(object).where(d.index != 2, "high")), "rating must be numeric"),
    ],
)
def test_refusals_name_what_is_wrong(edit, message):
    with pytest.raises(ValueError, match=message):
        mrmc_or(edit(_valid()))


def test_refusals_of_options_and_arrays():
    data = _valid()
    with pytest.raises(ValueError, match="unknown covariance method 'bootstrap'"):
        mrmc_or(data, cov="bootstrap")
    with pytest.raises(ValueError, match="alpha must lie between 0 and 1"):
        mrmc_or(data, alpha=5)
    with pytest.raises(ValueError, match="binary MRMC needs 0/1 decisions"):
        mrmc_binary(data)
    with pytest.raises(ValueError, match="unknown binary figure of merit 'ppv'"):
        mrmc_binary(data, fom="ppv", threshold=2)
    cube = np.ones((2, 3, 6))
    cube[1, 2, 4] = np.nan
    with pytest.raises(ValueError, match="reader 2 has no rating for case 4 in modality 1"):
        mrmc_or(cube, np.array([0, 1, 0, 1, 1, 0]))
    with pytest.raises(ValueError, match="one value per case"):
        mrmc_or(np.ones((2, 3, 6)), np.array([0, 1]))
    with pytest.raises(ValueError, match="reader 1 has no rating for case 2"):
        model_vs_readers(np.arange(6.0), np.array([np.arange(6.0), [0, 1, np.nan, 3, 4, 5]]), np.array([0, 1] * 3))
    with pytest.raises(ValueError, match="at least two readers"):
        model_vs_readers(np.arange(6.0), np.arange(6.0)[None], np.array([0, 1] * 3))


def test_model_vs_readers_by_hand(small):
    ratings, truth = small
    model, readers = ratings[0] + 0.25 * np.arange(13) % 1, ratings[1:]
    result = model_vs_readers(model, readers, truth)
    auc = np.array([_loop_auc(row, truth) for row in np.vstack([model, readers])])
    cov = _loop_jackknife(np.vstack([model, readers]), truth)
    diffs = auc[0] - auc[1:]
    r = 3
    cov_d = np.array(
        [[cov[0, 0] - cov[0, 1 + a] - cov[0, 1 + b] + cov[1 + a, 1 + b] for b in range(r)] for a in range(r)]
    )
    cov2 = np.mean([cov_d[a, b] for a in range(r) for b in range(r) if a != b])
    ms_r = np.var(diffs, ddof=1)
    error = ms_r + r * max(cov2, 0)
    df = error**2 / (ms_r**2 / (r - 1))
    t_stat = diffs.mean() / math.sqrt(error / r)
    assert result.model_auc == pytest.approx(auc[0]) and result.mean_reader_auc == pytest.approx(auc[1:].mean())
    assert result.difference == pytest.approx(diffs.mean())
    assert (result.t, result.df) == pytest.approx((t_stat, df))
    assert result.p_value == pytest.approx(2 * stats.t.sf(abs(t_stat), df))
    assert result.var == pytest.approx(np.mean(np.diag(cov_d))) and result.cov2 == pytest.approx(cov2)
    json.dumps(result.to_dict(), allow_nan=False)


def test_model_vs_readers_equals_rrrc_with_the_model_copied_for_every_reader(vandyke):
    """The single-treatment test is the OR-RRRC test of a two-modality study whose first modality is the model's
    scores copied for every reader (Kooi et al. 2016; RJafroc's 1T-RRRC vs 2T-RRRC)."""
    readers = vandyke[vandyke.modality == 0].pivot(index="reader", columns="case", values="rating")
    truth = vandyke.drop_duplicates("case").set_index("case").sort_index()["truth"].to_numpy()
    model = vandyke[vandyke.modality == 1].groupby("case")["rating"].mean().sort_index().to_numpy()
    for cov in ("jackknife", "delong", "unbiased"):
        single = model_vs_readers(model, readers.to_numpy(), truth, cov=cov)
        copied = pd.DataFrame(
            [
                {"reader": r, "modality": m, "case": c + 1, "truth": truth[c], "rating": s}
                for r in range(5)
                for m, scores in (("model", model), ("readers", readers.to_numpy()[r]))
                for c, s in enumerate(scores)
            ]
        )
        two = mrmc_or(copied, cov=cov)
        assert two.rrrc.comparisons[0].difference == pytest.approx(single.difference)
        assert two.rrrc.statistic == pytest.approx(single.t**2)
        assert two.rrrc.ddf == pytest.approx(single.df)
        assert two.rrrc.p_value == pytest.approx(single.p_value)
        assert two.rrrc.comparisons[0].ci == pytest.approx(single.ci)


def test_model_vs_readers_holds_its_size_where_fixed_readers_do_not():
    """Readers with random skill (rating = case latent + reader noise of log-normal SD) and a fixed model whose AUC
    equals the readers' population mean AUC: the test rejects about 5 % of the time, while a z-test that treats the
    readers as fixed (case variance only) rejects far more often."""
    rng = np.random.default_rng(2024)
    d, log_sd, spread, n_readers, reps = 1.5, math.log(0.8), 0.8, 5, 2000
    truth = np.r_[np.zeros(40, int), np.ones(40, int)]
    nodes, weights = hermegauss(60)
    reader_auc = stats.norm.cdf(d / np.sqrt(2 * (1 + np.exp(log_sd + spread * nodes) ** 2)))
    target = (weights * reader_auc).sum() / weights.sum()

    def model_sd(auc: float) -> float:
        return math.sqrt((d / (math.sqrt(2) * stats.norm.ppf(auc))) ** 2 - 1)

    def rejections(auc: float, n: int) -> tuple[float, float]:
        ours = fixed = 0
        for _ in range(n):
            latent = rng.normal(size=80) + d * truth
            sd = np.exp(log_sd + spread * rng.normal(size=n_readers))
            readers = latent + sd[:, None] * rng.normal(size=(n_readers, 80))
            result = model_vs_readers(latent + model_sd(auc) * rng.normal(size=80), readers, truth)
            ours += result.p_value < 0.05
            fixed_se = math.sqrt((result.var + (n_readers - 1) * max(result.cov2, 0)) / n_readers)
            fixed += abs(result.difference / fixed_se) > stats.norm.ppf(0.975)
        return ours / n, fixed / n

    size, fixed_size = rejections(target, reps)
    assert 0.035 <= size <= 0.065
    assert fixed_size > 0.08
    power, _ = rejections(target + 0.07, 300)
    assert power > 0.15
