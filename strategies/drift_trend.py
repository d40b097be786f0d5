"""The trend test over the sites' per-period AUCs (drift over time), at the coordinator.

Each site sends its test patients' per-patient AUC per acquisition period with a
patient-bootstrap 95% CI (fedir.client.drift). Whether performance moves with time is a
meta-regression of those AUCs on the period's time: weighted least squares (statsmodels
WLS) of AUC on t, the period's start in years (2021 -> 2021.0, 2021-Q3 -> 2021.5), with
weights 1 / SE^2 and SE = the CI's width / (2 x 1.96) (the bootstrap CI read as a normal
one). The slope is the change in AUC per year; its 95% CI and two-sided p-value are
WLS's t-based ones, with the residual scale estimated (the weights set the periods'
relative precision; how far the periods scatter around the line sets the absolute one,
so the test does not assume the CIs hold all the variation between periods).

Per site: one line through its periods (at least 3 periods: 1 residual degree of freedom).
Pooled: one common slope with an intercept per site (sites with at least 2 periods), so
that a site that only joins later or performs better throughout does not fake a trend;
it needs at least one residual degree of freedom too. A period is left out, with its
reason, when it was suppressed at the site, has no AUC or CI, or its CI has zero width
(an AUC of 1 in every resample: no standard error to weigh it by).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import statsmodels.api as sm
from scipy.stats import norm

from fedir.metrics import CONFIDENCE

Z = float(norm.ppf(0.5 + CONFIDENCE / 2))
UNIT = "AUC per year"
METHOD = ("weighted least squares of per-period AUC on the period's start in years, weights 1/SE^2 with SE "
          "from the 95% CI's width; t-based 95% CI and two-sided p-value, residual scale estimated")
POOLED_METHOD = METHOD + "; one slope for all sites, an intercept per site"


def period_time(label: str) -> float:
    """The start of a period label in years: "2021" -> 2021.0, "2021-Q3" -> 2021.5."""
    year, _, quarter = label.partition("-Q")
    return int(year) + (int(quarter) - 1) / 4 if quarter else float(int(year))


def usable_periods(drift: Mapping[str, Any]) -> tuple[list[dict], dict[str, str]]:
    """A site's periods that the test can weigh, ``{"period", "t", "auc", "se"}``, and the
    reason each other period is left out."""
    rows: list[dict] = []
    left_out: dict[str, str] = {}
    for period in drift.get("periods") or []:
        label = period["period"]
        ci = period.get("auc_ci")
        if period.get("suppressed"):
            left_out[label] = f"suppressed at the site: {period['suppressed']}"
        elif period.get("auc") is None or ci is None:
            left_out[label] = "no AUC with a CI"
        elif ci[1] - ci[0] <= 0:
            left_out[label] = "its CI has zero width: no standard error"
        else:
            rows.append({"period": label, "t": period_time(label), "auc": float(period["auc"]),
                         "se": (ci[1] - ci[0]) / (2 * Z)})
    return rows, left_out


def site_trend(drift: Mapping[str, Any]) -> dict:
    """One site's trend (see the module docstring)."""
    rows, left_out = usable_periods(drift)
    result = _wls([rows], METHOD)
    return {**result, "left_out": left_out}


def pooled_trend(per_site: Mapping[str, Mapping[str, Any]]) -> dict:
    """The common within-site slope over every site's periods (see the module docstring)."""
    groups = {site: usable_periods(drift)[0] for site, drift in per_site.items()}
    used = {site: rows for site, rows in groups.items() if len(rows) >= 2}
    result = _wls(list(used.values()), POOLED_METHOD)
    return {**result, "sites": sorted(used)}


def _wls(groups: list[list[dict]], method: str) -> dict:
    """WLS of AUC on time with an intercept per group; the time coefficient and its inference.
    A group's periods have distinct labels, so distinct times: the design has full rank."""
    n = sum(len(rows) for rows in groups)
    out: dict[str, Any] = {"slope": None, "slope_ci": None, "p_value": None, "n_periods": n,
                           "unit": UNIT, "method": method, "reason": None}
    df = n - len(groups) - 1
    if not groups or df < 1:
        out["reason"] = (f"{n} usable period(s) in {len(groups)} group(s): a slope with a CI needs at least "
                         f"{len(groups) + 2 if groups else 3}")
        return out
    auc = np.array([r["auc"] for rows in groups for r in rows])
    t = np.array([r["t"] for rows in groups for r in rows])
    se = np.array([r["se"] for rows in groups for r in rows])
    dummies = np.zeros((n, len(groups)))
    start = 0
    for j, rows in enumerate(groups):
        dummies[start:start + len(rows), j] = 1.0
        start += len(rows)
    # time centred, so the intercepts are the sites' AUCs at the mean time (the slope is unchanged)
    design = np.column_stack([dummies, t - t.mean()])
    fit = sm.WLS(auc, design, weights=1.0 / se**2).fit()
    low, high = fit.conf_int(alpha=1 - CONFIDENCE)[-1]
    out.update(slope=float(fit.params[-1]), slope_ci=[float(low), float(high)], p_value=float(fit.pvalues[-1]))
    return out
