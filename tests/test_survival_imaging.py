"""Survival on imaging sites: the synthetic federation's outcome (censoring at the site's
cut-off, follow-up by site, hazard rising with the stenosis), the per-patient risk of an
imaging patient, an end-to-end in-process imaging survival study, and the bad inputs."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from lifelines import CoxPHFitter
from lifelines.statistics import multivariate_logrank_test

from fedir.client.inputs import check_manifest, load_view
from fedir.client.manifest import ManifestError, read_manifest
from fedir.config import Settings, SettingsError
from fedir.simulations.synthetic import (
    OUTCOME_EFFECTS,
    _add_lesions,
    _vessel_tree,
    draw_outcome,
    follow_up_end,
    generate_federation,
    lesion_narrowing,
)
from fedir.tasks.survival import per_patient, site_metrics

SITES, PATIENTS, SIZE = 4, 30, 16


def _rows(root: Path, site: int) -> list[dict]:
    with (root / f"site-{site}" / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def _patients(root: Path, sites: int = SITES) -> pd.DataFrame:
    """One row per patient: site, time, event, label, age, sex, the study date."""
    out = []
    for site in range(sites):
        for row in _rows(root, site):
            out.append({"patient_id": row["patient_id"], "site": site, "time": int(row["time"]),
                        "event": int(row["event"]), "label": int(row["label"]), "age": float(row["clin_age"]),
                        "sex": int(row["clin_sex"]), "acquired": row["acquired"]})
    table = pd.DataFrame(out)
    assert (table.groupby("patient_id")[["time", "event"]].nunique() == 1).all().all()  # one outcome a patient
    return table.drop_duplicates("patient_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def outcome_federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("outcome")
    generate_federation(root, sites=SITES, patients=PATIENTS, seed=5, image_size=SIZE, unlabelled_fraction=0.0,
                        progress=False, outcome=True)
    return root


def test_the_outcome_is_censored_at_the_sites_cut_off(outcome_federation: Path) -> None:
    table = _patients(outcome_federation)
    follow_up = [(follow_up_end(s) - dt.date.fromisoformat(a)).days for s, a in zip(table["site"], table["acquired"])]
    table["follow_up"] = follow_up
    censored, observed = table[table["event"] == 0], table[table["event"] == 1]
    assert len(censored) > 10 and len(observed) > 10
    assert (censored["time"] == censored["follow_up"]).all()  # administrative censoring, at the cut-off
    assert ((observed["time"] >= 1) & (observed["time"] < observed["follow_up"])).all()
    info = json.loads((outcome_federation / "federation.json").read_text())
    assert info["parameters"]["outcome"] is True
    for site in range(SITES):
        part = table[table["site"] == site]
        assert info["sites"][f"site-{site}"]["events"] == int(part["event"].sum())
        assert info["sites"][f"site-{site}"]["censored"] == int((1 - part["event"]).sum())


def test_follow_up_differs_by_site(outcome_federation: Path) -> None:
    """The reverse Kaplan-Meier (censoring as the event) differs across sites: the log-rank
    test the server's follow_up_by_site runs on binned counts finds it on the raw times."""
    table = _patients(outcome_federation)
    reverse = multivariate_logrank_test(table["time"], table["site"], 1 - table["event"])
    assert reverse.p_value < 0.01
    longest = table[table["event"] == 0].groupby("site")["time"].max()
    assert longest[3] > (follow_up_end(0) - dt.date(2020, 1, 1)).days  # beyond anything site-0 can follow


def test_the_hazard_rises_with_the_stenosis_on_the_generated_table(outcome_federation: Path) -> None:
    """A Cox fit on the written table: a significant stenosis (label 1, a 60-95% narrowing in
    every image) and age raise the hazard."""
    table = _patients(outcome_federation)
    fit = CoxPHFitter().fit(table[["time", "event", "label", "age", "sex"]], "time", "event")
    assert fit.params_["label"] > 0 and fit.confidence_intervals_.loc["label"].iloc[0] > 0
    assert fit.params_["age"] > 0


def test_draw_outcome_has_the_stated_proportional_hazards() -> None:
    """On many patients with known stenosis burdens, lifelines recovers the generator's log
    hazard ratio of the stenosis (within its CI), under censoring at a fixed follow-up."""
    rng = np.random.default_rng(0)
    n = 3000
    stenosis = np.where(rng.random(n) < 0.4, rng.uniform(0.6, 0.95, n), 0.0)
    draws = [draw_outcome(rng, OUTCOME_EFFECTS["stenosis"] * s, 1500) for s in stenosis]
    table = pd.DataFrame({"time": [d[0] for d in draws], "event": [d[1] for d in draws], "stenosis": stenosis})
    assert 0.2 < table["event"].mean() < 0.8 and table["time"].max() == 1500
    fit = CoxPHFitter().fit(table, "time", "event")
    low, high = fit.confidence_intervals_.loc["stenosis"]
    assert low < OUTCOME_EFFECTS["stenosis"] < high and low > 0


@pytest.mark.parametrize("label", [0, 1])
def test_lesion_narrowing_is_the_drawn_stenosis(label: int) -> None:
    rng = np.random.default_rng(label)
    vessels = _vessel_tree(rng, 128)
    _add_lesions(rng, vessels, label)
    narrowing = lesion_narrowing(vessels)
    assert (0.6 - 1e-3 <= narrowing <= 0.95) if label else narrowing == 0.0


def test_the_outcome_option_changes_no_pixel_and_adds_only_time_and_event(outcome_federation: Path,
                                                                        tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    info = generate_federation(plain, sites=2, patients=PATIENTS, seed=5, image_size=SIZE, unlabelled_fraction=0.0,
                               progress=False)
    assert "outcome" not in info["parameters"] and "events" not in info["sites"]["site-0"]
    for site in range(2):
        with_outcome, without = _rows(outcome_federation, site), _rows(plain, site)
        assert "time" not in without[0] and "event" not in without[0]
        for a, b in zip(with_outcome, without):
            assert {k: v for k, v in a.items() if k not in ("time", "event")} == b
            pa = pydicom.dcmread(outcome_federation / f"site-{site}" / a["path"]).pixel_array
            assert np.array_equal(pa, pydicom.dcmread(plain / f"site-{site}" / b["path"]).pixel_array)


def test_cli_outcome_flag(tmp_path: Path) -> None:
    from fedir.cli import main

    assert main(["data", "synth", str(tmp_path), "--sites", "1", "--patients", "4", "--image-size", "16",
                 "--outcome"]) == 0
    rows = _rows(tmp_path, 0)
    assert all(r["time"].isdigit() and r["event"] in ("0", "1") for r in rows)
    assert len(read_manifest(tmp_path / "site-0", kind="survival")) == len(rows)


# ---- the per-patient risk of an imaging site ------------------------------------------------


def test_an_imaging_patients_risk_is_the_mean_of_its_images() -> None:
    target = np.array([[100, 1], [300, 0], [100, 1], [50, 1], [300, 0]], dtype=float)
    scores = np.array([1.0, 0.0, 3.0, 5.0, 2.0])
    time, event, risk = per_patient(target, scores, ["a", "b", "a", "c", "b"])
    assert time.tolist() == [100, 300, 50] and event.tolist() == [1, 0, 1] and risk.tolist() == [2.0, 1.0, 5.0]
    out = site_metrics(target, scores, ["a", "b", "a", "c", "b"], n_boot=0, seed=0, bins=10, time_bins=4,
                       time_bin_days=100.0)
    assert out["n"] == 5 and out["n_patients"] == 3 and out["events"] == 2 and sum(out["joint"]) == 3
    # pairs (c before a), (c before b), (a before b): c riskiest, then a, then b: all concordant
    assert out["c_index"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="5 targets, 5 scores and 4 patient ids"):
        per_patient(target, scores, ["a", "b", "a", "c"])


# ---- bad input ----------------------------------------------------------------------------


def _imaging_site(tmp_path: Path, rows: list[str]) -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "manifest.csv").write_text("patient_id,path,time,event\n" + "\n".join(rows) + "\n")
    return site


def test_a_patient_whose_images_disagree_on_the_outcome_is_refused_with_its_row(tmp_path: Path) -> None:
    site = _imaging_site(tmp_path, ["p1,a.dcm,100,1", "p2,b.dcm,40,0", "p1,c.dcm,100,0"])
    with pytest.raises(ManifestError) as caught:
        read_manifest(site, kind="survival")
    assert caught.value.public.endswith("row 4: a patient's time/event differ from its row 2")
    assert "\n" not in str(caught.value)
    with pytest.raises(ManifestError, match="row 4"):  # what a simulation checks before starting Flower
        check_manifest(str(site), "auto", "survival")
    read_manifest(site)  # a classification study does not read the outcome columns


def test_an_imaging_survival_site_without_time_or_a_bad_time_is_refused(tmp_path: Path) -> None:
    site = _imaging_site(tmp_path, ["p1,a.dcm,100,1", "p2,b.dcm,-4,0"])
    with pytest.raises(ManifestError, match="row 3: time '-4' is negative"):
        load_view(str(site), "auto", 16, "mip", 0.15, 0.25, kind="survival")
    (site / "manifest.csv").write_text("patient_id,path,event\np1,a.dcm,1\n")
    with pytest.raises(ManifestError, match="missing required column"):
        load_view(str(site), "auto", 16, "mip", 0.15, 0.25, kind="survival")


@pytest.mark.parametrize("override, key", [
    ({"train_batch_size": 1}, "train.batch-size"),
    ({"model_name": "basic_unet"}, "model.name"),
])
def test_settings_an_imaging_survival_study_cannot_use_are_refused_in_one_line(override: dict, key: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(task_kind="survival", **override)
    assert key in str(caught.value) and "\n" not in str(caught.value)
    Settings(task_kind="survival", model_name="resnet18")  # an image network's risk head is a survival model


# ---- end to end ---------------------------------------------------------------------------


@pytest.mark.slow  # ~60 s on a loaded core: in `make test`, not in test-fast
def test_an_imaging_survival_study_end_to_end(tmp_path: Path) -> None:
    """Three synthetic hospitals with the outcome, the image network's risk head on the Cox
    loss, two rounds in process: every site's C-indices with CIs, events, KM counts; the
    pooled C from aggregates with its bound, the stratified C; the survival bias verdict."""
    from fedir.simulations.inprocess import run_inprocess

    fed = tmp_path / "fed"
    generate_federation(fed, sites=3, patients=24, seed=2, image_size=32, unlabelled_fraction=0.0, progress=False,
                        outcome=True)
    settings = Settings(task_kind="survival", federation_sites=";".join(f"{fed}/site-{i}" for i in range(3)),
                        train_rounds=2, train_local_steps=3, train_batch_size=16, model_image_size=32,
                        eval_bootstrap=30, data_val_fraction=0.2, data_test_fraction=0.4)
    summary = run_inprocess(settings, tmp_path / "run")
    assert summary["task"] == "survival"
    for site, entry in summary["per_site"].items():
        assert entry["n_patients"] is not None and entry["n_test"] > entry["n_patients"], site  # images > patients
        assert entry["events"] is not None and entry["c_index"] is not None and entry["uno_c_index"] is not None
        assert entry["c_index_ci"] is not None and entry["c_index_ci"][0] <= entry["c_index"] <= entry["c_index_ci"][1]
        assert entry["ibs"] is None and "ibs" in entry["reasons"]
        assert entry["km"] is not None and len(entry["km"]["at_risk"]) == settings.eval_time_bins
    pooled = summary["global"]
    assert pooled["c_index"] is not None and pooled["c_index_binning_error"] is not None
    assert pooled["stratified_c_index"] is not None
    assert pooled["n_patients"] == sum(e["n_patients"] for e in summary["per_site"].values())
    bias = summary["bias"]
    assert bias["alarm"] in (True, False) and {"reasons", "warnings", "signals"} <= set(bias)
    assert {"site_label_association", "pooled_vs_stratified_c", "c_index_heterogeneity", "survival_by_site",
            "follow_up_by_site"} <= set(bias["tests"])
    assert all(bias["tests"][name]["computable"] for name in ("survival_by_site", "follow_up_by_site"))
    assert summary["selection"]["metric"] == "c_index"
    assert "C-index" in (tmp_path / "run" / "report.html").read_text()
