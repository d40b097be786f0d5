"""Fed-Heart-Disease: fedir's arms and strategies against FLamby's published figures.

Runs fedir's own ServerApp logic (strategy with per-site capture, run store, summary) and
ClientApp in one process through `fedir.simulations.inprocess.InProcessGrid` (no Ray:
the same messages and code, without transport), on the four hospitals written by
`fedir data import heart`. Budget as FLamby: logistic regression, 15 rounds x 100 local
SGD steps, batch 4, seeds 42-46. Two protocols: FLamby's (`data.standardise = "site"`:
each site scaled with its own training statistics; the pooled arm trained on pooled
statistics and tested with each site's own) and like-for-like (`"federated"`: one
standardisation from the sites' n / sum / sum of squares, at training and test time).

Personalised arms (`train.personalise`, fedir.models) run the federation as FedAvg
(or FedAdagrad) does, with either each site's intercept kept and learnt at the site, or
one round's local budget of fine-tuning from the global model before each evaluation.
`fedavg+smote` is FedAvg with `train.smote` (SMOTE on each site's training rows, at the
site): not personalised, so it sits in the headline table.
They gain by learning each site's prevalence, the site shortcut the bias checks flag, so
every run records its bias verdict beside its accuracy and they are never the headline.

    .venv/bin/python benchmarks/heart.py [--seeds 42 43 44 45 46] [--out benchmarks/results/heart.json]
    .venv/bin/python benchmarks/heart.py --arms fedavg+intercept fedavg+finetune --merge
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.uci_heart import CENTRES, import_heart

ARMS = {  # name -> (federation.arm, strategy.name, train.personalise)
    "local": ("local", "fedavg", "none"),
    "pooled": ("pooled", "fedavg", "none"),
    "fedavg": ("federated", "fedavg", "none"),
    "fedprox": ("federated", "fedprox", "none"),
    "fedadam": ("federated", "fedadam", "none"),
    "fedyogi": ("federated", "fedyogi", "none"),
    "fedadagrad": ("federated", "fedadagrad", "none"),
    "fedavg+intercept": ("federated", "fedavg", "intercept"),
    "fedavg+finetune": ("federated", "fedavg", "finetune"),
    "fedadagrad+intercept": ("federated", "fedadagrad", "intercept"),
    "fedadagrad+finetune": ("federated", "fedadagrad", "finetune"),
    "fedavg+smote": ("federated", "fedavg", "none"),  # train.smote at every site
}
PERSONALISED = ("local",) + tuple(name for name, (_, _, p) in ARMS.items() if p != "none")
FLAMBY = {  # published, mean over client tests / pooled test (Ogier du Terrail et al. 2022)
    "pooled": (0.735, 0.795), "fedavg": (0.685, 0.748), "fedprox": (0.685, None),
    "fedadam": (0.726, None), "fedyogi": (0.731, None),
}
T_975_DF4 = 2.776  # Student t for a 95% interval over 5 seeds


def summarise(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    half = T_975_DF4 * sd / len(values) ** 0.5 if len(values) == 5 else None
    return {"mean": mean, "sd": sd, "ci95": None if half is None else [mean - half, mean + half],
            "values": values}


def run_one(sites: str, arm: str, strategy: str, personalise: str, protocol: str, seed: int,
            out: Path, smote: bool = False) -> dict:
    settings = Settings(
        federation_sites=sites, federation_arm=arm, strategy_name=strategy, model_name="logreg",
        train_personalise=personalise, train_smote=smote,
        train_rounds=15, train_local_steps=100, train_batch_size=4, train_optimizer="sgd",
        train_lr=0.01, train_weight_decay=0.0, train_seed=seed, data_standardise=protocol,
        eval_bootstrap=200,
    )
    summary = run_inprocess(settings, out)
    per_site = {s: v["accuracy"] for s, v in summary["per_site"].items()}
    association = summary["bias"]["tests"].get("site_label_association", {})
    return {"per_site": per_site, "mean_over_sites": statistics.fmean(per_site.values()),
            "pooled_test": summary["global"]["accuracy"],
            "pooled_test_ci": summary["global"]["accuracy_ci"],
            "bias_alarm": summary["bias"]["alarm"], "bias_reasons": summary["bias"]["reasons"],
            "bias_sites_named": association.get("sites", [])}


def _cell(stats: dict) -> str:
    lo, hi = stats["ci95"] or (float("nan"), float("nan"))
    return f"{stats['mean']:.3f} +- {stats['sd']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(result: dict) -> str:
    """The README's headline table (non-personalised arms): per protocol and arm, mean over
    site tests and pooled test (mean +- sd over seeds [95% t-interval]), each site's mean,
    and FLamby's published figure."""
    head = ("| protocol | arm | mean over site tests | pooled test | " + " | ".join(CENTRES)
            + " | FLamby (mean / pooled) |")
    lines = [head, "|" + "---|" * (5 + len(CENTRES))]
    for protocol, table in result["protocols"].items():
        for arm, row in table.items():
            if arm in PERSONALISED:
                continue
            flamby = FLAMBY.get(arm)
            ref = "" if protocol != "flamby" or flamby is None else " / ".join(
                "-" if v is None else f"{v:.3f}" for v in flamby)
            sites = " | ".join(f"{row['per_site'][c]['mean']:.3f}" for c in CENTRES)
            lines.append(f"| {protocol} | {arm} | {_cell(row['mean_over_sites'])} | "
                         f"{_cell(row['pooled_test'])} | {sites} | {ref} |")
    return "\n".join(lines)


def base_of(name: str) -> str:
    """The non-personalised arm a personalised one is compared with, seed by seed."""
    return name.split("+")[0] if "+" in name else "fedavg"


def paired(runs: list[dict], base: list[dict], key) -> dict:  # noqa: ANN001 - key: run -> float
    """Per-seed differences (same seed, same data) of a personalised arm over its base."""
    return summarise([key(r) - key(b) for r, b in zip(runs, base)])


def personalised_markdown(result: dict) -> str:
    """The table of personalised arms, beside the bias verdict: mean over site tests, its
    paired gain over the base arm, each site's accuracy with its own paired gain (the gain
    sits in Switzerland), and in how many runs the bias checks raised an alarm."""
    head = ("| protocol | arm | mean over site tests | gain over base (paired) | "
            + " | ".join(f"{c} (gain)" for c in CENTRES) + " | bias alarm | sites named |")
    lines = [head, "|" + "---|" * (6 + len(CENTRES))]
    for protocol, table in result["protocols"].items():
        for arm, row in table.items():
            base = table.get(base_of(arm))
            if arm not in PERSONALISED or base is None:
                continue
            gain = paired(row["runs"], base["runs"], lambda r: r["mean_over_sites"])
            sites = " | ".join(
                f"{row['per_site'][c]['mean']:.3f} ({paired(row['runs'], base['runs'], lambda r, c=c: r['per_site'][c])['mean']:+.3f})"
                for c in CENTRES)
            recorded = [r for r in row["runs"] if "bias_alarm" in r]
            alarms = (f"{sum(bool(r['bias_alarm']) for r in recorded)} of {len(recorded)}"
                      if recorded else "not recorded")
            named = sorted({s for r in row["runs"] for s in r.get("bias_sites_named", [])})
            lines.append(f"| {protocol} | {arm} (vs {base_of(arm)}) | {_cell(row['mean_over_sites'])} | "
                         f"{gain['mean']:+.3f} +- {gain['sd']:.3f} | {sites} | "
                         f"{alarms} | {', '.join(named) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44, 45, 46])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "heart.json")
    parser.add_argument("--table", action="store_true", help="print the tables of an existing --out and stop")
    parser.add_argument("--merge", action="store_true",
                        help="add (or replace) the arms run now in an existing --out, keeping the others")
    args = parser.parse_args()
    if args.table:
        result = json.loads(args.out.read_text())
        print(markdown(result) + "\n\n" + personalised_markdown(result))
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # a 13-feature model: threads only add contention
    invocation = {"machine": describe(shared_machine=True), "loadavg_start": os.getloadavg(), "arms": args.arms,
                  "seeds": args.seeds}
    started = time.time()
    result = {"budget": "logreg, 15 rounds x 100 SGD steps (lr 0.01), batch 4; Flower defaults "
                        "for server optimisers (eta 0.1, tau 1e-3); FedProx mu 0.01; fine-tuning: "
                        "one round's budget (100 SGD steps) from the global model before each evaluation",
              "runner": "in-process grid (fedir.simulations.inprocess), no Ray",
              "flamby_published": FLAMBY, "protocols": {}}
    if args.merge:
        result = {**json.loads(args.out.read_text()), **{k: v for k, v in result.items() if k != "protocols"}}
    with tempfile.TemporaryDirectory() as tmp:
        counts = import_heart(Path(tmp) / "heart")
        sites = ";".join(str(Path(tmp) / "heart" / c) for c in CENTRES)
        result["sites"] = counts
        for protocol, label in (("site", "flamby"), ("federated", "like_for_like")):
            table = result["protocols"].setdefault(label, {})
            for name in args.arms:
                arm, strategy, personalise = ARMS[name]
                runs = [run_one(sites, arm, strategy, personalise, protocol, seed,
                                Path(tmp) / f"{label}-{name}-{seed}", smote=name.endswith("+smote"))
                        for seed in args.seeds]
                table[name] = {
                    "mean_over_sites": summarise([r["mean_over_sites"] for r in runs]),
                    "pooled_test": summarise([r["pooled_test"] for r in runs]),
                    "per_site": {c: summarise([r["per_site"][c] for r in runs]) for c in CENTRES},
                    "runs": runs,
                }
                print(f"{label:14s} {name:21s} mean-over-sites {table[name]['mean_over_sites']['mean']:.3f}"
                      f" +- {table[name]['mean_over_sites']['sd']:.3f}  pooled-test "
                      f"{table[name]['pooled_test']['mean']:.3f}  "
                      + " ".join(f"{c} {table[name]['per_site'][c]['mean']:.3f}" for c in CENTRES), flush=True)
    invocation["loadavg_end"] = os.getloadavg()
    invocation["wall_s"] = time.time() - started
    if args.merge:
        result.setdefault("invocations", []).append(invocation)
    else:
        result.update({"machine": invocation["machine"], "loadavg_start": invocation["loadavg_start"],
                       "loadavg_end": invocation["loadavg_end"], "wall_s": invocation["wall_s"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
