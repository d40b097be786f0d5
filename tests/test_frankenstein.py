"""The Frankenstein detector's signals, each on a federation that must fire and one that must not."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from fedir.client.embedding import MAX_DIM, embedding_moments, predict_with_embedding, projection
from fedir.metrics import site_metrics
from fedir.models import build_model
from fedir.strategies.bias import SECONDARY, pooled_vs_within_auc, verdict
from fedir.strategies.cross_site_gap import cross_site_gap
from fedir.strategies.frankenstein import Thresholds, analyse
from fedir.strategies.heterogeneity import heterogeneity
from fedir.strategies.separability import site_separability


def _eval(rng, n: int, prevalence: float, separation: float, shift: float = 0.0) -> dict:
    """A site's evaluation aggregates: scores = sigmoid(separation * label + shift + noise)."""
    y = (rng.random(n) < prevalence).astype(int)
    if y.min() == y.max():
        y[0] = 1 - y[0]
    s = 1 / (1 + np.exp(-(separation * (y - 0.5) + shift + rng.normal(0, 1, n))))
    return site_metrics(y, s, [f"p{i}" for i in range(n)], n_boot=200, seed=1)


def _strict_json(d) -> None:
    json.dumps(d, allow_nan=False)


# ---- heterogeneity ---------------------------------------------------------------------------


def test_heterogeneity_fires_when_one_site_is_far_better():
    rng = np.random.default_rng(0)
    per_site = {f"s{k}": _eval(rng, 300, 0.5, 0.5) for k in range(3)}
    per_site["s3"] = _eval(rng, 300, 0.5, 6.0)
    out = heterogeneity(per_site)
    assert out["alarm"] and out["sites"][0] == "s3"
    assert out["i2"] > 0.5 and out["p_value"] < 0.01
    assert out["random_effects_ci"][0] < out["random_effects_auc"] < out["random_effects_ci"][1]
    _strict_json(out)


def test_heterogeneity_rarely_fires_on_identical_sites():
    """Same score distribution at every site: the false-alarm rate stays near alpha (1%)."""
    alarms = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        out = heterogeneity({f"s{k}": _eval(rng, 200, 0.5, 2.0) for k in range(4)})
        assert out["computable"]
        alarms.append(out["alarm"])
    assert sum(alarms) <= 2


def test_heterogeneity_not_computable_with_one_site():
    rng = np.random.default_rng(2)
    out = heterogeneity({"s0": _eval(rng, 100, 0.5, 2.0)})
    assert not out["computable"] and not out["alarm"] and "not computable" in out["reason"]


# ---- pooled vs within: the bootstrap interval -------------------------------------------------


def test_gap_interval_keeps_a_small_noisy_gap_quiet():
    """Tiny test sets: a gap above max_gap by chance, but its interval covers 0."""
    rng = np.random.default_rng(3)
    per_site = {f"s{k}": _eval(rng, 12, 0.5, 1.0, shift=0.3 * k) for k in range(3)}
    out = pooled_vs_within_auc(per_site, max_gap=-1.0)  # any gap exceeds the threshold...
    assert out["gap_ci"][0] <= 0 <= out["gap_ci"][1]  # ...but its interval covers 0
    assert not out["alarm"]
    assert out["gap_ci_sites"] is not None


def test_gap_interval_lets_a_real_gap_fire():
    rng = np.random.default_rng(4)
    per_site = {f"s{k}": _eval(rng, 200, 0.1, 0.5, shift=-1.5) for k in range(3)}
    per_site["hot"] = _eval(rng, 200, 0.9, 0.5, shift=1.5)
    out = pooled_vs_within_auc(per_site)
    assert out["alarm"] and out["gap_ci"][0] > 0 and "hot" in out["sites"]


# ---- embedding separability ---------------------------------------------------------------------


def _moments(rng, n: int, site_shift: np.ndarray, class_shift: float, d: int = 12):
    y = rng.integers(0, 2, n)
    f = rng.normal(0, 1, (n, d)) + site_shift
    f[:, 0] += class_shift * y
    return embedding_moments(f, y, 2)


def test_separability_fires_when_features_identify_a_site_not_the_disease():
    rng = np.random.default_rng(5)
    moments = {f"s{k}": _moments(rng, 80, np.zeros(12), 0.2) for k in range(3)}
    marker = np.zeros(12)
    marker[3] = 4.0
    moments["marked"] = _moments(rng, 80, marker, 0.2)
    out = site_separability(moments)
    assert out["alarm"] and out["sites"] == ["marked"]
    assert out["site_accuracy"] > 0.9 and out["class_accuracy"] < 0.65
    assert out["site_accuracy_ci"][0] <= out["site_accuracy"] <= out["site_accuracy_ci"][1]
    _strict_json(out)


def test_separability_quiet_when_sites_share_one_distribution():
    rng = np.random.default_rng(6)
    out = site_separability({f"s{k}": _moments(rng, 80, np.zeros(12), 2.0) for k in range(4)})
    assert out["computable"] and not out["alarm"]
    assert out["site_accuracy"] < 0.65 < out["class_accuracy"]


def test_small_groups_send_nothing_and_wide_embeddings_are_projected():
    rng = np.random.default_rng(7)
    y = np.array([0] * 30 + [1] * 3)
    m = embedding_moments(rng.normal(size=(33, 200)), y, 2)
    assert list(m.counts) == [30, 0, 33]  # 3 positives < 5: suppressed
    assert not m.means[1].any() and not m.covs[1].any()
    assert m.dim == MAX_DIM and projection(200).shape == (200, MAX_DIM)
    assert np.allclose(projection(200), projection(200))  # every site draws the same basis


@pytest.mark.parametrize("name", ["resnet_small", "logreg", "mlp"])
def test_embedding_is_the_last_layers_input(name):
    model = build_model(name, n_features=6)
    x = torch.randn(7, 6) if name in ("logreg", "mlp") else torch.randn(7, 1, 32, 32)
    scores, features = predict_with_embedding(model, x, torch.device("cpu"))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert scores.shape == (7,) and features.shape == (7, last.in_features)
    with torch.no_grad():
        expected = torch.softmax(last(torch.as_tensor(features)), dim=1)[:, 1].numpy()
    assert np.allclose(scores, expected, atol=1e-5)


# ---- cross-site -----------------------------------------------------------------------------------


def _entry(auc):
    return {"auc": auc, "auc_ci": [auc - 0.05, auc + 0.05], "n": 100}


def test_cross_site_fires_when_models_do_not_travel():
    sites = ["a", "b", "c"]
    matrix = {m: {d: _entry(0.9 if m == d else 0.55) for d in sites} for m in sites}
    out = cross_site_gap(matrix)
    assert out["alarm"] and out["gap"] == pytest.approx(0.35) and out["gap_ci"][0] > 0
    _strict_json(out)


def test_cross_site_quiet_when_models_transfer():
    sites = ["a", "b", "c"]
    matrix = {m: {d: _entry(0.8 + (0.02 if m == d else 0.0)) for d in sites} for m in sites}
    out = cross_site_gap(matrix)
    assert out["computable"] and not out["alarm"]


# ---- verdict and sensitivity -------------------------------------------------------------------


def _fire(reason: str) -> dict:
    return {"alarm": True, "reason": reason}


QUIET = {"alarm": False, "reason": ""}


def test_by_default_secondary_signals_only_warn_however_many_fire():
    """bias.secondary-to-alarm = 0 (the default): three secondary signals, no primary, no alarm;
    all three are listed as warnings, in the order of the tests."""
    tests = {"site_label_association": QUIET, "auc_heterogeneity": _fire("het"),
             "site_separability": _fire("sep"), "cross_site": _fire("cross")}
    for v in (verdict(tests), verdict(tests, 0)):
        assert v["alarm"] is False and v["reasons"] == [] and v["secondary_to_alarm"] == 0
        assert v["warnings"] == ["het", "sep", "cross"]
        assert v["signals"] == ["auc_heterogeneity", "site_separability", "cross_site"]


def test_a_primary_raises_the_alarm_with_the_secondaries_as_corroborating_reasons():
    tests = {"site_label_association": _fire("assoc"), "pooled_vs_within_auc": QUIET,
             "auc_heterogeneity": _fire("het"), "site_separability": _fire("sep")}
    for k in (0, 1, 2, 5):
        v = verdict(tests, k)
        assert v["alarm"] is True and v["reasons"] == ["assoc", "het", "sep"] and v["warnings"] == []


def test_with_two_secondary_to_alarm_one_warns_and_two_raise_the_alarm():
    """bias.secondary-to-alarm = 2, the rule before the default became 0."""
    one = verdict({"site_label_association": QUIET, "auc_heterogeneity": _fire("x"), "cross_site": QUIET}, 2)
    assert not one["alarm"] and one["warnings"] == ["x"]
    two = verdict({"site_label_association": QUIET, "auc_heterogeneity": _fire("x"), "cross_site": _fire("y")}, 2)
    assert two["alarm"] and two["reasons"] == ["x", "y"] and two["warnings"] == []
    assert verdict({"auc_heterogeneity": _fire("x")}, 1)["alarm"] is True


def test_a_negative_secondary_to_alarm_is_refused():
    with pytest.raises(ValueError, match="secondary_to_alarm must be >= 0"):
        verdict({"auc_heterogeneity": QUIET}, -1)


def test_the_setting_reaches_the_verdict_and_its_leave_one_site_out_reruns():
    """A clean federation whose embedding identifies the sites and whose AUCs differ: two
    secondary signals. Under the default they warn; with bias.secondary-to-alarm = 2 the
    verdict alarms, and the leave-one-site-out reruns judge by the same rule."""
    rng = np.random.default_rng(11)
    counts = {f"s{k}": {0: 60, 1: 40} for k in range(4)}
    per_site = {s: _eval(rng, 150, 0.4, sep) for s, sep in zip(counts, (1.0, 3.0, 1.0, 3.0))}
    moments = {s: _moments(rng, 80, np.full(12, 3.0 * k), 2.0) for k, s in enumerate(counts)}
    quiet = analyse(counts, per_site, moments, Thresholds(bootstrap=0))
    assert set(quiet["signals"]) == {"auc_heterogeneity", "site_separability"}
    assert quiet["alarm"] is False and len(quiet["warnings"]) == 2
    assert not any(e["alarm"] for e in quiet["sensitivity"]["by_site"].values())
    loud = analyse(counts, per_site, moments, Thresholds(bootstrap=0, secondary_to_alarm=2))
    assert loud["alarm"] is True and loud["secondary_to_alarm"] == 2 and loud["warnings"] == []
    for entry in loud["sensitivity"]["by_site"].values():
        assert set(entry["signals"]) <= set(SECONDARY)  # no primary in any subset
        assert entry["alarm"] is (len(entry["signals"]) >= 2)


def test_analyse_flags_the_site_an_alarm_rests_on():
    rng = np.random.default_rng(8)
    counts = {"s0": {0: 5, 1: 95}, "s1": {0: 60, 1: 40}, "s2": {0: 58, 1: 42}, "s3": {0: 61, 1: 39}}
    per_site = {s: _eval(rng, 150, 0.4, 1.5) for s in counts}
    out = analyse(counts, per_site, {}, Thresholds())
    assert out["alarm"] and "site_label_association" in out["signals"]
    sens = out["sensitivity"]
    assert sens["sites"] == ["s0"] and "without s0 the alarm clears" in sens["flags"][0]
    assert not sens["by_site"]["s0"]["alarm"] and sens["by_site"]["s1"]["alarm"]
    _strict_json(out)


def test_analyse_clean_federation_is_quiet_and_stable():
    rng = np.random.default_rng(9)
    counts = {f"s{k}": {0: 60, 1: 40} for k in range(4)}
    per_site = {s: _eval(rng, 150, 0.4, 1.5) for s in counts}
    moments = {s: _moments(rng, 80, np.zeros(12), 2.0) for s in counts}
    out = analyse(counts, per_site, moments, Thresholds())
    assert not out["alarm"] and out["signals"] == [] and out["sensitivity"]["flags"] == []


def test_rounds_before_the_last_leave_out_sensitivity_and_separability_interval():
    """Only the final round's verdict carries the leave-one-site-out sensitivity and the
    separability interval; every round's signals and alarms are those of the full analysis."""
    rng = np.random.default_rng(8)
    counts = {"s0": {0: 5, 1: 95}, "s1": {0: 60, 1: 40}, "s2": {0: 58, 1: 42}, "s3": {0: 61, 1: 39}}
    per_site = {s: _eval(rng, 150, 0.4, 1.5) for s in counts}
    moments = {s: _moments(rng, 80, np.zeros(12), 2.0) for s in counts}
    full = analyse(counts, per_site, moments, Thresholds())
    cheap = analyse(counts, per_site, moments, Thresholds(), final=False)
    assert cheap["alarm"] == full["alarm"] and cheap["signals"] == full["signals"]
    assert cheap["reasons"] == full["reasons"]
    assert cheap["sensitivity"]["by_site"] == {} and "final round" in cheap["sensitivity"]["reason"]
    assert full["sensitivity"]["by_site"]
    sep_full, sep_cheap = full["tests"]["site_separability"], cheap["tests"]["site_separability"]
    assert sep_full["site_accuracy_ci"] is not None and sep_cheap["site_accuracy_ci"] is None
    assert sep_cheap["site_accuracy"] == sep_full["site_accuracy"]
    assert cheap["tests"]["pooled_vs_within_auc"] == full["tests"]["pooled_vs_within_auc"]


def test_many_sites_skip_the_pairwise_analyses():
    """A 1,000-site simulation must not spend its rounds on pairwise separability or
    leave-one-site-out: those are skipped with a reason. The gap's bootstrap intervals,
    vectorised (fedir.metrics.resample_histograms), are no longer skipped."""
    rng = np.random.default_rng(10)
    one = _eval(rng, 40, 0.5, 2.0)
    moments = _moments(rng, 40, np.zeros(12), 2.0)
    sites = [f"s{k}" for k in range(300)]
    out = analyse({s: {0: 20, 1: 20} for s in sites}, {s: one for s in sites}, {s: moments for s in sites},
                  Thresholds())
    assert out["tests"]["site_separability"]["reason"].startswith("skipped")
    assert out["tests"]["pooled_vs_within_auc"]["gap_ci"] is not None
    assert out["sensitivity"]["reason"].startswith("skipped")
    assert out["tests"]["site_label_association"]["computable"]
