"""Semi-supervised local training on a MedMNIST federation: does it pay off?

Protocol (TARGETS.md, "Semi-supervised"): a MedMNIST file cut into 4 sites by
`fedir data import medmnist` (IID and Dirichlet label skew), 10% of each site's training
images labelled (stratified per class, the same subset for every arm of a seed). Arms:

- `sup10`: FedAvg, supervised on the labelled 10% (what semi-supervision must beat);
- `fixmatch`, `mean_teacher`: FedAvg, the same 10% plus the unlabelled 90%;
- `sup100`: FedAvg, supervised with every training label (the ceiling);
- `local`: each site alone (`federation.arm = local`), supervised on its 10% (the floor).

Every run goes through fedir's own ServerApp logic and ClientApp in one process
(`fedir.simulations.inprocess.InProcessGrid`, no Ray). The headline AUC is the final
model's on the whole official test split (the union of the site test shares), with a
95% bootstrap CI (fedir.metrics.site_metrics, each image its own patient); the local arm
is scored the same way for each site's own model (read from the node's Flower context).
Per-site AUCs on each site's own test share come from the run's summary. Nothing is
tuned: the budget and hyper-parameters are fixed in advance (below; FixMatch's threshold
and mean teacher's EMA decay as published), and the val split is only reported.

    nice -n 5 .venv/bin/python benchmarks/semi_supervised.py [--dataset pneumoniamnist]
        [--seeds 0 1 2] [--partitions iid dirichlet:0.5] [--rounds 10] [--local-steps 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import flwr
import numpy as np
import torch

from fedir.client.arms import LOCAL_KEY
from fedir.client.client_app import build_client_app
from fedir.client.site import load_site
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.metrics import site_metrics
from fedir.models import build_model
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.medmnist import import_medmnist

ARMS = {  # name -> (federation.arm, objective, labelled fraction of the federation used)
    "sup10": ("federated", "supervised", "low"),
    "fixmatch": ("federated", "fixmatch", "low"),
    "mean_teacher": ("federated", "mean_teacher", "low"),
    "sup100": ("federated", "supervised", "full"),
    "local": ("local", "supervised", "low"),
}
SEMI_ARMS = ("fixmatch", "mean_teacher")
DATA = Path(os.environ.get("FEDIR_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "medmnist"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "flwr": flwr.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(pick_device()), "shared_machine": True}


def split_tensors(sites: list[Path], split: str, image_size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The union of the sites' shares of one official split: images, labels, ids."""
    parts = [load_site(s, image_size=image_size).split(split) for s in sites]
    return (torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]).numpy(),
            [i for p in parts for i in p.patients])


def score(state: dict, data: tuple, image_size: int, seed: int) -> dict:
    """AUC of a model (state dict) on one split union, with a 1,000-resample bootstrap CI."""
    model = build_model("resnet_small")
    model.load_state_dict(state)
    images, labels, ids = data
    scores = predict(model, images, pick_device())
    m = site_metrics(labels, scores, ids, n_boot=1000, seed=seed)
    return {"auc": m["auc"], "auc_ci": m["auc_ci"], "n": m["n"], "positives": m["positives"]}


def run_arm(name: str, sites: list[Path], args: argparse.Namespace, seed: int, out: Path,
            test: tuple, val: tuple) -> dict:
    arm, objective, _ = ARMS[name]
    settings = Settings(
        federation_sites=";".join(str(s) for s in sites), federation_arm=arm, train_objective=objective,
        train_rounds=args.rounds, train_local_steps=args.local_steps, train_batch_size=args.batch_size,
        train_lr=args.lr, train_seed=seed, train_unlabelled_ratio=args.mu, train_threshold=0.95,
        train_ema_decay=0.99, model_image_size=args.image_size, eval_bootstrap=100,
    )
    started = time.time()
    grid = InProcessGrid(build_client_app(settings), len(sites), settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="benchmark")
    per_site = {s: {"auc": v["auc"], "auc_ci": v["auc_ci"], "n_test": v["n_test"]}
                for s, v in summary["per_site"].items()}
    result = {"wall_s": round(time.time() - started, 1), "per_site_own_test": per_site}
    if arm == "local":  # each site's own model, from its node's context
        states = {f"site-{node - 100}": ctx.state.array_records[LOCAL_KEY].to_torch_state_dict()
                  for node, ctx in grid.contexts.items()}
        result["official_test_per_site_model"] = {s: score(st, test, args.image_size, seed) for s, st in states.items()}
        result["official_val_per_site_model"] = {s: score(st, val, args.image_size, seed) for s, st in states.items()}
        aucs = [v["auc"] for v in result["official_test_per_site_model"].values()]
        result["official_test"] = {"auc": statistics.fmean(aucs), "auc_best_site": max(aucs),
                                   "note": "mean over the four sites' own models"}
    else:
        state = torch.load(out / "model.pt", weights_only=True)
        result["official_test"] = score(state, test, args.image_size, seed)
        result["official_val"] = score(state, val, args.image_size, seed)
    return result


def gap_shares(runs: dict) -> dict:
    """Per seed and from the seed means: (arm - sup10) / (sup100 - sup10), paired."""
    out = {}
    auc = {a: [r["official_test"]["auc"] for r in runs[a]] for a in runs}
    if "sup10" not in auc or "sup100" not in auc:
        return out
    gaps = [hi - lo for hi, lo in zip(auc["sup100"], auc["sup10"])]
    for arm in SEMI_ARMS:
        if arm not in auc:
            continue
        gains = [a - lo for a, lo in zip(auc[arm], auc["sup10"])]
        out[arm] = {
            "paired_gain_per_seed": gains,
            "gap_per_seed": gaps,
            "share_per_seed": [g / d if d > 0 else None for g, d in zip(gains, gaps)],
            "share_of_mean_gap": statistics.fmean(gains) / statistics.fmean(gaps) if statistics.fmean(gaps) > 0 else None,
        }
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(result: dict) -> str:
    lines = ["| partition | arm | test AUC, mean +- sd over seeds | per seed [bootstrap 95% CI] | val AUC | share of gap closed |",
             "|---|---|---|---|---|---|"]
    for part, block in result["partitions"].items():
        for arm, runs in block["runs"].items():
            aucs = [r["official_test"]["auc"] for r in runs]
            m, sd = mean_sd(aucs)
            if arm == "local":
                cells = "; ".join(
                    "sites " + " ".join(f"{v['auc']:.3f}" for v in r["official_test_per_site_model"].values())
                    for r in runs)
                val = ""
            else:
                cells = "; ".join(f"{r['official_test']['auc']:.3f} [{r['official_test']['auc_ci'][0]:.3f}, "
                                  f"{r['official_test']['auc_ci'][1]:.3f}]" for r in runs)
                val = f"{mean_sd([r['official_val']['auc'] for r in runs])[0]:.3f}"
            share = block["gap_shares"].get(arm, {}).get("share_of_mean_gap")
            share_txt = "" if share is None else f"{share:.0%}"
            label = f"{arm} (mean of site models)" if arm == "local" else arm
            lines.append(f"| {part} | {label} | {m:.3f} +- {sd:.3f} | {cells} | {val} | {share_txt} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="pneumoniamnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet:0.5"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--labelled-fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mu", type=int, default=2, help="unlabelled images per labelled image in a step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out and stop")
    args = parser.parse_args()
    out_file = args.out or Path(__file__).parent / "results" / f"semi_supervised_{args.dataset}.json"
    if args.table:
        print(markdown(json.loads(out_file.read_text())))
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    npz = DATA / f"{args.dataset}.npz"
    result = {"machine": machine(), "loadavg_start": os.getloadavg(), "dataset": args.dataset,
              "budget": {k: v for k, v in vars(args).items() if k not in ("out", "table")},
              "model": "resnet_small (MONAI ResNet, basic blocks 16-128, 7x7 stem) at 28x28, AdamW",
              "runner": "in-process grid (fedir.simulations.inprocess), no Ray", "partitions": {}}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.partitions:
            block = {"runs": {a: [] for a in args.arms}, "federations": {}}
            for seed in args.seeds:
                feds = {}
                for level, fraction in (("low", args.labelled_fraction), ("full", 1.0)):
                    root = Path(tmp) / f"{part.replace(':', '')}-s{seed}-{level}"
                    record = import_medmnist(npz, root, sites=args.sites, partition=part,
                                             labelled_fraction=fraction, seed=seed)
                    feds[level] = [root / s for s in record["per_site"]]
                    block["federations"][f"seed{seed}-{level}"] = record["per_site"]
                test = split_tensors(feds["low"], "test", args.image_size)
                val = split_tensors(feds["low"], "val", args.image_size)
                for arm in args.arms:
                    sites = feds[ARMS[arm][2]]
                    r = run_arm(arm, sites, args, seed, Path(tmp) / f"run-{part}-{seed}-{arm}", test, val)
                    block["runs"][arm].append(r)
                    print(f"{part:14s} seed {seed} {arm:12s} test AUC {r['official_test']['auc']:.3f} "
                          f"({r['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
            block["gap_shares"] = gap_shares(block["runs"])
            result["partitions"][part] = block
            out_file.parent.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps({**result, "partial": True}, indent=1))
        # Written before the temporary federations are deleted: tens of thousands of
        # small files take minutes to remove on a loaded machine.
        result["loadavg_end"] = os.getloadavg()
        result["wall_s"] = round(time.time() - started, 1)
        out_file.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
