"""Fed-Heart-Disease: fedir's arms and strategies against FLamby's published figures.

Runs fedir's own ServerApp logic (strategy with per-site capture, run store, summary) and
ClientApp in one process through `fedir.simulations.inprocess.InProcessGrid` (no Ray:
the same messages and code, without transport), on the four hospitals written by
`fedir data import heart`. Budget as FLamby: logistic regression, 15 rounds x 100 local
SGD steps, batch 4, seeds 42-46. Two protocols: FLamby's (`data.standardise = "site"`:
each site scaled with its own training statistics; the pooled arm trained on pooled
statistics and tested with each site's own) and like-for-like (`"federated"`: one
standardisation from the sites' n / sum / sum of squares, at training and test time).

    .venv/bin/python benchmarks/heart.py [--seeds 42 43 44 45 46] [--out benchmarks/results/heart.json]
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
import torch

from fedir.config import Settings
from fedir.simulations.heart import CENTRES, import_heart
from fedir.simulations.inprocess import run_inprocess

ARMS = {  # name -> (federation.arm, strategy.name)
    "local": ("local", "fedavg"),
    "pooled": ("pooled", "fedavg"),
    "fedavg": ("federated", "fedavg"),
    "fedprox": ("federated", "fedprox"),
    "fedadam": ("federated", "fedadam"),
    "fedyogi": ("federated", "fedyogi"),
    "fedadagrad": ("federated", "fedadagrad"),
}
FLAMBY = {  # published, mean over client tests / pooled test (Ogier du Terrail et al. 2022)
    "pooled": (0.735, 0.795), "fedavg": (0.685, 0.748), "fedprox": (0.685, None),
    "fedadam": (0.726, None), "fedyogi": (0.731, None),
}
T_975_DF4 = 2.776  # Student t for a 95% interval over 5 seeds


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "flwr": flwr.__version__,
            "torch_threads": torch.get_num_threads(), "shared_machine": True}


def summarise(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    half = T_975_DF4 * sd / len(values) ** 0.5 if len(values) == 5 else None
    return {"mean": mean, "sd": sd, "ci95": None if half is None else [mean - half, mean + half],
            "values": values}


def run_one(sites: str, arm: str, strategy: str, protocol: str, seed: int, out: Path) -> dict:
    settings = Settings(
        federation_sites=sites, federation_arm=arm, strategy_name=strategy, model_name="logreg",
        train_rounds=15, train_local_steps=100, train_batch_size=4, train_optimizer="sgd",
        train_lr=0.01, train_weight_decay=0.0, train_seed=seed, data_standardise=protocol,
        eval_bootstrap=200,
    )
    summary = run_inprocess(settings, out)
    per_site = {s: v["accuracy"] for s, v in summary["per_site"].items()}
    return {"per_site": per_site, "mean_over_sites": statistics.fmean(per_site.values()),
            "pooled_test": summary["global"]["accuracy"],
            "pooled_test_ci": summary["global"]["accuracy_ci"]}


def markdown(result: dict) -> str:
    """The README table: per protocol and arm, mean over site tests and pooled test (mean
    +- sd over seeds [95% t-interval]), each site's mean, and FLamby's published figure."""
    def cell(stats: dict) -> str:
        lo, hi = stats["ci95"] or (float("nan"), float("nan"))
        return f"{stats['mean']:.3f} +- {stats['sd']:.3f} [{lo:.3f}, {hi:.3f}]"

    head = ("| protocol | arm | mean over site tests | pooled test | " + " | ".join(CENTRES)
            + " | FLamby (mean / pooled) |")
    lines = [head, "|" + "---|" * (5 + len(CENTRES))]
    for protocol, table in result["protocols"].items():
        for arm, row in table.items():
            flamby = FLAMBY.get(arm)
            ref = "" if protocol != "flamby" or flamby is None else " / ".join(
                "-" if v is None else f"{v:.3f}" for v in flamby)
            sites = " | ".join(f"{row['per_site'][c]['mean']:.3f}" for c in CENTRES)
            lines.append(f"| {protocol} | {arm} | {cell(row['mean_over_sites'])} | "
                         f"{cell(row['pooled_test'])} | {sites} | {ref} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "heart.json")
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # a 13-feature model: threads only add contention
    result = {"machine": machine(), "loadavg_start": os.getloadavg(), "started": time.time(),
              "budget": "logreg, 15 rounds x 100 SGD steps (lr 0.01), batch 4; Flower defaults "
                        "for server optimisers (eta 0.1, tau 1e-3); FedProx mu 0.01",
              "runner": "in-process grid (fedir.simulations.inprocess), no Ray",
              "flamby_published": FLAMBY, "protocols": {}}
    with tempfile.TemporaryDirectory() as tmp:
        counts = import_heart(Path(tmp) / "heart")
        sites = ";".join(str(Path(tmp) / "heart" / c) for c in CENTRES)
        result["sites"] = counts
        for protocol, label in (("site", "flamby"), ("federated", "like_for_like")):
            table = {}
            for name in args.arms:
                arm, strategy = ARMS[name]
                runs = [run_one(sites, arm, strategy, protocol, seed, Path(tmp) / f"{label}-{name}-{seed}")
                        for seed in args.seeds]
                table[name] = {
                    "mean_over_sites": summarise([r["mean_over_sites"] for r in runs]),
                    "pooled_test": summarise([r["pooled_test"] for r in runs]),
                    "per_site": {c: summarise([r["per_site"][c] for r in runs]) for c in CENTRES},
                    "runs": runs,
                }
                print(f"{label:14s} {name:11s} mean-over-sites {table[name]['mean_over_sites']['mean']:.3f}"
                      f" +- {table[name]['mean_over_sites']['sd']:.3f}  pooled-test "
                      f"{table[name]['pooled_test']['mean']:.3f}", flush=True)
            result["protocols"][label] = table
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = time.time() - result.pop("started")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
