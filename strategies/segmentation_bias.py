"""The Frankenstein checks of a segmentation study, from the sites' aggregates: what exists so far.

`dice_heterogeneity`: I^2 of the per-site Dice (fedir.strategies.heterogeneity on Dice, its
standard error from the site's patient-bootstrap CI). Heterogeneity alone is a secondary
signal (hospitals differ in case mix and scanners), and the segmentation analogues of the
primary ones (foreground fraction by site, site separability of the bottleneck embedding)
are not implemented yet, so `segmentation_verdict` leaves the alarm null with that reason
instead of calling a federation clean that was not checked.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedir.strategies.heterogeneity import auc_heterogeneity

NOT_CHECKED = ("not computed for segmentation: only the Dice heterogeneity (I^2) is implemented; "
               "foreground fraction by site and bottleneck separability are not, so no alarm is raised or cleared")


def dice_heterogeneity(per_site: Mapping[str, dict], *, alpha: float, min_i2: float) -> dict:
    """Cochran's Q and I^2 over the sites with a Dice and its CI (sites whose CI has zero
    width give no standard error and are left out, named in `excluded`)."""
    usable, excluded = {}, []
    for site, m in per_site.items():
        ci = m.get("dice_ci")
        if m.get("dice") is not None and ci is not None and ci[1] - ci[0] <= 0:
            excluded.append(site)
            continue
        usable[site] = {"auc": m.get("dice"), "auc_ci": ci}
    out = auc_heterogeneity(usable, alpha=alpha, min_i2=min_i2)
    out["name"] = "dice_heterogeneity"
    out["site_dice"] = out.pop("site_auc")
    out["random_effects_dice"] = out.pop("random_effects_auc")
    out["excluded"] = excluded
    out["reason"] = str(out["reason"]).replace("AUCs", "Dice scores").replace("AUC", "Dice")
    return out


def segmentation_verdict(per_site: Mapping[str, dict], *, alpha: float, min_i2: float) -> dict:
    """The verdict entry of a segmentation round: its tests, the alarm null (module docstring)."""
    test = dice_heterogeneity(per_site, alpha=alpha, min_i2=min_i2)
    return {"alarm": None, "reasons": [NOT_CHECKED], "warnings": [test["reason"]] if test["alarm"] else [],
            "signals": ["dice_heterogeneity"] if test["alarm"] else [], "tests": {"dice_heterogeneity": test}}
