"""The dashboard on a survival run: the overview's pooled C-index, the per-site C-index table
and the C-index plots, from a run store written as the ServerApp writes a survival study's
(real site aggregates of simulated risks, the real pooling and bias analysis)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dashboard_harness import chromium, screenshot, served

from fedir.server.dashboard_state import overview, run_detail
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary, fmt_with_ci, write_summary
from fedir.strategies.frankenstein import Thresholds, analyse
from fedir.tasks.survival_metrics import pooled_survival_metrics, site_survival_metrics

SITES = ["hospital-a", "hospital-b", "hospital-c"]
TIME_BINS, WIDTH = 20, 180.0
pytestmark = pytest.mark.timeout(300)


def _survival_run(folder: Path, rounds: int = 2) -> dict:
    """A finished survival run of `rounds` rounds in folder/runs.sqlite; its summary.json."""
    rng = np.random.default_rng(4)
    with RunStore(folder / "runs.sqlite") as store:
        store.start_run("surv-1", "fabricated", {"train.rounds": rounds, "task.kind": "survival",
                                                 "eval.time-bins": TIME_BINS, "eval.time-bin-days": WIDTH}, SITES)
        for server_round in range(1, rounds + 1):
            store.record_training("surv-1", server_round, {
                s: {"train_loss": 3.0 / server_round, "n_labelled": 90, "n_unlabelled": 0,
                    "label_counts": {"0": 15, "1": 15}} for s in SITES})
            per_site, counts = {}, {}
            for i, site in enumerate(SITES):
                n = 30 + 5 * i
                x = rng.normal(size=n)
                t = np.round(rng.exponential(900 * np.exp(-x))) + 1
                c = np.round(rng.uniform(300, 2500, n))
                time, event = np.minimum(t, c), (t <= c).astype(int)
                risk = server_round * x + rng.normal(scale=1.0, size=n)
                per_site[site] = site_survival_metrics(time, event, risk, n_boot=50, time_bins=TIME_BINS,
                                                       time_bin_days=WIDTH)
                counts[site] = {0: int((1 - event).sum()), 1: int(event.sum())}
            store.record_evaluation("surv-1", server_round, per_site,
                                    pooled_survival_metrics(per_site, time_bins=TIME_BINS))
            store.record_bias("surv-1", server_round, analyse(counts, per_site, {}, Thresholds(), kind="survival",
                                                             time_bins=TIME_BINS))
        store.finish_run("surv-1")
        return json.loads(write_summary(build_summary(store, "surv-1"), folder / "summary.json").read_text())


def test_the_dashboard_state_of_a_survival_run_is_its_c_index(tmp_path: Path) -> None:
    summary = _survival_run(tmp_path)
    assert summary["task"] == "survival" and summary["global"]["c_index"] is not None
    (line,) = overview(tmp_path)["runs"]
    assert line["metric"] == "c_index" and line["metric_name"] == "C-index"
    assert line["global_auc"] == pytest.approx(summary["global"]["c_index"], abs=1e-4)
    assert [p[0] for p in line["auc_series"]] == [1, 2]
    detail = run_detail(tmp_path, ".", "surv-1")
    assert [c[0] for c in detail["columns"]] == ["n_test", "patients", "events", "c_index", "uno_c_index"]
    assert set(detail["metrics"]) == {"c_index", "uno_c_index"}
    rows = {row["site"]: row for row in detail["table"]}
    for site, entry in [*summary["per_site"].items(), ("global", summary["global"])]:
        for metric in ("c_index", "uno_c_index"):
            assert rows[site][metric] == fmt_with_ci(entry[metric], entry[metric + "_ci"])
        assert rows[site]["events"] == str(int(entry["events"]))
    assert rows["global"]["uno_c_index"] == "n/a" and rows["global"]["reasons"]["uno_c_index"]
    assert set(detail["series"]["c_index"]) == {*SITES, "global"}
    assert "binning error at most" in detail["binning"]


def test_the_dashboard_page_shows_the_c_index_per_site_and_pooled(tmp_path: Path) -> None:
    summary = _survival_run(tmp_path)
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        with served(tmp_path) as url:
            page.goto(url)
            page.wait_for_selector('#site-table tr[data-site="global"]', timeout=0)
            page.wait_for_function("(document.getElementById('site-plot').data || []).length > 0", timeout=0)
            heads = page.locator("#site-table thead th").all_inner_texts()
            assert heads == ["site", "n test", "patients", "events", "C-index [95% CI]", "Uno's C [95% CI]"]
            for site, entry in [*summary["per_site"].items(), ("global", summary["global"])]:
                row = page.locator(f'#site-table tr[data-site="{site}"]')
                for metric in ("c_index", "uno_c_index"):
                    expected = fmt_with_ci(entry[metric], entry[metric + "_ci"])
                    assert row.locator(f'[data-col="{metric}"] .value').inner_text() == expected
            assert "Uno" in page.locator("#table-notes").inner_text()  # the pooled Uno's C: why n/a
            assert page.locator("#metric").input_value() == "c_index"
            assert "C-index" in page.locator("#runs tbody").inner_text()
            assert "binning error at most" in page.locator("#threshold-note").inner_text()
            screenshot(page, "dashboard-survival-run")
        assert not errors, errors
