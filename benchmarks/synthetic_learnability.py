"""Is the synthetic XA task learnable, but not trivially? Measure it.

Generates a synthetic federation (confound 0, every training patient labelled), pools the
labelled images of all sites through fedir's own site reader (`load_site`: modality LUT,
VOI window, MONOCHROME1, frame policy, resize, z-score), and trains fedir's default model
centrally with fedir's own training loop, choosing the epoch on the validation patients.
Reports the test AUC per image and per patient (mean score) with a patient-bootstrap CI,
and writes it with the machine description to benchmarks/results/synthetic_learnability.json.

    python benchmarks/synthetic_learnability.py [--sites 4 --patients 150 --epochs 12]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedir.client.objectives import build_objective
from fedir.client.site import SplitTensors, load_site
from fedir.client.training import TrainConfig, pick_device, predict, train
from fedir.metrics import site_metrics
from fedir.models import build_model
from fedir.simulations.synthetic import generate_federation

RESULTS = Path(__file__).parent / "results" / "synthetic_learnability.json"


def pooled(sites: list, split: str) -> SplitTensors:
    """Concatenate one split of every site, keeping labelled images only."""
    parts = [s.split(split) for s in sites]
    images = torch.cat([p.images[p.labels >= 0] for p in parts])
    labels = torch.cat([p.labels[p.labels >= 0] for p in parts])
    patients = [pid for p in parts for pid, y in zip(p.patients, p.labels.tolist()) if y >= 0]
    return SplitTensors(images, labels, patients)


def patient_auc(data: SplitTensors, scores: np.ndarray) -> float:
    by: dict[str, list] = {}
    for pid, y, s in zip(data.patients, data.labels.tolist(), scores):
        by.setdefault(pid, [y, []])[1].append(s)
    ys = [v[0] for v in by.values()]
    return float(roc_auc_score(ys, [np.mean(v[1]) for v in by.values()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fedir-synth-learnability")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128, help="size the model sees")
    parser.add_argument("--epochs", type=int, default=12)
    args = parser.parse_args()

    t0 = time.time()
    generate_federation(args.out, sites=args.sites, patients=args.patients, seed=args.seed,
                        unlabelled_fraction=0.0, progress=False)
    sites = [load_site(d, image_size=args.image_size) for d in sorted(args.out.glob("site-*"))]
    tr, va, te = (pooled(sites, s) for s in ("train", "val", "test"))
    device = pick_device()
    model = build_model("resnet_small", seed=args.seed)
    history, best = [], (-1.0, None, 0)
    for epoch in range(1, args.epochs + 1):
        train(model, tr.images, tr.labels, build_objective("supervised"),
              TrainConfig(epochs=1, batch_size=32, lr=2e-3, seed=args.seed * 100 + epoch), device)
        val_auc = float(roc_auc_score(va.labels.numpy(), predict(model, va.images, device)))
        history.append({"epoch": epoch, "val_auc": round(val_auc, 4)})
        print(f"epoch {epoch}: val AUC {val_auc:.3f}", flush=True)
        if val_auc > best[0]:
            best = (val_auc, copy.deepcopy(model.state_dict()), epoch)
    model.load_state_dict(best[1])
    scores = predict(model, te.images, device)
    test = site_metrics(te.labels.numpy(), scores, te.patients, n_boot=1000, seed=args.seed)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "images": {"train": len(tr.labels), "val": len(va.labels), "test": len(te.labels)},
        "positives": {s: int(d.labels.sum()) for s, d in (("train", tr), ("val", va), ("test", te))},
        "history": history,
        "chosen_epoch": best[2],
        "test_auc_image": test["auc"],
        "test_auc_image_ci95_patient_bootstrap": test["auc_ci"],
        "test_auc_patient_mean_score": patient_auc(te, scores),
        "wall_seconds": round(time.time() - t0, 1),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": str(device)},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("chosen_epoch", "test_auc_image",
                      "test_auc_image_ci95_patient_bootstrap", "test_auc_patient_mean_score")}))


if __name__ == "__main__":
    main()
