"""Drift over time end to end: a synthetic federation whose site-1 changes scanner in 2022,
through Flower's simulation engine, to summary.json's drift entry and the report.

This checks the mechanics (every site's periods reach the summary as labels with their
aggregates, the trend test runs, the report shows it). Whether the AUC visibly drops after
the change depends on a model that has learnt the stenosis task, which a test-sized
federation does not (benchmarks/synthetic_learnability.py): the detection itself is not
asserted here.
"""

from __future__ import annotations

import csv
import json

import pytest

from fedir.simulations.scenario import load_scenario
from fedir.simulations.simulate import simulate
from fedir.simulations.synthetic import generate_federation

pytestmark = pytest.mark.slow


def test_a_scanner_change_federation_reports_periods_and_a_trend(tmp_path) -> None:
    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=90, seed=4, image_size=32, progress=False,
                        scanner_change=(1, "2022-01-01"))
    toml = tmp_path / "drift.toml"
    toml.write_text('[federation]\nsites = ["fed/site-0", "fed/site-1"]\n'
                    "[train]\nrounds = 2\nlocal-epochs = 1\n[model]\nimage-size = 32\n"
                    "[data]\ntest-fraction = 0.5\n[eval]\nbootstrap = 100\n")
    out = tmp_path / "run"
    summary = simulate(load_scenario(toml), out, scenario=str(toml))
    drift = summary["drift"]
    assert drift["setting"] == "year" and drift["reason"] is None
    assert set(drift["per_site"]) == {"site-0", "site-1"}
    dates = {row["acquired"] for site in ("site-0", "site-1")
             for row in csv.DictReader((fed / site / "manifest.csv").open())}
    for site, entry in drift["per_site"].items():
        labels = [p["period"] for p in entry["periods"]]
        assert labels == sorted(labels) and set(labels) <= {"2020", "2021", "2022", "2023", "2024"}, site
        shown = [p for p in entry["periods"] if "suppressed" not in p]
        assert len(shown) >= 3, entry  # ~45 test patients over five years
        assert sum(p["n_patients"] for p in shown) <= summary["per_site"][site]["n_patients"]
        for period in shown:
            assert period["n_patients"] >= 5 and 0 < period["positives"] < period["n_patients"]
            assert period["auc_ci"][0] <= period["auc"] <= period["auc_ci"][1]
        trend = entry["trend"]
        assert trend["unit"] == "AUC per year" and trend["n_periods"] + len(trend["left_out"]) == len(labels)
        if trend["slope"] is not None:
            assert trend["slope_ci"][0] <= trend["slope"] <= trend["slope_ci"][1] and 0 <= trend["p_value"] <= 1
    assert drift["pooled"]["sites"]
    text = json.dumps(summary) + (out / "report.html").read_text()
    assert not any(date in text for date in dates)  # a label, never a date
    assert "<h2>Drift over time</h2>" in (out / "report.html").read_text()
