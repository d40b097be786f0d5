"""Drift over time, at the site: the test patients' metrics per acquisition period.

A model validated once can decay when a hospital changes scanner, protocol or case mix.
The manifest's `acquired` column (fedir.client.manifest: a date, a year or a quarter)
says when each row was acquired; a patient belongs to the period of their earliest row.
`eval.drift-period` bins the test patients by year or quarter and each period gets
fedir.metrics.site_metrics on its own patients: the per-patient AUC with its
patient-bootstrap CI, the number of patients and of positive patients.

What leaves the site is the period's label ("2021", "2021-Q3"), never a date, and only
these aggregates. A period with fewer than k patients (k as the data card's,
fedir.client.datacard) or without both classes is sent as suppressed, with the reason
and without its counts; when exactly one period is suppressed so, the smallest other one
is too, so that the site's test total cannot give it back (the data card's rule).
Patients without a date at the period's precision (an empty cell, or a bare year under
"quarter") belong to no period.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedir.client.datacard import DEFAULT_K
from fedir.client.manifest import Acquired
from fedir.metrics import site_metrics

NO_DATES = "no test patient has an acquired date at this precision"
GIVES_BACK = "suppressed so that the site's total cannot give back another suppressed period's counts"


def period_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    patients: Sequence[str],
    acquired: Mapping[str, Acquired],
    unit: str,
    *,
    k: int = DEFAULT_K,
    n_boot: int = 500,
    seed: int = 0,
    bins: int = 50,
) -> dict:
    """The test split's metrics per period of `unit` ("year" or "quarter").

    Args:
        labels, scores, patients: the scored test images (N,), as site_metrics takes them.
        acquired: each patient's earliest acquisition (fedir.client.manifest.acquired_by_patient).
        unit: the period, `eval.drift-period`.
        k: the smallest number of patients a period's counts may show.
        n_boot, seed, bins: as site_metrics (the round's seed, so that a period's CI is
            reproducible).

    Returns ``{"unit", "periods": [...], "reason"}``, periods in time order, each
    ``{"period", "n_patients", "positives", "auc", "auc_ci"}`` (per patient) or
    ``{"period", "suppressed": reason}``; ``reason`` is None unless no period could be formed.
    """
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=float).reshape(-1)
    ids = [str(p) for p in patients]
    of_image = [None if p not in acquired else acquired[p].period(unit) for p in ids]
    names = sorted({p for p in of_image if p is not None})
    if not names:
        return {"unit": unit, "periods": [], "reason": NO_DATES}
    rows: list[dict] = []
    for name in names:
        keep = np.array([p == name for p in of_image])
        metrics = site_metrics(y[keep], s[keep], [p for p, kept in zip(ids, keep) if kept],
                               n_boot=n_boot, seed=seed, bins=bins)
        rows.append(_period(name, metrics, k))
    _suppress_complement(rows)
    return {"unit": unit, "periods": [_public(row) for row in rows], "reason": None}


def _period(name: str, metrics: dict, k: int) -> dict:
    """One period's entry from its site_metrics, per patient; suppressed when small, one-class,
    or when a patient's images carry both labels (then there is no per-patient metric)."""
    level = metrics["per_patient"]
    if level is None:
        return {"period": name, "suppressed": "labels are per image: no per-patient metric"}
    n, positives = int(level["n_patients"]), int(level["positives"])
    row = {"period": name, "n_patients": n, "positives": positives, "auc": level["auc"],
           "auc_ci": level["auc_ci"], "suppressed": None}
    if n < k:
        row["suppressed"] = f"fewer than {k} patients"
    elif positives in (0, n):
        row["suppressed"] = "one class only"
    return row


def _suppress_complement(rows: list[dict]) -> None:
    """The data card's rule: one suppressed period among shown ones takes the smallest with it."""
    hidden = [row for row in rows if row["suppressed"]]
    shown = [row for row in rows if not row["suppressed"]]
    if len(hidden) == 1 and shown:
        min(shown, key=lambda row: (row["n_patients"], row["period"]))["suppressed"] = GIVES_BACK


def _public(row: dict) -> dict:
    """What is sent of a period: its label and reason when suppressed, else its aggregates."""
    if row["suppressed"]:
        return {"period": row["period"], "suppressed": row["suppressed"]}
    return {key: row[key] for key in ("period", "n_patients", "positives", "auc", "auc_ci")}
