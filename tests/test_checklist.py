"""The checklist of common errors (fedir.server.checklist): each item's status is computed from
the run's settings and results, so two runs with different settings get different statuses,
in summary.json and in the report's table."""

from __future__ import annotations

import csv
import json

import numpy as np

from fedir.config import Settings
from fedir.server.checklist import ATTENTION, NA, OK, STATUSES, build_checklist
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary
from fedir.simulations.inprocess import run_inprocess
from tests.store_factory import RUN

ITEMS = ["split by patient", "model selection", "decision threshold", "hyperparameters", "external validation",
         "class imbalance", "confidence intervals", "data leakage", "clinical baseline",
         "sensitivity analysis (fused inputs)", "censoring", "drift over time", "site confounding"]


def _by_item(checklist: list[dict]) -> dict[str, dict]:
    return {row["item"]: row for row in checklist}


def test_every_item_once_with_a_known_status(store: RunStore):
    checklist = build_summary(store, RUN)["checklist"]
    assert [row["item"] for row in checklist] == ITEMS
    assert all(row["status"] in STATUSES and row["detail"] for row in checklist)


def test_the_statuses_follow_the_settings(store: RunStore):
    summary = build_summary(store, RUN)
    default = _by_item(build_checklist({}, summary))
    changed = _by_item(build_checklist({"eval.bootstrap": 0, "eval.select": "last", "data.inputs": "clinical",
                                        "federation.arm": "pooled", "task.kind": "survival"}, summary))
    assert default["confidence intervals"]["status"] == OK and changed["confidence intervals"]["status"] == ATTENTION
    assert default["clinical baseline"]["status"] == ATTENTION and changed["clinical baseline"]["status"] == NA
    assert "validation" in default["model selection"]["detail"] and "eval.select = last" in changed["model selection"]["detail"]
    assert "pooled arm" in changed["external validation"]["detail"]
    assert default["censoring"]["status"] == NA and changed["censoring"]["status"] == OK
    assert "risk sets" in changed["censoring"]["detail"] and changed["class imbalance"]["status"] == NA
    # the verdict of the fabricated run: an alarm (site-label association)
    assert default["site confounding"]["status"] == ATTENTION and "BIAS ALARM" in default["site confounding"]["detail"]


def test_the_drift_item_reads_the_trend_test(store: RunStore):
    """n/a without dates, attention when a slope's CI excludes 0 (naming it), ok otherwise."""
    summary = build_summary(store, RUN)
    assert _by_item(build_checklist({}, summary))["drift over time"]["status"] == NA

    def with_trend(site_ci: list[float]) -> dict:
        flat = {"slope": -0.01, "slope_ci": [-0.05, 0.03], "p_value": 0.6, "reason": None}
        site = {"slope": -0.08, "slope_ci": site_ci, "p_value": 0.01, "reason": None}
        drift = {"setting": "year", "reason": None, "pooled": flat,
                 "per_site": {"north": {"periods": [], "trend": site}, "south": {"periods": [], "trend": flat}}}
        return _by_item(build_checklist({}, {**summary, "drift": drift}))["drift over time"]

    moving = with_trend([-0.12, -0.04])
    assert moving["status"] == ATTENTION and "north -0.080 [-0.120, -0.040]" in moving["detail"]
    assert "south" not in moving["detail"]
    assert with_trend([-0.12, 0.01])["status"] == OK


def _tabular_federation(root) -> str:
    """Three tabular sites, both classes at each, one informative feature and clin_* columns."""
    rng = np.random.default_rng(1)
    names = ["north", "south", "east"]
    for name in names:
        rows = []
        for i in range(90):
            y = int(rng.random() < 0.4)
            rows.append({"patient_id": f"{name}-{i}", "label": y, "clin_a": rng.normal(y, 1.0),
                         "clin_b": rng.normal(0.0, 1.0)})
        (root / name).mkdir(parents=True)
        with (root / name / "manifest.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return ";".join(str(root / n) for n in names)


def test_two_runs_with_different_settings_report_different_statuses(tmp_path):
    sites = _tabular_federation(tmp_path / "fed")
    base = dict(federation_sites=sites, train_rounds=2, train_local_steps=20, train_optimizer="sgd", train_lr=0.05,
                eval_bootstrap=20, bias_bootstrap=0)
    first = run_inprocess(Settings(**base), tmp_path / "a")
    second = run_inprocess(Settings(**{**base, "eval_threshold_rule": "fixed", "bias_cross_site": True,
                                       "eval_bootstrap": 0}), tmp_path / "b")
    a, b = _by_item(first["checklist"]), _by_item(second["checklist"])
    assert a["external validation"]["status"] == ATTENTION and b["external validation"]["status"] == OK
    assert "Youden" in a["decision threshold"]["detail"] and "fixed in advance" in b["decision threshold"]["detail"]
    assert a["confidence intervals"]["status"] == OK and b["confidence intervals"]["status"] == ATTENTION
    assert "patients" in a["confidence intervals"]["detail"]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["checklist"] == second["checklist"]
    html = (tmp_path / "b" / "report.html").read_text()
    assert "Checklist of common errors" in html and "cross-site matrix: every site&#39;s model" in html


def test_the_class_imbalance_item_of_a_three_class_study_reads_the_confusion_counts(store: RunStore):
    """K > 2: the test class counts come from the pooled confusion counts; a rare class under
    the argmax decision is a warning, the balanced decision handles it."""
    summary = build_summary(store, RUN)
    confusion = [[70, 2, 1], [8, 1, 1], [9, 0, 3]]  # 73 / 10 / 12 patients
    three = {**summary, "global": {"per_patient": {"n_test": 95, "confusion": confusion}}}
    argmax = _by_item(build_checklist({"task.classes": 3}, three))["class imbalance"]
    assert argmax["status"] == ATTENTION and "73 / 10 / 12 of 95" in argmax["detail"]
    assert "task.decision = balanced" in argmax["detail"]
    balanced = _by_item(build_checklist({"task.classes": 3, "task.decision": "balanced"}, three))["class imbalance"]
    assert balanced["status"] == OK
    even = {**three, "global": {"per_patient": {"n_test": 90, "confusion": [[30, 0, 0], [0, 30, 0], [0, 0, 30]]}}}
    assert _by_item(build_checklist({"task.classes": 3}, even))["class imbalance"]["status"] == OK
    segmentation = _by_item(build_checklist({"task.kind": "segmentation"}, summary))
    assert segmentation["class imbalance"]["status"] == NA and segmentation["censoring"]["status"] == NA
