"""The pooled-vs-within AUC gap of a K > 2 study (task.classes), one class at a time.

A model that ranks hospitals credits itself, pooled, for putting one site's patients above
another's; with K classes it can do so for any class. Each class's one-vs-rest problem
(p_c for class c against the rest) is a binary one with the sites' per-class histograms and
exact AUCs (fedir.tasks.multiclass_metrics), so fedir.strategies.bias.pooled_vs_within_auc
applies to it unchanged: its gap, its CI from every site's redrawn histograms, its alarm.
The test alarms when any class's does, naming the class(es) and their sites: K gaps are
tested, each at its own 95% interval and `bias.max-auc-gap`, with no correction for the K
comparisons (the gap must also exceed the threshold, as in the binary test). `gap`,
`pooled_auc` and `within_auc` are the means over the classes where the gap is computable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedir.strategies.bias import pooled_vs_within_auc
from fedir.tasks.multiclass_metrics import CLASS_AUCS, HIST_CLASS, HIST_REST


def one_vs_rest(entry: Mapping[str, Any], c: int) -> dict[str, Any]:
    """A site's K-class metric set as the binary one of class c against the rest (what the
    binary bias tests read: n, auc, hist_neg, hist_pos, reasons, per_patient)."""
    auc = entry[CLASS_AUCS][c]
    out: dict[str, Any] = {"n": entry["n"], "auc": auc, "hist_neg": entry[HIST_REST][c],
                           "hist_pos": entry[HIST_CLASS][c],
                           "reasons": {} if auc is not None else {"auc": f"class {c} or the rest absent"}}
    if "per_patient" in entry:
        patient = entry["per_patient"]
        out["per_patient"] = None if patient is None else one_vs_rest(patient, c)
        if patient is None:
            out["reasons"]["per_patient"] = (entry.get("reasons") or {}).get("per_patient", "none sent")
    return out


def multiclass_pooled_vs_within_auc(per_site: Mapping[str, dict], *, max_gap: float = 0.05, n_boot: int = 200,
                                    seed: int = 0) -> dict:
    """The gap per class and the test over them (see the module docstring)."""
    classes = max((int(entry["classes"]) for entry in per_site.values()), default=0)
    by_class = {str(c): pooled_vs_within_auc({site: one_vs_rest(m, c) for site, m in per_site.items()},
                                             max_gap=max_gap, n_boot=n_boot, seed=seed + c)
                for c in range(classes)}
    computable = [r for r in by_class.values() if r["computable"]]
    alarmed = {c: r for c, r in by_class.items() if r["alarm"]}
    out: dict[str, Any] = {
        "name": "pooled_vs_within_auc",
        "computable": bool(computable),
        "level": next(iter(by_class.values()))["level"] if by_class else None,
        "pooled_auc": float(np.mean([r["pooled_auc"] for r in computable])) if computable else None,
        "within_auc": float(np.mean([r["within_auc"] for r in computable])) if computable else None,
        "gap": float(np.mean([r["gap"] for r in computable])) if computable else None,
        "per_class": by_class,
        "thresholds": {"max_gap": max_gap},
        "alarm": bool(alarmed),
        "classes": sorted(alarmed, key=int),
        "sites": list(dict.fromkeys(site for r in alarmed.values() for site in r["sites"])),
        "reason": "",
    }
    if not computable:
        out["reason"] = "not computable for any class: " + "; ".join(
            f"class {c}: {r['reason']}" for c, r in by_class.items()) if by_class else "no sites reported"
    elif alarmed:
        out["reason"] = "; ".join(f"class {c} (one-vs-rest): {r['reason']}" for c, r in alarmed.items())
    return out
