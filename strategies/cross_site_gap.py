"""Cross-site evaluation (FLARE-style): every site's own model scored on every site's test data.

After the last round the server sends each site's locally trained model (its last update
in the federated arm, its own model in the local-only arm) to every site, and each site
returns the task kind's CROSS_SITE_METRIC of each model on its test patients, with the CI
it computed there (fedir.tasks: a classifier's AUC, a segmentation's per-patient Dice with
its patient-bootstrap CI; fedir.server.cross_site_round does the messaging). Entry [i][j]
is site i's model on site j's data. A model that is much better on its own site's patients
than on the others' has learned something that does not transfer: a site marker, a
scanner, a local prevalence. The gap is the mean diagonal minus the mean off-diagonal
value (defined entries only); its standard error comes from the entries' bootstrap CIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedir.strategies.heterogeneity import METRICS, Z95, standard_error


def cross_site_gap(matrix: Mapping[str, Mapping[str, dict]], *, max_gap: float = 0.1, metric: str = "auc") -> dict:
    """`matrix[model_site][data_site]` = {metric: float | None, f"{metric}_ci": [lo, hi] | None}.

    Alarm: gap > ``max_gap`` and its 95% interval above 0. The sites named are those whose
    own model loses most off its site (diagonal minus its row's off-diagonal mean). The
    result's `matrix` holds the values, `matrix_ci` their CIs, `metric` their name.
    """
    label = METRICS[metric][0]
    out: dict[str, Any] = {
        "name": "cross_site", "computable": False, "metric": metric,
        "matrix": {m: {d: (e or {}).get(metric) for d, e in row.items()} for m, row in matrix.items()},
        "matrix_ci": {m: {d: (e or {}).get(f"{metric}_ci") for d, e in row.items()} for m, row in matrix.items()},
        "diagonal": None, "off_diagonal": None, "gap": None, "gap_ci": None, "site_gap": {},
        "thresholds": {"max_gap": max_gap}, "alarm": False, "sites": [], "reason": "",
    }
    diag, off, site_gap = [], [], {}
    for model_site, row in matrix.items():
        own = row.get(model_site) or {}
        others = [e for d, e in row.items() if d != model_site and e and e.get(metric) is not None]
        if own.get(metric) is not None:
            diag.append(own)
            if others:
                site_gap[model_site] = float(own[metric] - np.mean([e[metric] for e in others]))
        off.extend(others)
    if not diag or not off:
        out["reason"] = f"not computable: needs a defined {label} of a site's model on its own and on other sites' data"
        return out
    d_mean = float(np.mean([e[metric] for e in diag]))
    o_mean = float(np.mean([e[metric] for e in off]))
    se = float(np.sqrt(_var_of_mean(diag, metric) + _var_of_mean(off, metric)))
    gap = d_mean - o_mean
    out.update(computable=True, diagonal=d_mean, off_diagonal=o_mean, gap=gap,
               gap_ci=[gap - Z95 * se, gap + Z95 * se], site_gap=site_gap)
    out["alarm"] = bool(gap > max_gap and out["gap_ci"][0] > 0)
    if out["alarm"]:
        out["sites"] = sorted(site_gap, key=lambda site: site_gap[site], reverse=True)[:1]
        top = out["sites"][0]
        out["reason"] = (
            f"site models score {d_mean:.2f} {label} on their own site and {o_mean:.2f} on the others "
            f"(gap {gap:.2f} [95% CI {out['gap_ci'][0]:.2f}, {out['gap_ci'][1]:.2f}] > {max_gap}); "
            f"largest for {top} ({site_gap[top]:.2f})"
        )
    return out


def _var_of_mean(entries: list[dict], metric: str) -> float:
    """The variance of the entries' mean, from their CIs (an entry without one: SE 0.05)."""
    ses = [standard_error(e[f"{metric}_ci"]) if e.get(f"{metric}_ci") else 0.05 for e in entries]
    return float(np.sum(np.square(ses)) / len(entries) ** 2)
