"""Federated self-supervised pretraining (`train.objective = "simclr"`) then fine-tuning, against random init.

Protocol (issue 18, item 2): per seed, the synthetic XA federation (`fedir data synth`: 4
sites, 64 px, `--patients` per site) is written twice from the same generator seed, once
with 90% of the training patients' labels removed (10% labels) and once with none removed
(100%); the pixels are the same (the label draw does not touch them; checked here on the
training images). Then, the same budget for every fine-tuning study:

- `random`: a supervised study from random initial weights (train.seed);
- `simclr`: first a federated SimCLR pretraining study on every training image of the 4
  sites, labels unused (`train.objective = simclr`, eval.select = last), then a supervised
  study with `model.init` = its model.pt (the projection head dropped, every other weight loaded).

The pretraining reads no label, so one pretraining per seed serves both label fractions.
Every study goes through fedir's ServerApp logic and ClientApp in one process (the
in-process grid, no Ray); the fine-tuned model fedir saves (round chosen on validation,
eval.select = val-auc) is scored on the union of the 4 sites' test patients, per patient
(mean score over the patient's images), and `simclr` minus `random` of the same seed and
fraction is a paired bootstrap of the per-patient AUC difference on the same patients
(fedir.metrics.paired_auc_difference, 1,000 resamples). Nothing is tuned.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/ssl_pretraining.py [--seeds 0] [--patients 100]
    .venv/bin/python benchmarks/ssl_pretraining.py --data breastmnist --image-size 28 --out results/ssl_pretraining_breastmnist.json
    .venv/bin/python benchmarks/ssl_pretraining.py --table
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from fedir.client.client_app import build_client_app
from fedir.client.site import load_site
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.metrics import paired_auc_difference
from fedir.models import build_model
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.medmnist import import_medmnist
from fedir.simulations.synthetic import GENERATOR_VERSION, generate_federation

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402  (benchmarks/ is on sys.path)

OUT = Path(__file__).parent / "results" / "ssl_pretraining_synthetic_xa.json"
MEDMNIST = Path(os.environ.get("FEDIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "medmnist"


def _study(sites: list[Path], out: Path, args: argparse.Namespace, seed: int, **kw) -> tuple[dict, float]:
    base = dict(federation_sites=";".join(str(s) for s in sites), train_seed=seed, model_image_size=args.image_size,
                train_batch_size=args.batch_size, train_lr=args.lr, eval_bootstrap=100, bias_bootstrap=0)
    settings = Settings(**{**base, **kw})
    started = time.time()
    grid = InProcessGrid(build_client_app(settings), len(sites), settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="benchmark")
    return summary, round(time.time() - started, 1)


def test_patients(sites: list[Path], image_size: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """The union of the sites' test images, their patient ids and each patient's label."""
    parts = [load_site(s, image_size=image_size).split("test") for s in sites]
    images = torch.cat([p.images for p in parts])
    ids = [f"{s.name}/{i}" for s, p in zip(sites, parts) for i in p.patients]
    labels = torch.cat([p.labels for p in parts]).numpy()
    return images, ids, labels


def per_patient(scores: np.ndarray, ids: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean score and label per patient (patients in sorted order)."""
    by: dict[str, list[float]] = defaultdict(list)
    label: dict[str, int] = {}
    for s, i, y in zip(scores, ids, labels):
        by[i].append(float(s))
        label[i] = int(y)
    order = sorted(by)
    return order, np.array([np.mean(by[i]) for i in order]), np.array([label[i] for i in order])


def scored(model_pt: Path, test: tuple) -> np.ndarray:
    model = build_model("resnet_small")
    model.load_state_dict(torch.load(model_pt, weights_only=True))
    return predict(model, test[0], pick_device())


def run_seed(seed: int, root: Path, args: argparse.Namespace) -> dict:
    feds = {}
    for fraction in args.fractions:
        fed = root / f"{args.data}-f{fraction:g}"
        if args.data == "synthetic":
            per_site = generate_federation(fed, sites=args.sites, patients=args.patients, seed=seed,
                                           unlabelled_fraction=1 - fraction, image_size=args.image_size,
                                           progress=False)["sites"]
        else:  # MedMNIST's official splits over `sites` IID sites, the same images at every fraction
            per_site = import_medmnist(MEDMNIST / f"{args.data}.npz", fed, sites=args.sites, partition="iid",
                                       labelled_fraction=fraction, seed=seed)["per_site"]
        feds[fraction] = ([fed / s for s in sorted(per_site)], per_site)
    first = next(iter(feds.values()))[0]
    test = test_patients(first, args.image_size)
    same_pixels = all(
        torch.equal(load_site(a, image_size=args.image_size).train.images,
                    load_site(b, image_size=args.image_size).train.images)
        for sites, _ in feds.values() for a, b in zip(first, sites))
    block: dict = {"same_training_pixels_across_fractions": same_pixels, "federations": {
        f"{f:g}": {s: {k: v for k, v in info.items() if k in ("images", "patients", "labelled_patients",
                                                              "positive_patients", "labelled_images")} or info
                   for s, info in per_site.items()} for f, (_, per_site) in feds.items()}}
    # pretraining: every training image, labels unused (on the first fraction's federation)
    pre_out = root / "pretrain"
    pre, wall = _study(first, pre_out, args, seed, train_objective="simclr", eval_select="last",
                       train_rounds=args.pretrain_rounds, train_local_steps=args.pretrain_steps,
                       train_batch_size=args.pretrain_batch_size)
    block["pretraining"] = {"wall_s": wall, "status": pre["status"], "rounds": args.pretrain_rounds,
                            "global": pre["pretraining"]["global"], "train_images": sum(
                                len(load_site(s, image_size=args.image_size).train.images) for s in first)}
    print(f"seed {seed} pretraining: {wall:.0f} s, test contrastive loss "
          f"{pre['pretraining']['global']['test']['contrastive_loss']:.3f} (chance "
          f"{pre['pretraining']['global']['test']['contrastive_chance']:.3f}), view match "
          f"{pre['pretraining']['global']['test']['view_match']:.3f}", flush=True)
    block["runs"] = {}
    for fraction, (sites, _) in feds.items():
        cell: dict = {}
        patient_scores = {}
        for arm in ("random", "simclr"):
            out = root / f"run-{fraction:g}-{arm}"
            kw = {"model_init": str(pre_out / "model.pt")} if arm == "simclr" else {}
            summary, wall = _study(sites, out, args, seed, train_rounds=args.rounds,
                                   train_local_steps=args.local_steps, **kw)
            ids, scores, labels = per_patient(scored(out / "model.pt", test), test[1], test[2])
            patient_scores[arm] = scores
            init = summary["model_init"]
            pooled = (summary["global"] or {}).get("per_patient") or {}
            cell[arm] = {"wall_s": wall, "selected_round": summary["selection"]["round"],
                         "val_auc": summary["selection"]["score"],
                         # fedir's own pooled per-patient test AUC (each site scores after AdaBN)
                         "study_test_auc": pooled.get("auc"), "study_test_auc_ci": pooled.get("auc_ci"),
                         "model_init": {k: init.get(k) for k in ("from", "n_loaded", "n_new", "n_dropped")},
                         "test_patients": len(ids), "test_positives": int(labels.sum())}
        d = paired_auc_difference(labels, patient_scores["simclr"], patient_scores["random"], n_boot=1000, seed=seed)
        cell["random"]["auc"], cell["simclr"]["auc"] = d["auc_b"], d["auc_a"]
        cell["difference"] = {"simclr_minus_random": d["difference"], "ci": d["difference_ci"], "reason": d["reason"]}
        block["runs"][f"{fraction:g}"] = cell
        print(f"seed {seed} labels {fraction:.0%}: random {d['auc_b']:.3f}, simclr {d['auc_a']:.3f}, "
              f"difference {d['difference']:+.3f} {d['difference_ci']} (load {os.getloadavg()[0]:.1f})", flush=True)
    return block


def markdown(result: dict) -> str:
    def ci(c: list | None) -> str:
        return "[n/a]" if c is None else f"[{c[0]:+.3f}, {c[1]:+.3f}]"

    lines = ["| labels | seed | test patients (positive) | random init AUC | SimCLR-pretrained AUC | "
             "SimCLR - random [paired 95% CI] |", "|---|---|---|---|---|---|"]
    for seed, block in result["seeds"].items():
        for key, cell in block["runs"].items():
            d = cell["difference"]
            lines.append(f"| {float(key):.0%} | {seed} | {cell['random']['test_patients']} "
                         f"({cell['random']['test_positives']}) | {cell['random']['auc']:.3f} | "
                         f"{cell['simclr']['auc']:.3f} | {d['simclr_minus_random']:+.3f} {ci(d['ci'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data", choices=["synthetic", "breastmnist", "pneumoniamnist"], default="synthetic",
                        help="the synthetic XA federation, or a MedMNIST .npz of ../shared/data/medmnist "
                             "(then --image-size 28; --patients is unused)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=100, help="per site")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pretrain-rounds", type=int, default=5)
    parser.add_argument("--pretrain-steps", type=int, default=20)
    parser.add_argument("--pretrain-batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    result: dict = {"machine": describe(shared_machine=True), "loadavg_start": os.getloadavg(),
                    "generator_version": GENERATOR_VERSION,
                    "budget": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "table"},
                    "runner": "in-process grid (fedir.simulations.inprocess), no Ray",
                    "unit": "patient (mean score over the patient's test images), union of the sites' test patients",
                    "seeds": {}}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            result["seeds"][str(seed)] = run_seed(seed, Path(tmp) / f"s{seed}", args)
            result["wall_s"] = round(time.time() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**result, "partial": seed != args.seeds[-1]}, indent=1))
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.time() - started, 1)
    result["partial"] = False
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
