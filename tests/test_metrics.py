"""Site-level evaluation aggregates and their pooling at the server (fedir.metrics)."""

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fedir import metrics
from fedir.metrics import DEFAULT_BINS, auc_from_histograms, patient_scores, pooled_metrics, site_metrics

KEYS = {
    "n", "n_patients", "positives", "auc", "accuracy", "sensitivity", "specificity",
    "auc_ci", "accuracy_ci", "sensitivity_ci", "specificity_ci",
    "tp", "tn", "fp", "fn", "hist_neg", "hist_pos", "hist_score_sum", "ece", "per_patient", "reasons",
}  # fmt: skip
POOLED_KEYS = KEYS | {"auc_binning_error"}
METRICS = ("auc", "accuracy", "sensitivity", "specificity")


def _site(seed: int, n: int = 300, shift: float = 0.25, images_per_patient: int = 3):
    """Labels, probabilities and patient ids with some signal."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.4 + shift * y, 0.2), 0, 1)
    patients = [f"p{seed}-{i // images_per_patient}" for i in range(n)]
    return y, s, patients


def _assert_plain_json(d: dict) -> None:
    """No numpy types or NaN: json with allow_nan=False round-trips it unchanged."""
    assert json.loads(json.dumps(d, allow_nan=False)) == json.loads(json.dumps(d))
    for value in d.values():
        assert not isinstance(value, np.generic)


def _contains(ci, point) -> bool:
    return ci[0] - 1e-12 <= point <= ci[1] + 1e-12


# ---- site_metrics -----------------------------------------------------------------------


@pytest.mark.parametrize(("order", "expected"), [("perfect", 1.0), ("inverted", 0.0)])
def test_site_metrics_perfect_and_inverted_auc(order, expected):
    y = np.array([0] * 50 + [1] * 50)
    s = np.linspace(0.01, 0.99, 100)
    if order == "inverted":
        s = s[::-1]
    m = site_metrics(y, s, [f"p{i // 2}" for i in range(100)], n_boot=200)
    assert set(m) == KEYS
    assert m["auc"] == pytest.approx(expected)
    assert m["auc_ci"] == pytest.approx([expected, expected])
    assert m["reasons"] == {}
    _assert_plain_json(m)


def test_site_metrics_random_scores_auc_near_half_and_cis_contain_points():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 800)
    s = rng.uniform(0, 1, 800)
    m = site_metrics(y, s, [f"p{i // 4}" for i in range(800)], n_boot=300)
    assert m["auc"] == pytest.approx(0.5, abs=0.06)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s))
    for name in METRICS:
        assert m[name] is not None and _contains(m[f"{name}_ci"], m[name]), name


def test_site_metrics_counts_and_histograms():
    y, s, patients = _site(0)
    m = site_metrics(y, s, patients, n_boot=50, threshold=0.5)
    pred = s >= 0.5
    assert (m["tp"], m["fn"]) == (int(np.sum(pred & (y == 1))), int(np.sum(~pred & (y == 1))))
    assert m["tp"] + m["tn"] + m["fp"] + m["fn"] == m["n"] == 300
    assert m["n_patients"] == 100 and m["positives"] == int(y.sum())
    assert len(m["hist_neg"]) == len(m["hist_pos"]) == DEFAULT_BINS
    assert sum(m["hist_neg"]) == 300 - m["positives"] and sum(m["hist_pos"]) == m["positives"]
    edges = np.linspace(0, 1, DEFAULT_BINS + 1)
    assert m["hist_pos"] == np.histogram(s[y == 1], bins=edges)[0].tolist()
    assert m["sensitivity"] == pytest.approx(m["tp"] / (m["tp"] + m["fn"]))
    assert m["accuracy"] == pytest.approx((m["tp"] + m["tn"]) / 300)
    _assert_plain_json(m)


def test_bootstrap_resamples_patients_not_images():
    """20 identical images per patient: a patient bootstrap sees 10 units, not 200."""
    rng = np.random.default_rng(1)
    patient_label = np.array([0, 1] * 5)
    patient_score = np.clip(0.5 + (patient_label - 0.5) * 0.3 + rng.normal(0, 0.25, 10), 0, 1)
    y = np.repeat(patient_label, 20)
    s = np.repeat(patient_score, 20)
    by_patient = site_metrics(y, s, [f"p{i // 20}" for i in range(200)], n_boot=500)
    by_image = site_metrics(y, s, [f"img{i}" for i in range(200)], n_boot=500)
    assert by_patient["n_patients"] == 10 and by_image["n_patients"] == 200
    assert by_patient["accuracy"] == by_image["accuracy"]
    for name in ("auc", "accuracy"):
        width_patient = np.diff(by_patient[f"{name}_ci"])[0]
        width_image = np.diff(by_image[f"{name}_ci"])[0]
        assert width_patient > 2 * width_image, name


def test_vectorised_bootstrap_matches_sklearn_on_each_resample():
    """Each resample's AUC is roc_auc_score with images weighted by their patient's multiplicity."""
    y, s, patients = _site(4, n=120)
    patient_index = np.unique(patients, return_inverse=True)[1]
    weights = np.random.default_rng(0).multinomial(40, np.full(40, 1 / 40), size=25).astype(float)
    replicates = metrics._bootstrap_replicates(y, s, s >= 0.5, patient_index, 40, weights)
    expected = [roc_auc_score(y, s, sample_weight=w[patient_index]) for w in weights]
    np.testing.assert_allclose(replicates["auc"], expected, atol=1e-12)
    tp = np.array([np.sum(w[patient_index] * ((s >= 0.5) & (y == 1))) for w in weights])
    positives = np.array([np.sum(w[patient_index] * (y == 1)) for w in weights])
    np.testing.assert_allclose(replicates["sensitivity"], tp / positives)


def test_bootstrap_is_seeded():
    y, s, patients = _site(2)
    assert site_metrics(y, s, patients, seed=5) == site_metrics(y, s, patients, seed=5)
    assert site_metrics(y, s, patients, seed=5)["auc_ci"] != site_metrics(y, s, patients, seed=6)["auc_ci"]


def test_one_class_test_set_gives_none_with_counts_in_reason():
    m = site_metrics(np.zeros(12, int), np.linspace(0.1, 0.9, 12), [f"p{i}" for i in range(12)])
    assert m["auc"] is None and m["auc_ci"] is None and m["sensitivity"] is None
    assert "12 negatives, 0 positives" in m["reasons"]["auc"]
    assert "sensitivity" in m["reasons"] and "auc_ci" in m["reasons"]
    assert m["specificity"] is not None and m["specificity_ci"] is not None
    assert m["accuracy"] is not None
    _assert_plain_json(m)


def test_ci_none_when_too_few_resamples_are_usable(monkeypatch):
    """One positive patient among 20 is in about 64% of resamples ((19/20)^20 miss it).

    That passes the default 50% rule; with the rule raised to 90% the AUC and
    sensitivity CIs must be withheld, the specificity one (every resample has negatives)
    kept.
    """
    y = np.array([1] + [0] * 19)
    s = np.linspace(0.05, 0.95, 20)
    patients = [f"p{i}" for i in range(20)]
    assert site_metrics(y, s, patients, n_boot=400)["auc_ci"] is not None
    monkeypatch.setattr(metrics, "MIN_USABLE_FRACTION", 0.9)
    m = site_metrics(y, s, patients, n_boot=400)
    assert m["auc"] is not None and m["auc_ci"] is None
    assert "of 400 patient-level bootstrap resamples contained both classes" in m["reasons"]["auc_ci"]
    assert m["sensitivity_ci"] is None and m["specificity_ci"] is not None


def test_empty_test_set_is_all_none():
    m = site_metrics(np.array([]), np.array([]), [])
    assert set(m) == KEYS
    assert m["n"] == m["n_patients"] == m["positives"] == 0
    for name in METRICS:
        assert m[name] is None and m[f"{name}_ci"] is None
        assert m["reasons"][name] == m["reasons"][f"{name}_ci"] == "no test images"
    assert m["hist_neg"] == m["hist_pos"] == [0] * DEFAULT_BINS
    _assert_plain_json(m)


def test_single_patient_has_points_but_no_cis():
    m = site_metrics(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]), ["p"] * 4)
    assert m["auc"] == 1.0 and m["auc_ci"] is None
    assert "single patient" in m["reasons"]["auc_ci"]


@pytest.mark.parametrize(
    ("labels", "scores", "patients"),
    [([0, 2], [0.1, 0.2], ["a", "b"]), ([0, 1], [0.1, 1.2], ["a", "b"]), ([0, 1], [0.1, np.nan], ["a", "b"]),
     ([0, 1], [0.1], ["a", "b"])],
)  # fmt: skip
def test_site_metrics_rejects_bad_input(labels, scores, patients):
    with pytest.raises(ValueError):
        site_metrics(np.array(labels), np.array(scores), patients)


def test_site_metrics_1000_images_500_resamples_is_fast():
    import time

    y, s, patients = _site(7, n=1000, images_per_patient=2)
    start = time.perf_counter()
    site_metrics(y, s, patients, n_boot=500)
    assert time.perf_counter() - start < 1.0


# ---- auc_from_histograms ----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_histogram_auc_close_to_exact_on_continuous_scores(seed):
    y, s, patients = _site(seed, n=600)
    m = site_metrics(y, s, patients, n_boot=10)
    assert auc_from_histograms(m["hist_neg"], m["hist_pos"]) == pytest.approx(roc_auc_score(y, s), abs=0.02)


def test_histogram_auc_exact_at_bin_centres():
    rng = np.random.default_rng(0)
    centres = (np.arange(DEFAULT_BINS) + 0.5) / DEFAULT_BINS
    y = rng.integers(0, 2, 400)
    s = centres[np.clip(rng.normal(8 + 4 * y, 3).round().astype(int), 0, DEFAULT_BINS - 1)]
    m = site_metrics(y, s, [str(i) for i in range(400)], n_boot=10)
    assert auc_from_histograms(m["hist_neg"], m["hist_pos"]) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_histogram_auc_with_weights_is_weighted_mann_whitney():
    """Non-integer counts act as sample weights (what the patient bootstrap relies on)."""
    rng = np.random.default_rng(4)
    y = np.array([0, 1] * 30)
    s = rng.integers(0, 10, 60) / 10
    w = rng.uniform(0, 3, 60)
    groups = np.unique(s)
    neg = [w[(y == 0) & (s == g)].sum() for g in groups]
    pos = [w[(y == 1) & (s == g)].sum() for g in groups]
    assert auc_from_histograms(neg, pos) == pytest.approx(roc_auc_score(y, s, sample_weight=w))


def test_histogram_auc_none_for_empty_class_and_ties_count_half():
    assert auc_from_histograms([0, 0, 0], [1, 2, 3]) is None
    assert auc_from_histograms([3, 0], [0, 0]) is None
    assert auc_from_histograms([0, 4, 0], [0, 2, 0]) == 0.5
    assert auc_from_histograms([1, 0], [0, 1]) == 1.0
    with pytest.raises(ValueError):
        auc_from_histograms([1, 2], [1, 2, 3])


# ---- pooled_metrics -----------------------------------------------------------------------


@pytest.fixture
def three_sites():
    return {f"site-{k}": site_metrics(*_site(k, n=200 + 100 * k), n_boot=50) for k in range(3)}


def test_pooled_totals_add_up(three_sites):
    pooled = pooled_metrics(three_sites, n_boot=200)
    assert set(pooled) == POOLED_KEYS
    for key in ("n", "n_patients", "positives", "tp", "tn", "fp", "fn"):
        assert pooled[key] == sum(site[key] for site in three_sites.values()), key
    assert pooled["hist_pos"] == np.sum([site["hist_pos"] for site in three_sites.values()], axis=0).tolist()
    assert pooled["sensitivity"] == pytest.approx(pooled["tp"] / (pooled["tp"] + pooled["fn"]))
    assert pooled["specificity"] == pytest.approx(pooled["tn"] / (pooled["tn"] + pooled["fp"]))
    _assert_plain_json(pooled)


def test_pooled_auc_is_exact_within_its_reported_binning_error(three_sites):
    pooled = pooled_metrics(three_sites, n_boot=200)
    ys, ss = zip(*[_site(k, n=200 + 100 * k)[:2] for k in range(3)])
    exact = roc_auc_score(np.concatenate(ys), np.concatenate(ss))
    binned = auc_from_histograms(pooled["hist_neg"], pooled["hist_pos"])
    assert 0 < pooled["auc_binning_error"] < 0.05
    assert abs(pooled["auc"] - exact) <= pooled["auc_binning_error"]
    # the within-site pairs are exact, so the pooled value is nearer the truth than the binned one
    assert abs(pooled["auc"] - exact) < abs(binned - exact)


def test_pooled_cis_contain_points(three_sites):
    pooled = pooled_metrics(three_sites, n_boot=300)
    for name in METRICS:
        lo, hi = pooled[f"{name}_ci"]
        assert lo < pooled[name] < hi, name
    # the fixture's labels are drawn per image, so its patients carry both labels
    assert list(pooled["reasons"]) == ["per_patient"] and pooled["per_patient"] is None


def test_pooled_wilson_interval():
    site = site_metrics(np.array([1] * 10 + [0] * 10), np.array([0.9] * 9 + [0.1] * 11), [str(i) for i in range(20)])
    pooled = pooled_metrics({"a": site})
    assert pooled["sensitivity"] == 0.9
    lo, hi = pooled["sensitivity_ci"]
    assert lo == pytest.approx(0.5958, abs=1e-3) and hi == pytest.approx(0.9821, abs=1e-3)


def test_pooled_handles_one_class_sites_and_no_sites():
    only_neg = site_metrics(np.zeros(5, int), np.full(5, 0.2), list("abcde"))
    only_pos = site_metrics(np.ones(5, int), np.full(5, 0.8), list("fghij"))
    assert pooled_metrics({"n": only_neg})["auc"] is None
    assert "5 negatives, 0 positives" in pooled_metrics({"n": only_neg})["reasons"]["auc"]
    assert pooled_metrics({"n": only_neg, "p": only_pos})["auc"] == 1.0
    empty = pooled_metrics({})
    assert all(empty[name] is None for name in METRICS) and math.isclose(empty["n"], 0)
    assert set(empty["reasons"]) == {*METRICS, *(f"{m}_ci" for m in METRICS), "ece", "per_patient"}


def test_pooled_rejects_mismatched_bins():
    y, s, p = _site(0, n=40)
    with pytest.raises(ValueError):
        pooled_metrics({"a": site_metrics(y, s, p, bins=10), "b": site_metrics(y, s, p, bins=20)})


# ---- resample_histograms: the one histogram bootstrap -------------------------------------

HISTS = np.array([[3, 0, 5, 2], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=float), np.array(
    [[0, 1, 0, 6], [2, 2, 0, 0], [0, 0, 0, 0]], dtype=float)


def test_resampled_histograms_keep_each_sites_class_counts_and_its_mean():
    for resample_sites in (False, True):
        neg, pos = metrics.resample_histograms(*HISTS, 4000, np.random.default_rng(0), resample_sites=resample_sites)
        assert neg.shape == pos.shape == (4000, 3, 4)
        if not resample_sites:  # every slot is its own site: totals fixed, redraws centred on the counts
            assert (neg.sum(axis=2) == HISTS[0].sum(axis=1)).all() and (pos.sum(axis=2) == HISTS[1].sum(axis=1)).all()
            assert neg.mean(axis=0) == pytest.approx(HISTS[0], abs=0.1)
    # with site resampling each slot holds a whole site's class total, drawn uniformly
    totals = neg.sum(axis=2).ravel()
    assert set(np.unique(totals)) <= {0.0, 4.0, 10.0}
    assert np.mean(totals == 10.0) == pytest.approx(1 / 3, abs=0.02)


def test_resampled_histograms_draw_as_a_per_site_loop_does():
    """Without site resampling a seed gives the replicates of one multinomial draw per site in
    turn (negatives, then positives): pooled-AUC intervals stay those of earlier versions."""
    neg, pos = metrics.resample_histograms(*HISTS, 50, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    for k, counts in enumerate(HISTS):
        for i, row in enumerate(counts):
            if row.sum():
                expected = rng.multinomial(int(row.sum()), row / row.sum(), size=50)
                assert ((neg, pos)[k][:, i] == expected).all()


def test_resampled_site_slots_are_independent_draws():
    """A site drawn twice into one replicate gets two independent redraws, not one copied."""
    one = np.array([[5.0, 5.0]]), np.array([[5.0, 5.0]])
    neg, _ = metrics.resample_histograms(np.repeat(one[0], 2, 0), np.repeat(one[1], 2, 0), 2000,
                                         np.random.default_rng(1), resample_sites=True)
    assert np.mean(neg[:, 0, 0] == neg[:, 1, 0]) < 0.5  # identical rows: 0.25 for independent Binomial(10, 1/2)


def test_pooled_auc_sums_every_sites_histograms(three_sites):
    neg, pos = metrics.stack_histograms(three_sites)
    assert neg.shape == (3, DEFAULT_BINS)
    pooled = pooled_metrics(three_sites, n_boot=10)
    # the binned pooled AUC (the bias gap's, compared with binned within-site AUCs)
    assert metrics.pooled_auc(three_sites) == auc_from_histograms(pooled["hist_neg"], pooled["hist_pos"])
    assert metrics.pooled_auc({}) is None


@pytest.mark.parametrize("decimals", [1, 2, 6])
def test_site_auc_is_sklearns_with_tied_scores(decimals):
    y, s, p = _site(11, n=250)
    s = np.round(s, decimals)  # 1 decimal: many ties, which count 1/2
    assert site_metrics(y, s, p, n_boot=10)["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


# ---- per-patient metrics ----------------------------------------------------------------


def test_per_patient_metrics_by_hand():
    """Three patients: a (label 1; images 0.9, 0.5 -> 0.7), b (0; 0.2, 0.4, 0.6 -> 0.4),
    c (0; 0.8 -> 0.8). Per patient the positive (0.7) beats b (0.4), loses to c (0.8):
    AUC 1/2; at 0.5, a is a true positive, b a true negative, c a false positive."""
    labels = np.array([1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.5, 0.2, 0.4, 0.6, 0.8])
    patients = ["a", "a", "b", "b", "b", "c"]
    m = site_metrics(labels, scores, patients, n_boot=100)
    pp = m["per_patient"]
    assert (pp["n"], pp["n_patients"], pp["positives"]) == (3, 3, 1)
    assert pp["auc"] == pytest.approx(0.5)
    assert (pp["tp"], pp["tn"], pp["fp"], pp["fn"]) == (1, 1, 1, 0)
    assert pp["specificity"] == pytest.approx(0.5)
    # per image: 2 positives x 4 negatives, 0.9 beats all, 0.5 beats 0.2 and 0.4: 6/8
    assert m["auc"] == pytest.approx(6 / 8)
    assert sum(pp["hist_pos"]) == 1 and sum(pp["hist_neg"]) == 2
    _assert_plain_json(m)


def test_per_patient_is_none_when_a_patient_has_both_labels():
    m = site_metrics(np.array([1, 0, 0, 1]), np.array([0.9, 0.1, 0.2, 0.8]), ["a", "a", "b", "c"], n_boot=50)
    assert m["per_patient"] is None
    assert "both labels" in m["reasons"]["per_patient"]
    assert m["auc"] is not None


def _patient_site(seed: int, n_patients: int):
    """Labels per patient, 1-4 images each, scores with signal."""
    rng = np.random.default_rng(seed)
    y_patient = rng.integers(0, 2, n_patients)
    images = rng.integers(1, 5, n_patients)
    y = np.repeat(y_patient, images)
    s = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1)
    patients = np.repeat([f"s{seed}-p{i}" for i in range(n_patients)], images).tolist()
    return y, s, patients


def test_pooled_per_patient_auc_against_sklearn_on_the_union():
    sites = {f"site-{k}": _patient_site(k, 60 + 20 * k) for k in range(3)}
    per_site = {name: site_metrics(*data, n_boot=50, bins=1000) for name, data in sites.items()}
    pooled = pooled_metrics(per_site, n_boot=200)
    y = np.concatenate([d[0] for d in sites.values()])
    s = np.concatenate([d[1] for d in sites.values()])
    p = sum((d[2] for d in sites.values()), [])
    _, patient_y, patient_s = patient_scores(y, s, p)
    exact = roc_auc_score(patient_y, patient_s)
    assert pooled["per_patient"]["n"] == len(set(p))
    # 1,000 bins: cross-site pairs sharing a bin are rare, so the pooled AUC is within 0.005 of exact
    assert pooled["per_patient"]["auc"] == pytest.approx(exact, abs=0.005)
    lo, hi = pooled["per_patient"]["auc_ci"]
    assert lo < pooled["per_patient"]["auc"] < hi


def test_paired_auc_difference():
    from fedir.metrics import paired_auc_difference

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    good = np.clip(rng.normal(0.4 + 0.3 * y, 0.2), 0, 1)
    weak = np.clip(good + rng.normal(0, 0.3, 200), 0, 1)
    d = paired_auc_difference(y, good, weak, n_boot=500)
    assert d["auc_a"] == pytest.approx(roc_auc_score(y, good))
    assert d["difference"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, weak))
    lo, hi = d["difference_ci"]
    assert 0 < lo < d["difference"] < hi
    same = paired_auc_difference(y, good, good, n_boot=100)
    assert same["difference"] == 0 and same["difference_ci"] == [0.0, 0.0]
    assert paired_auc_difference(np.ones(5), good[:5], weak[:5])["reason"]


# ---- the pooled AUC as exact as the aggregates allow; calibration -------------------------


@pytest.mark.parametrize("bins", [20, 50, 100])
def test_pooled_per_patient_auc_is_sklearns_on_the_union_within_the_reported_bound(bins):
    sites = {f"site-{k}": _patient_site(k, 40 + 20 * k) for k in range(4)}
    per_site = {name: site_metrics(*data, n_boot=20, bins=bins) for name, data in sites.items()}
    pooled = pooled_metrics(per_site, n_boot=50)["per_patient"]
    union = [patient_scores(*data) for data in sites.values()]
    exact = roc_auc_score(np.concatenate([u[1] for u in union]), np.concatenate([u[2] for u in union]))
    assert 0 < pooled["auc_binning_error"] < 0.5
    assert abs(pooled["auc"] - exact) <= pooled["auc_binning_error"]


def test_pooled_auc_of_a_clinical_like_model_with_few_distinct_scores():
    """Scores that take a few values (a logistic model on age band and sex): the pairs
    that share a bin but not a score are what binning gets wrong; within a site the AUC
    is exact, so the pooled one errs only on cross-site pairs, within the bound."""
    rng = np.random.default_rng(3)
    levels = np.array([0.31, 0.34, 0.38, 0.42, 0.47, 0.52, 0.58, 0.61, 0.66])
    per_site, ys, ss = {}, [], []
    for k in range(3):
        y = rng.integers(0, 2, 50)
        s = levels[np.clip(rng.integers(0, 6, 50) + 2 * y + k // 2, 0, levels.size - 1)]
        per_site[k] = site_metrics(y, s, [f"{k}-{i}" for i in range(50)], n_boot=20)
        ys.append(y)
        ss.append(s)
    pooled = pooled_metrics(per_site, n_boot=50)
    exact = roc_auc_score(np.concatenate(ys), np.concatenate(ss))
    assert abs(pooled["auc"] - exact) <= pooled["auc_binning_error"]
    assert abs(pooled["auc"] - exact) <= abs(auc_from_histograms(pooled["hist_neg"], pooled["hist_pos"]) - exact)
    # one site alone: every pair is within the site, so the pooled AUC is exact and its bound 0
    alone = pooled_metrics({"only": per_site[0]}, n_boot=10)
    assert alone["auc"] == pytest.approx(roc_auc_score(ys[0], ss[0]), abs=1e-12) and alone["auc_binning_error"] == 0


def test_ece_and_reliability_by_hand():
    # bins of 0.1: [0, 0.1) holds 0.05 (neg) and 0.05 (pos): mean 0.05, observed 0.5;
    # [0.1, 0.2) holds 0.15 (neg): observed 0; [0.9, 1] holds 0.95 (pos): observed 1
    m = site_metrics(np.array([0, 1, 0, 1]), np.array([0.05, 0.05, 0.15, 0.95]), list("abcd"), n_boot=10, bins=10)
    expected = 2 / 4 * 0.45 + 1 / 4 * 0.15 + 1 / 4 * 0.05
    assert m["ece"] == pytest.approx(expected) and m["per_patient"]["ece"] == pytest.approx(expected)
    assert m["hist_score_sum"] == pytest.approx([0.1, 0.15, 0, 0, 0, 0, 0, 0, 0, 0.95])
    rows = metrics.calibration(m["hist_neg"], m["hist_pos"], m["hist_score_sum"])["bins"]
    assert [(r["low"], r["count"], r["positives"]) for r in rows] == [(0.0, 2, 1), (0.1, 1, 0), (0.9, 1, 1)]
    assert rows[0]["mean_score"] == pytest.approx(0.05) and rows[0]["observed"] == 0.5


def test_pooled_ece_is_the_ece_of_the_union():
    y, s = np.array([0, 1, 0, 1, 1, 0]), np.array([0.05, 0.05, 0.15, 0.95, 0.42, 0.44])
    a = site_metrics(y[:4], s[:4], list("abcd"), n_boot=10, bins=10)
    b = site_metrics(y[4:], s[4:], list("ef"), n_boot=10, bins=10)
    union = site_metrics(y, s, list("abcdef"), n_boot=10, bins=10)
    pooled = pooled_metrics({"a": a, "b": b}, n_boot=10)
    assert pooled["ece"] == pytest.approx(union["ece"]) and pooled["per_patient"]["ece"] == pytest.approx(union["ece"])
    del b["hist_score_sum"]
    assert pooled_metrics({"a": a, "b": b}, n_boot=10)["ece"] is None


def test_no_bootstrap_gives_points_without_cis():
    y, s, p = _site(2, n=60)
    m = site_metrics(y, s, p, n_boot=0)
    assert m["auc"] is not None and m["auc_ci"] is None and "eval.bootstrap = 0" in m["reasons"]["auc_ci"]
    pooled = pooled_metrics({"a": m}, n_boot=0)
    assert pooled["auc"] is not None and pooled["auc_ci"] is None
