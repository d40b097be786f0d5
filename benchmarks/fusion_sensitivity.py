"""Does the sensitivity analysis of a fused model recover the inputs that drive the label?

The synthetic federation's label is drawn first; the image then shows a stenosis or not,
and age and sex shift weakly with it (simulations/synthetic.py `_patient`: +3 years, +4
points of male share). `--null-covariate` adds `clin_null`, drawn from a random stream of
its own, so nothing about the label is in it. A fused model (`data.inputs =
"image+clinical"`) is trained on 4 sites, and each site's test patients get the
sensitivity analysis (fedir.client.input_sensitivity); the pooled drops
(fedir.strategies.input_sensitivity) should order image > age, sex > clin_null.

Beside it, in the same run, the same federation with the imaging model alone
(`data.inputs = "auto"`) and the clinical companion (`baseline.clinical`: logistic
regression on clin_*), so the fused model's AUC sits next to the two it combines.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fusion_sensitivity.py [--seeds 0] [--rounds 8] [--out PATH]

Result: benchmarks/results/fusion_sensitivity.json (machine from benchmarks/machine.py).
The federation is generated with seed 0; `--seeds` are the training seeds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import describe  # benchmarks/ is on sys.path

from fedir.config import SITE_SEPARATOR, Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.synthetic import generate_federation

RESULT = Path(__file__).parent / "results" / "fusion_sensitivity.json"
SITES, PATIENTS, SIZE = 4, 100, 64


def _settings(sites: list[Path], seed: int, rounds: int, inputs: str) -> Settings:
    return Settings(
        federation_sites=SITE_SEPARATOR.join(str(s) for s in sites),
        data_inputs=inputs,  # type: ignore[arg-type]
        model_image_size=SIZE,
        train_rounds=rounds,
        train_local_epochs=2,
        train_seed=seed,
        data_test_fraction=0.3,
        baseline_clinical=inputs != "auto",
        eval_bootstrap=500,
    )


def _pick(entry: dict | None) -> dict | None:
    level = None if entry is None else entry.get("per_patient")
    return None if level is None else {"auc": level["auc"], "auc_ci": level["auc_ci"], "n_patients": level["n_patients"]}


def _run(fed: Path, seed: int, rounds: int, out: Path) -> dict:
    sites = [fed / f"site-{i}" for i in range(SITES)]
    started = time.perf_counter()
    fused = run_inprocess(_settings(sites, seed, rounds, "image+clinical"), out / "fused")
    fused_s = time.perf_counter() - started
    started = time.perf_counter()
    imaging = run_inprocess(_settings(sites, seed, rounds, "auto"), out / "imaging")
    imaging_s = time.perf_counter() - started
    clinical = json.loads((out / "fused" / "clinical-baseline" / "summary.json").read_text())
    sensitivity = fused["sensitivity"]
    return {
        "seed": seed,
        "seconds": {"fused_with_clinical_companion": round(fused_s, 1), "imaging": round(imaging_s, 1)},
        "selected_round": {"fused": fused["selection"]["round"], "imaging": imaging["selection"]["round"],
                           "clinical": clinical["selection"]["round"]},
        "auc_per_patient": {
            model: {"pooled": _pick(summary["global"]),
                    "per_site": {site: _pick(entry) for site, entry in summary["per_site"].items()}}
            for model, summary in (("fused", fused), ("imaging", imaging), ("clinical", clinical))
        },
        "pooled_drops": sensitivity["pooled"],
        "per_site_drops": {site: entry["inputs"] for site, entry in sensitivity["per_site"].items()},
        "checklist": next(i for i in fused["checklist"] if i["item"].startswith("sensitivity")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    result: dict = {"machine": describe(shared_machine=True),
                    "federation": {"sites": SITES, "patients_per_site": PATIENTS, "image_size": SIZE,
                                   "unlabelled_fraction": 0.0, "null_covariate": True, "generator_seed": 0},
                    "settings": {"rounds": args.rounds, "local_epochs": 2, "test_fraction": 0.3,
                                 "sensitivity_repeats": 5, "blur_sigma": 4.0, "bootstrap": 500},
                    "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        fed = Path(tmp) / "fed"
        generate_federation(fed, sites=SITES, patients=PATIENTS, seed=0, unlabelled_fraction=0.0,
                            image_size=SIZE, progress=False, null_covariate=True)
        for seed in args.seeds:
            result["runs"].append(_run(fed, seed, args.rounds, Path(tmp) / f"seed-{seed}"))
            print(json.dumps(result["runs"][-1]["pooled_drops"]["ranking"]), flush=True)
    result["machine_after"] = describe(with_torch=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
