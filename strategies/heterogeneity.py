"""Per-site performance heterogeneity: Cochran's Q and I^2 of the sites' AUCs (a meta-analysis).

Each site reports its AUC with a patient-bootstrap 95% CI; the standard error is taken
from the CI's width (width / (2 x 1.96)). If the sites' AUCs differ by more than their
sampling error (Q large, I^2 high), the model works differently at different hospitals:
one explanation is that it learned something site-specific (a marker, a prevalence) that
holds at some sites and not at others. Heterogeneity alone is not proof of confounding
(case mix differs between hospitals), which is why the verdict treats it as a
corroborating signal (fedir.strategies.bias.verdict).

The random-effects estimate (DerSimonian-Laird tau^2) is what the forest plot draws as
the pooled diamond.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import chi2, norm

Z95 = float(norm.ppf(0.975))
# A site whose bootstrap CI has zero width (every replicate AUC 1.0) would get infinite
# weight; its standard error is floored here.
MIN_SE = 0.01


def auc_heterogeneity(per_site: Mapping[str, dict], *, alpha: float = 0.01, min_i2: float = 0.5) -> dict:
    """Cochran's Q test and I^2 over the sites with a defined AUC and CI.

    Alarm: p < ``alpha`` and I^2 >= ``min_i2`` (significant and large: with big test sets a
    trivial difference is significant). The sites named are those whose AUC lies outside
    the random-effects 95% interval around the pooled estimate, furthest first.

    The AUCs are the sites' image-level ones, whose CIs already resample patients (the
    right unit), not the per-patient AUCs (fedir.strategies.bias.evaluation_level): with the
    10-20 test patients per site of a small study, a per-patient AUC near 1 has a bootstrap
    CI truncated at 1, so its standard error is too small, it weighs too much and Q is
    inflated. Measured on a clean synthetic XA federation (4 sites, 12-19 test patients
    each; bias_calibration.py --stability, seed 1, round 3): per patient, site AUCs 0.38-0.89
    gave Q = 14.4 on 3 dof (p = 0.002, an alarm); per image, Q = 2.6.
    """
    estimates = {
        site: (float(m["auc"]), standard_error(m["auc_ci"]))
        for site, m in per_site.items()
        if m.get("auc") is not None and m.get("auc_ci") is not None
    }
    out: dict[str, Any] = {
        "name": "auc_heterogeneity",
        "computable": False,
        "q": None, "dof": None, "p_value": None, "i2": None, "tau2": None,
        "random_effects_auc": None, "random_effects_ci": None,
        "site_auc": {s: a for s, (a, _) in estimates.items()},
        "site_se": {s: se for s, (_, se) in estimates.items()},
        "thresholds": {"alpha": alpha, "min_i2": min_i2},
        "alarm": False, "sites": [], "reason": "",
    }
    if len(estimates) < 2:
        out["reason"] = f"not computable: needs at least 2 sites with a defined AUC and CI, got {len(estimates)}"
        return out
    sites = list(estimates)
    theta = np.array([estimates[s][0] for s in sites])
    se = np.array([estimates[s][1] for s in sites])
    w = 1.0 / se**2
    fixed = float(w @ theta / w.sum())
    q = float(w @ (theta - fixed) ** 2)
    dof = len(sites) - 1
    tau2 = max(0.0, (q - dof) / (w.sum() - (w**2).sum() / w.sum()))
    w_re = 1.0 / (se**2 + tau2)
    re_mean = float(w_re @ theta / w_re.sum())
    re_se = float(np.sqrt(1.0 / w_re.sum()))
    out.update(
        computable=True, q=q, dof=dof, p_value=float(chi2.sf(q, dof)),
        i2=max(0.0, (q - dof) / q) if q > 0 else 0.0, tau2=tau2,
        random_effects_auc=re_mean, random_effects_ci=[re_mean - Z95 * re_se, re_mean + Z95 * re_se],
    )
    out["alarm"] = bool(out["p_value"] < alpha and out["i2"] >= min_i2)
    if out["alarm"]:
        spread = Z95 * np.sqrt(se**2 + tau2)
        outside = [(abs(t - re_mean) / s, site) for site, t, s in zip(sites, theta, spread) if abs(t - re_mean) > s]
        extreme = sorted(outside, reverse=True) or [(0.0, sites[int(np.argmax(np.abs(theta - re_mean)))])]
        out["sites"] = [site for _, site in extreme]
        named = "; ".join(f"{s} AUC {out['site_auc'][s]:.2f}" for s in out["sites"])
        out["reason"] = (
            f"site AUCs differ beyond sampling error (Cochran's Q {q:.1f}, dof {dof}, "
            f"p={out['p_value']:.2g} < {alpha}, I^2 {out['i2']:.0%} >= {min_i2:.0%}; random-effects AUC "
            f"{re_mean:.2f}): {named}"
        )
    return out


def standard_error(ci) -> float:
    """A 95% CI's width / (2 x 1.96), floored at MIN_SE: the SE a site's AUC carries."""
    return max((float(ci[1]) - float(ci[0])) / (2 * Z95), MIN_SE)
