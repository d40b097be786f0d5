"""The clinical-only companion study (baseline.clinical) and its table beside the imaging model."""

import csv
import json

import pytest

from fedir.config import Settings, SettingsError
from fedir.server.report.baseline import (
    baseline_section,
    baseline_text,
    comparison,
    with_baselines,
)
from fedir.simulations.companion import check_clinical_columns, clinical_settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.synthetic import generate_federation


def _entry(auc, n, image_auc=0.99):
    """A summary entry whose per-patient AUC is `auc` (the per-image one is another number)."""
    per_patient = {"n_test": n, "n_patients": n, "auc": auc, "auc_ci": [auc - 0.1, auc + 0.1],
                   "accuracy": 0.6, "accuracy_ci": [0.5, 0.7], "reasons": {}}
    return {**per_patient, "n_test": 3 * n, "auc": image_auc, "per_patient": per_patient}


def test_comparison_pairs_sites_and_never_fills_a_missing_one():
    imaging = {"per_site": {"a": _entry(0.55, 30), "b": _entry(0.52, 20)}, "global": _entry(0.54, 50)}
    clinical = {"run_id": "r1", "evaluated_round": 3, "per_site": {"a": _entry(0.77, 10)},
                "global": _entry(0.75, 10)}
    cmp = comparison(imaging, clinical)
    assert cmp["per_site"]["a"]["clinical"]["auc"] == 0.77 and cmp["per_site"]["a"]["imaging"]["auc"] == 0.55
    assert cmp["per_site"]["b"]["clinical"] is None and cmp["missing"] == ["b"]
    assert cmp["per_site"]["a"]["imaging"]["n_test"] == 30  # patients, not the 90 images
    text = baseline_text({"clinical_baseline": cmp})
    assert "0.770 [0.670, 0.870]" in text and "0.550 [0.450, 0.650]" in text and "0.990" not in text
    # a site whose images carry both labels has no per-patient imaging metric: n/a, not its per-image one
    imaging["per_site"]["b"] = {**_entry(0.52, 20), "per_patient": None}
    assert comparison(imaging, clinical)["per_site"]["b"]["imaging"] is None
    html = baseline_section({"clinical_baseline": cmp})
    assert "Clinical-only baseline" in html and "r1" in html and "n/a" in html
    assert comparison(imaging, None)["available"] is False


def test_only_runs_that_asked_get_a_baseline_entry(tmp_path):
    summary = {"per_site": {}, "global": _entry(0.5, 1)}
    assert with_baselines(summary, tmp_path, {}) is summary
    marked = with_baselines(summary, tmp_path, {"baseline.clinical": True})
    assert marked["clinical_baseline"]["available"] is False  # asked for, not found: said so
    assert "not available" in baseline_text(marked)


def test_companion_settings_keep_the_federation_and_split_and_switch_off_image_knobs(tmp_path):
    s = Settings(federation_sites="x;y", train_rounds=4, train_seed=7, data_test_fraction=0.3,
                 train_objective="fixmatch", train_fedbn=True, strategy_name="fedadam",
                 baseline_clinical=True, baseline_clinical_steps=20, monitor_tensorboard="tb")
    c = clinical_settings(s)
    assert (c.federation_sites, c.train_rounds, c.train_seed, c.data_test_fraction, c.strategy_name) == \
        ("x;y", 4, 7, 0.3, "fedadam")
    assert (c.data_inputs, c.model_name, c.train_objective, c.train_local_steps) == \
        ("clinical", "logreg", "supervised", 20)
    assert not c.train_fedbn and not c.baseline_clinical and c.monitor_tensorboard == ""
    site = tmp_path / "s"
    site.mkdir()
    with (site / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["patient_id", "path", "label"], ["p", "a.dcm", "1"]])
    with pytest.raises(SettingsError, match="no clin_"):
        check_clinical_columns(Settings(federation_sites=str(site), baseline_clinical=True))


def test_an_imaging_run_with_a_clinical_baseline_reports_both_on_the_same_patients(tmp_path):
    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=24, seed=0, unlabelled_fraction=0.0, image_size=32,
                        progress=False)
    settings = Settings(federation_sites=";".join(str(fed / f"site-{i}") for i in range(2)),
                        model_image_size=32, train_rounds=1, train_local_epochs=1, train_batch_size=8,
                        eval_bootstrap=20, baseline_clinical=True, baseline_clinical_steps=10)
    summary = run_inprocess(settings, tmp_path / "run")
    companion = json.loads((tmp_path / "run" / "clinical-baseline" / "summary.json").read_text())
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    cmp = written["clinical_baseline"]
    assert cmp["available"] and cmp["run_id"] == companion["run_id"] and summary["clinical_baseline"] == cmp
    for site in ("site-0", "site-1"):
        pair = cmp["per_site"][site]
        assert pair["clinical"]["auc"] == companion["per_site"][site]["per_patient"]["auc"]
        assert pair["imaging"]["auc"] == written["per_site"][site]["per_patient"]["auc"]
        # the same test patients, compared per patient on both sides: the clinical
        # model's rows are the imaging model's patients
        assert pair["clinical"]["n_test"] == pair["imaging"]["n_test"] == pair["imaging"]["n_patients"] > 0
        assert written["per_site"][site]["n_test"] >= pair["imaging"]["n_patients"]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Clinical-only baseline beside the imaging model" in report
    assert f"{cmp['per_site']['site-0']['clinical']['auc']:.3f}" in report


@pytest.mark.slow
def test_fedir_simulate_runs_the_companion_on_flowers_engine_and_prints_both(tmp_path, capsys):
    """The command line on Ray: the companion's folder, and the side-by-side table printed."""
    from fedir.cli import main

    generate_federation(tmp_path / "fed", sites=2, patients=16, seed=0, unlabelled_fraction=0.0,
                        image_size=32, progress=False)
    toml = tmp_path / "s.toml"
    toml.write_text('[federation]\nsites = ["fed/site-0", "fed/site-1"]\n'
                    "[train]\nrounds = 1\nlocal-epochs = 1\nbatch-size = 4\n"
                    "[model]\nimage-size = 32\n[eval]\nbootstrap = 20\n[baseline]\nclinical = true\n")
    assert main(["simulate", str(toml), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Clinical-only baseline" in out and "clinical AUC [95% CI]" in out
    assert (tmp_path / "run" / "clinical-baseline" / "report.html").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["clinical_baseline"]["available"]
