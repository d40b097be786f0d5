"""Survival on imaging sites: scenarios/survival_imaging.toml on the synthetic outcome, in process.

Writes the synthetic federation with its outcome (`fedir data synth --outcome`: a time to a
major adverse event driven by each patient's stenosis burden, age and sex, censored at each
site's data cut-off), then runs the scenario in process (fedir.simulations.inprocess) twice on
the same sites and patients:

- `imaging`: the scenario as written, a small MONAI ResNet's one-output risk head on the Cox
  partial likelihood, a patient's risk the mean of its images';
- `clinical`: the baseline in the same run, a linear Cox model on the same manifests' clin_age
  and clin_sex (`data.inputs = "clinical"`, `model.name = "logreg"`, train.lr 0.05: a linear
  model on two standardised columns needs larger steps than the network).

Reported per arm: every site's Harrell and Uno C-index with patient-bootstrap CIs, events and
patients; the pooled C-index from the sites' binned counts with its bound and the site-stratified
C; the bias verdict with each survival signal. Beside them, per site, `reference_c_index`: the
C-index on the same test patients of the generator's own log hazard with the stenosis burden
replaced by the patient's label (0, or the middle of the significant range for label 1), a
near-ceiling for what the images and covariates can give. The JSON goes to
benchmarks/results/survival_imaging.json with the machine described.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/survival_imaging.py
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from lifelines.utils import concordance_index
from machine import describe  # benchmarks/ is on sys.path

from fedir.client.split import split_of
from fedir.config import Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import BINARY_SEVERITY, generate_federation, outcome_risk

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "scenarios" / "survival_imaging.toml"
ARMS = {"imaging": [], "clinical": ["data.inputs=clinical", "model.name=logreg", "train.lr=0.05"]}
SHOWN = ("n_test", "n_patients", "events", "c_index", "c_index_ci", "uno_c_index", "uno_c_index_ci")


def reference_c_index(site_dir: Path, settings: Settings) -> float:
    """Harrell's C on the site's test patients of the generator's log hazard, the stenosis
    burden replaced by the label (see the module docstring)."""
    patients = {}
    with (site_dir / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            pid = row["patient_id"]
            if split_of(pid, settings.data_val_fraction, settings.data_test_fraction) == "test":
                burden = float(np.mean(BINARY_SEVERITY)) * int(row["label"])
                patients[pid] = (int(row["time"]), int(row["event"]),
                                 outcome_risk(burden, float(row["clin_age"]), int(row["clin_sex"])))
    t, e, r = (np.array(v) for v in zip(*patients.values()))
    return float(concordance_index(t, -r, e))


def arm_result(summary: dict, wall_s: float) -> dict:
    bias = summary["bias"]
    return {
        "wall_s": round(wall_s, 1),
        "selected_round": summary["selection"]["round"],
        "per_site": {site: {k: entry.get(k) for k in SHOWN} for site, entry in summary["per_site"].items()},
        "global": {k: summary["global"].get(k) for k in ("n_patients", "events", "c_index",
                                                           "c_index_binning_error", "stratified_c_index")},
        "bias": {"alarm": bias["alarm"], "reasons": bias["reasons"], "warnings": bias["warnings"],
                 "signals": bias["signals"],
                 "tests": {name: {k: t.get(k) for k in ("alarm", "p_value", "gap", "i2", "reason") if k in t}
                           for name, t in bias["tests"].items()}},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("/tmp/fedir-bench/survival-imaging"))
    parser.add_argument("--patients", type=int, default=100, help="patients per site")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "survival_imaging.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="section.key=value for both arms (e.g. train.rounds=2 for a quick look)")
    args = parser.parse_args()
    load_start, started = os.getloadavg(), time.time()
    info = generate_federation(args.data, sites=4, patients=args.patients, seed=0, image_size=64, outcome=True,
                               progress=False)
    sites = [args.data / f"site-{i}" for i in range(4)]
    site_list = ";".join(str(s) for s in sites)
    result: dict = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/survival_imaging.py " + " ".join(sys.argv[1:]),
        "scenario": str(SCENARIO.relative_to(ROOT)), "overrides": args.overrides,
        "federation": {"sites": 4, "patients_per_site": args.patients, "seed": 0, "image_size": 64,
                       "per_site": {s: {k: v[k] for k in ("images", "patients", "positive_patients", "events",
                                                          "censored")} for s, v in info["sites"].items()}},
        "arms": {},
    }
    settings = None
    for arm, extra in ARMS.items():
        settings = load_scenario(SCENARIO, [f'federation.sites="{site_list}"', *args.overrides, *extra])
        tic = time.time()
        summary = run_inprocess(settings, args.data.parent / f"run-{arm}")
        result["arms"][arm] = arm_result(summary, time.time() - tic)
    assert settings is not None
    result["reference_c_index"] = {s.name: reference_c_index(s, settings) for s in sites}
    imaging, clinical = result["arms"]["imaging"]["global"], result["arms"]["clinical"]["global"]
    result["pooled_c_index_imaging_minus_clinical"] = (None if None in (imaging["c_index"], clinical["c_index"])
                                                       else imaging["c_index"] - clinical["c_index"])
    result["wall_s"] = round(time.time() - started, 1)
    result["machine"] = describe(loadavg_at_start=[round(x, 2) for x in load_start])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for arm, r in result["arms"].items():
        print(f"{arm}: pooled C {r['global']['c_index']:.3f} (+- {r['global']['c_index_binning_error']:.3f}), "
              f"stratified {r['global']['stratified_c_index']:.3f}, alarm {r['bias']['alarm']}, "
              f"signals {r['bias']['signals']}")
        for site, e in r["per_site"].items():
            print(f"  {site}: C {e['c_index']:.3f} {e['c_index_ci']}  Uno {e['uno_c_index']:.3f}  "
                  f"{e['events']}/{e['n_patients']} events")
    print("reference C:", {k: round(v, 3) for k, v in result["reference_c_index"].items()})
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
