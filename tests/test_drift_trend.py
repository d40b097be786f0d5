"""The coordinator's drift trend test (fedir.strategies.drift_trend) against an independent
weighted least squares, and the summary and report that show it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from scipy import stats

from fedir.server.report import write_report
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary
from fedir.strategies.drift_trend import Z, period_time, pooled_trend, site_trend


def _drift(aucs: dict[str, float], half: dict[str, float], unit: str = "year") -> dict:
    return {"unit": unit, "reason": None,
            "periods": [{"period": p, "n_patients": 20, "positives": 8, "auc": a,
                         "auc_ci": [a - half[p], min(a + half[p], 1.0)]} for p, a in aucs.items()]}


def _independent(groups: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[float, list[float], float]:
    """Slope, 95% CI and p of WLS with an intercept per group, by the normal equations."""
    x_rows, y, w = [], [], []
    for g, (t, auc, se) in enumerate(groups):
        for ti, ai, si in zip(t, auc, se):
            x_rows.append([1.0 if j == g else 0.0 for j in range(len(groups))] + [ti])
            y.append(ai)
            w.append(1 / si**2)
    x, y, w = np.array(x_rows), np.array(y), np.array(w)
    xtwx = x.T @ (w[:, None] * x)
    beta = np.linalg.solve(xtwx, x.T @ (w * y))
    df = len(y) - x.shape[1]
    scale = float(np.sum(w * (y - x @ beta) ** 2) / df)
    se_slope = float(np.sqrt(scale * np.linalg.inv(xtwx)[-1, -1]))
    q = stats.t.ppf(0.975, df)
    p = 2 * stats.t.sf(abs(beta[-1]) / se_slope, df)
    return float(beta[-1]), [beta[-1] - q * se_slope, beta[-1] + q * se_slope], float(p)


def test_period_time_in_years() -> None:
    assert period_time("2021") == 2021.0 and period_time("2021-Q3") == 2021.5


def test_site_trend_matches_an_independent_weighted_regression() -> None:
    aucs = {"2019": 0.84, "2020": 0.82, "2021": 0.80, "2022": 0.66, "2023": 0.63}
    half = {"2019": 0.08, "2020": 0.10, "2021": 0.07, "2022": 0.12, "2023": 0.09}
    trend = site_trend(_drift(aucs, half))
    t = np.array([period_time(p) for p in aucs])
    slope, ci, p = _independent([(t, np.array(list(aucs.values())), np.array(list(half.values())) / Z)])
    assert trend["slope"] == pytest.approx(slope) and trend["slope_ci"] == pytest.approx(ci)
    assert trend["p_value"] == pytest.approx(p)
    assert trend["slope"] < 0 and trend["slope_ci"][1] < 0 and trend["unit"] == "AUC per year"


def test_pooled_trend_is_one_slope_with_an_intercept_per_site() -> None:
    a = _drift({"2020-Q1": 0.9, "2020-Q3": 0.85, "2021-Q1": 0.8, "2021-Q3": 0.7},
               {"2020-Q1": 0.05, "2020-Q3": 0.06, "2021-Q1": 0.05, "2021-Q3": 0.08}, "quarter")
    b = _drift({"2020-Q3": 0.7, "2021-Q1": 0.69, "2021-Q3": 0.66}, {"2020-Q3": 0.1, "2021-Q1": 0.1, "2021-Q3": 0.12},
               "quarter")
    lone = _drift({"2021-Q1": 0.5}, {"2021-Q1": 0.1}, "quarter")  # one period: no within-site slope
    pooled = pooled_trend({"a": a, "b": b, "lone": lone})
    groups = [(np.array([period_time(p["period"]) for p in d["periods"]]), np.array([p["auc"] for p in d["periods"]]),
               np.array([(p["auc_ci"][1] - p["auc_ci"][0]) / (2 * Z) for p in d["periods"]])) for d in (a, b)]
    slope, ci, p = _independent(groups)
    assert pooled["sites"] == ["a", "b"] and pooled["n_periods"] == 7
    assert pooled["slope"] == pytest.approx(slope) and pooled["slope_ci"] == pytest.approx(ci)
    assert pooled["p_value"] == pytest.approx(p)


def test_left_out_periods_and_too_few_periods_say_why() -> None:
    drift = _drift({"2020": 0.8, "2021": 1.0}, {"2020": 0.1, "2021": 0.0})
    drift["periods"].append({"period": "2022", "suppressed": "fewer than 5 patients"})
    trend = site_trend(drift)
    assert trend["slope"] is None and "1 usable period" in trend["reason"]
    assert trend["left_out"] == {"2021": "its CI has zero width: no standard error",
                                 "2022": "suppressed at the site: fewer than 5 patients"}
    assert pooled_trend({})["reason"].startswith("0 usable period(s)")


def _store(path: Path, drift: dict[str, dict | None], config: dict | None = None) -> RunStore:
    store = RunStore(path)
    store.start_run("r", "x", config or {}, list(drift))
    entries = {site: {"n": 40, "n_patients": 20, "auc": 0.7, "auc_ci": [0.6, 0.8], "hist_neg": [1, 0],
                      "hist_pos": [0, 1], **({} if d is None else {"drift": d})} for site, d in drift.items()}
    store.record_evaluation("r", 1, entries, None)
    store.record_evaluation("r", 1, entries, None, split="val")
    return store


def test_summary_and_report_show_the_periods_and_the_trend(tmp_path: Path) -> None:
    falling = _drift({"2020": 0.85, "2021": 0.83, "2022": 0.65, "2023": 0.6},
                     {"2020": 0.08, "2021": 0.08, "2022": 0.1, "2023": 0.1})
    falling["periods"].append({"period": "2024", "suppressed": "one class only"})
    flat = _drift({"2021": 0.7, "2022": 0.72, "2023": 0.69}, {"2021": 0.1, "2022": 0.1, "2023": 0.1})
    with _store(tmp_path / "runs.sqlite", {"a": falling, "b": flat, "c": None}) as store:
        summary = build_summary(store, "r")
        report = write_report(store, "r", tmp_path / "report.html").read_text()
    drift = summary["drift"]
    assert drift["setting"] == "year" and drift["reason"] is None and set(drift["per_site"]) == {"a", "b"}
    assert drift["per_site"]["a"]["periods"] == falling["periods"]
    assert drift["per_site"]["a"]["trend"] == site_trend(falling)
    assert drift["pooled"] == pooled_trend({"a": falling, "b": flat})
    assert drift["per_site"]["a"]["trend"]["slope"] < 0
    assert "<h2>Drift over time</h2>" in report and "suppressed: one class only" in report
    assert "all sites (common slope)" in report and "data:image/png;base64," in report.split("Drift over time")[1]


@pytest.mark.parametrize(("drift", "config", "reason"), [
    ({"a": None}, {}, "no site's manifest has an acquired column"),
    ({"a": None}, {"eval.drift-period": "off"}, "eval.drift-period = off"),
])
def test_without_periods_the_summary_and_report_say_why(tmp_path: Path, drift, config, reason: str) -> None:
    with _store(tmp_path / "runs.sqlite", drift, config) as store:
        summary = build_summary(store, "r")
        report = write_report(store, "r", tmp_path / "report.html").read_text()
    assert summary["drift"] == {"setting": config.get("eval.drift-period", "year"), "per_site": {}, "pooled": None,
                                "reason": reason}
    assert f"Not computed: {escape(reason)}." in report
