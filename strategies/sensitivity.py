"""Leave-one-site-out sensitivity: does a conclusion rest on one hospital?

The verdict and the pooled headline metric (a classification's AUC, a segmentation's Dice)
are recomputed with each site left out in turn (from the same aggregates; nothing is
retrained). A conclusion that changes when one site is removed is flagged: an alarm that
disappears without site-0 says the confounding is site-0's; a clean verdict that turns into
an alarm says one site was hiding it; and a pooled metric that moves by more than
``max_auc_shift`` says the headline number is one site's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedir.metrics import pooled_auc
from fedir.strategies.bias import evaluation_level
from fedir.strategies.heterogeneity import METRICS
from fedir.tasks.segmentation_metrics import pooled_segmentation_metrics

Analyse = Callable[[Mapping[str, Mapping], Mapping[str, dict], Mapping[str, object]], dict]


def _pooled_auc(per_site: Mapping[str, dict]) -> tuple[dict[str, dict], Callable[[Mapping[str, dict]], float | None]]:
    # per patient where every site has them, like the gap and heterogeneity tests it reruns;
    # the level is the full federation's, so that a shift is the site's, not a change of unit
    return evaluation_level(per_site)[0], pooled_auc


def _pooled_dice(per_site: Mapping[str, dict]) -> tuple[dict[str, dict], Callable[[Mapping[str, dict]], float | None]]:
    # the patient-weighted mean of the sites' per-patient Dice sums (fedir.tasks.segmentation_metrics)
    return dict(per_site), lambda units: pooled_segmentation_metrics(units)["dice"] if units else None


# the pooled metric of each kind's headline: the units it pools and how
POOLED = {"auc": _pooled_auc, "dice": _pooled_dice}


def leave_one_site_out(
    label_counts: Mapping[str, Mapping[int, int]],
    per_site: Mapping[str, dict],
    moments: Mapping[str, object],
    analyse: Analyse,
    full: dict,
    *,
    max_auc_shift: float = 0.05,
    metric: str = "auc",
) -> dict:
    """For each site: the verdict's alarm and signals, and the pooled `metric` (a key of
    POOLED: "auc" or "dice"), without it.

    `analyse(label_counts, per_site, moments)` is the verdict function (`label_counts`: each
    site's training counts the verdict reads, class counts or foreground tables); `full` is
    its result on every site. Returns `{"by_site": {site: {"alarm", "signals",
    "pooled_<metric>"}}, "flags": [sentences], "sites": [...], "metric": metric}`.
    """
    sites = sorted(set(label_counts) | set(per_site))
    units, pooled = POOLED[metric](per_site)
    label = METRICS[metric][0]
    full_value = pooled(units)
    by_site, flags, named = {}, [], []
    if len(sites) < 3:
        return {"by_site": {}, "flags": [], "sites": [], "metric": metric,
                "reason": f"not computable: leaving one of {len(sites)} site(s) out leaves fewer than 2"}
    for site in sites:
        rest_counts = {s: v for s, v in label_counts.items() if s != site}
        rest_sites = {s: v for s, v in per_site.items() if s != site}
        rest_moments = {s: v for s, v in moments.items() if s != site}
        result = analyse(rest_counts, rest_sites, rest_moments)
        value = pooled({s: v for s, v in units.items() if s != site})
        entry = {"alarm": result["alarm"], "signals": result["signals"], f"pooled_{metric}": value}
        by_site[site] = entry
        if result["alarm"] != full["alarm"]:
            named.append(site)
            flags.append(
                f"without {site} the alarm {'is raised' if result['alarm'] else 'clears'}"
                + ("" if not full["alarm"] else f" (signals left: {', '.join(result['signals']) or 'none'})")
            )
        if full_value is not None and value is not None and abs(value - full_value) > max_auc_shift:
            named.append(site)
            flags.append(f"without {site} the pooled {label} moves from {full_value:.2f} to {value:.2f}")
    return {"by_site": by_site, "flags": flags, "sites": list(dict.fromkeys(named)), "metric": metric,
            "thresholds": {"max_auc_shift": max_auc_shift}, "reason": ""}

