"""Leave-one-site-out sensitivity: does a conclusion rest on one hospital?

The verdict and the pooled AUC are recomputed with each site left out in turn (from the
same aggregates; nothing is retrained). A conclusion that changes when one site is removed
is flagged: an alarm that disappears without site-0 says the confounding is site-0's; a
clean verdict that turns into an alarm says one site was hiding it; and a pooled AUC that
moves by more than ``max_auc_shift`` says the headline number is one site's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from fedir.metrics import pooled_auc
from fedir.strategies.bias import evaluation_level

Analyse = Callable[[Mapping[str, Mapping[int, int]], Mapping[str, dict], Mapping[str, object]], dict]


def leave_one_site_out(
    label_counts: Mapping[str, Mapping[int, int]],
    per_site: Mapping[str, dict],
    moments: Mapping[str, object],
    analyse: Analyse,
    full: dict,
    *,
    max_auc_shift: float = 0.05,
) -> dict:
    """For each site: the verdict's alarm and signals, and the pooled AUC, without it.

    `analyse(label_counts, per_site, moments)` is the verdict function; `full` is its result
    on every site. Returns `{"by_site": {site: {...}}, "flags": [sentences], "sites": [...]}`.
    """
    sites = sorted(set(label_counts) | set(per_site))
    # per patient where every site has them, like the gap and heterogeneity tests it reruns;
    # the level is the full federation's, so that a shift is the site's, not a change of unit
    units = evaluation_level(per_site)[0]
    full_auc = pooled_auc(units)
    by_site, flags, named = {}, [], []
    if len(sites) < 3:
        return {"by_site": {}, "flags": [], "sites": [],
                "reason": f"not computable: leaving one of {len(sites)} site(s) out leaves fewer than 2"}
    for site in sites:
        rest_counts = {s: v for s, v in label_counts.items() if s != site}
        rest_sites = {s: v for s, v in per_site.items() if s != site}
        rest_moments = {s: v for s, v in moments.items() if s != site}
        result = analyse(rest_counts, rest_sites, rest_moments)
        auc = pooled_auc({s: v for s, v in units.items() if s != site})
        entry = {"alarm": result["alarm"], "signals": result["signals"], "pooled_auc": auc}
        by_site[site] = entry
        if result["alarm"] != full["alarm"]:
            named.append(site)
            flags.append(
                f"without {site} the alarm {'is raised' if result['alarm'] else 'clears'}"
                + ("" if not full["alarm"] else f" (signals left: {', '.join(result['signals']) or 'none'})")
            )
        if full_auc is not None and auc is not None and abs(auc - full_auc) > max_auc_shift:
            named.append(site)
            flags.append(f"without {site} the pooled AUC moves from {full_auc:.2f} to {auc:.2f}")
    return {"by_site": by_site, "flags": flags, "sites": list(dict.fromkeys(named)),
            "thresholds": {"max_auc_shift": max_auc_shift}, "reason": ""}

