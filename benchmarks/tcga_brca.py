"""Fed-TCGA-BRCA: fedir's survival task against FLamby's published figures.

fedir's own ServerApp logic and ClientApp in one process (fedir.simulations.inprocess, no
Ray), on the six regions written by `fedir data import tcga-brca`. FLamby's model and
budget (flamby/datasets/fed_tcga_brca/common.py): a linear Cox model, batch 8, Adam lr 0.1;
federated arms get (866 // 6 // 8) * 30 // 100 = 5 rounds of 100 local steps; FLamby's
pooled arm 30 epochs over the pooled training rows (3,248 steps of batch 8). Local Adam is
fedir's adamw with weight decay 0. Server optimisers use Flower's defaults (eta 0.1,
tau 1e-3); FedProx mu 0.01. Metric: Harrell's C (as lifelines computes it) on each
region's FLamby test set, averaged over the six regions.

Two protocols:
- "flamby": the covariates as they are (`data.standardise = "none"`: age in years beside
  one-hot columns), FLamby's pooled budget (1 round x 30 epochs);
- "like_for_like": one standardisation for everyone (`"federated"`: the sites' n / sum /
  sum of squares), and the pooled arm given the federation's budget and preprocessing
  (5 rounds x 600 steps: the six sites' 100 steps each).
"pooled_mle" (like-for-like only) is the converged pooled Cox model: lifelines'
CoxPHFitter on the pooled standardised training patients, its ridge penalty chosen by
5-fold cross-validation on them.
"pooled_lr0.01" is the pooled arm at a tenth of FLamby's learning rate (a diagnostic).
"Site K alone" trains a one-site federation on region K (the same budget as a federated
site) and scores its model on all six test sets (FLamby's "client K" rows).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tcga_brca.py [--seeds 0 1 2 3 4]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/tcga_brca.py --arms pooled_mle --protocols like_for_like --merge
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lifelines.utils import concordance_index
from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.tcga_brca import REGIONS, import_tcga_brca

FEDERATED = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")
FLAMBY = {"fedavg": 0.732, "fedprox": 0.729, "fedadagrad": 0.813, "fedadam": 0.815, "fedyogi": 0.815,
          "pooled": 0.676, **{f"alone:{r}": v for r, v in zip(REGIONS, (0.728, 0.750, 0.498, 0.656, 0.712, 0.691))}}
ROUNDS, LOCAL_STEPS, BATCH, LR = 5, 100, 8, 0.1
POOLED_EPOCHS = 30
PROTOCOLS = {"flamby": "none", "like_for_like": "federated"}
T_975_DF4 = 2.776




def summarise(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    half = T_975_DF4 * sd / len(values) ** 0.5 if len(values) == 5 else None
    return {"mean": mean, "sd": sd, "ci95": None if half is None else [mean - half, mean + half], "values": values}


def settings(sites: list[Path], arm: str, strategy: str, standardise: str, seed: int, **budget) -> Settings:
    base = dict(task_kind="survival", federation_sites=";".join(map(str, sites)), federation_arm=arm,
                strategy_name=strategy, model_name="logreg", train_rounds=ROUNDS, train_local_steps=LOCAL_STEPS,
                train_batch_size=BATCH, train_lr=LR, train_weight_decay=0.0, train_optimizer="adamw",
                train_seed=seed, data_standardise=standardise, eval_select="last", eval_bootstrap=100)
    return Settings(**{**base, **budget})


def read_test(site: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train x, test x, test time, test event, train rows' n) of a region's manifest."""
    with (site / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    features = [c for c in rows[0] if c.startswith("clin_")]
    x = {s: np.array([[float(r[c]) for c in features] for r in rows if r["split"] == s]) for s in ("train", "test")}
    test = [r for r in rows if r["split"] == "test"]
    return (x["train"], x["test"], np.array([float(r["time"]) for r in test]),
            np.array([int(r["event"]) for r in test]), np.array([len(x["train"])]))


def alone_scores(model_file: Path, train_x: np.ndarray, tests: dict, standardise: str) -> dict[str, float]:
    """A one-site model's lifelines C-index on every region's test set (standardised with
    the training site's statistics under like-for-like, as its federation of one did)."""
    state = torch.load(model_file, weights_only=True)
    w = state["weight"].numpy().reshape(-1)
    mean, std = (train_x.mean(axis=0), train_x.std(axis=0)) if standardise != "none" else (0.0, 1.0)
    std = np.where(np.asarray(std) > 1e-12, std, 1.0)
    out = {}
    for region, (x, t, e) in tests.items():
        risk = ((x - mean) / std) @ w
        out[region] = float(concordance_index(t, -risk, e))
    return out


def exact_pooled(model_file: Path, train_x: np.ndarray, tests: dict, standardise: str) -> float:
    """The raw scores' pooled C over the six test sets (lifelines), for the error of the
    pooled C rebuilt from aggregates; `train_x` are every site's training rows (their
    statistics are the federated standardisation's)."""
    state = torch.load(model_file, weights_only=True)
    w = state["weight"].numpy().reshape(-1)
    mean, std = (train_x.mean(axis=0), train_x.std(axis=0)) if standardise != "none" else (0.0, 1.0)
    std = np.where(np.asarray(std) > 1e-12, std, 1.0)
    risk = np.concatenate([((x - mean) / std) @ w for x, _, _ in tests.values()])
    return float(concordance_index(np.concatenate([t for _, t, _ in tests.values()]), -risk,
                                   np.concatenate([e for _, _, e in tests.values()])))


def pooled_mle(sites: list[Path], tests: dict, seed: int) -> dict:
    """The converged pooled Cox model (lifelines' CoxPHFitter, Efron ties) on every site's
    standardised training patients, its ridge penalty chosen by 5-fold cross-validation on
    those training patients (never on test): the ceiling the pooled arm should reach."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.utils import k_fold_cross_validation

    frames = []
    for site in sites:
        frame = pd.read_csv(site / "manifest.csv")
        frames.append(frame[frame["split"] == "train"])
    train = pd.concat(frames, ignore_index=True)
    features = [c for c in train.columns if c.startswith("clin_")]
    mean, std = train[features].mean(), train[features].std(ddof=0).replace(0, 1)
    data = pd.concat([(train[features] - mean) / std, train[["time", "event"]]], axis=1)
    scores = {}
    for penalty in (0.01, 0.1, 1.0):
        folds = k_fold_cross_validation(CoxPHFitter(penalizer=penalty), data.sample(frac=1, random_state=seed),
                                        "time", "event", k=5, scoring_method="concordance_index")
        scores[penalty] = float(np.mean(folds))
    chosen = max(scores, key=lambda p: scores[p])
    beta = CoxPHFitter(penalizer=chosen).fit(data, "time", "event").params_[features].to_numpy()
    per_site = {r: float(concordance_index(t, -(((x - mean.to_numpy()) / std.to_numpy()) @ beta), e))
                for r, (x, t, e) in tests.items()}
    return {"per_site": per_site, "mean_over_sites": statistics.fmean(per_site.values()),
            "penalizer": chosen, "cv_concordance": scores}


def run_arm(name: str, sites: list[Path], standardise: str, seed: int, out: Path, tests: dict) -> dict:
    if name == "pooled_mle":
        return pooled_mle(sites, tests, seed)
    if name.startswith("alone:"):
        region = name.split(":")[1]
        site = sites[REGIONS.index(region)]
        summary = run_inprocess(settings([site], "federated", "fedavg", standardise, seed), out)
        per_site = alone_scores(out / "model.pt", read_test(site)[0], tests, standardise)
        return {"per_site": per_site, "mean_over_sites": statistics.fmean(per_site.values()),
                "own_site_fedir": summary["per_site"][region]["c_index"]}
    if name.startswith("pooled"):
        budget = ({"train_rounds": 1, "train_local_steps": 0, "train_local_epochs": POOLED_EPOCHS}
                  if standardise == "none" else {"train_local_steps": LOCAL_STEPS * len(sites)})
        if name == "pooled_lr0.01":  # the diagnostic: the same budget at a tenth of the learning rate
            budget["train_lr"] = 0.01
        summary = run_inprocess(settings(sites, "pooled", "fedavg", standardise, seed, **budget), out)
    else:
        summary = run_inprocess(settings(sites, "federated", name, standardise, seed), out)
    per_site = {r: summary["per_site"][r]["c_index"] for r in REGIONS}
    pooled = summary["global"]
    train_x = np.concatenate([read_test(s)[0] for s in sites])
    return {"per_site": per_site, "mean_over_sites": statistics.fmean(per_site.values()),
            "pooled_c_from_aggregates": pooled["c_index"], "binning_error": pooled.get("c_index_binning_error"),
            "pooled_c_exact": exact_pooled(out / "model.pt", train_x, tests, standardise),
            "stratified_c": pooled.get("stratified_c_index"), "bias_alarm": summary["bias"]["alarm"],
            "bias_reasons": summary["bias"]["reasons"], "bias_warnings": summary["bias"].get("warnings", [])}


def markdown(result: dict) -> str:
    lines = ["| protocol | arm | mean C over the 6 test sets (mean +- sd over seeds [95% t-interval]) | "
             + " | ".join(REGIONS) + " | FLamby |", "|" + "---|" * (4 + len(REGIONS))]
    for protocol, table in result["protocols"].items():
        for arm, row in table.items():
            stats = row["mean_over_sites"]
            lo, hi = stats["ci95"] or (float("nan"), float("nan"))
            sites = " | ".join(f"{row['per_site'][r]['mean']:.3f}" for r in REGIONS)
            ref = f"{FLAMBY[arm]:.3f}" if arm in FLAMBY else "-"
            lines.append(f"| {protocol} | {arm} | {stats['mean']:.3f} +- {stats['sd']:.3f} [{lo:.3f}, {hi:.3f}] | "
                         f"{sites} | {ref} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=[*FEDERATED, "pooled", *(f"alone:{r}" for r in REGIONS)])
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tcga_brca.json")
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out and stop")
    parser.add_argument("--merge", action="store_true", help="add the arms run now to an existing --out")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    started, load_start = time.time(), os.getloadavg()
    result: dict = {"budget": f"linear Cox (Linear(39, 1)), Efron ties (torchsurv); federated: {ROUNDS} rounds x "
                              f"{LOCAL_STEPS} local Adam steps (lr {LR}, batch {BATCH}); Flower's server-optimiser "
                              "defaults (eta 0.1, tau 1e-3); FedProx mu 0.01; pooled (flamby protocol): 1 round x "
                              f"{POOLED_EPOCHS} epochs; pooled (like_for_like): {ROUNDS} rounds x 600 steps",
                    "runner": "in-process grid (fedir.simulations.inprocess), no Ray",
                    "metric": "Harrell's C-index per region test set (torchsurv at the sites; lifelines for the "
                              "site-alone models), mean over the six regions",
                    "flamby_published": FLAMBY, "seeds": args.seeds, "protocols": {}}
    if args.merge:
        previous = json.loads(args.out.read_text())
        result["protocols"] = previous["protocols"]
        result["invocations"] = [*previous.get("invocations", []),
                                 {k: previous[k] for k in ("machine", "loadavg_start", "loadavg_end", "wall_s")
                                  if k in previous}]
    with tempfile.TemporaryDirectory() as tmp:
        result["sites"] = import_tcga_brca(Path(tmp) / "brca")
        sites = [Path(tmp) / "brca" / r for r in REGIONS]
        tests = {r: read_test(s)[1:4] for r, s in zip(REGIONS, sites)}
        for protocol in args.protocols:
            table = result["protocols"].setdefault(protocol, {})
            for arm in args.arms:
                runs = [run_arm(arm, sites, PROTOCOLS[protocol], seed, Path(tmp) / f"{protocol}-{arm}-{seed}", tests)
                        for seed in args.seeds]
                table[arm] = {"mean_over_sites": summarise([r["mean_over_sites"] for r in runs]),
                              "per_site": {r: summarise([run["per_site"][r] for run in runs]) for r in REGIONS},
                              "runs": runs}
                print(f"{protocol:14s} {arm:16s} {table[arm]['mean_over_sites']['mean']:.3f} "
                      f"+- {table[arm]['mean_over_sites']['sd']:.3f}", flush=True)
    result.update(machine=describe(shared_machine=True), loadavg_start=load_start, loadavg_end=os.getloadavg(),
                  wall_s=time.time() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
