"""The decision threshold chosen on validation patients, and the test metrics at it
(fedir.strategies.thresholds, wired in by the ServerApp's StudyRecorder)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from fedir.config import Settings
from fedir.metrics import patient_scores, site_metrics
from fedir.protocol import VAL_KEY
from fedir.server.runstore import RunStore
from fedir.server.server_app import StudyRecorder
from fedir.server.summary import build_summary
from fedir.strategies.per_site import RoundReplies
from fedir.strategies.thresholds import Threshold, at, choose, thresholded, youden


def test_youden_by_hand():
    # 4 bins, candidate edges 0.25, 0.5, 0.75: J = 1 + 3/6 - 1, 3/4 + 5/6 - 1, 2/4 + 6/6 - 1
    assert youden([3, 2, 1, 0], [0, 1, 1, 2]) == (2, pytest.approx(0.75 + 5 / 6 - 1))


def test_youden_ties_go_to_the_edge_nearest_half_then_the_lower():
    assert youden([2, 0, 0, 0], [0, 0, 0, 2]) == (2, 1.0)  # J = 1 at every edge: 0.5
    assert youden([1, 0, 1, 0], [0, 1, 0, 1])[0] == 1  # J = 0.5 at 0.25 and at 0.75: the lower
    assert youden([3, 0], [0, 0]) is None


def _patients(seed: int, n: int, shift: float = 0.3):
    rng = np.random.default_rng(seed)
    y_patient = rng.integers(0, 2, n)
    images = rng.integers(1, 4, n)
    y = np.repeat(y_patient, images)
    s = np.clip(rng.normal(0.3 + shift * y, 0.15), 0, 1)
    return y, s, np.repeat([f"{seed}-{i}" for i in range(n)], images).tolist()


def _site(seed: int, n: int = 60, bins: int = 20):
    test, val = _patients(seed, n), _patients(seed + 100, n)
    return ({**site_metrics(*test, n_boot=20, bins=bins), VAL_KEY: site_metrics(*val, n_boot=20, bins=bins)},
            test, val)


def test_the_threshold_is_chosen_on_validation_and_never_reads_test():
    sites = {f"s{k}": _site(k) for k in range(3)}
    test = {name: s[0] for name, s in sites.items()}
    val = {name: entry.pop(VAL_KEY) for name, entry in test.items()}
    chosen = thresholded(test, val, rule="youden", fixed=0.5, per_site=False).federation
    # the pooled validation patients' histograms, Youden's J by hand over the interior edges
    neg = np.sum([v["per_patient"]["hist_neg"] for v in val.values()], axis=0)
    pos = np.sum([v["per_patient"]["hist_pos"] for v in val.values()], axis=0)
    js = [pos[k:].sum() / pos.sum() + neg[:k].sum() / neg.sum() - 1 for k in range(1, 20)]
    assert chosen.edge == 1 + int(np.argmax(js)) and chosen.value == pytest.approx(chosen.edge / 20)
    assert (chosen.rule, chosen.chosen_on, chosen.level) == ("youden", "validation", "per_patient")
    # another test set (here: the labels flipped) leaves the threshold where it was
    flipped = copy.deepcopy(test)
    for entry in flipped.values():
        for level in (entry, entry["per_patient"]):
            level["hist_neg"], level["hist_pos"] = level["hist_pos"], level["hist_neg"]
    assert thresholded(flipped, val, rule="youden", fixed=0.5, per_site=False).federation == chosen


def test_test_counts_at_the_edge_match_the_raw_test_scores():
    entry, (y, s, p), _ = _site(7)
    val = entry.pop(VAL_KEY)
    threshold = choose({"a": val}, rule="youden", fixed=0.5)
    out = at(entry, threshold)
    ids, patient_y, patient_s = patient_scores(y, s, p)
    called = patient_s >= threshold.value
    per_patient = out["per_patient"]
    assert per_patient["tp"] == int(np.sum(called & (patient_y == 1)))
    assert per_patient["tn"] == int(np.sum(~called & (patient_y == 0)))
    assert out["tp"] == int(np.sum((s >= threshold.value) & (y == 1)))
    # Wilson intervals whose unit is the patient: a sensitivity over the positive patients
    assert per_patient["sensitivity"] == per_patient["tp"] / int(patient_y.sum())
    lo, hi = per_patient["sensitivity_ci"]
    assert lo < per_patient["sensitivity"] < hi
    assert per_patient["threshold"]["value"] == threshold.value and len(ids) == per_patient["n"]


def test_fixed_rule_and_no_validation_keep_the_sites_own_counts():
    entry, _, _ = _site(3)
    val = entry.pop(VAL_KEY)
    for result in (thresholded({"a": entry}, {"a": val}, rule="fixed", fixed=0.5, per_site=True),
                   thresholded({"a": entry}, {}, rule="youden", fixed=0.5, per_site=False)):
        kept = result.per_site["a"]
        assert kept["tp"] == entry["tp"] and kept["sensitivity_ci"] == entry["sensitivity_ci"]
        assert result.federation.value == 0.5 and result.federation.rule == "fixed"
    assert "no site sent validation" in thresholded({"a": entry}, {}, rule="youden", fixed=0.5,
                                                    per_site=False).federation.reason


def test_per_site_thresholds_each_from_the_sites_own_validation():
    a, _, _ = _site(1)
    b, _, _ = _site(2)
    val = {"a": a.pop(VAL_KEY)}
    b.pop(VAL_KEY)  # site b sent no validation metrics: it keeps the federation's threshold
    result = thresholded({"a": a, "b": b}, val, rule="youden", fixed=0.5, per_site=True)
    own = youden(val["a"]["per_patient"]["hist_neg"], val["a"]["per_patient"]["hist_pos"])
    assert result.per_site["a"]["threshold"]["value"] == pytest.approx(own[0] / 20)
    assert result.per_site["b"]["threshold"]["value"] == result.federation.value
    assert "federation's threshold" in result.per_site["b"]["threshold"]["reason"]
    # the pool is counted at the federation's threshold at every site
    assert all(e["threshold"]["value"] == result.federation.value for e in result.for_pool.values())


def test_an_edge_beyond_the_test_histograms_is_refused():
    entry, _, _ = _site(4, bins=10)
    with pytest.raises(ValueError, match="beyond"):
        at(entry, Threshold(0.75, "youden", "validation", edge=15))


def test_the_recorder_stores_the_test_metrics_at_the_validation_threshold(tmp_path: Path):
    settings = Settings(eval_bootstrap=20, eval_hist_bins=20, eval_threshold_per_site=True)
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", "test", settings.to_run_config(), ["s0", "s1"])
        recorder = StudyRecorder(store, "r", settings, rounds=1)
        per_site = {f"s{k}": _site(k)[0] for k in range(2)}
        val = {site: copy.deepcopy(entry[VAL_KEY]) for site, entry in per_site.items()}
        recorder.on_train(RoundReplies(1, per_site={
            site: {"train_loss": 0.5, "label_counts": {0: 20, 1: 20}, "skipped": {}} for site in per_site}))
        recorder.on_evaluate(RoundReplies(1, per_site=per_site))
        recorder.progress.close()
        summary = build_summary(store, "r")
    expected = choose(val, rule="youden", fixed=0.5)
    threshold = summary["threshold"]
    assert (threshold["value"], threshold["rule"], threshold["chosen_on"]) == (expected.value, "youden", "validation")
    assert set(threshold["per_site"]) == {"s0", "s1"}
    own = youden(val["s0"]["per_patient"]["hist_neg"], val["s0"]["per_patient"]["hist_pos"])
    assert threshold["per_site"]["s0"] == pytest.approx(own[0] / 20)
    pooled = summary["global"]["per_patient"]
    neg = np.sum([_site(k)[0]["per_patient"]["hist_neg"] for k in range(2)], axis=0)
    assert pooled["tn"] == int(neg[:expected.edge].sum())
    assert summary["global"]["auc_binning_error"] is not None and summary["global"]["per_patient"]["ece"] is not None
