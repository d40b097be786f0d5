"""Survival evaluation aggregates: computed at a site from its patients' risk scores, pooled at the server.

A site scores each test patient with a risk (the Cox model's linear predictor: higher =
earlier event) and keeps the scores. What leaves it is :func:`site_survival_metrics`:

- Harrell's C-index and Uno's C-index (inverse-probability-of-censoring weighted, so it
  does not depend on the site's censoring pattern), each with a patient-bootstrap 95% CI;
- the exact within-site pair counts behind Harrell's C (concordant, tied in risk,
  comparable pairs), from which the server adds sites exactly;
- a joint histogram of (risk bin, time bin, event), which orders the pairs *across* sites:
  the pooled C-index (:func:`pooled_c_index`) is exact for within-site pairs and bounded
  for cross-site pairs that share a risk bin or a time bin;
- a Kaplan-Meier curve at fixed time-bin edges, k-suppressed: the survival and the number
  at risk at an edge where fewer than k patients remain at risk are withheld (-1), because
  the tail of a curve with few patients at risk gives away single events.

Pairs follow lifelines' `concordance_index` (the reference in the tests): (i, j) is
comparable when i had the event and T_i < T_j, or T_i == T_j and j was censored; a pair
tied in risk counts 1/2. Risk bins are `bins` equal bins of sigmoid(risk) on [0, 1]
(fixed edges, so every site bins alike without seeing the others' scores); time bins are
`time_bins` bins of `time_bin_days` days, the last one open-ended.

Privacy cost of the joint histogram: it places each patient in one of bins x time_bins x 2
cells; a cell holding one patient gives that patient's risk to within 1/bins (on the
sigmoid scale), their follow-up to within a time bin and their event status. That is more
than the classification histograms reveal (they have no time axis); the KM counts add
nothing beyond it. Nothing per patient is sent otherwise, and no identifier ever is.

The integrated Brier score is not computed: it needs each patient's predicted survival
curve S(t | x), and a Cox model trained through fedir shares only its coefficients; the
baseline hazard (Breslow's estimator) would need every site's risk-set sums at every
event time, which fedir does not federate. Every value returned is a plain Python
number, list or None (JSON-safe, NaN-free). No torch here except inside
:func:`torchsurv_c_indices` (the site side), so the server imports this module freely.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
DEFAULT_TIME_BIN_DAYS = 365.0
DEFAULT_TIME_BINS = 10
DEFAULT_K = 5  # as the data card's (fedir.client.datacard.DEFAULT_K)
# A percentile CI from a minority of usable resamples describes another population.
MIN_USABLE_FRACTION = 0.5

# ---- the names of a survival evaluation (fedir.protocol encodes exactly these) -----------
SURVIVAL_COUNTS = ("n", "n_patients", "events")
SURVIVAL_SCALARS = ("c_index", "uno_c_index", "ibs")  # each with `<name>_ci`
PAIR_COUNTS = "pairs"  # [concordant, tied in risk, comparable] within the site, exact
JOINT = "joint"  # flattened (bins, time_bins, 2) counts: risk bin x time bin x event
KM_SURVIVAL = "km_survival"  # KM survival at each time-bin end (-1 = suppressed)
KM_AT_RISK = "km_at_risk"  # patients at risk at each time-bin start (-1 = suppressed)
SURVIVAL_INT_VECTORS = (JOINT, KM_AT_RISK)
SURVIVAL_FLOAT_VECTORS = (PAIR_COUNTS, KM_SURVIVAL)
IBS_REASON = ("not defined for a federated Cox model: the integrated Brier score needs predicted survival "
              "curves, and only the coefficients are shared, not the baseline hazard")


def time_edges(time_bins: int, time_bin_days: float) -> np.ndarray:
    """The inner edges of the time bins: (time_bins - 1,) days; bin b is [edge b-1, edge b)."""
    return np.arange(1, time_bins) * float(time_bin_days)


def _pairs(time: np.ndarray, event: np.ndarray, risk: np.ndarray,
           weight_of_i: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(comparable, concordance credit) matrices (n, n): row i is the earlier patient.
    `weight_of_i` weights each comparable pair by its row (Uno's 1 / G(T_i)^2)."""
    e = event.astype(bool)
    comp = ((time[:, None] < time[None, :]) | ((time[:, None] == time[None, :]) & ~e[None, :])) & e[:, None]
    credit = np.where(risk[:, None] > risk[None, :], 1.0, np.where(risk[:, None] == risk[None, :], 0.5, 0.0))
    comp_w = comp.astype(float)
    if weight_of_i is not None:
        comp_w = comp_w * weight_of_i[:, None]
    return comp_w, comp_w * credit


def pair_counts(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[float, float, float]:
    """(concordant, tied in risk, comparable) pairs of one site, exactly (lifelines' rules)."""
    comp, credit = _pairs(np.asarray(time, float), np.asarray(event), np.asarray(risk, float))
    tied = float((comp * (credit == 0.5)).sum())
    concordant = float(credit.sum()) - 0.5 * tied
    return concordant, tied, float(comp.sum())


def censoring_weights(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    """1 / G(T_i)^2 for the patients with an event, G the Kaplan-Meier estimate of the
    censoring distribution just before T_i (Uno et al. 2011); 0 for censored patients."""
    t = np.asarray(time, float)
    censored = 1 - np.asarray(event, int)
    order = np.unique(t)
    at_risk = np.array([(t >= u).sum() for u in order])
    cens = np.array([censored[t == u].sum() for u in order])
    surv = np.cumprod(1 - cens / at_risk)
    before = np.concatenate([[1.0], surv[:-1]])  # G(T-)
    g = before[np.searchsorted(order, t)]
    with np.errstate(divide="ignore"):
        w = np.where((np.asarray(event) == 1) & (g > 0), 1.0 / np.maximum(g, 1e-12) ** 2, 0.0)
    return w


def _bootstrap_c(comp: np.ndarray, credit: np.ndarray, n_boot: int, seed: int) -> list[float] | None:
    """Percentile 95% CI of sum(w w' credit) / sum(w w' comp) over patient resamples
    (multiplicities w drawn with replacement); None when too few resamples have a pair."""
    n = comp.shape[0]
    if n_boot < 1 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)]).astype(float)
    den = np.einsum("bi,ij,bj->b", counts, comp, counts)
    num = np.einsum("bi,ij,bj->b", counts, credit, counts)
    ok = den > 0
    if ok.sum() < MIN_USABLE_FRACTION * n_boot:
        return None
    values = num[ok] / den[ok]
    tail = (1 - CONFIDENCE) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def torchsurv_c_indices(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[float, float]:
    """(Harrell's C, Uno's C) by torchsurv (the site side: torch is imported here only)."""
    import torch
    from torchsurv.metrics.cindex import ConcordanceIndex
    from torchsurv.stats.ipcw import get_ipcw

    t = torch.as_tensor(np.asarray(time, np.float32))
    e = torch.as_tensor(np.asarray(event).astype(bool))
    r = torch.as_tensor(np.asarray(risk, np.float32))
    cindex = ConcordanceIndex()
    harrell = float(cindex(r, e, t))
    uno = float(cindex(r, e, t, weight=get_ipcw(e, t)))
    return harrell, uno


def joint_histogram(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, bins: int,
                    time_bins: int, time_bin_days: float) -> np.ndarray:
    """(bins, time_bins, 2) counts: sigmoid(risk) bin x time bin x event."""
    s = 1.0 / (1.0 + np.exp(-np.clip(np.asarray(risk, float), -50, 50)))
    r_bin = np.minimum((s * bins).astype(int), bins - 1)
    t_bin = np.searchsorted(time_edges(time_bins, time_bin_days), np.asarray(time, float), side="right")
    out = np.zeros((bins, time_bins, 2), dtype=np.int64)
    np.add.at(out, (r_bin, t_bin, np.asarray(event, int)), 1)
    return out


def kaplan_meier(time: np.ndarray, event: np.ndarray, *, time_bins: int, time_bin_days: float,
                 k: int = DEFAULT_K) -> tuple[list[float], list[int]]:
    """KM survival at each time-bin end and the number at risk at each bin's start, both
    -1 where fewer than k patients are at risk (k-suppressed; 0 at risk is shown as 0)."""
    t, e = np.asarray(time, float), np.asarray(event, int)
    ends = np.arange(1, time_bins + 1) * float(time_bin_days)
    starts = ends - float(time_bin_days)
    event_times = np.unique(t[e == 1])
    factors = np.array([1 - ((t == u) & (e == 1)).sum() / (t >= u).sum() for u in event_times])
    surv, at_risk = [], []
    for start, end in zip(starts, ends):
        n = int((t >= start).sum())
        s = float(np.prod(factors[event_times <= end])) if len(factors) else 1.0
        small = 0 < n < k
        at_risk.append(-1 if small else n)
        surv.append(-1.0 if small or n == 0 else s)
    return surv, at_risk


def site_survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, n_boot: int = 500,
                          seed: int = 0, bins: int = 50, time_bins: int = DEFAULT_TIME_BINS,
                          time_bin_days: float = DEFAULT_TIME_BIN_DAYS, k: int = DEFAULT_K) -> dict:
    """Test-set survival aggregates of one site (one row per patient), safe to send.

    Args:
        time: (n,) follow-up in days; event: (n,) 1 = event observed, 0 = censored;
        risk: (n,) the model's risk scores (higher = earlier event).

    Returns the keys of SURVIVAL_COUNTS, SURVIVAL_SCALARS (with `_ci`), PAIR_COUNTS,
    JOINT, KM_SURVIVAL, KM_AT_RISK and `reasons` (why a value is None).
    """
    t, e, r = np.asarray(time, float), np.asarray(event, int), np.asarray(risk, float)
    reasons: dict[str, str] = {"ibs": IBS_REASON}
    concordant, tied, comparable = pair_counts(t, e, r)
    out: dict = {"n": int(t.size), "n_patients": int(t.size), "events": int(e.sum()),
                 PAIR_COUNTS: [concordant, tied, comparable], "ibs": None, "ibs_ci": None}
    if comparable == 0:
        why = "no comparable pair (no event before another patient's follow-up ended)"
        out.update(c_index=None, c_index_ci=None, uno_c_index=None, uno_c_index_ci=None)
        reasons.update(c_index=why, c_index_ci=why, uno_c_index=why, uno_c_index_ci=why)
    else:
        harrell, uno = torchsurv_c_indices(t, e, r)
        out["c_index"], out["uno_c_index"] = harrell, uno
        for name, weights in (("c_index", None), ("uno_c_index", censoring_weights(t, e))):
            ci = _bootstrap_c(*_pairs(t, e, r, weights), n_boot, seed)
            out[f"{name}_ci"] = ci
            if ci is None:
                reasons[f"{name}_ci"] = ("no bootstrap (eval.bootstrap = 0)" if n_boot < 1 else
                                         "fewer than half of the patient resamples had a comparable pair")
    out[JOINT] = [int(v) for v in joint_histogram(t, e, r, bins=bins, time_bins=time_bins,
                                                  time_bin_days=time_bin_days).ravel()]
    out[KM_SURVIVAL], out[KM_AT_RISK] = kaplan_meier(t, e, time_bins=time_bins, time_bin_days=time_bin_days, k=k)
    out["reasons"] = reasons
    return out


# ---- at the server: pooling from aggregates ---------------------------------------------


def _joint(entry: Mapping, time_bins: int) -> np.ndarray:
    flat = np.asarray(entry[JOINT], dtype=float)
    return flat.reshape(-1, time_bins, 2)


def _cross_pairs(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Ordered pairs (i in a, j in b) in distinct time bins with i's event earlier:
    (concordant by risk bin, tied in risk bin, comparable). a, b: (bins, time_bins, 2)."""
    events_a = a[:, :, 1]  # (R, T)
    n_b = b.sum(axis=2)  # (R, T)
    later_b = np.cumsum(n_b[:, ::-1], axis=1)[:, ::-1]  # j in time bins >= t
    later_b = np.concatenate([later_b[:, 1:], np.zeros((n_b.shape[0], 1))], axis=1)  # > t
    lower_b = np.cumsum(later_b, axis=0) - later_b  # risk bins < r, time bins > t
    concordant = float((events_a * lower_b).sum())
    tied = float((events_a * later_b).sum())
    comparable = float(events_a.sum(axis=0) @ later_b.sum(axis=0))
    return concordant, tied, comparable


def _same_bin_pairs(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Unordered cross pairs in the same time bin with at least one event: (all of them,
    the expected number of comparable ones: both events -> 1, one event -> 1/2)."""
    ea, eb = a[:, :, 1].sum(axis=0), b[:, :, 1].sum(axis=0)
    ca, cb = a[:, :, 0].sum(axis=0), b[:, :, 0].sum(axis=0)
    both = float(ea @ eb)
    one = float(ea @ cb + eb @ ca)
    return both + one, both + 0.5 * one


def pooled_c_index(per_site: Mapping[str, Mapping], *, time_bins: int) -> dict:
    """The federation's Harrell C-index from aggregates only, with a bound of its error.

    Within-site pairs are each site's exact counts. A cross-site pair (i, j) in distinct
    time bins, i's event in the earlier one, is comparable for certain and ordered by risk
    bins (a pair sharing a risk bin counts 1/2, off by at most 1/2). A cross-site pair in
    the same time bin with an event may or may not be comparable (which one is earlier is
    lost in the bin): it is left out of the estimate, which is the C of the known pairs. The
    bound is the worst case over the unknown pairs: all or none of them comparable, all or
    none of the uncertain ones concordant; the raw scores' pooled C lies within `c_index`
    +- `binning_error`. `cross_site_pairs` counts the known cross-site pairs and, at their
    expected weight (1 if both had the event, 1/2 otherwise), the unknown ones.

    Also returns the site-stratified C (within-site pairs only, exact) and the pair counts.
    """
    sites = [s for s in per_site if per_site[s].get(PAIR_COUNTS) is not None]
    within = np.array([per_site[s][PAIR_COUNTS] for s in sites], dtype=float).reshape(-1, 3)
    w_conc, w_tied, w_comp = within.sum(axis=0) if len(sites) else (0.0, 0.0, 0.0)
    joints = {s: _joint(per_site[s], time_bins) for s in sites}
    c_conc = c_tied = c_comp = unsure = expected = 0.0
    for i, a in enumerate(sites):
        for b in sites[i + 1:]:
            for x, y in ((joints[a], joints[b]), (joints[b], joints[a])):
                conc, tied, comp = _cross_pairs(x, y)
                c_conc, c_tied, c_comp = c_conc + conc, c_tied + tied, c_comp + comp
            all_same, exp_same = _same_bin_pairs(joints[a], joints[b])
            unsure, expected = unsure + all_same, expected + exp_same
    stratified = None if w_comp == 0 else float((w_conc + 0.5 * w_tied) / w_comp)
    sure_wins = w_conc + 0.5 * w_tied + c_conc
    known = w_comp + c_comp
    if known == 0:
        return {"c_index": None, "binning_error": None, "stratified_c_index": stratified,
                "cross_site_pairs": float(expected), "within_site_pairs": w_comp}
    # the unknown same-time-bin pairs are left out of the estimate (assumed ordered as well
    # as the known pairs): crediting them 1/2 biased the pooled C towards 0.5 on TCGA-BRCA
    # (benchmarks/pooled_c_binning.py); the bound still covers them
    estimate = (sure_wins + 0.5 * c_tied) / known
    low = sure_wins / (known + unsure)
    high = max((sure_wins + c_tied + unsure) / (known + unsure), (sure_wins + c_tied) / known)
    bound = max(estimate - low, high - estimate)
    return {"c_index": float(np.clip(estimate, 0, 1)), "binning_error": float(bound),
            "stratified_c_index": stratified, "cross_site_pairs": float(c_comp + expected),
            "within_site_pairs": float(w_comp)}


def pooled_km_counts(per_site: Mapping[str, Mapping], *, time_bins: int) -> dict[str, dict[str, list[int]]]:
    """Per site and time bin: events and censored patients (from the joint histogram)."""
    out = {}
    for site, entry in per_site.items():
        joint = _joint(entry, time_bins).sum(axis=0)  # (T, 2)
        out[site] = {"events": [int(v) for v in joint[:, 1]], "censored": [int(v) for v in joint[:, 0]]}
    return out


def pooled_survival_metrics(per_site: Mapping[str, Mapping], *, time_bins: int) -> dict:
    """The federation's entry: counts summed, the pooled C-index (pooled_c_index) with its
    binning bound, the stratified C; Uno's C and the IBS are not pooled (None, reasons)."""
    pooled = pooled_c_index(per_site, time_bins=time_bins)
    reasons = {"c_index_ci": "no interval for the pooled C-index from aggregates (its binning bound is given)",
               "uno_c_index": "Uno's C is not pooled: the censoring weights need every patient's follow-up",
               "ibs": IBS_REASON}
    if pooled["c_index"] is None:
        reasons["c_index"] = "no comparable pair in the federation"
    out: dict[str, Any] = {key: sum(int(e[key]) for e in per_site.values()) for key in SURVIVAL_COUNTS}
    joints = [_joint(e, time_bins) for e in per_site.values() if e.get(JOINT)]
    total = np.sum(joints, axis=0) if joints else np.zeros((1, time_bins, 2))
    out.update({
        "c_index": pooled["c_index"], "c_index_ci": None, "c_index_binning_error": pooled["binning_error"],
        "stratified_c_index": pooled["stratified_c_index"], "uno_c_index": None, "uno_c_index_ci": None,
        "ibs": None, "ibs_ci": None, JOINT: [int(v) for v in total.ravel()],
        "reasons": reasons,
    })
    return out


def per_site_time_table(per_site: Mapping[str, Mapping], *, time_bins: int
                        ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sites, events (S, T), censored (S, T)) per time bin, for the log-rank tests."""
    sites = list(per_site)
    joints = [_joint(per_site[s], time_bins).sum(axis=0) for s in sites]
    events = np.array([j[:, 1] for j in joints]).reshape(len(sites), time_bins)
    censored = np.array([j[:, 0] for j in joints]).reshape(len(sites), time_bins)
    return sites, events, censored


def exact_pooled_c_index(times: Sequence[np.ndarray], events: Sequence[np.ndarray],
                         risks: Sequence[np.ndarray]) -> float:
    """The raw scores' pooled Harrell C (every patient in one place): for tests and benchmarks."""
    conc, tied, comp = pair_counts(np.concatenate(times), np.concatenate(events), np.concatenate(risks))
    return (conc + 0.5 * tied) / comp
