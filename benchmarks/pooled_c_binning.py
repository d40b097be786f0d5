"""The pooled C-index from aggregates against the exact pooled C, on Fed-TCGA-BRCA's test sets.

A linear Cox model (lifelines' CoxPHFitter, Efron ties, a small ridge penalty for the
one-hot columns) is fitted on the pooled, standardised training patients; each region
scores its own test patients and computes fedir's site aggregates
(fedir.tasks.survival_metrics.site_survival_metrics); the server's pooled C
(pooled_c_index) is compared with the C of every test patient's raw score in one place
(lifelines' concordance_index), for several risk-bin counts (eval.hist-bins) and time-bin
widths (eval.time-bin-days, over a fixed 3,600-day horizon). Reported: the error, fedir's
worst-case bound, and the cost in privacy (how many cells a patient can fall into).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pooled_c_binning.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from lifelines import CoxPHFitter  # noqa: E402
from lifelines.utils import concordance_index  # noqa: E402
from machine import describe  # benchmarks/ is on sys.path

from fedir.simulations.tcga_brca import REGIONS, import_tcga_brca  # noqa: E402
from fedir.tasks.survival_metrics import pooled_c_index, site_survival_metrics  # noqa: E402

HORIZON_DAYS = 3600.0
RISK_BINS = (10, 50, 200)
TIME_BIN_DAYS = (360.0, 180.0, 90.0, 30.0)


def load(folder: Path) -> dict[str, dict[str, pd.DataFrame]]:
    out = {}
    for region in REGIONS:
        frame = pd.read_csv(folder / region / "manifest.csv")
        out[region] = {s: frame[frame["split"] == s].drop(columns=["patient_id", "split"]) for s in ("train", "test")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pooled_c_binning.json")
    args = parser.parse_args()
    started, load_start = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        import_tcga_brca(Path(tmp) / "brca")
        data = load(Path(tmp) / "brca")
    train = pd.concat([d["train"] for d in data.values()])
    features = [c for c in train.columns if c.startswith("clin_")]
    mean, std = train[features].mean(), train[features].std(ddof=0).replace(0, 1)
    fitter = CoxPHFitter(penalizer=0.1).fit(
        pd.concat([(train[features] - mean) / std, train[["time", "event"]]], axis=1), "time", "event")
    beta = fitter.params_[features].to_numpy()
    tests = {r: d["test"] for r, d in data.items()}
    risks = {r: ((t[features] - mean) / std).to_numpy() @ beta for r, t in tests.items()}
    all_t = np.concatenate([t["time"].to_numpy() for t in tests.values()])
    all_e = np.concatenate([t["event"].to_numpy() for t in tests.values()])
    exact = float(concordance_index(all_t, -np.concatenate(list(risks.values())), all_e))
    rows = []
    for bins in RISK_BINS:
        for width in TIME_BIN_DAYS:
            time_bins = int(HORIZON_DAYS / width) + 1
            per_site = {r: site_survival_metrics(t["time"].to_numpy(), t["event"].to_numpy(), risks[r], n_boot=0,
                                                 bins=bins, time_bins=time_bins, time_bin_days=width)
                        for r, t in tests.items()}
            pooled = pooled_c_index(per_site, time_bins=time_bins)
            rows.append({"risk_bins": bins, "time_bin_days": width, "time_bins": time_bins,
                         "cells_per_patient": bins * time_bins * 2, "pooled_from_aggregates": pooled["c_index"],
                         "exact": exact, "error": pooled["c_index"] - exact, "bound": pooled["binning_error"],
                         "within_bound": abs(pooled["c_index"] - exact) <= pooled["binning_error"] + 1e-12,
                         "stratified": pooled["stratified_c_index"]})
            print(f"bins {bins:4d} width {width:5.0f} d: pooled {pooled['c_index']:.4f} exact {exact:.4f} "
                  f"error {rows[-1]['error']:+.4f} bound {pooled['binning_error']:.4f}", flush=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for bins in RISK_BINS:
        part = [r for r in rows if r["risk_bins"] == bins]
        ax.plot([r["time_bin_days"] for r in part], [abs(r["error"]) for r in part], marker="o",
                label=f"|error|, {bins} risk bins")
        ax.plot([r["time_bin_days"] for r in part], [r["bound"] for r in part], linestyle="--",
                label=f"bound, {bins} risk bins")
    ax.set(xlabel="time-bin width (days)", ylabel="pooled C-index: error / bound", xscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(args.out.with_suffix(".png"), bbox_inches="tight")
    result = {"exact_pooled_c": exact, "n_test": int(all_t.size), "events_test": int(all_e.sum()),
              "model": "lifelines CoxPHFitter(penalizer=0.1) on the pooled standardised training patients",
              "horizon_days": HORIZON_DAYS, "rows": rows,
              "machine": describe(with_torch=False, shared_machine=True),
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.time() - started}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
