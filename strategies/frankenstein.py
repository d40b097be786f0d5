"""The Frankenstein detector: every bias signal of a round, the verdict, and its sensitivity.

One entry point, `analyse`, so the ServerApp, the calibration benchmark and the tests
compute the verdict the same way. Inputs are aggregates only: labelled training patients
per class per site (data counts; a segmentation site's patients per foreground-fraction
bin, fedir.protocol.ForegroundCounts), each site's evaluation aggregates (AUC with CI, score
histograms), each site's embedding moments (fedir.client.embedding), and, after the last round,
the cross-site matrix of the kind's CROSS_SITE_METRIC (AUC; a segmentation's Dice).
Thresholds are those chosen on the calibration federations (benchmarks/bias_calibration.py;
the segmentation Dice gap's is not: docs/methods.md); they are scenario settings (`[bias]`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

from fedir.strategies.bias import SECONDARY_TO_ALARM, pooled_vs_within_auc, site_label_association, verdict
from fedir.strategies.cross_site_gap import cross_site_gap
from fedir.strategies.heterogeneity import heterogeneity
from fedir.strategies.multiclass_bias import multiclass_pooled_vs_within_auc
from fedir.strategies.segmentation_bias import foreground_by_site
from fedir.strategies.sensitivity import leave_one_site_out
from fedir.strategies.separability import site_separability
from fedir.strategies.survival_bias import (
    follow_up_by_site,
    pooled_vs_stratified_c,
    survival_by_site,
)
from fedir.tasks import classification, segmentation

# Above this many sites the pairwise analyses (site separability, leave-one-site-out) are
# skipped, each with its reason: they grow with the square of the sites and would dominate a
# 1,000-site simulation's rounds. The other signals, the gap's bootstrap intervals included
# (vectorised: under 2 s per round at 1,000 sites), run at any size.
MAX_DETAILED_SITES = 50


@dataclass(frozen=True)
class Thresholds:
    """Each signal's alarm threshold (see each signal's module for its meaning), and how many
    secondary signals together raise the alarm (`secondary_to_alarm`, bias.secondary-to-alarm;
    0 = they only warn: fedir.strategies.bias.verdict)."""

    alpha: float = 0.01
    min_cramers_v: float = 0.2
    max_auc_gap: float = 0.05
    min_i2: float = 0.5
    min_site_accuracy: float = 0.8
    min_separability_excess: float = 0.1
    max_cross_site_gap: float = 0.1
    max_cross_site_dice_gap: float = 0.2
    bootstrap: int = 200
    secondary_to_alarm: int = SECONDARY_TO_ALARM


def survival_tests(label_counts: Mapping[str, Mapping[int, int]], per_site: Mapping[str, dict],
                   thresholds: Thresholds, time_bins: int) -> dict[str, dict]:
    """A survival study's signals (fedir.strategies.survival_bias): the event rate by site
    (the label-association test on censored/event counts), survival and follow-up by site,
    pooled vs site-stratified C, C-index heterogeneity."""
    return {
        "site_label_association": site_label_association(
            dict(sorted(label_counts.items())), alpha=thresholds.alpha, min_cramers_v=thresholds.min_cramers_v),
        "pooled_vs_stratified_c": pooled_vs_stratified_c(per_site, time_bins=time_bins, max_gap=thresholds.max_auc_gap),
        "c_index_heterogeneity": heterogeneity(per_site, "c_index", alpha=thresholds.alpha, min_i2=thresholds.min_i2),
        "survival_by_site": survival_by_site(per_site, time_bins=time_bins, alpha=thresholds.alpha),
        "follow_up_by_site": follow_up_by_site(per_site, time_bins=time_bins, alpha=thresholds.alpha),
    }


def segmentation_tests(foreground: Mapping[str, Mapping], per_site: Mapping[str, dict],
                       moments: Mapping[str, object], thresholds: Thresholds, *, final: bool, seed: int,
                       cross_site: Mapping[str, Mapping[str, dict]] | None = None) -> dict[str, dict]:
    """A segmentation study's signals (fedir.strategies.segmentation_bias): foreground
    fraction by site (from the training replies' foreground tables), the Dice
    heterogeneity, the bottleneck embedding's site separability and, after the last round
    under bias.cross-site, the cross-site Dice gap (its own threshold,
    `max_cross_site_dice_gap`: docs/methods.md, "Cross-site evaluation")."""
    tests = {
        "foreground_by_site": foreground_by_site(foreground, alpha=thresholds.alpha,
                                                 min_cramers_v=thresholds.min_cramers_v),
        "dice_heterogeneity": heterogeneity(per_site, "dice", alpha=thresholds.alpha, min_i2=thresholds.min_i2),
    }
    tests.update(_separability(per_site, moments, thresholds, final=final, seed=seed))
    if cross_site:
        tests["cross_site"] = cross_site_gap(cross_site, max_gap=thresholds.max_cross_site_dice_gap,
                                             metric=segmentation.CROSS_SITE_METRIC)
    return tests


def _separability(per_site: Mapping[str, dict], moments: Mapping[str, object], thresholds: Thresholds, *,
                  final: bool, seed: int) -> dict[str, dict]:
    """The site-separability test where sites sent moments (skipped above MAX_DETAILED_SITES)."""
    if not moments:
        return {}
    if len(per_site) > MAX_DETAILED_SITES:
        return {"site_separability": _skipped("site_separability", len(per_site))}
    return {"site_separability": site_separability(
        moments, min_accuracy=thresholds.min_site_accuracy,
        min_excess=thresholds.min_separability_excess, seed=seed, n_boot=thresholds.bootstrap if final else 0,
    )}


def signals(
    label_counts: Mapping[str, Mapping[int, int]],
    per_site: Mapping[str, dict],
    moments: Mapping[str, object],
    thresholds: Thresholds,
    cross_site: Mapping[str, Mapping[str, dict]] | None = None,
    seed: int = 0,
    *,
    final: bool = True,
    kind: str = "classification",
    time_bins: int = 20,
) -> dict:
    """The verdict over every signal that has its inputs (no sensitivity analysis); a
    survival study (`kind`) has its own signals (survival_tests).

    ``final`` = False leaves out the separability interval (``site_accuracy_ci``), which
    no alarm depends on; see :func:`analyse`.
    """
    if kind == "survival":
        return verdict(survival_tests(label_counts, per_site, thresholds, time_bins), thresholds.secondary_to_alarm)
    if kind == "segmentation":
        return verdict(segmentation_tests(label_counts, per_site, moments, thresholds, final=final, seed=seed,
                                          cross_site=cross_site), thresholds.secondary_to_alarm)
    multiclass = any("classes" in entry for entry in per_site.values())  # task.classes > 2
    tests = {
        "site_label_association": site_label_association(
            dict(sorted(label_counts.items())), alpha=thresholds.alpha, min_cramers_v=thresholds.min_cramers_v
        ),
        "pooled_vs_within_auc": (multiclass_pooled_vs_within_auc if multiclass else pooled_vs_within_auc)(
            per_site, max_gap=thresholds.max_auc_gap, n_boot=thresholds.bootstrap, seed=seed
        ),
        # the macro one-vs-rest AUC and its CI for K > 2
        "auc_heterogeneity": heterogeneity(per_site, "auc", alpha=thresholds.alpha, min_i2=thresholds.min_i2),
    }
    tests.update(_separability(per_site, moments, thresholds, final=final, seed=seed))
    if cross_site:
        tests["cross_site"] = cross_site_gap(cross_site, max_gap=thresholds.max_cross_site_gap,
                                             metric=classification.CROSS_SITE_METRIC)
    return verdict(tests, thresholds.secondary_to_alarm)


def analyse(
    label_counts: Mapping[str, Mapping[int, int]],
    per_site: Mapping[str, dict],
    moments: Mapping[str, object],
    thresholds: Thresholds,
    cross_site: Mapping[str, Mapping[str, dict]] | None = None,
    seed: int = 0,
    *,
    final: bool = True,
    kind: str = "classification",
    time_bins: int = 20,
) -> dict:
    """`signals` plus the leave-one-site-out sensitivity of its conclusions (in `sensitivity`).

    The sensitivity reruns the signals without the cross-site matrix (it belongs to the
    run's models, not to a subset of sites) and without bootstrap intervals (their
    thresholds are checked on the full federation only).

    ``final`` = False is for the rounds before the study's last: every signal, alarm and
    reason of the verdict, but neither the sensitivity (it reruns the signals once per site)
    nor the separability interval. The summary and the report read the last round's
    verdict, which has both; a round's own alarm never depends on them.
    """
    full = signals(label_counts, per_site, moments, thresholds, cross_site, seed, final=final, kind=kind,
                   time_bins=time_bins)
    multiclass = any("classes" in entry for entry in per_site.values())  # task.classes > 2
    if not final or kind == "survival" or multiclass:
        reason = ("computed on the study's final round only" if kind != "survival" and not multiclass else
                  "not computed for task.classes > 2 (leave-one-site-out reads the binary score histograms)"
                  if multiclass else
                  f"not computed for {kind} studies (leave-one-site-out reruns the classification signals)")
        full["sensitivity"] = {"by_site": {}, "flags": [], "sites": [], "reason": reason}
        return full
    if len(per_site) > MAX_DETAILED_SITES:
        full["sensitivity"] = {"by_site": {}, "flags": [], "sites": [],
                               "reason": f"skipped: more than {MAX_DETAILED_SITES} sites"}
        return full
    quick = Thresholds(**{**thresholds.__dict__, "bootstrap": 0})
    full["sensitivity"] = leave_one_site_out(
        label_counts, per_site, moments, partial(_subset, thresholds=quick, seed=seed, kind=kind), full,
        metric="dice" if kind == "segmentation" else "auc",
    )
    return full


def _skipped(name: str, sites: int) -> dict:
    return {"name": name, "computable": False, "alarm": False, "sites": [],
            "reason": f"skipped: {sites} sites, more than {MAX_DETAILED_SITES} (pairwise analysis)"}


def _subset(label_counts, per_site, moments, *, thresholds: Thresholds, seed: int, kind: str) -> dict:
    return signals(label_counts, per_site, moments, thresholds, None, seed, kind=kind)
