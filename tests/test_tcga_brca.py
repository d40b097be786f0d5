"""Fed-TCGA-BRCA: the import (FLamby's split, six regions) and a two-round survival study
through fedir's ServerApp logic and ClientApp: every metric per site, the verdict,
summary.json, the report and the dashboard's view of it."""

import json

import pytest

from fedir.cli import main
from fedir.client.tabular import is_tabular_site, read_tabular_site
from fedir.config import Settings
from fedir.server.dashboard_state import overview, run_detail
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.tcga_brca import REGIONS, default_source, import_tcga_brca

SOURCE = default_source()
pytestmark = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"Fed-TCGA-BRCA data not at {SOURCE}")


@pytest.fixture(scope="module")
def brca(tmp_path_factory):
    out = tmp_path_factory.mktemp("brca")
    import_tcga_brca(out)
    return out


def test_import_keeps_flambys_regions_and_split(brca, tmp_path, monkeypatch, capsys):
    sites = {r: read_tabular_site(brca / r, kind="survival") for r in REGIONS}
    sizes = {r: (len(s.train.patients), len(s.test.patients)) for r, s in sites.items()}
    assert sizes == {"northeast": (248, 63), "south": (156, 40), "west": (164, 42), "midwest": (129, 33),
                     "europe": (129, 33), "canada": (40, 11)}
    events = sum(int(s.train.y[:, 1].sum() + s.test.y[:, 1].sum()) for s in sites.values())
    assert events == 151 and all(len(s.features) == 39 and not s.val.patients for s in sites.values())
    assert all(is_tabular_site(brca / r) for r in REGIONS)
    monkeypatch.setenv("FEDIR_DATA", str(SOURCE.parent))
    assert main(["data", "import", "tcga-brca", "--out", str(tmp_path / "b")]) == 0
    assert "248 train, 63 test patients, 59 events" in capsys.readouterr().out
    monkeypatch.setenv("FEDIR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        import_tcga_brca(tmp_path / "x")


def test_a_two_round_survival_study_reports_every_site_and_the_verdict(brca, tmp_path):
    settings = Settings(task_kind="survival", federation_sites=";".join(str(brca / r) for r in REGIONS),
                        strategy_name="fedadam", train_rounds=2, train_local_steps=10, train_batch_size=8,
                        train_lr=0.1, train_weight_decay=0.0, eval_bootstrap=20, eval_select="last")
    summary = run_inprocess(settings, tmp_path)
    in_process = {key: summary[key] for key in ("upload_bytes", "wire_bytes")}  # run_inprocess adds them
    assert summary == {**json.loads((tmp_path / "summary.json").read_text()), **in_process}
    assert summary["status"] == "finished" and summary["task"] == "survival" and summary["evaluated_round"] == 2
    assert not [n for n in summary["notes"] if n["kind"] == "missing"]  # no site failed a round
    for region in REGIONS:
        entry = summary["per_site"][region]
        assert entry["n_patients"] > 0 and 0 <= entry["c_index"] <= 1
        assert entry["c_index_ci"][0] <= entry["c_index"] <= entry["c_index_ci"][1]
        assert entry["uno_c_index"] is not None and entry["ibs"] is None and "ibs" in entry["reasons"]
        assert len(entry["km"]["survival"]) == settings.eval_time_bins
    pooled = summary["global"]
    assert pooled["n_patients"] == 222 and pooled["events"] == sum(summary["per_site"][r]["events"] for r in REGIONS)
    assert pooled["c_index"] is not None and pooled["c_index_binning_error"] > 0
    assert pooled["c_index_ci"] is None and "binning bound" in pooled["reasons"]["c_index_ci"]
    tests = summary["bias"]["tests"]
    assert {"site_label_association", "pooled_vs_stratified_c", "c_index_heterogeneity", "survival_by_site",
            "follow_up_by_site"} <= set(tests) and summary["bias"]["alarm"] is not None
    # the event rate by site: Europe 9 of 162 patients, the Northeast 59 of 311
    assert tests["site_label_association"]["computable"] and tests["site_label_association"]["p_value"] < 0.01
    report = (tmp_path / "report.html").read_text()
    assert "Kaplan-Meier curves per site" in report and "Harrell&#39;s C [95% CI]" in report
    line = overview(tmp_path)["runs"][0]
    detail = run_detail(tmp_path, line["source"], line["run_id"])
    assert detail["run"]["rounds_evaluated"] == 2 and len(detail["table"]) == len(REGIONS) + 1
