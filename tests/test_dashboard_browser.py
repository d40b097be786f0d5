"""The dashboard in a real headless chromium: a finished run, a run being written, broken stores.

Screenshots of each go to test-artifacts/ (or $FEDIR_TEST_ARTIFACTS); each test prints the path.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from dashboard_harness import chromium, screenshot, served
from run_factory import start, write_round, write_run
from store_factory import RUN as STORE_RUN
from store_factory import fabricate

from fedir.metrics import SCALAR_METRICS
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary, fmt_with_ci, write_summary

SITES = ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
# Each wait is for the event itself (an element, a redrawn plot) with no deadline of its own:
# on a loaded machine chromium can take many seconds to parse plotly.min.js. A page that
# never gets there is stopped by the module's pytest timeout.
WAIT_MS = 0
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def page(browser):
    """A fresh page that records every URL it asks for, to prove nothing comes from outside."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.requested = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    yield page
    context.close()


def assert_local_only(page) -> None:
    hosts = {urlparse(url).hostname for url in page.requested if not url.startswith("data:")}
    assert hosts == {"127.0.0.1"}, page.requested
    assert not page.errors, page.errors


def test_finished_run_matches_summary(page, tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "study-1", SITES, 5, alarm_from=3, null_auc=("hospital-b",), cards=True,
                  seed=1, missing=("hospital-d",), rejected=("hospital-c",))
        summary = json.loads(write_summary(build_summary(store, "study-1"), tmp_path / "summary.json").read_text())
    with served(tmp_path) as url:
        page.goto(url)
        page.wait_for_selector('#site-table tr[data-site="global"]', timeout=WAIT_MS)
        page.wait_for_function("(document.getElementById('site-plot').data || []).length > 0", timeout=WAIT_MS)
        for site, entry in [*summary["per_site"].items(), ("global", summary["global"])]:
            row = page.locator(f'#site-table tr[data-site="{site}"]')
            assert row.locator('[data-col="n_test"] .value').inner_text() == str(entry["n_test"])
            for metric in SCALAR_METRICS:
                expected = fmt_with_ci(entry[metric], entry[metric + "_ci"])
                assert row.locator(f'[data-col="{metric}"] .value').inner_text() == expected
                if entry[metric] is None:  # the reason summary.json gives is on the page too
                    assert entry["reasons"][metric] in page.locator("#table-notes").inner_text()
        verdict = page.locator("#verdict")
        assert summary["bias"]["alarm"] is True
        assert "alarm" in verdict.get_attribute("class").split()
        assert "BIAS ALARM" in verdict.inner_text()
        for reason in summary["bias"]["reasons"]:
            assert reason in verdict.locator(".reasons").inner_text()
        assert "round(s) 3\u20135" in verdict.inner_text()
        assert "final" in verdict.get_attribute("class").split()  # the run has finished
        assert "(round 5, final)" in verdict.inner_text()
        assert "per-round verdicts (provisional): r1 no, r2 no, r3 ALARM" in verdict.inner_text()
        assert "the verdict changed 1 time(s)" in verdict.inner_text()
        status = page.locator("#round-status").inner_text()
        assert "3 of 4 sites answered" in status and "hospital-d" in status
        assert "rejected" in status and "update norm 1000x" in status
        assert page.locator('#cards table[data-card="hospital-a"]').inner_text().count("Philips") == 1
        assert page.locator("#progress-line").inner_text().startswith("status: finished")
        screenshot(page, "dashboard-finished-run")
        assert_local_only(page)


def test_run_being_written_updates_without_reload(page, tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.sqlite")
    start(store, "live", SITES, 6)
    for server_round in (1, 2):
        write_round(store, "live", SITES, server_round)

    def keep_writing() -> None:
        with RunStore(tmp_path / "runs.sqlite") as writer:
            for server_round in (3, 4):
                time.sleep(1.0)
                write_round(writer, "live", SITES, server_round)

    with served(tmp_path, poll_seconds=0.5) as url:
        page.goto(url)
        progress = page.locator("#progress-line")
        page.wait_for_function("document.querySelector('#progress-line').innerText.includes('rounds evaluated: 2 of 6')",
                               timeout=WAIT_MS)
        assert "status: running" in progress.inner_text()
        page.evaluate("window.__notReloaded = true")
        writer = threading.Thread(target=keep_writing)
        writer.start()
        page.wait_for_function("document.querySelector('#progress-line').innerText.includes('rounds evaluated: 4 of 6')",
                               timeout=WAIT_MS)
        writer.join()
        assert page.evaluate("window.__notReloaded === true"), "the page was reloaded"
        page.wait_for_function("JSON.stringify((document.getElementById('global-plot').data || []).at(-1)?.x)"
                               " === '[1,2,3,4]'", timeout=WAIT_MS)  # the pooled line has the new rounds
        assert "Round 4 (evaluated): 4 of 4 sites answered" in page.locator("#round-status").inner_text()
        assert page.locator("#verdict").inner_text().splitlines()[:2] == [
            "No bias alarm (round 4, provisional)", "site label association: p=0.41, Cramer's V=0.07 \u00b7 pooled vs within auc:"
            " pooled AUC=0.75, within-site AUC=0.74, gap=0.01"]
        screenshot(page, "dashboard-run-being-written")
        assert_local_only(page)
    store.close()


def test_several_runs_compared(page, tmp_path: Path) -> None:
    for folder, run_ids in (("baseline", ["a-1", "a-2"]), ("confounded", ["b-1"])):
        with RunStore(tmp_path / folder / "runs.sqlite") as store:
            for i, run_id in enumerate(run_ids):
                write_run(store, run_id, SITES[:3], 3 + i, seed=i, alarm_from=2 if folder == "confounded" else None)
    with served(tmp_path) as url:
        page.goto(url)
        page.wait_for_selector("#runs tbody tr:nth-child(3)", timeout=WAIT_MS)
        assert page.locator("#runs tbody tr").count() == 3
        assert page.locator("#compare-plot").is_visible()
        page.wait_for_function("(document.getElementById('compare-plot').data || []).length === 3", timeout=WAIT_MS)
        page.locator('#runs tr[data-run="baseline/a-1"]').click()
        page.wait_for_function("document.querySelector('#run-title').innerText.startsWith('Run a-1')", timeout=WAIT_MS)
        assert "No bias alarm" in page.locator("#verdict").inner_text()
        page.locator('#runs tr[data-run="confounded/b-1"]').click()
        page.wait_for_function("document.querySelector('#verdict').innerText.includes('BIAS ALARM')", timeout=WAIT_MS)
        screenshot(page, "dashboard-several-runs")
        assert_local_only(page)


@pytest.mark.parametrize("content, expected", [
    (None, "no runs.sqlite in"),
    (b"this is not a database, it was cut short by a failed copy" * 100, "cannot be read as SQLite"),
])
def test_missing_or_corrupt_store_gives_a_clear_page(page, tmp_path: Path, content, expected) -> None:
    if content is not None:
        (tmp_path / "runs.sqlite").write_bytes(content)
    with served(tmp_path) as url:
        page.goto(url)
        problem = page.locator("#error")
        problem.wait_for(state="visible", timeout=WAIT_MS)
        assert expected in problem.inner_text()
        assert "Traceback" not in page.content()
        assert page.locator("#run-section").is_hidden()
        screenshot(page, "dashboard-" + ("missing" if content is None else "corrupt") + "-store")
        assert_local_only(page)


HOSTILE = '<b>site</b><img src=x onerror="window.__pwned=1">'  # <b>: markup plotly would draw


def test_markup_in_a_site_name_is_shown_as_text(page, tmp_path: Path) -> None:
    """A site named with markup appears as typed in the table and in plotly's legend, and
    nothing of it becomes an element or runs."""
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "study-1", [HOSTILE, "hospital-b"], 2, cards=True, seed=1)
    with served(tmp_path) as url:
        page.goto(url)
        page.wait_for_selector('#site-table tr[data-site="global"]', timeout=WAIT_MS)
        page.wait_for_function("(document.getElementById('site-plot').data || []).length > 0", timeout=WAIT_MS)
        assert HOSTILE in page.locator("#site-table").inner_text()
        page.wait_for_selector("#site-plot .legendtext", timeout=WAIT_MS)
        legend = page.locator("#site-plot .legendtext").evaluate_all("nodes => nodes.map((n) => n.textContent)")
        assert HOSTILE in legend, legend
        assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
        assert page.evaluate("window.__pwned") is None
        assert_local_only(page)


def test_per_patient_metrics_lead_the_page(page, tmp_path: Path) -> None:
    """A run with per-patient metrics: the table's per-patient cells, the ECE, the threshold
    line and the per-patient AUC as the default plot, all as summary.json says."""
    fabricate(tmp_path / "runs.sqlite").close()
    with RunStore(tmp_path / "runs.sqlite") as store:
        summary = build_summary(store, STORE_RUN)
    with served(tmp_path) as url:
        page.goto(url)
        page.wait_for_selector('#site-table tr[data-site="global"]', timeout=WAIT_MS)
        for site, entry in [*summary["per_site"].items(), ("global", summary["global"])]:
            patient = entry["per_patient"]
            row = page.locator(f'#site-table tr[data-site="{site}"]')
            assert row.locator('[data-col="patients"] .value').inner_text() == str(patient["n_test"])
            assert row.locator('[data-col="patient_auc"] .value').inner_text() == fmt_with_ci(patient["auc"], patient["auc_ci"])
            assert row.locator('[data-col="ece"] .value').inner_text() == f"{patient['ece']:.3f}"
        assert "only one class" in page.locator("#table-notes").inner_text()
        assert "Decision threshold 0.450: Youden" in page.locator("#threshold-note").inner_text()
        assert page.locator("#metric").input_value() == "patient_auc"
        screenshot(page, "dashboard-per-patient")
        assert_local_only(page)
