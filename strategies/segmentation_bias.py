"""The Frankenstein checks of a segmentation study, from the sites' aggregates.

A segmentation federation is confounded when what the masks hold depends on the hospital
(one site's patients carry the stenoses, another's only healthy vessels): a model can then
learn "stenosis" as "this scanner". The classification signals carry over as follows
(fedir.strategies.frankenstein.segmentation_tests; the verdict rule is
fedir.strategies.bias.verdict's, unchanged):

- `foreground_by_site` (primary, replacing the site-label association): for each
  foreground class (vessel, stenosis), the chi-square test / Cramer's V of the site x
  foreground-fraction-bin table of the sites' training patients (each site's
  fedir.protocol.ForegroundCounts; the test is fedir.strategies.bias.site_label_association
  on that table). Alarm when any class's table is associated with the site at
  alpha / (number of classes) (Bonferroni over the classes) with Cramer's V >= the
  threshold. A cell a site suppressed (below k) is filled with the row's suppressed patients
  (its total minus its shown cells, known exactly) spread evenly over its suppressed cells
  (`filled_cells` counts them). The fill cannot know which suppressed cell was the small
  one (under the data card's rule a lone small cell is withheld with the next smallest), so
  a small site's row is flattened: the cost of suppression in power, and the site named may
  be the wrong one (benchmarks/README.md, "The segmentation verdict").
- `dice_heterogeneity` (secondary): I^2 of the per-site Dice (fedir.strategies.heterogeneity).
- `site_separability` (secondary): the BasicUNet bottleneck's moments, per site, among
  images with and without a stenosis in the reference (fedir.client.embedding), through
  fedir.strategies.separability exactly as classification's.

No segmentation analogue of pooled-vs-within AUC is computed: a Dice is per image, with no
ranking of patients across sites to compare against the within-site one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedir.protocol import SUPPRESSED
from fedir.strategies.bias import site_label_association
from fedir.tasks.segmentation_metrics import FOREGROUND_BIN_NAMES, FOREGROUND_NAMES


def filled_table(table: Mapping[str, Any], row: int) -> tuple[dict[int, int], int]:
    """One foreground class's row of a site's ForegroundCounts dict as {bin: patients}, the
    suppressed cells filled (module docstring), and how many cells were filled."""
    cells = [int(c) for c in table["counts"][row]]
    hidden = [b for b, c in enumerate(cells) if c == SUPPRESSED]
    rest = int(table["patients"]) - sum(c for c in cells if c != SUPPRESSED)
    out = {b: c for b, c in enumerate(cells) if c != SUPPRESSED}
    for i, b in enumerate(hidden):
        out[b] = rest // len(hidden) + (1 if i < rest % len(hidden) else 0)
    return out, len(hidden)


def foreground_by_site(tables: Mapping[str, Mapping[str, Any]], *, alpha: float = 0.01,
                       min_cramers_v: float = 0.2) -> dict:
    """Whether the sites' training patients differ in foreground fraction (module docstring).

    `tables`: site -> fedir.protocol.ForegroundCounts.as_dict(); a site whose entry is no
    such table (a fedir before foreground tables sent none) is left out and named
    (`missing`). Returns the test's dict (name, computable, alarm, sites, reason, and per
    class the association test under `per_class`)."""
    missing = sorted(site for site, table in tables.items() if "counts" not in table)
    tables = {site: table for site, table in tables.items() if site not in missing}
    per_class: dict[str, dict] = {}
    filled: dict[str, int] = {}
    corrected = alpha / len(FOREGROUND_NAMES)
    for row, name in enumerate(FOREGROUND_NAMES):
        counts = {}
        for site, table in sorted(tables.items()):
            counts[site], hidden = filled_table(table, row)
            filled[site] = filled.get(site, 0) + hidden
        per_class[name] = site_label_association(
            counts, alpha=corrected, min_cramers_v=min_cramers_v, subject=f"{name} fraction",
            categories={b: f"{name} fraction {bin_name}" for b, bin_name in enumerate(FOREGROUND_BIN_NAMES)})
    fired = [name for name, test in per_class.items() if test["alarm"]]
    computable = [name for name, test in per_class.items() if test["computable"]]
    out: dict[str, Any] = {
        "name": "foreground_by_site",
        "computable": bool(computable),
        "alarm": bool(fired),
        "sites": list(dict.fromkeys(site for name in fired for site in per_class[name]["sites"])),
        "p_value": min((t["p_value"] for t in per_class.values() if t["computable"]), default=None),
        "cramers_v": max((t["cramers_v"] for t in per_class.values() if t["computable"]), default=None),
        "thresholds": {"alpha": alpha, "alpha_per_class": corrected, "min_cramers_v": min_cramers_v},
        "patients": {site: int(table["patients"]) for site, table in sorted(tables.items())},
        "filled_cells": filled,
        "missing": missing,
        "per_class": per_class,
    }
    if fired:
        out["reason"] = "; ".join(per_class[name]["reason"] for name in fired)
    elif computable:
        out["reason"] = "foreground fraction does not differ by site beyond chance (" + ", ".join(
            f"{name}: p={per_class[name]['p_value']:.2g}, Cramer's V {per_class[name]['cramers_v']:.2f}"
            for name in computable) + ")"
    else:
        out["reason"] = ("not computable: needs at least 2 sites whose training patients fall in 2 or more "
                         "foreground-fraction bins" if tables else
                         "not computable: no site sent foreground counts")
    if missing:
        out["reason"] += f" ({', '.join(missing)}: no foreground counts sent)"
    return out
