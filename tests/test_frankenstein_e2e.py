"""The detector end to end: real studies (in-process) on MedMNIST federations, one clean and
one confounded, through the ClientApp, the strategy and the server's analysis."""

import json

import pytest

from fedir.config import Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.medmnist import import_medmnist
from tests.shared_data import shared_data

pytestmark = pytest.mark.slow
SIGNALS = {"site_label_association", "pooled_vs_within_auc", "auc_heterogeneity", "site_separability", "cross_site"}


def _study(tmp_path, name: str, **importer) -> dict:
    fed = tmp_path / name
    import_medmnist(shared_data() / "medmnist" / "breastmnist.npz", fed, sites=3, seed=3, **importer)
    settings = Settings(
        federation_sites=";".join(str(fed / f"site-{k}") for k in range(3)), train_rounds=2,
        train_local_steps=8, train_batch_size=32, model_image_size=28, eval_bootstrap=100, bias_bootstrap=100,
        bias_cross_site=True,  # opt-in: every signal, the cross-site matrix too
    )
    summary = run_inprocess(settings, tmp_path / f"run-{name}")
    assert json.loads((tmp_path / f"run-{name}" / "summary.json").read_text())["bias"]["alarm"] == summary["bias"]["alarm"]
    return summary


def test_confounded_federation_fires_and_names_the_site(tmp_path):
    summary = _study(tmp_path, "confounded", prevalence_skew=0.95, marker_site=0)
    bias = summary["bias"]
    assert set(bias["tests"]) == SIGNALS  # every signal computed, cross-site after the last round
    assert bias["alarm"] and "site_label_association" in bias["signals"]
    assert "site-0" in bias["tests"]["site_label_association"]["sites"]
    assert any("site-0" in reason for reason in bias["reasons"])
    assert "site-0" in bias["sensitivity"]["sites"]  # the alarm rests on site-0
    report = (tmp_path / "run-confounded" / "report.html").read_text()
    for heading in ("Forest plot", "Pooled against within-site AUC", "Site separability", "Cross-site evaluation",
                    "Leave one site out"):
        assert heading in report


def test_clean_federation_stays_quiet(tmp_path):
    bias = _study(tmp_path, "clean")["bias"]
    assert set(bias["tests"]) == SIGNALS
    assert not bias["alarm"] and bias["reasons"] == []
    assert all(bias["tests"][name]["computable"] for name in SIGNALS), {
        n: t["reason"] for n, t in bias["tests"].items() if not t["computable"]}
