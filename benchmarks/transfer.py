"""Transfer learning (`model.init`, `train.freeze`): does a checkpoint from another task help a small federation?

Protocol (issue 18, item 1): per seed, resnet_small is pretrained centrally on PneumoniaMNIST
(another task: pneumonia on chest X-rays) with fedir's own site reader and training loop,
the epoch chosen on PneumoniaMNIST's validation split, and saved as a plain state dict. Then
BreastMNIST (breast ultrasound, benign vs malignant) is cut into 4 IID sites by `fedir data
import medmnist` with 10% or 100% of the training labels, and three federated studies run on
each federation, the same budget for all:

- `random`: random initial weights (train.seed);
- `pretrained`: `model.init` = the PneumoniaMNIST checkpoint (its head is the same shape, so
  every entry loads: the head starts from pneumonia's classifier);
- `pretrained+freeze`: the same, with `train.freeze = encoder` for the first 2 rounds.

Every run goes through fedir's ServerApp logic and ClientApp in one process (the
in-process grid, no Ray); the saved model (eval.select = val-auc) is scored on the whole
official BreastMNIST test split, and each arm is compared with `random` of the same seed and
fraction by a paired bootstrap of the AUC difference on the same test images
(fedir.metrics.paired_auc_difference, 1,000 resamples). Nothing is tuned.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/transfer.py [--seeds 0 1 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedir.client.client_app import build_client_app
from fedir.client.objectives import ObjectiveParams, build_objective
from fedir.client.site import load_site
from fedir.client.training import TrainConfig, pick_device, predict, train
from fedir.config import Settings
from fedir.metrics import paired_auc_difference, site_metrics
from fedir.models import build_model
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.medmnist import import_medmnist

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe  # noqa: E402  (benchmarks/ is on sys.path)
from semi_supervised import DATA, score, split_tensors  # noqa: E402  (the sibling benchmark)

ARMS = {"random": {}, "pretrained": {"init": True},
        "pretrained+freeze": {"init": True, "freeze": True}}


def pretrain(npz: Path, root: Path, args: argparse.Namespace, seed: int) -> dict:
    """Central supervised training on every PneumoniaMNIST training image, one epoch at a time
    (fedir's training loop and weak augmentation); the epoch with the best validation AUC is
    saved to root/pretrained.pt."""
    record = import_medmnist(npz, root / "pneumonia", sites=1, seed=seed)
    site = load_site(root / "pneumonia" / next(iter(record["per_site"])), image_size=args.image_size)
    x, y = site.train.images, site.train.labels
    model = build_model("resnet_small", seed=1000 + seed)
    objective = build_objective("supervised", ObjectiveParams(augment="weak", seed=seed))
    best: tuple[float, int, dict] = (-1.0, 0, {})
    history = []
    started = time.time()
    for epoch in range(1, args.pretrain_epochs + 1):
        config = TrainConfig(epochs=1, batch_size=64, lr=args.lr, seed=seed * 100 + epoch)
        train(model, x, y, objective, config, pick_device())
        val = site_metrics(site.val.labels.numpy(), predict(model, site.val.images, pick_device()),
                           site.val.patients, n_boot=0)
        history.append(val["auc"])
        if val["auc"] > best[0]:
            best = (val["auc"], epoch, {k: v.clone() for k, v in model.state_dict().items()})
    path = root / "pretrained.pt"
    torch.save(best[2], path)
    test = site_metrics(site.test.labels.numpy(),
                        predict(_loaded(best[2]), site.test.images, pick_device()), site.test.patients, n_boot=0)
    return {"path": path, "record": {"train_images": int(x.shape[0]), "epochs": args.pretrain_epochs,
                                     "val_auc_per_epoch": history, "chosen_epoch": best[1],
                                     "pneumonia_val_auc": best[0], "pneumonia_test_auc": test["auc"],
                                     "wall_s": round(time.time() - started, 1)}}


def _loaded(state: dict) -> torch.nn.Module:
    model = build_model("resnet_small")
    model.load_state_dict(state)
    return model


def run_arm(arm: str, sites: list[Path], checkpoint: Path, args: argparse.Namespace, seed: int, out: Path,
            test: tuple) -> dict:
    options = ARMS[arm]
    settings = Settings(
        federation_sites=";".join(str(s) for s in sites), train_rounds=args.rounds,
        train_local_steps=args.local_steps, train_batch_size=args.batch_size, train_lr=args.lr, train_seed=seed,
        model_image_size=args.image_size, eval_bootstrap=100,
        model_init=str(checkpoint) if options.get("init") else "",
        train_freeze="encoder" if options.get("freeze") else "none",
        train_freeze_rounds=args.freeze_rounds if options.get("freeze") else 0,
    )
    started = time.time()
    grid = InProcessGrid(build_client_app(settings), len(sites), settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="benchmark")
    state = torch.load(out / "model.pt", weights_only=True)
    init = summary["model_init"]
    return {"wall_s": round(time.time() - started, 1), "selected_round": summary["selection"]["round"],
            "model_init": {k: init.get(k) for k in ("from", "n_loaded", "n_new", "n_dropped", "loaded_share")},
            "official_test": score(state, test, args.image_size, seed, keep_scores=True)}


def paired(labels: np.ndarray, a: dict, b: dict, seed: int) -> dict:
    d = paired_auc_difference(labels, np.asarray(a["scores"]), np.asarray(b["scores"]), n_boot=1000, seed=seed)
    return {"difference": d["difference"], "difference_ci": d["difference_ci"], "reason": d["reason"]}


def analysis(result: dict) -> dict:
    """Per fraction and arm: the paired difference against random init, per seed and its mean."""
    out: dict = {}
    for fraction in result["budget"]["fractions"]:
        key = f"{fraction:g}"
        block: dict = {}
        for arm in ARMS:
            if arm == "random":
                continue
            per_seed = {}
            for seed, runs in result["seeds"].items():
                cell = runs["runs"].get(key, {})
                if arm in cell and "random" in cell:
                    per_seed[seed] = paired(np.asarray(runs["test_labels"]), cell[arm]["official_test"],
                                            cell["random"]["official_test"], int(seed))
            diffs = [v["difference"] for v in per_seed.values()]
            block[arm] = {"per_seed": per_seed, "mean_difference": statistics.fmean(diffs) if diffs else None,
                          "sd": statistics.stdev(diffs) if len(diffs) > 1 else None,
                          "seeds_ci_above_0": sum(1 for v in per_seed.values()
                                                  if v["difference_ci"] and v["difference_ci"][0] > 0),
                          "seeds_ci_below_0": sum(1 for v in per_seed.values()
                                                  if v["difference_ci"] and v["difference_ci"][1] < 0)}
        out[key] = block
    return out


def markdown(result: dict) -> str:
    def ci(c: list | None) -> str:
        return "[n/a]" if c is None else f"[{c[0]:+.3f}, {c[1]:+.3f}]"

    lines = ["| labels | seed | random AUC | pretrained AUC | pretrained - random [paired CI] | "
             "pretrained+freeze AUC | pretrained+freeze - random [paired CI] |", "|---|---|---|---|---|---|---|"]
    for key, block in result["analysis"].items():
        for seed, runs in result["seeds"].items():
            cell = runs["runs"].get(key, {})
            if "random" not in cell:
                continue
            row = [f"{float(key):.0%}", seed, f"{cell['random']['official_test']['auc']:.3f}"]
            for arm in ("pretrained", "pretrained+freeze"):
                d = block[arm]["per_seed"].get(seed)
                row += [f"{cell[arm]['official_test']['auc']:.3f}" if arm in cell else "not run",
                        "" if d is None else f"{d['difference']:+.3f} {ci(d['difference_ci'])}"]
            lines.append("| " + " | ".join(row) + " |")
        means = []
        for arm in ("pretrained", "pretrained+freeze"):
            b = block[arm]
            sd = "" if b["sd"] is None else f" +- {b['sd']:.3f}"
            means += ["", "" if b["mean_difference"] is None else
                      f"mean {b['mean_difference']:+.3f}{sd}; CI above 0 in {b['seeds_ci_above_0']}, "
                      f"below 0 in {b['seeds_ci_below_0']} of {len(b['per_seed'])}"]
        lines.append("| " + " | ".join([f"{float(key):.0%}", "all", "", *means]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--freeze-rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer_breastmnist.json")
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    result: dict = {"machine": describe(shared_machine=True), "loadavg_start": os.getloadavg(),
                    "budget": {k: v for k, v in vars(args).items() if k not in ("out", "table")},
                    "pretraining": "PneumoniaMNIST train split, central, resnet_small, AdamW, batch 64, weak augmentation; "
                                   "epoch chosen on PneumoniaMNIST val AUC",
                    "target": "BreastMNIST, 4 IID sites, official test split scored (union of the site test shares)",
                    "runner": "in-process grid (fedir.simulations.inprocess), no Ray", "seeds": {}}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            root = Path(tmp) / f"s{seed}"
            pre = pretrain(DATA / "pneumoniamnist.npz", root, args, seed)
            block: dict = {"pretraining": pre["record"], "runs": {}}
            result["seeds"][str(seed)] = block
            test = None
            for fraction in args.fractions:
                fed = root / f"breast-f{fraction:g}"
                record = import_medmnist(DATA / "breastmnist.npz", fed, sites=args.sites, partition="iid",
                                         labelled_fraction=fraction, seed=seed)
                sites = [fed / s for s in record["per_site"]]
                if test is None:  # every fraction of a seed splits the images alike
                    test = split_tensors(sites, "test", args.image_size)
                    block["test_labels"] = [int(v) for v in test[1]]
                cell = block["runs"].setdefault(f"{fraction:g}", {})
                for arm in ARMS:
                    r = run_arm(arm, sites, pre["path"], args, seed, root / f"run-{fraction:g}-{arm}", test)
                    r["loadavg_after"] = os.getloadavg()
                    cell[arm] = r
                    print(f"seed {seed} labels {fraction:.0%} {arm:18s} test AUC {r['official_test']['auc']:.3f} "
                          f"(round {r['selected_round']}, {r['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f})",
                          flush=True)
            result["analysis"] = analysis(result)
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
