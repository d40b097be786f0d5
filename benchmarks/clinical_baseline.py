"""The clinical-only baseline beside the imaging model, per site, on the synthetic XA federation.

"Prime Time for AI in Interventional Radiology" asks that every imaging model be compared
with a model of simple clinical variables. Here one imaging study with `baseline.clinical
= true` is run by fedir's own ServerApp logic and ClientApp (in one process,
`fedir.simulations.inprocess`, no Ray) on the synthetic federation (whose manifests carry
clin_age and clin_sex): its clinical companion (fedir.simulations.companion: a logistic
regression on the clin_* columns, `data.inputs = "clinical"`, features standardised from
the sites' federated sums) runs first, then the imaging model (resnet_small), both with
FedAvg, both tested on the same test patients of each site (the patient-hash split), and
the imaging run's summary carries both per site (`clinical_baseline`). Both are compared
per patient (the clinical sites' rows are patients; the imaging model's patient score is
the mean over their images), with the site's patient-bootstrap 95% CIs.

    .venv/bin/python benchmarks/clinical_baseline.py
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
from fedir.server.report.baseline import baseline_text
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.synthetic import GENERATOR_VERSION, generate_federation

IMAGING = dict(model_name="resnet_small", model_image_size=64, train_rounds=5, train_local_epochs=2,
               baseline_clinical=True, baseline_clinical_steps=50, baseline_clinical_lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "clinical_baseline.json")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    result = {"machine": describe(shared_machine=True),
              "generator_version": GENERATOR_VERSION, "patients_per_site": args.patients,
              "settings": IMAGING, "loadavg_start": os.getloadavg()}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Path(tmp) / "federation"
        generate_federation(fed, sites=4, patients=args.patients, seed=0, unlabelled_fraction=0.0,
                            image_size=128, progress=False)
        sites = ";".join(str(fed / f"site-{i}") for i in range(4))
        summary = run_inprocess(Settings(federation_sites=sites, eval_bootstrap=500, **IMAGING), Path(tmp) / "run")
        result["comparison"] = summary["clinical_baseline"]
        result["bias"] = {"alarm": summary["bias"]["alarm"], "reasons": summary["bias"]["reasons"]}
        print(baseline_text(summary), flush=True)
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
