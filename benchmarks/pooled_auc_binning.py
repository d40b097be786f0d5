"""How far the pooled AUC from the sites' aggregates is from the exact one, at 20/50/100 bins.

Four sites of 30 test patients each, 20 seeds, two kinds of scores: a weak imaging model
whose scores bunch around 0.45 with small site offsets (the demo federation's, which
learns little at its budget), and a clinical-like logistic model on age band and sex,
which takes few distinct values. For each bin count: the error of the plain binned AUC of
the summed histograms (fedir.metrics.auc_from_histograms, what the pool reported before),
the error of fedir.metrics.pooled_metrics's AUC (within-site pairs exact), and the bound
it reports (``auc_binning_error``), against sklearn's roc_auc_score on the union of the
sites' per-patient scores. Seconds on a CPU.

    .venv/bin/python benchmarks/pooled_auc_binning.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fedir.metrics import auc_from_histograms, pooled_metrics, site_metrics

SITES, PATIENTS, SEEDS, BINS = 4, 30, 20, (20, 50, 100)


def scores(kind: str, rng: np.random.Generator, site: int, y: np.ndarray) -> np.ndarray:
    if kind == "demo":  # bunched near 0.45, a small site offset and a weak signal
        return np.clip(rng.normal(0.42 + 0.03 * site + 0.02 * y, 0.04), 0, 1)
    age_band = rng.integers(40, 80, y.size) // 10
    sex = rng.integers(0, 2, y.size)
    return np.round(1 / (1 + np.exp(-(-1.0 + 0.15 * (age_band - 5) + 0.2 * sex + 0.1 * site))), 3)


def errors(kind: str, bins: int, seed: int) -> tuple[float, float, float]:
    """(|binned - exact|, |pooled - exact|, reported bound) of one federation."""
    rng = np.random.default_rng(seed)
    per_site, ys, ss = {}, [], []
    for site in range(SITES):
        y = rng.integers(0, 2, PATIENTS)
        s = scores(kind, rng, site, y)
        per_site[site] = site_metrics(y, s, [f"{site}-{i}" for i in range(PATIENTS)], n_boot=0, bins=bins)
        ys.append(y)
        ss.append(s)
    pooled = pooled_metrics(per_site, n_boot=0)["per_patient"]
    exact = roc_auc_score(np.concatenate(ys), np.concatenate(ss))
    binned = auc_from_histograms(pooled["hist_neg"], pooled["hist_pos"])
    return abs(binned - exact), abs(pooled["auc"] - exact), pooled["auc_binning_error"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pooled_auc_binning.json")
    args = parser.parse_args()
    result: dict = {"sites": SITES, "patients_per_site": PATIENTS, "seeds": SEEDS, "cases": {}}
    for kind in ("demo", "clinical"):
        for bins in BINS:
            e = np.array([errors(kind, bins, seed) for seed in range(SEEDS)])
            row = {name: {"mean": float(e[:, i].mean()), "max": float(e[:, i].max())}
                   for i, name in enumerate(("binned_error", "pooled_error", "bound"))}
            row["within_bound"] = bool((e[:, 1] <= e[:, 2] + 1e-12).all())
            result["cases"][f"{kind}/{bins}"] = row
            print(f"{kind:8s} {bins:3d} bins: binned error {row['binned_error']['mean']:.4f} (max "
                  f"{row['binned_error']['max']:.4f}), pooled error {row['pooled_error']['mean']:.4f} "
                  f"(max {row['pooled_error']['max']:.4f}), bound {row['bound']['mean']:.4f} "
                  f"(max {row['bound']['max']:.4f}), within bound: {row['within_bound']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
