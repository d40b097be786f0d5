"""Task kind survival: manifest rows, the Cox loss, the C-indices and the pooled C from
aggregates against lifelines, the protocol, the bias signals and the settings it refuses."""

import numpy as np
import pytest
import torch
from lifelines import CoxPHFitter
from lifelines.datasets import load_rossi
from lifelines.utils import concordance_index
from scipy.stats import rankdata

from fedir.client.manifest import ManifestError, read_manifest
from fedir.client.tabular import read_tabular_site
from fedir.config import Settings, SettingsError
from fedir.protocol import decode_evaluation, encode_evaluation
from fedir.server.summary import selection_line
from fedir.strategies.frankenstein import Thresholds, analyse
from fedir.tasks import task_of
from fedir.tasks.survival import loss
from fedir.tasks.survival_metrics import (
    censoring_weights,
    exact_pooled_c_index,
    pair_counts,
    pooled_c_index,
    site_survival_metrics,
)

TIME_BINS, WIDTH = 20, 180.0


def _manifest(tmp_path, rows, header="patient_id,time,event,clin_age"):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return site


@pytest.mark.parametrize("row, message", [
    ("p2,-3,1,50", "row 3: a time is negative"),
    ("p2,,1,50", "row 3: a time is missing"),
    ("p2,ten,0,50", "row 3: a time is not a number"),
    ("p2,30,2,50", "row 3: an event is not 0 or 1"),
    ("p2,30,,50", "row 3: an event is not 0 or 1"),
    ("p2,30,yes,", "row 3: an event is not 0 or 1"),  # refused even though its covariate is missing
])
def test_a_bad_survival_row_is_refused_with_its_row_number(tmp_path, row, message):
    site = _manifest(tmp_path, ["p1,100,1,60", row])
    with pytest.raises(ManifestError) as caught:
        read_tabular_site(site, kind="survival")
    assert message in caught.value.public and "\n" not in str(caught.value)


def test_survival_rows_read_by_the_tabular_and_the_imaging_reader(tmp_path):
    site = _manifest(tmp_path, ["p1,100,1,60", "p2,250.5,0,70"])
    tab = read_tabular_site(site, kind="survival", val_fraction=0.0, test_fraction=0.5)
    y = np.concatenate([tab.train.y, tab.test.y])
    assert y.shape == (2, 2) and sorted(map(tuple, y.tolist())) == [(100.0, 1.0), (250.5, 0.0)]
    with pytest.raises(ManifestError, match="missing required column"):
        read_tabular_site(_manifest(tmp_path, ["p1,60"], "patient_id,clin_age"), kind="survival")
    imaging = _manifest(tmp_path, ["p1,a.dcm,100,1", "p2,b.dcm,-1,0"], "patient_id,path,time,event")
    with pytest.raises(ManifestError, match="row 3: time '-1' is negative") as caught:
        read_manifest(imaging, kind="survival")
    assert caught.value.public == "manifest.csv: row 3: a time is negative or not finite"


def test_cox_loss_matches_lifelines_efron_fit():
    """Minimising the loss (torchsurv, Efron ties) gives lifelines' coefficients, and the
    loss at them is lifelines' negative log partial likelihood per distinct event time."""
    rossi = load_rossi()
    covariates = [c for c in rossi.columns if c not in ("week", "arrest")]
    fitter = CoxPHFitter(penalizer=0.0).fit(rossi, "week", "arrest")
    x = torch.tensor(rossi[covariates].to_numpy(), dtype=torch.float64)
    target = torch.tensor(rossi[["week", "arrest"]].to_numpy(), dtype=torch.float64)
    beta = torch.zeros(len(covariates), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([beta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss((x @ beta)[:, None], target)
        value.backward()
        return value

    opt.step(closure)
    # torchsurv sums in float32 whatever the input's precision: coefficients agree to ~1e-3
    np.testing.assert_allclose(beta.detach().numpy(), fitter.params_[covariates].to_numpy(), atol=2e-3)
    at_lifelines = loss((x @ torch.tensor(fitter.params_[covariates].to_numpy()))[:, None], target)
    event_times = rossi.loc[rossi["arrest"] == 1, "week"].nunique()  # torchsurv's mean: per distinct event time
    assert float(at_lifelines) * event_times == pytest.approx(-fitter.log_likelihood_, rel=1e-6)


def test_cox_loss_of_a_batch_without_events_or_of_one_patient_is_zero():
    out = torch.tensor([[0.3], [-1.0]], requires_grad=True)
    value = loss(out, torch.tensor([[10.0, 0.0], [20.0, 0.0]]))
    value.backward()
    assert float(value.detach()) == 0 and torch.equal(out.grad, torch.zeros_like(out))
    assert float(loss(torch.tensor([[0.5]]), torch.tensor([[10.0, 1.0]]))) == 0


def _federation(seed=0, sites=5):
    """Sites with exponential times from a linear risk, uniform censoring, integer days (ties)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(sites):
        n = int(rng.integers(15, 60))
        x = rng.normal(size=n) + 0.3 * s
        t = np.round(rng.exponential(1500 * np.exp(-x)))
        c = np.round(rng.uniform(0, 4000, n))
        out.append((np.minimum(t, c), (t <= c).astype(int), x + rng.normal(scale=0.5, size=n)))
    return out


def test_site_c_indices_match_lifelines_and_their_cis_cover_them():
    for t, e, r in _federation():
        m = site_survival_metrics(t, e, r, n_boot=200, time_bins=TIME_BINS, time_bin_days=WIDTH)
        assert m["c_index"] == pytest.approx(concordance_index(t, -r, e), abs=1e-6)
        conc, tied, comp = pair_counts(t, e, r)
        assert (conc + 0.5 * tied) / comp == pytest.approx(concordance_index(t, -r, e), abs=1e-12)
        # Uno's C: torchsurv's, and the bootstrap's matrix form at unit multiplicities agree
        w = censoring_weights(t, e)
        ok = (t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & (e[None, :] == 0))
        comp_w = ok * (e[:, None] == 1) * w[:, None]
        credit = np.where(r[:, None] > r[None, :], 1.0, np.where(r[:, None] == r[None, :], 0.5, 0.0))
        assert m["uno_c_index"] == pytest.approx((comp_w * credit).sum() / comp_w.sum(), abs=2e-3)
        for name in ("c_index", "uno_c_index"):
            low, high = m[f"{name}_ci"]
            assert low <= m[name] <= high
        assert m["events"] == int(e.sum()) and sum(m["joint"]) == len(t)
        assert m["ibs"] is None and "baseline hazard" in m["reasons"]["ibs"]


def test_km_counts_are_k_suppressed():
    t = np.array([10.0, 20, 30, 400, 500, 600, 700, 800])
    e = np.array([1, 0, 1, 1, 0, 1, 0, 1])
    m = site_survival_metrics(t, e, -t, n_boot=0, time_bins=4, time_bin_days=365)
    assert m["km_at_risk"] == [8, 5, -1, 0]  # 2 at risk from day 730: below k = 5
    assert m["km_survival"][0] == pytest.approx((7 / 8) * (5 / 6))
    assert m["km_survival"][2:] == [-1.0, -1.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_c_from_aggregates_is_within_its_bound_of_the_exact_pooled_c(seed):
    fed = _federation(seed)
    per_site = {f"s{i}": site_survival_metrics(t, e, r, n_boot=0, time_bins=TIME_BINS, time_bin_days=WIDTH)
                for i, (t, e, r) in enumerate(fed)}
    pooled = pooled_c_index(per_site, time_bins=TIME_BINS)
    exact = exact_pooled_c_index(*zip(*fed))
    assert exact == pytest.approx(concordance_index(np.concatenate([f[0] for f in fed]),
                                                    -np.concatenate([f[2] for f in fed]),
                                                    np.concatenate([f[1] for f in fed])))
    assert abs(pooled["c_index"] - exact) <= pooled["binning_error"]
    assert abs(pooled["c_index"] - exact) < 0.03  # measured: 0.02 at most over these seeds
    # one site: the pooled C is the site's own, exactly
    one = pooled_c_index({"s0": per_site["s0"]}, time_bins=TIME_BINS)
    assert one["c_index"] == pytest.approx(per_site["s0"]["c_index"], abs=1e-6) and one["binning_error"] == 0


def test_survival_evaluation_crosses_the_protocol_unchanged():
    t, e, r = _federation()[0]
    m = site_survival_metrics(t, e, r, n_boot=50, time_bins=TIME_BINS, time_bin_days=WIDTH)
    name, back = decode_evaluation(encode_evaluation("siteA", m, None, m, kind="survival"))
    assert name == "siteA"
    for key in ("c_index", "c_index_ci", "uno_c_index_ci", "events", "joint", "km_at_risk", "pairs", "reasons"):
        assert back[key] == pytest.approx(m[key]) if not isinstance(m[key], dict) else back[key] == m[key]
    assert back["ibs"] is None and back["val"]["c_index"] == pytest.approx(m["c_index"])


def test_sites_that_differ_in_survival_and_follow_up_warn_and_alarm_only_under_the_setting():
    """Sites whose patients live longer and are followed longer, a model that ranks only
    within each site: survival and follow-up by site fire (both secondary), no primary. The
    default bias.secondary-to-alarm = 0 lists both as warnings; 2 raises the alarm."""
    rng = np.random.default_rng(3)
    per_site, counts = {}, {}
    for s in range(4):
        n = 80
        t = np.round(rng.exponential(300 * (s + 1), n)) + 1
        e = (rng.random(n) < 0.7).astype(int)
        risk = -rankdata(t) / n + rng.normal(scale=0.3, size=n)  # the same range at every site
        per_site[f"s{s}"] = site_survival_metrics(t, e, risk, n_boot=100, time_bins=TIME_BINS, time_bin_days=WIDTH)
        counts[f"s{s}"] = {0: 25, 1: 55}
    quiet = analyse(counts, per_site, {}, Thresholds(), kind="survival", time_bins=TIME_BINS)
    assert quiet["signals"] == ["survival_by_site", "follow_up_by_site"]
    assert quiet["alarm"] is False and len(quiet["warnings"]) == 2 and quiet["reasons"] == []
    loud = analyse(counts, per_site, {}, Thresholds(secondary_to_alarm=2), kind="survival", time_bins=TIME_BINS)
    assert loud["alarm"] is True and len(loud["reasons"]) == 2 and loud["warnings"] == []


def test_a_model_that_ranks_hospitals_raises_the_alarm():
    """Within each site the risk is noise, but sites with earlier events score higher: the
    pooled C is high, the stratified one 0.5, and the gap is the primary alarm."""
    rng = np.random.default_rng(3)
    per_site, counts = {}, {}
    for s in range(4):
        n = 80
        t = np.round(rng.exponential(300 * (s + 1), n)) + 1
        e = (rng.random(n) < 0.7).astype(int)
        per_site[f"s{s}"] = site_survival_metrics(t, e, -s + rng.normal(scale=0.01, size=n), n_boot=100,
                                                  time_bins=TIME_BINS, time_bin_days=WIDTH)
        counts[f"s{s}"] = {0: int((1 - e).sum()), 1: int(e.sum())}
    result = analyse(counts, per_site, {}, Thresholds(), kind="survival", time_bins=TIME_BINS)
    gap = result["tests"]["pooled_vs_stratified_c"]
    assert gap["alarm"] and gap["stratified_c_index"] == pytest.approx(0.5, abs=0.1) and gap["gap"] > 0.1
    assert result["alarm"] and "pooled_vs_stratified_c" in result["signals"]
    assert result["tests"]["survival_by_site"]["p_value"] < 0.01
    assert set(result["tests"]) == {"site_label_association", "pooled_vs_stratified_c", "c_index_heterogeneity",
                                    "survival_by_site", "follow_up_by_site"}


@pytest.mark.parametrize("override, key", [
    ({"train_objective": "fixmatch"}, "train.objective"),
    ({"train_mixup_alpha": 0.2}, "train.mixup-alpha"),
    ({"train_smote": True}, "train.smote"),
    ({"train_personalise": "intercept"}, "train.personalise"),
    ({"bias_cross_site": True}, "bias.cross-site"),
    ({"model_name": "basic_unet"}, "model.name"),
])
def test_settings_a_survival_study_cannot_use_are_refused_in_one_line(override, key):
    with pytest.raises(SettingsError) as caught:
        Settings(task_kind="survival", **override)
    assert key in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(SettingsError, match="task.kind"):
        Settings.from_run_config({"task.kind": "multiclass"})  # a kind fedir.tasks does not have


def test_the_task_contract_of_each_kind():
    for kind, outputs, metric in (("classification", 2, "auc"), ("survival", 1, "c_index"),
                                  ("segmentation", 3, "dice")):
        task = task_of(kind)
        assert task.n_outputs(2) == outputs and task.SELECTION_METRIC == metric in task.SUMMARY_METRICS
    assert task_of("survival").TARGET_COLUMNS == ("time", "event")
    with pytest.raises(ValueError, match="task.kind"):
        task_of("multiclass")


def test_a_survival_study_selects_its_round_on_the_validation_c_index(tmp_path):
    """A synthetic tabular survival federation with the hash split: the validation
    patients choose the round by their pooled C-index (never the test patients')."""
    from fedir.simulations.inprocess import run_inprocess

    rng = np.random.default_rng(0)
    sites = []
    for s in range(3):
        site = tmp_path / f"site-{s}"
        site.mkdir()
        x = rng.normal(size=(80, 2))
        t = np.round(rng.exponential(900 * np.exp(-x[:, 0]))) + 1
        c = np.round(rng.uniform(200, 3000, 80))
        rows = [f"p{s}-{i},{min(t[i], c[i]):g},{int(t[i] <= c[i])},{x[i, 0]:.4f},{x[i, 1]:.4f}" for i in range(80)]
        (site / "manifest.csv").write_text("patient_id,time,event,clin_a,clin_b\n" + "\n".join(rows) + "\n")
        sites.append(str(site))
    settings = Settings(task_kind="survival", federation_sites=";".join(sites), train_rounds=2,
                        train_local_steps=20, train_batch_size=8, train_lr=0.05, eval_bootstrap=20,
                        data_val_fraction=0.25, data_test_fraction=0.25)
    summary = run_inprocess(settings, tmp_path / "run")
    selection = summary["selection"]
    assert selection["score"] is not None and "validation C-index" in selection["criterion"]
    # the terminal and the report name the score by the kind's metric, not as an AUC
    assert selection["metric"] == "c_index"
    assert f"(validation C-index {selection['score']:.3f})" in selection_line(summary)
    assert "validation AUC" not in (tmp_path / "run" / "report.html").read_text()
    assert summary["global"]["c_index"] > 0.6  # the risk follows clin_a
    assert all(entry["c_index_ci"] is not None for entry in summary["per_site"].values())


def test_a_site_whose_bootstrap_ci_has_no_width_is_left_out_of_the_heterogeneity():
    from fedir.strategies.heterogeneity import heterogeneity

    per_site = {"a": {"c_index": 0.70, "c_index_ci": [0.60, 0.80]}, "b": {"c_index": 0.72, "c_index_ci": [0.62, 0.82]},
                "tiny": {"c_index": 1.0, "c_index_ci": [1.0, 1.0]}}
    out = heterogeneity(per_site, "c_index", alpha=0.01, min_i2=0.5)
    assert out["excluded"] == ["tiny"] and set(out["site_c_index"]) == {"a", "b"} and not out["alarm"]
