"""The sensitivity analysis of a fused model across sites: each input's AUC drop, pooled.

Each site sends, per input (a clinical variable permuted, the image blank or blurred), the
drop in its test patients' AUC with a patient-bootstrap 95% CI and standard error
(fedir.client.input_sensitivity). Here, per input, over the sites that measured it:

    drop = sum_i w_i d_i,  w_i = n_i / sum_j n_j (n_i the site's test patients),
    SE = sqrt(sum_i w_i^2 se_i^2),  95% CI = drop -+ 1.96 SE (normal).

Why patient weights and not inverse variance: a variable the model ignores gives a drop of
exactly 0 with a bootstrap SE of 0 at every site (permuting it changes no score), and an
inverse-variance weight would be infinite there; at small sites the bootstrap SE is itself
noisy, so inverse weights would let the luckiest site decide. Weighting by test patients
is how the pooled AUC weights the sites too. Why not a CI over sites (a t-interval of the
site drops): with four sites it has 3 degrees of freedom and is too wide to rank anything.
The interval treats the sites as independent samples of one common drop: heterogeneity
between sites is not in it (the per-site table shows it).

The ranking orders the inputs by pooled drop, largest first: what the model leans on most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

Z95 = 1.959963984540054
METHOD = ("patient-weighted mean of the sites' drops; 95% CI normal, SE = sqrt(sum w_i^2 se_i^2) from each "
          "site's patient-bootstrap SE (sites independent, heterogeneity not included)")


def input_label(entry: Mapping[str, Any]) -> str:
    """`clin_age permuted`, `image blank`: one input's change, as the report names it."""
    return f"{entry['input']} {entry['change']}"


def pooled_sensitivity(per_site: Mapping[str, Mapping[str, Any]]) -> dict:
    """``{"method", "inputs": [...], "ranking", "reason"}`` from the sites' entries.

    Each of ``inputs`` is ``{"input", "change", "drop", "drop_ci", "drop_se", "sites",
    "n_patients"}`` over the sites whose drop has an SE; ``ranking`` their labels
    (input_label) by drop, largest first. ``reason`` says why there is none."""
    groups: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for entry in per_site.values():
        n = int(entry.get("n_patients") or 0)
        for item in entry.get("inputs") or []:
            if item.get("drop") is None or item.get("drop_se") is None or not n:
                continue
            groups.setdefault((item["input"], item["change"]), []).append((n, float(item["drop"]), float(item["drop_se"])))
    if not groups:
        reasons = sorted({str(e.get("reason")) for e in per_site.values() if e.get("reason")})
        return {"method": METHOD, "inputs": [], "ranking": [],
                "reason": "no site measured a drop" + (f" ({'; '.join(reasons)})" if reasons else "")}
    inputs: list[dict[str, Any]] = []
    for (name, change), rows in groups.items():
        total = sum(n for n, _, _ in rows)
        drop = sum(n * d for n, d, _ in rows) / total
        se = math.sqrt(sum((n / total) ** 2 * s**2 for n, _, s in rows))
        inputs.append({"input": name, "change": change, "drop": drop, "drop_ci": [drop - Z95 * se, drop + Z95 * se],
                       "drop_se": se, "sites": len(rows), "n_patients": total})
    inputs.sort(key=lambda item: -item["drop"])
    return {"method": METHOD, "inputs": inputs, "ranking": [input_label(item) for item in inputs], "reason": None}
