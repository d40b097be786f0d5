"""Frankenstein checks from aggregates (fedir.strategies.bias)."""

import json

import numpy as np
import pytest

from fedir.metrics import auc_from_histograms, pooled_auc, site_metrics
from fedir.strategies.bias import evaluation_level, pooled_vs_within_auc, site_label_association, verdict
from fedir.strategies.frankenstein import Thresholds, analyse

CONFOUNDED = {"a": {0: 5, 1: 95}, "b": {0: 90, 1: 10}, "c": {0: 88, 1: 12}}
BALANCED = {"a": {0: 40, 1: 60}, "b": {0: 42, 1: 58}, "c": {0: 39, 1: 61}}


def _strict_json(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))


def _eval(labels, scores) -> dict:
    """A site's aggregates in 20 bins (eval.hist-bins' default is now 50): the cases and the
    Monte Carlo tolerances below were set on 20-bin histograms, and stay so."""
    labels = np.asarray(labels)
    return site_metrics(labels, np.asarray(scores), [f"p{i}" for i in range(labels.size)], n_boot=50, bins=20)


# ---- site_label_association ---------------------------------------------------------------


def test_confounded_table_alarms_and_names_the_site():
    result = site_label_association(CONFOUNDED)
    assert result["computable"] and result["alarm"]
    assert result["sites"][0] == "a"
    assert result["p_value"] < 0.01 and result["cramers_v"] >= 0.2
    assert result["prevalence"]["a"] == pytest.approx(0.95)
    assert "a" in result["reason"] and "95%" in result["reason"]
    assert result["thresholds"] == {"alpha": 0.01, "min_cramers_v": 0.2}
    _strict_json(result)


def test_balanced_table_does_not_alarm():
    result = site_label_association(BALANCED)
    assert result["computable"] and not result["alarm"]
    assert result["sites"] == [] and result["reason"] == ""
    assert result["cramers_v"] < 0.2


def test_significant_but_small_effect_does_not_alarm():
    """Huge counts make a 2-point prevalence difference significant; V keeps it quiet."""
    result = site_label_association({"a": {0: 48000, 1: 52000}, "b": {0: 50000, 1: 50000}})
    assert result["p_value"] < 0.01 and result["cramers_v"] < 0.2
    assert not result["alarm"]


@pytest.mark.parametrize(
    "counts",
    [{"a": {0: 5, 1: 95}}, {"a": {0: 5}, "b": {0: 7}}, {"a": {0: 5, 1: 0}, "b": {0: 7, 1: 0}}, {},
     {"a": {0: 0, 1: 0}, "b": {0: 4, 1: 6}}],
)  # fmt: skip
def test_one_site_or_one_class_is_not_computable(counts):
    result = site_label_association(counts)
    assert not result["computable"] and not result["alarm"]
    assert "not computable" in result["reason"]
    _strict_json(result)


def test_empty_sites_are_dropped_and_string_class_keys_accepted():
    counts = {"a": {"0": 5, "1": 95}, "b": {"0": 90, "1": 10}, "c": {"0": 88, "1": 12}, "d": {}}
    result = site_label_association(counts)
    assert result["alarm"] and result["sites"][0] == "a"
    assert "d" not in result["table"]
    assert result["statistic"] == pytest.approx(site_label_association(CONFOUNDED)["statistic"])


# ---- pooled_vs_within_auc ---------------------------------------------------------------


def test_site_separating_model_alarms_and_names_the_site():
    """Within every site the scores are noise; one site holds all positives, scored high."""
    rng = np.random.default_rng(0)
    per_site = {f"site-{k}": _eval(rng.integers(0, 2, 200), rng.uniform(0.05, 0.45, 200)) for k in range(3)}
    per_site["site-x"] = _eval(np.ones(150, int), rng.uniform(0.7, 0.95, 150))
    result = pooled_vs_within_auc(per_site)
    assert result["computable"] and result["alarm"]
    assert result["within_auc"] == pytest.approx(0.5, abs=0.07)
    assert result["pooled_auc"] > result["within_auc"] + 0.1
    assert result["sites"] == ["site-x"]
    assert "site-x" in result["excluded"] and "150 positives" in result["excluded"]["site-x"]
    assert "site-x" in result["reason"]
    _strict_json(result)


def test_clean_federation_does_not_alarm():
    rng = np.random.default_rng(1)
    per_site = {}
    for k in range(4):
        y = rng.integers(0, 2, 300)
        per_site[f"site-{k}"] = _eval(y, np.clip(rng.normal(0.4 + 0.25 * y, 0.2), 0, 1))
    result = pooled_vs_within_auc(per_site)
    assert result["computable"] and not result["alarm"]
    assert all(auc == pytest.approx(0.8, abs=0.08) for auc in result["site_auc"].values())
    assert abs(result["gap"]) <= 0.05 and result["sites"] == [] and result["reason"] == ""


def test_within_auc_is_n_weighted_and_undefined_sites_excluded():
    rng = np.random.default_rng(2)
    y_small, y_big = rng.integers(0, 2, 50), rng.integers(0, 2, 450)
    per_site = {
        "small": _eval(y_small, np.where(y_small == 1, 0.9, 0.1)),
        "big": _eval(y_big, rng.uniform(0, 1, 450)),
        "neg-only": _eval(np.zeros(30, int), rng.uniform(0, 1, 30)),
    }
    result = pooled_vs_within_auc(per_site)
    binned = {s: auc_from_histograms(per_site[s]["hist_neg"], per_site[s]["hist_pos"]) for s in ("small", "big")}
    expected = (50 * binned["small"] + 450 * binned["big"]) / 500  # from histograms, like the pooled AUC
    assert result["within_auc"] == pytest.approx(expected)
    assert result["site_auc"]["neg-only"] is None
    assert set(result["excluded"]) == {"neg-only"}
    assert "only one class" in result["excluded"]["neg-only"]


def test_pooled_vs_within_not_computable_without_any_site_auc():
    per_site = {"a": _eval(np.zeros(10, int), np.full(10, 0.2)), "b": _eval(np.ones(10, int), np.full(10, 0.8))}
    result = pooled_vs_within_auc(per_site)
    assert not result["computable"] and not result["alarm"]
    assert result["pooled_auc"] == 1.0 and result["within_auc"] is None
    assert "not computable" in result["reason"] and "a:" in result["reason"]
    assert not pooled_vs_within_auc({})["computable"]


def _loop_gaps(per_site, n_boot, rng, resample_sites):
    """The gap's bootstrap written as a per-replicate loop (the reference for the vectorised one)."""
    neg = np.array([m["hist_neg"] for m in per_site.values()], dtype=float)
    pos = np.array([m["hist_pos"] for m in per_site.values()], dtype=float)
    gaps = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(neg), len(neg)) if resample_sites else np.arange(len(neg))
        rn = np.array([rng.multinomial(int(neg[i].sum()), neg[i] / max(neg[i].sum(), 1)) for i in pick])
        rp = np.array([rng.multinomial(int(pos[i].sum()), pos[i] / max(pos[i].sum(), 1)) for i in pick])
        within = [(a.sum() + b.sum(), auc_from_histograms(a, b)) for a, b in zip(rn, rp)]
        within = [(n, auc) for n, auc in within if auc is not None]
        pooled = auc_from_histograms(rn.sum(0), rp.sum(0))
        if pooled is not None and within:  # a replicate of one-class sites only has no gap
            gaps.append(pooled - sum(n * a for n, a in within) / sum(n for n, _ in within))
    return np.percentile(gaps, [2.5, 97.5])


@pytest.mark.parametrize("resample_sites", [False, True])
def test_gap_intervals_have_the_distribution_of_a_per_replicate_loop(resample_sites):
    """The vectorised bootstrap draws in another order than a loop would, so its intervals
    are compared in distribution (2,000 replicates each, different seeds), not digit by digit."""
    rng = np.random.default_rng(4)
    per_site = {f"site-{k}": _eval(rng.integers(0, 2, 60), rng.uniform(0.05, 0.45, 60)) for k in range(3)}
    per_site["site-x"] = _eval(np.ones(50, int), rng.uniform(0.7, 0.95, 50))
    result = pooled_vs_within_auc(per_site, n_boot=2000, seed=1)
    interval = result["gap_ci_sites" if resample_sites else "gap_ci"]
    reference = _loop_gaps(per_site, 2000, np.random.default_rng(2), resample_sites)
    width = reference[1] - reference[0]
    assert interval == pytest.approx(reference, abs=0.06 * width)
    assert interval[0] < result["gap"] < interval[1]


# ---- the gap per patient --------------------------------------------------------------------


def _patients(rng, patients: int, images: int, prevalence: float, shift: float) -> dict:
    """A site whose patients each have `images` images sharing the patient's score level
    (a patient effect of SD 1 beside an image noise of SD 0.2): images are not independent."""
    y = (np.arange(patients) < round(prevalence * patients)).astype(int)
    effect = (y - 0.5) + shift + rng.normal(0, 1.0, patients)
    s = 1 / (1 + np.exp(-(np.repeat(effect, images) + rng.normal(0, 0.2, patients * images))))
    ids = np.repeat([f"p{i}" for i in range(patients)], images)
    return site_metrics(np.repeat(y, images), s, ids, n_boot=200, seed=1)


def _images_only(per_site: dict) -> dict:
    return {site: {**m, "per_patient": None} for site, m in per_site.items()}


def test_gap_is_per_patient_when_every_site_has_them():
    rng = np.random.default_rng(5)
    per_site = {"a": _patients(rng, 15, 20, 0.6, 0.35), "b": _patients(rng, 15, 20, 0.4, -0.35)}
    out = pooled_vs_within_auc(per_site)
    neg = np.sum([m["per_patient"]["hist_neg"] for m in per_site.values()], axis=0)
    pos = np.sum([m["per_patient"]["hist_pos"] for m in per_site.values()], axis=0)
    assert out["level"] == "patient" and out["level_reason"] == ""
    assert out["pooled_auc"] == pytest.approx(auc_from_histograms(neg, pos))
    assert out["site_auc"] == {site: m["per_patient"]["auc"] for site, m in per_site.items()}


def test_a_chance_gap_over_the_threshold_alarms_per_image_but_not_per_patient():
    """The issue's clean rounds: 15 patients x 20 correlated images per site, a gap just over
    0.05 by chance. Resampling images, the interval is narrow and above 0 (a false alarm);
    resampling patients, it covers 0."""
    rng = np.random.default_rng(5)
    per_site = {"a": _patients(rng, 15, 20, 0.6, 0.35), "b": _patients(rng, 15, 20, 0.4, -0.35),
                "c": _patients(rng, 15, 20, 0.5, 0.0)}
    by_image = pooled_vs_within_auc(_images_only(per_site))
    assert by_image["level"] == "image" and by_image["gap"] > 0.05 and by_image["gap_ci"][0] > 0
    assert by_image["alarm"]
    by_patient = pooled_vs_within_auc(per_site)
    assert by_patient["gap"] > 0.05 and by_patient["gap_ci"][0] <= 0 < by_patient["gap_ci"][1]
    assert not by_patient["alarm"] and by_patient["reason"] == ""


def test_a_confounded_site_alarms_per_patient_and_the_site_resampled_interval_cannot_decide():
    """One hospital holds the positives and scores high. The gap's patient-resampled interval
    is above 0; the interval that also resamples sites is not (a quarter to a third of its
    replicates lack the hospital), which is why it is reported and does not decide."""
    rng = np.random.default_rng(0)
    per_site = {f"s{k}": _patients(rng, 30, 5, 0.1, -1.0) for k in range(3)}
    per_site["hot"] = _patients(rng, 30, 5, 0.9, 1.0)
    out = pooled_vs_within_auc(per_site)
    assert out["level"] == "patient" and out["gap"] > 0.1 and out["gap_ci"][0] > 0
    assert out["alarm"] and out["sites"] == ["hot"]
    assert "per patient" in out["reason"] and "patients resampled within each site" in out["reason"]
    assert out["gap_ci_sites"][0] <= 0
    _strict_json(out)


def test_gap_falls_back_to_images_with_the_reason_when_a_site_has_no_per_patient_metrics():
    rng = np.random.default_rng(6)
    per_site = {"a": _patients(rng, 15, 4, 0.5, 0.0), "b": _patients(rng, 15, 4, 0.5, 0.0)}
    mixed = np.array([0, 1] * 20)  # each patient has an image of each label
    per_site["mixed"] = site_metrics(mixed, rng.uniform(0, 1, 40), np.repeat([f"q{i}" for i in range(20)], 2),
                                     n_boot=50)
    assert per_site["mixed"]["per_patient"] is None
    units, level, why = evaluation_level(per_site)
    assert level == "image" and units == per_site
    assert why.startswith("per image: no per-patient metrics from mixed (") and "both labels" in why
    out = pooled_vs_within_auc(per_site)
    assert out["level"] == "image" and out["level_reason"] == why
    assert out["site_auc"]["a"] == per_site["a"]["auc"]  # every site per image, never a mix


def test_leave_one_site_out_moves_the_per_patient_pooled_auc():
    """The sensitivity's pooled AUC without each site is the per-patient one, like the gap it reruns."""
    rng = np.random.default_rng(8)
    per_site = {k: _patients(rng, 20, 6, 0.5, shift) for k, shift in (("a", 0.0), ("b", 0.5), ("c", -0.5))}
    counts = {k: {0: 10, 1: 10} for k in per_site}
    by_site = analyse(counts, per_site, {}, Thresholds(bootstrap=0))["sensitivity"]["by_site"]
    for left_out, entry in by_site.items():
        rest = {k: m["per_patient"] for k, m in per_site.items() if k != left_out}
        assert entry["pooled_auc"] == pytest.approx(pooled_auc(rest))
        assert entry["pooled_auc"] != pytest.approx(pooled_auc({k: per_site[k] for k in rest}))


# ---- verdict ------------------------------------------------------------------------------


def test_verdict_collects_reasons_of_alarmed_tests():
    alarmed = site_label_association(CONFOUNDED)
    quiet = site_label_association(BALANCED)
    v = verdict({"association": alarmed, "quiet": quiet})
    assert v["alarm"] and v["reasons"] == [alarmed["reason"]]
    assert v["tests"]["quiet"] is quiet
    assert verdict({"quiet": quiet}) == {
        "alarm": False, "reasons": [], "warnings": [], "secondary_to_alarm": 0, "signals": [],
        "tests": {"quiet": quiet},
    }
    _strict_json(v)
