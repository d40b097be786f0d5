"""Secondary signals that fire without raising the alarm (bias.secondary-to-alarm = 0, the
default) are shown as warnings wherever a verdict is shown: summary line, report, checklist,
dashboard. Three of them, no primary: no alarm and three warnings, each by its reason."""

from __future__ import annotations

from pathlib import Path

from run_factory import write_run

from fedir.server.checklist import build_checklist
from fedir.server.dashboard_state import run_detail
from fedir.server.report.bias import bias_section
from fedir.server.runstore import RunStore
from fedir.server.summary import verdict_line
from fedir.strategies.bias import verdict

REASONS = {
    "auc_heterogeneity": "site AUCs differ beyond their sampling error (I^2 0.81)",
    "site_separability": "the embedding identifies site-1 with accuracy 0.97",
    "cross_site": "site models score 0.21 lower on other sites",
}


def _three_secondaries(secondary_to_alarm: int = 0) -> dict:
    tests = {"site_label_association": {"alarm": False, "reason": "prevalence similar across sites"},
             "pooled_vs_within_auc": {"alarm": False, "reason": "pooled close to within"},
             **{name: {"alarm": True, "reason": reason} for name, reason in REASONS.items()}}
    return verdict(tests, secondary_to_alarm)


def test_three_secondaries_under_the_default_are_three_warnings_not_an_alarm():
    bias = _three_secondaries()
    assert bias["alarm"] is False and bias["warnings"] == list(REASONS.values())
    line = verdict_line(bias)
    assert line.startswith("No bias alarm") and all(f"WARNING: {r}." in line for r in REASONS.values())
    html = str(bias_section(bias))
    assert "bias.secondary-to-alarm = 0, only a primary signal raises it" in html
    assert all(f"<li>{r}</li>" in html for r in REASONS.values())
    item = next(i for i in build_checklist({}, {"bias": bias}) if i["item"] == "site confounding")
    assert item["status"] == "attention" and all(f"warning: {r}" in item["detail"] for r in REASONS.values())


def test_with_two_the_same_signals_are_the_alarm_and_no_warning():
    bias = _three_secondaries(2)
    assert bias["alarm"] is True and bias["reasons"] == list(REASONS.values()) and bias["warnings"] == []
    assert verdict_line(bias).startswith("BIAS ALARM")


def test_the_dashboard_lists_the_warnings_of_the_latest_verdict(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "r", ["site-0", "site-1", "site-2"], 2)
        store.record_bias("r", 2, _three_secondaries())
    shown = run_detail(tmp_path, ".", "r")["verdict"]
    assert shown["alarm"] is False and shown["warnings"] == list(REASONS.values())


def test_the_scenario_setting_reaches_the_server_thresholds():
    from fedir.config import Settings
    from fedir.server.server_app import thresholds
    from fedir.strategies.bias import SECONDARY_TO_ALARM

    assert thresholds(Settings()).secondary_to_alarm == SECONDARY_TO_ALARM == 0
    assert thresholds(Settings.from_run_config({"bias.secondary-to-alarm": 2})).secondary_to_alarm == 2
