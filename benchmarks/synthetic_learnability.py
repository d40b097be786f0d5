"""The synthetic XA task's learning curve: does a pooled model improve with more labelled patients?

Why: pooling, federating and semi-supervision can only matter on a task where more
labelled data helps. This measures that, on the demo's federation (4 sites x 120
patients, confound 0) with every training patient labelled: the labelled images of all
sites are pooled through fedir's own site reader (`load_site`: modality LUT, VOI window,
MONOCHROME1, frame policy, resize, z-score) and fedir's default model is trained with
fedir's own training loop and supervised objective on a subsample of N training
patients (stratified by label, drawn per seed; the seed also sets the initialisation).

The "epoch" is chosen on the validation patients (AUC of each patient's mean image score);
the test patients are scored once, with that model only. An epoch is one pass over the
subsample but at least `--min-steps` optimiser steps, so that a dozen patients are not
judged after two steps. Test AUC per patient (mean score) and per image, each with a
95% CI from fedir's patient bootstrap; the mean over seeds beside them.

    python benchmarks/synthetic_learnability.py [--sizes 12,24,48,96,192,all --seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/ is on sys.path
from sklearn.metrics import roc_auc_score

from fedir.client.objectives import build_objective
from fedir.client.site import SplitTensors, load_site
from fedir.client.training import TrainConfig, pick_device, predict, train
from fedir.metrics import site_metrics
from fedir.models import build_model
from fedir.simulations.synthetic import GENERATOR_VERSION, generate_federation

RESULTS = Path(__file__).parent / "results" / "synthetic_learnability.json"


def pooled(sites: list, split: str) -> SplitTensors:
    """Concatenate one split of every site, keeping labelled images only."""
    parts = [s.split(split) for s in sites]
    images = torch.cat([p.images[p.labels >= 0] for p in parts])
    labels = torch.cat([p.labels[p.labels >= 0] for p in parts])
    patients = [pid for p in parts for pid, y in zip(p.patients, p.labels.tolist()) if y >= 0]
    return SplitTensors(images, labels, patients)


def subsample(data: SplitTensors, n: int, seed: int) -> SplitTensors:
    """The images of `n` patients drawn without replacement, stratified by label (the
    subsample keeps the pool's prevalence, and a dozen patients hold both classes)."""
    label_of = dict(zip(data.patients, data.labels.tolist()))
    if n >= len(label_of):
        return data
    rng = np.random.default_rng(seed)
    positives = sorted(p for p, y in label_of.items() if y == 1)
    negatives = sorted(p for p, y in label_of.items() if y == 0)
    n_pos = min(max(round(n * len(positives) / len(label_of)), 1), n - 1)
    chosen = set(rng.permutation(positives)[:n_pos]) | set(rng.permutation(negatives)[: n - n_pos])
    keep = torch.tensor([p in chosen for p in data.patients])
    return SplitTensors(data.images[keep], data.labels[keep], [p for p in data.patients if p in chosen])


def by_patient(data: SplitTensors, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-patient labels and mean image scores (a patient's images share its label)."""
    groups: dict[str, tuple[int, list[float]]] = {}
    for pid, y, s in zip(data.patients, data.labels.tolist(), scores):
        groups.setdefault(pid, (y, []))[1].append(float(s))
    ids = list(groups)
    return (np.array([groups[p][0] for p in ids]), np.array([np.mean(groups[p][1]) for p in ids]), ids)


def patient_auc(data: SplitTensors, scores: np.ndarray) -> float:
    labels, means, _ = by_patient(data, scores)
    return float(roc_auc_score(labels, means))


def run_arm(train_set: SplitTensors, va: SplitTensors, te: SplitTensors, seed: int,
            args: argparse.Namespace, device: torch.device) -> dict:
    """Train one model on `train_set`, pick the epoch on validation, score the test once."""
    model = build_model("resnet_small", seed=seed)
    steps = max(-(-len(train_set) // args.batch_size), args.min_steps)
    history, best_auc, best_state, best_epoch = [], -1.0, None, 0
    for epoch in range(1, args.epochs + 1):
        train(model, train_set.images, train_set.labels, build_objective("supervised"),
              TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, seed=seed * 1000 + epoch), device)
        val_auc = patient_auc(va, predict(model, va.images, device))
        history.append(round(val_auc, 4))
        if val_auc > best_auc:
            best_auc, best_state, best_epoch = val_auc, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    scores = predict(model, te.images, device)
    per_image = site_metrics(te.labels.numpy(), scores, te.patients, n_boot=args.bootstrap, seed=seed)
    labels, means, ids = by_patient(te, scores)
    per_patient = site_metrics(labels, means, ids, n_boot=args.bootstrap, seed=seed)
    return {
        "train_images": len(train_set), "steps_per_epoch": steps, "val_auc_patient_by_epoch": history,
        "chosen_epoch": best_epoch, "val_auc_patient_chosen": round(best_auc, 4),
        "test_auc_patient": per_patient["auc"], "test_auc_patient_ci95": per_patient["auc_ci"],
        "test_auc_image": per_image["auc"], "test_auc_image_ci95": per_image["auc_ci"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "fedir-synth-learnability")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=120, help="per site (the demo's 120)")
    parser.add_argument("--data-seed", type=int, default=0, help="the federation's seed (the demo's 0)")
    parser.add_argument("--image-size", type=int, default=128, help="size the model sees (the demo's 128)")
    parser.add_argument("--frame-policy", default="mip")
    parser.add_argument("--sizes", default="12,24,48,96,192,all", help="labelled training patients")
    parser.add_argument("--seeds", default="0,1,2", help="subsample and initialisation seeds")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--min-steps", type=int, default=8, help="optimiser steps per epoch at least")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="what else ran on the machine")
    args = parser.parse_args()

    t0 = time.time()
    generate_federation(args.out, sites=args.sites, patients=args.patients, seed=args.data_seed,
                        unlabelled_fraction=0.0, progress=False)
    sites = [load_site(d, image_size=args.image_size, frame_policy=args.frame_policy)
             for d in sorted(args.out.glob("site-*"))]
    tr, va, te = (pooled(sites, s) for s in ("train", "val", "test"))
    n_train = len(set(tr.patients))
    # largest first: the end point that decides whether the task is learnable comes first
    sizes = sorted({n_train if s == "all" else min(int(s), n_train) for s in args.sizes.split(",")}, reverse=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    device = pick_device()
    runs = []
    for n in sizes:
        for seed in seeds:
            start = time.time()
            arm = run_arm(subsample(tr, n, seed), va, te, seed, args, device)
            runs.append({"train_patients": n, "seed": seed, **arm, "seconds": round(time.time() - start, 1)})
            print(f"n={n} seed={seed}: val {arm['val_auc_patient_chosen']:.3f} (epoch {arm['chosen_epoch']}), "
                  f"test per patient {arm['test_auc_patient']:.3f} {arm['test_auc_patient_ci95']}, "
                  f"per image {arm['test_auc_image']:.3f} ({runs[-1]['seconds']} s)", flush=True)
    curve = []
    for n in sorted(sizes):
        rows = [r for r in runs if r["train_patients"] == n]
        curve.append({"train_patients": n,
                      "test_auc_patient_mean": round(float(np.mean([r["test_auc_patient"] for r in rows])), 4),
                      "test_auc_image_mean": round(float(np.mean([r["test_auc_image"] for r in rows])), 4),
                      "seconds_per_seed": round(float(np.mean([r["seconds"] for r in rows])), 1)})
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "generator_version": GENERATOR_VERSION,
        "pool": {split: {"patients": len(set(d.patients)), "images": len(d),
                         "positive_patients": int(by_patient(d, np.zeros(len(d)))[0].sum())}
                 for split, d in (("train", tr), ("val", va), ("test", te))},
        "curve": curve,
        "runs": runs,
        "wall_seconds": round(time.time() - t0, 1),
        "machine": describe(note=args.note),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(curve, indent=1))


if __name__ == "__main__":
    main()
