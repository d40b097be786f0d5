"""The summary, the terminal table and the HTML report, all rebuilt from the run store."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from markupsafe import escape

from fedir.server.report import write_report
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary, format_site_table, write_summary
from tests.store_factory import RUN, SITES, VERDICT, fabricate

CONTRACT_KEYS = {"run_id", "scenario", "rounds", "sites", "global", "per_site", "bias", "notes", "status"}
METRIC_KEYS = {"auc", "auc_ci", "accuracy", "accuracy_ci", "sensitivity", "sensitivity_ci",
               "specificity", "specificity_ci", "n_test"}


@pytest.fixture
def store(tmp_path: Path) -> RunStore:
    with fabricate(tmp_path / "runs.sqlite") as s:
        yield s


def test_summary_contract(store: RunStore, tmp_path: Path) -> None:
    summary = build_summary(store, RUN)
    assert CONTRACT_KEYS <= set(summary)
    assert summary["rounds"] == 2 and summary["sites"] == SITES and summary["status"] == "finished"
    assert METRIC_KEYS <= set(summary["global"])
    assert summary["global"]["n_test"] == 135
    assert set(summary["per_site"]) == set(SITES)
    for entry in summary["per_site"].values():
        assert METRIC_KEYS | {"positives", "reasons"} <= set(entry)
    assert summary["per_site"]["site-a"]["auc"] == pytest.approx(0.80)
    assert summary["per_site"]["site-a"]["auc_ci"] == pytest.approx([0.70, 0.88])
    site_b = summary["per_site"]["site-b"]
    assert site_b["auc"] is None and site_b["auc_ci"] is None
    assert site_b["reasons"]["auc"] == "only one class among the test patients"
    assert summary["bias"] == VERDICT
    json.dumps(summary, allow_nan=False)
    written = write_summary(summary, tmp_path / "out" / "summary.json")
    assert json.loads(written.read_text()) == summary


def test_site_without_evaluation_gets_nulls_with_reasons(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as s:
        s.start_run("r", "x", {}, ["a", "silent"])
        s.record_evaluation("r", 1, {"a": {"n": 10, "auc": 0.7, "auc_ci": [0.6, 0.8]}}, None)
        summary = build_summary(s, "r")
    silent = summary["per_site"]["silent"]
    assert silent["n_test"] == 0 and silent["auc"] is None
    assert "round 1" in silent["reasons"]["auc"]
    assert summary["bias"]["alarm"] is None  # not analysed: no verdict, never "no alarm"
    assert summary["bias"]["reasons"] == ["not computed: no bias analysis was recorded for this run"]


def test_write_summary_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_summary({"global": {"auc": float("nan")}}, tmp_path / "summary.json")


def test_site_table(store: RunStore) -> None:
    table = format_site_table(build_summary(store, RUN))
    for site in [*SITES, "global"]:
        assert site in table
    assert "0.800 [0.700, 0.880]" in table
    assert "BIAS ALARM: label prevalence differs strongly between sites" in table
    assert "only one class among the test patients" in table


def test_site_table_without_alarm_shows_key_numbers(store: RunStore) -> None:
    summary = build_summary(store, RUN)
    summary["bias"] = {**VERDICT, "alarm": False, "reasons": []}
    line = format_site_table(summary).splitlines()
    verdict = next(row for row in line if row.startswith("No bias alarm:"))
    assert "Cramer's V=0.62" in verdict and "gap=0.06" in verdict


def test_report_is_self_contained(store: RunStore, tmp_path: Path) -> None:
    html = write_report(store, RUN, tmp_path / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html)
    assert "http://" not in html and "https://" not in html
    assert "data:image/png;base64," in html
    for site in SITES:
        assert site in html
    for reason in VERDICT["reasons"]:
        assert str(escape(reason)) in html
    assert "only one class among the test patients" in html
    assert "2 files unreadable" in html
    assert 'class="verdict alarm"' in html


def test_report_escapes_site_names(tmp_path: Path) -> None:
    sites = ["<script>", "site-b", 'a"b&c']
    with fabricate(tmp_path / "runs.sqlite", sites) as s:
        html = write_report(s, RUN, tmp_path / "report.html").read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;" in html
    assert str(escape('a"b&c')) in html and 'a"b&c' not in html


def test_site_table_says_why_a_site_failed_and_that_no_verdict_was_computed(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as s:
        s.start_run("r", "x", {}, ["a", "b"])
        s.record_note("r", 1, "b", "missing", "train failed: a stale reason")
        s.record_note("r", 2, "b", "missing", "train failed: manifest.csv: row 3: empty path")
        table = format_site_table(build_summary(s, "r"))
    assert "Bias verdict not computed: no evaluation round was recorded" in table
    assert "No bias alarm" not in table
    assert "  b (round 2): train failed: manifest.csv: row 3: empty path" in table
    assert "stale" not in table


SCRIPT = "<script>alert(1)</script>"


def test_markup_from_sites_is_shown_as_text_never_run(tmp_path: Path) -> None:
    """A site name, a note's reason, a verdict reason and a data-card value that carry a
    script tag reach the page as text: the report itself has no <script> at all."""
    sites = [SCRIPT, "site-b", "site-c"]
    with fabricate(tmp_path / "runs.sqlite", sites) as s:
        s.record_note(RUN, 2, SCRIPT, "rejected", f"norm too large {SCRIPT}")
        s.record_bias(RUN, 2, {**VERDICT, "reasons": [f"site {SCRIPT} differs"]})
        s.record_card(RUN, SCRIPT, {"k": 5, "files": {"listed": 1, "loaded": 1, "skipped": {SCRIPT: 1}},
                                    "patients": {"train": 1, "val": 0, "test": 0},
                                    "labels": {"labelled_patients": 1, "unlabelled_patients": 0,
                                               "per_class": {"values": {SCRIPT: 5}, "suppressed_cells": 0},
                                               "prevalence": None},
                                    "acquisition": {"Manufacturer": {"values": {SCRIPT: 5}}}})
        html = write_report(s, RUN, tmp_path / "report.html").read_text()
    assert "<script" not in html.lower()
    shown = str(escape(SCRIPT))
    assert html.count(shown) >= 8  # names in tables, the note, the reason, the card's cells
    assert f"norm too large {shown}" in html and f"site {shown} differs" in html


def test_summary_states_the_threshold_calibration_and_binning(store: RunStore) -> None:
    summary = build_summary(store, RUN)
    threshold = summary["threshold"]
    assert (threshold["value"], threshold["rule"], threshold["chosen_on"]) == (0.45, "youden", "validation")
    assert threshold["per_site"] == dict.fromkeys(SITES, 0.45)
    pooled = summary["global"]
    assert pooled["auc_binning_error"] == 0.004 and pooled["per_patient"]["auc_binning_error"] == 0.008
    site_a = summary["per_site"]["site-a"]["per_patient"]
    assert site_a["ece"] == 0.08
    # the reliability rows are the histograms' counts, each bin's mean score from its score sum
    stored = store.site_metrics(RUN, 2)["site-a"]["per_patient"]
    counts = [n + p for n, p in zip(stored["hist_neg"], stored["hist_pos"])]
    assert [r["count"] for r in site_a["reliability"]] == [c for c in counts if c]
    assert all(r["low"] <= r["mean_score"] <= r["high"] for r in site_a["reliability"])


def test_report_puts_per_patient_metrics_first_with_the_threshold_and_calibration(store: RunStore, tmp_path: Path) -> None:
    html = write_report(store, RUN, tmp_path / "report.html").read_text()
    per_patient, per_image = html.index("Per patient (primary)"), html.index("<h3>Per image</h3>")
    assert per_patient < per_image
    summary = build_summary(store, RUN)
    pooled = summary["global"]["per_patient"]
    # the pooled per-patient AUC, with the bound of its binning error beside it
    assert f"{pooled['auc']:.3f} [{pooled['auc_ci'][0]:.3f}, {pooled['auc_ci'][1]:.3f}] \u00b10.008 binning" in html
    site_a = summary["per_site"]["site-a"]["per_patient"]
    assert html.index(f"{site_a['auc']:.3f} [") < per_image
    assert "Decision threshold 0.450: Youden" in html and "validation patients" in html
    assert "Calibration (per patient)" in html and "site-a: ECE 0.080" in html
    assert "site-b, per patient auc: only one class among the test patients" in html


def test_terminal_table_leads_with_per_patient_metrics(store: RunStore) -> None:
    table = format_site_table(build_summary(store, RUN))
    header = next(line for line in table.splitlines() if line.startswith("site"))
    assert header.index("patients") < header.index("AUC [95% CI]") < header.index("AUC per image")
    assert "binning error at most per patient +-0.008, per image +-0.004" in table
    assert "Decision threshold 0.450" in table


def test_terminal_table_marks_a_site_whose_labels_are_per_image(store: RunStore) -> None:
    summary = build_summary(store, RUN)
    summary["per_site"]["site-a"]["per_patient"] = None
    row = next(line for line in format_site_table(summary).splitlines() if line.startswith("site-a"))
    assert row.startswith("site-a (per image)") and "0.800 [0.700, 0.880]" in row


def test_report_labels_the_verdict_final_and_each_round_provisional(store: RunStore, tmp_path: Path) -> None:
    """The fabricated run has finished: its verdict is final; the table lists both rounds'
    verdicts as provisional. Reopened (running again), the verdict itself is provisional."""
    html = write_report(store, RUN, tmp_path / "report.html").read_text()
    assert '<span class="status">(final)</span>' in html
    assert "Verdict per round (each provisional" in html and "changed 0 time(s)" in html
    assert html.count("<td>ALARM</td>") == 2
    store.record_bias(RUN, 2, {**VERDICT, "alarm": False, "reasons": [], "signals": []})
    store.reopen_run(RUN, after_round=2)
    html = write_report(store, RUN, tmp_path / "running.html").read_text()
    assert '<span class="status">(provisional: the study is still running)</span>' in html and "(final)" not in html
    assert "changed 1 time(s)" in html and "<td>no alarm</td>" in html
