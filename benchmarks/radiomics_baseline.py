"""The radiomics baseline beside the imaging and clinical models, paired per patient.

"Prime Time for AI in Interventional Radiology" asks that an imaging model be compared with
simpler ones: the clinical variables, and handcrafted (radiomics) image features. Here
`fedir compare`'s arms (fedir.simulations.compare, fedir's own ServerApp logic and ClientApp
in one process) run, on the same sites, rounds, seed and patient split:

- ``federated``: the imaging model (resnet_small, FedAvg, supervised);
- ``clinical``: the clinical companion's logistic regression on clin_* (synthetic only:
  MedMNIST has no clinical columns);
- ``radiomics``: the radiomics companion's logistic regression on each image's IBSI
  first-order and GLCM features (fedir.client.radiomics; `data.inputs = "radiomics"`,
  federated standardisation; a patient's score the mean over their images).

Each arm's selected model scores every site's test patients as the sites' own evaluation
does; the per-patient AUCs come with patient-bootstrap 95% CIs (each run's summary), and the
paired AUC differences with a patient bootstrap on the same patients (fedir.metrics
.paired_auc_difference).

    .venv/bin/python benchmarks/radiomics_baseline.py            # synthetic, then BreastMNIST
    .venv/bin/python benchmarks/radiomics_baseline.py --only synthetic
    .venv/bin/python benchmarks/radiomics_baseline.py --labelled 0.1 --out benchmarks/results/radiomics_baseline_labelled10.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.simulations.compare import compare, markdown
from fedir.simulations.medmnist import import_medmnist
from fedir.simulations.synthetic import GENERATOR_VERSION, generate_federation

DATA = Path(os.environ.get("FEDIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "medmnist"

COMMON = dict(model_name="resnet_small", train_rounds=5, train_local_epochs=2, eval_bootstrap=500,
              baseline_clinical_steps=50, baseline_clinical_lr=0.05,
              baseline_radiomics_steps=50, baseline_radiomics_lr=0.05)


def synthetic(tmp: Path, patients: int, seed: int, labelled: float) -> tuple[Settings, dict]:
    fed = tmp / "synthetic"
    generate_federation(fed, sites=4, patients=patients, seed=0, unlabelled_fraction=1.0 - labelled, image_size=64,
                        progress=False)
    settings = Settings(federation_sites=";".join(str(fed / f"site-{i}") for i in range(4)),
                        model_image_size=64, train_seed=seed, **COMMON)
    return settings, {"data": "synthetic XA (fedir data synth)", "generator_version": GENERATOR_VERSION,
                      "sites": 4, "patients_per_site": patients, "image_size": 64, "labelled": labelled}


def breastmnist(tmp: Path, seed: int, labelled: float) -> tuple[Settings, dict]:
    npz = DATA / "breastmnist.npz"
    record = import_medmnist(npz, tmp / "breastmnist", sites=4, partition="iid", labelled_fraction=labelled, seed=0)
    settings = Settings(federation_sites=";".join(str(tmp / "breastmnist" / s) for s in record["per_site"]),
                        model_image_size=28, train_seed=seed, **COMMON)
    return settings, {"data": "BreastMNIST (../shared/data/medmnist/breastmnist.npz, official splits)",
                      "sites": 4, "partition": "iid", "image_size": 28, "labelled": labelled}


def per_site_auc(run: Path) -> dict:
    """Each site's per-patient AUC [95% CI] and test patients in an arm's summary.json."""
    summary = json.loads((run / "summary.json").read_text())
    return {site: {k: (entry.get("per_patient") or {}).get(k) for k in ("auc", "auc_ci", "n_test")}
            for site, entry in summary["per_site"].items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["synthetic", "breastmnist"], default=None)
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--labelled", type=float, default=1.0,
                        help="share of the training patients labelled (the validation and test ones always are)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "radiomics_baseline.json")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["settings"] = dict(COMMON)
    for name in ("synthetic", "breastmnist"):
        if args.only not in (None, name):
            continue
        start, load = time.time(), os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            settings, data = (synthetic(Path(tmp), args.patients, args.seeds[0], args.labelled) if name == "synthetic"
                              else breastmnist(Path(tmp), args.seeds[0], args.labelled))
            arms = ["federated", "clinical", "radiomics"] if name == "synthetic" else ["federated", "radiomics"]
            out = compare(settings, Path(tmp) / "compare", args.seeds, arms, progress=lambda line: print(line, flush=True))
            per_site = {str(seed): {arm: per_site_auc(Path(tmp) / "compare" / f"seed-{seed}" / arm) for arm in arms}
                        for seed in args.seeds}
        table = markdown(out)
        print(table, flush=True)
        result[name] = {"machine": describe(shared_machine=True), **data, "arms": arms, "seeds": args.seeds,
                        "loadavg_start": list(load), "loadavg_end": list(os.getloadavg()),
                        "wall_s": round(time.time() - start, 1), "runs": out["runs"], "per_site": per_site,
                        "questions": out["questions"],
                        "table": table}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
        print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
