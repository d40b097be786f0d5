"""The dashboard state of a segmentation run and of a K > 2 classification run, each a real
small in-process study: the table's columns are the kind's, every cell summary.json has a
value for is filled (not n/a), the plots' series are the kind's run-store metrics and the
overview line carries the kind's metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dashboard_harness import chromium, screenshot, served
from test_multiclass import _federation

from fedir.config import Settings
from fedir.server.dashboard_state import overview, run_detail
from fedir.server.summary import fmt_with_ci
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import generate_federation

pytestmark = pytest.mark.timeout(600)
SEGMENTATION = ('[task]\nkind = "segmentation"\n[federation]\nsites = ["fed/site-0", "fed/site-1"]\n'
                "[train]\nrounds = 1\nlocal-epochs = 1\nbatch-size = 8\n[model]\nimage-size = 32\n"
                '[data]\nframe-policy = "all"\ntest-fraction = 0.3\nval-fraction = 0.2\n[eval]\nbootstrap = 20\n')


def _state(run: Path) -> tuple[dict, dict, dict]:
    summary = json.loads((run / "summary.json").read_text())
    (line,) = overview(run)["runs"]
    return summary, line, run_detail(run, line["source"], line["run_id"])


def _cells(summary: dict, detail: dict, level: str | None, metrics: tuple[str, ...]) -> None:
    """Each metric's cell is summary.json's value with its CI, filled where summary.json has one."""
    rows = {row["site"]: row for row in detail["table"]}
    assert set(rows) == {*summary["per_site"], "global"}
    for site, entry in [*summary["per_site"].items(), ("global", summary["global"])]:
        source = entry[level] if level else entry
        for metric in metrics:
            key = f"patient_{metric}" if level else metric
            assert rows[site][key] == fmt_with_ci(source[metric], source[metric + "_ci"])
            if source[metric] is not None:
                assert rows[site][key] != "n/a", (site, key)


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Path:
    """A one-round segmentation study of two synthetic sites at 32 px, one masked frame per cine run."""
    root = tmp_path_factory.mktemp("seg")
    generate_federation(root / "fed", sites=2, patients=10, seed=3, image_size=32, progress=False,
                        mask_fraction=0.0)
    (root / "seg.toml").write_text(SEGMENTATION)
    run_inprocess(load_scenario(root / "seg.toml"), root / "run")
    return root / "run"


def test_a_segmentation_run_shows_dice_and_hd95_per_site(segmentation_run: Path) -> None:
    summary, line, detail = _state(segmentation_run)
    assert summary["global"]["dice"] is not None
    assert [c[0] for c in detail["columns"]] == ["patients", "n_test", "dice", "hd95", "dice_vessel", "dice_stenosis"]
    _cells(summary, detail, None, ("dice", "hd95", "dice_vessel", "dice_stenosis"))
    for site, entry in summary["per_site"].items():  # the run store's series are the summary's metrics
        assert detail["series"]["dice"][site][-1][1] == pytest.approx(entry["dice"], abs=1e-4)
    assert set(detail["metrics"]) == {"dice", "hd95", "dice_vessel", "dice_stenosis"} and detail["unbounded"] == ["hd95"]
    assert detail["threshold"] == "" and "patient-weighted" in detail["binning"]
    assert line["metric"] == "dice" and line["metric_name"] == "Dice"
    assert line["global_auc"] == pytest.approx(summary["global"]["dice"], abs=1e-4)


def test_the_page_of_a_segmentation_run_heads_its_own_columns_and_marks_its_metric(segmentation_run: Path) -> None:
    summary = json.loads((segmentation_run / "summary.json").read_text())
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        with served(segmentation_run) as url:
            page.goto(url)
            page.wait_for_selector('#site-table tr[data-site="global"]', timeout=0)
            page.wait_for_function("(document.getElementById('site-plot').data || []).length > 0", timeout=0)
            heads = page.locator("#site-table thead th").all_inner_texts()
            assert heads == ["site", "patients", "images", "Dice [95% CI]", "HD95 px [95% CI]",
                             "vessel Dice [95% CI]", "stenosis Dice [95% CI]"]
            row = page.locator('#site-table tr[data-site="global"]')
            for metric in ("dice", "dice_vessel"):
                expected = fmt_with_ci(summary["global"][metric], summary["global"][metric + "_ci"])
                assert row.locator(f'[data-col="{metric}"] .value').inner_text() == expected
            assert page.locator("#metric").input_value() == "dice"
            assert "(Dice)" in page.locator("#runs tbody").inner_text()
            page.select_option("#metric", "hd95")  # pixels: the axis follows the values, not 0..1
            page.wait_for_function("document.getElementById('site-plot').layout.yaxis.title.text.startsWith('HD95')",
                                   timeout=0)
            assert page.evaluate("document.getElementById('site-plot').layout.yaxis.rangemode") == "tozero"
            screenshot(page, "dashboard-segmentation-run")
        assert not errors, errors


def test_a_three_class_run_shows_the_macro_auc_and_balanced_accuracy(tmp_path: Path) -> None:
    settings = Settings(task_classes=3, federation_sites=";".join(_federation(tmp_path, n=60)), train_rounds=1,
                        train_local_steps=10, train_batch_size=8, train_lr=0.1, eval_bootstrap=20,
                        data_val_fraction=0.25, data_test_fraction=0.3)
    run_inprocess(settings, tmp_path / "run")
    summary, line, detail = _state(tmp_path / "run")
    keys = [c[0] for c in detail["columns"]]
    assert keys == ["patients", "patient_auc", "patient_balanced_accuracy", "patient_accuracy", "n_test",
                    "auc", "balanced_accuracy", "accuracy"]
    assert not {"positives", "sensitivity", "specificity", "ece"} & set(keys)  # binary-only columns
    _cells(summary, detail, "per_patient", ("auc", "balanced_accuracy", "accuracy"))
    _cells(summary, detail, None, ("auc", "balanced_accuracy", "accuracy"))
    assert summary["global"]["per_patient"]["balanced_accuracy"] is not None
    assert set(detail["metrics"]) <= set(detail["series"])
    assert detail["series"]["patient_balanced_accuracy"]["global"][-1][1] == pytest.approx(
        summary["global"]["per_patient"]["balanced_accuracy"], abs=1e-4)
    assert detail["threshold"].startswith("No decision threshold")
    assert line["metric"] == "auc" and line["metric_name"] == "macro AUC"
    assert line["global_auc"] == pytest.approx(summary["global"]["per_patient"]["auc"], abs=1e-4)
