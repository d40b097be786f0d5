"""The Frankenstein checks for a survival study: outcome by site, and a model that ranks hospitals.

Pure statistics over the sites' aggregates (fedir.tasks.survival_metrics):

- `survival_by_site`: the log-rank test across sites of the event times, from the sites'
  binned counts (events and censored patients per time bin; lifelines'
  `multivariate_logrank_test` on the binned times, each bin's censored patients at risk
  through its events). Sites differ in case mix, so this is secondary evidence alone.
- `follow_up_by_site`: the same test on the reverse Kaplan-Meier (censoring as the event):
  whether follow-up length depends on the site (a site that stops following patients
  early makes its patients look event-free). Secondary.
- `pooled_vs_stratified_c`: the pooled C-index (every pair across the federation) minus
  the site-stratified one (pairs within a site only). A model that orders patients of
  different hospitals better than patients of the same one is ordering hospitals: the
  survival analogue of pooled-vs-within AUC. Alarm when the gap exceeds `max_gap` and
  stays above 0 after the pooled C's binning bound is taken off (the gap is then positive
  whatever the raw scores; no sampling interval, unlike the AUC gap's bootstrap). Primary.
- `c_index_heterogeneity`: Cochran's Q and I^2 of the per-site C-indices, SE from their
  patient-bootstrap CIs (fedir.strategies.heterogeneity.heterogeneity with metric "c_index";
  a site whose CI has zero width is left out and named). Secondary.

The event rate's association with the site is the classification test unchanged
(fedir.strategies.bias.site_label_association): a survival site's label counts are its
training patients censored (0) and with the event (1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedir.tasks.survival_metrics import per_site_time_table, pooled_c_index


def _logrank(name: str, per_site: Mapping[str, dict], time_bins: int, alpha: float, *, reverse: bool) -> dict:
    from lifelines.statistics import multivariate_logrank_test

    out: dict[str, Any] = {"name": name, "computable": False, "p_value": None, "chi2": None, "dof": None,
                           "alarm": False, "sites": [], "reason": "", "thresholds": {"alpha": alpha}}
    if len(per_site) < 2:
        out["reason"] = f"not computable: needs at least 2 sites, got {len(per_site)}"
        return out
    sites, events, censored = per_site_time_table(per_site, time_bins=time_bins)
    if reverse:
        events, censored = censored, events
    durations, observed, groups, weights = [], [], [], []
    for s, site in enumerate(sites):
        for b in range(time_bins):
            for flag, count in ((1, events[s, b]), (0, censored[s, b])):
                if count > 0:
                    durations.append(b)
                    observed.append(flag)
                    groups.append(site)
                    weights.append(float(count))
    if sum(o * w for o, w in zip(observed, weights)) == 0:
        out["reason"] = "not computable: no " + ("censored patient" if reverse else "event") + " at any site"
        return out
    result = multivariate_logrank_test(np.array(durations), np.array(groups), np.array(observed),
                                       weights=np.array(weights))
    what = "follow-up (censoring)" if reverse else "survival"
    out.update(computable=True, p_value=float(result.p_value), chi2=float(result.test_statistic),
               dof=int(result.degrees_of_freedom))
    out["alarm"] = bool(out["p_value"] < alpha)
    if out["alarm"]:
        rate = (events.sum(axis=1) / np.maximum(events.sum(axis=1) + censored.sum(axis=1), 1))
        out["sites"] = [sites[i] for i in np.argsort(-np.abs(rate - rate.mean()))[:2]]
        out["reason"] = (f"{what} differs by site: log-rank chi2 = {out['chi2']:.1f} on {out['dof']} dof, "
                         f"p = {out['p_value']:.2g} < {alpha:g}")
    else:
        out["reason"] = f"{what} does not differ by site beyond chance (log-rank p = {out['p_value']:.2g})"
    return out


def survival_by_site(per_site: Mapping[str, dict], *, time_bins: int, alpha: float) -> dict:
    return _logrank("survival_by_site", per_site, time_bins, alpha, reverse=False)


def follow_up_by_site(per_site: Mapping[str, dict], *, time_bins: int, alpha: float) -> dict:
    return _logrank("follow_up_by_site", per_site, time_bins, alpha, reverse=True)


def pooled_vs_stratified_c(per_site: Mapping[str, dict], *, time_bins: int, max_gap: float) -> dict:
    """Pooled minus site-stratified Harrell C (see the module docstring)."""
    pooled = pooled_c_index(per_site, time_bins=time_bins)
    out: dict[str, Any] = {"name": "pooled_vs_stratified_c", "computable": False,
                           "pooled_c_index": pooled["c_index"], "stratified_c_index": pooled["stratified_c_index"],
                           "binning_error": pooled["binning_error"], "gap": None,
                           "thresholds": {"max_gap": max_gap}, "alarm": False, "sites": [], "reason": ""}
    if len(per_site) < 2 or pooled["c_index"] is None or pooled["stratified_c_index"] is None:
        out["reason"] = "not computable: needs at least 2 sites with comparable pairs"
        return out
    gap = pooled["c_index"] - pooled["stratified_c_index"]
    out.update(computable=True, gap=gap)
    out["alarm"] = bool(gap > max_gap and gap - pooled["binning_error"] > 0)
    out["reason"] = (f"the model ranks patients across sites better than within them: pooled C "
                     f"{pooled['c_index']:.3f} vs site-stratified {pooled['stratified_c_index']:.3f} "
                     f"(gap {gap:+.3f}, binning error at most {pooled['binning_error']:.3f}, threshold {max_gap:g})"
                     if out["alarm"] else
                     f"pooled C {pooled['c_index']:.3f} vs site-stratified {pooled['stratified_c_index']:.3f} "
                     f"(gap {gap:+.3f} +- {pooled['binning_error']:.3f})")
    return out
