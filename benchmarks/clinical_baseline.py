"""The clinical-only baseline beside the imaging model, per site, on the synthetic XA federation.

"Prime Time for AI in Interventional Radiology" asks that every imaging model be compared
with a model of simple clinical variables. Here both are trained by fedir's own
ServerApp logic and ClientApp (in one process, `fedir.simulations.inprocess`, no Ray) on
the same synthetic federation (whose manifests carry clin_age and clin_sex): the imaging
model (resnet_small) and a logistic regression on the manifest's clin_* columns
(`data.inputs = "clinical"`, features standardised from the sites' federated sums), both
with FedAvg, and both tested on the same test patients of each site (the patient-hash
split). The imaging model is scored per image, the clinical one per patient; both with
the site's patient-bootstrap 95% CIs.

    .venv/bin/python benchmarks/clinical_baseline.py
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import flwr
import torch

from fedir.config import Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.synthetic import generate_federation

ARMS = {
    "imaging": dict(model_name="resnet_small", model_image_size=64, train_rounds=5, train_local_epochs=2),
    "clinical": dict(model_name="logreg", data_inputs="clinical", train_rounds=5, train_local_steps=50,
                     train_optimizer="sgd", train_lr=0.05, train_batch_size=8, train_weight_decay=0.0),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=80)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "clinical_baseline.json")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    result = {"machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch": torch.__version__, "flwr": flwr.__version__, "shared_machine": True},
              "loadavg_start": os.getloadavg(), "arms": {}}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        fed = Path(tmp) / "federation"
        generate_federation(fed, sites=4, patients=args.patients, seed=0, unlabelled_fraction=0.0,
                            image_size=128, progress=False)
        sites = ";".join(str(fed / f"site-{i}") for i in range(4))
        for arm, kw in ARMS.items():
            summary = run_inprocess(Settings(federation_sites=sites, eval_bootstrap=500, **kw),
                                    Path(tmp) / arm)
            result["arms"][arm] = {
                "settings": kw,
                "per_site": {s: {k: v[k] for k in ("n_test", "auc", "auc_ci", "accuracy", "accuracy_ci")}
                             for s, v in summary["per_site"].items()},
                "global": {k: summary["global"][k] for k in ("auc", "auc_ci", "accuracy", "accuracy_ci")},
            }
            print(arm, json.dumps(result["arms"][arm]["per_site"]), flush=True)
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
