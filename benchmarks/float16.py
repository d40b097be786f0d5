"""float16 updates: bytes a site uploads per round and the accuracy change, paired by seed.

Heart (like-for-like protocol, FedAvg, logistic regression and the MLP, FLamby's budget,
seeds 42-46) run twice per seed through the in-process grid, with `train.update-dtype`
float32 and float16; the grid counts the serialised weights every site sends. For the
imaging models, the serialised size of one update is measured directly (no training).

`--medmnist`: PneumoniaMNIST cut into 4 IID sites (`fedir data import medmnist`, every
training label kept), resnet_small at 28x28, FedAvg, 5 rounds x 20 local AdamW steps of
batch 32, seeds 0-2, float32 and float16 updates; the final model's AUC on the whole
official test split (bootstrap 95% CI), paired by seed; results in float16_medmnist.json.

    .venv/bin/python benchmarks/float16.py [--medmnist]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

import torch
from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.models import build_model, state_arrays
from fedir.protocol import encode_weights, payload_bytes
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.uci_heart import CENTRES, import_heart

SEEDS = (42, 43, 44, 45, 46)
ROUNDS = 15


def medmnist(rounds: int = 5, steps: int = 20, seeds: tuple[int, ...] = (0, 1, 2)) -> None:
    """float32 against float16 updates on a PneumoniaMNIST federation (see the docstring)."""
    from semi_supervised import DATA, score, split_tensors  # benchmarks/ is on sys.path

    from fedir.simulations.medmnist import import_medmnist

    result = {"machine": describe(shared_machine=True), "loadavg_start": os.getloadavg(),
              "budget": {"sites": 4, "partition": "iid", "rounds": rounds, "local_steps": steps,
                         "batch_size": 32, "model": "resnet_small 28x28", "seeds": list(seeds)},
              "runs": {"float32": [], "float16": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            record = import_medmnist(DATA / "pneumoniamnist.npz", Path(tmp) / f"fed{seed}", sites=4,
                                     partition="iid", seed=seed)
            sites = [Path(tmp) / f"fed{seed}" / s for s in record["per_site"]]
            test = split_tensors(sites, "test", 28)
            for dtype in ("float32", "float16"):
                s = Settings(federation_sites=";".join(map(str, sites)), model_image_size=28,
                             train_rounds=rounds, train_local_steps=steps, train_batch_size=32,
                             train_seed=seed, train_update_dtype=dtype, eval_bootstrap=100)
                out = Path(tmp) / f"run-{seed}-{dtype}"
                summary = run_inprocess(s, out)
                auc = score(torch.load(out / "model.pt", weights_only=True), test, 28, seed)
                result["runs"][dtype].append({**auc, "upload_bytes_per_round": summary["upload_bytes"] / rounds})
                print(seed, dtype, f"AUC {auc['auc']:.4f}", flush=True)
    diffs = [b["auc"] - a["auc"] for a, b in zip(result["runs"]["float32"], result["runs"]["float16"])]
    result.update(paired_auc_diffs=diffs, paired_diff_mean=statistics.fmean(diffs),
                  paired_diff_sd=statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                  auc={d: statistics.fmean(r["auc"] for r in runs) for d, runs in result["runs"].items()},
                  loadavg_end=os.getloadavg())
    out = Path(__file__).parent / "results" / "float16_medmnist.json"
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("auc", "paired_auc_diffs", "paired_diff_mean")}), f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--medmnist", action="store_true", help="the PneumoniaMNIST comparison instead of heart")
    if parser.parse_args().medmnist:
        logging.getLogger("flwr").setLevel(logging.ERROR)
        torch.set_num_threads(1)
        medmnist()
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    result = {"machine": describe(shared_machine=True),
              "loadavg_start": os.getloadavg(), "heart": {}, "imaging_update_bytes": {}}
    for name in ("resnet_small", "resnet10"):
        state = state_arrays(build_model(name))
        result["imaging_update_bytes"][name] = {d: payload_bytes(encode_weights(state, dtype=d))
                                                for d in ("float32", "float16")}
    with tempfile.TemporaryDirectory() as tmp:
        import_heart(Path(tmp) / "heart")
        sites = ";".join(str(Path(tmp) / "heart" / c) for c in CENTRES)
        for model in ("logreg", "mlp"):
            runs: dict[str, list] = {"float32": [], "float16": []}
            for seed in SEEDS:
                for dtype in runs:
                    s = Settings(federation_sites=sites, model_name=model, train_rounds=ROUNDS,
                                 train_local_steps=100, train_batch_size=4, train_optimizer="sgd",
                                 train_lr=0.01, train_weight_decay=0.0, train_seed=seed,
                                 train_update_dtype=dtype, eval_bootstrap=100)
                    summary = run_inprocess(s, Path(tmp) / f"{model}-{dtype}-{seed}")
                    runs[dtype].append({
                        "mean_over_sites": statistics.fmean(v["accuracy"] for v in summary["per_site"].values()),
                        "upload_bytes_per_round": summary["upload_bytes"] / ROUNDS})
            diffs = [b["mean_over_sites"] - a["mean_over_sites"] for a, b in zip(runs["float32"], runs["float16"])]
            result["heart"][model] = {
                "runs": runs,
                "bytes_per_round": {d: runs[d][0]["upload_bytes_per_round"] for d in runs},
                "accuracy": {d: statistics.fmean(r["mean_over_sites"] for r in runs[d]) for d in runs},
                "paired_diff_mean": statistics.fmean(diffs), "paired_diff_sd": statistics.stdev(diffs),
                "paired_diffs": diffs,
            }
            print(model, json.dumps({k: v for k, v in result["heart"][model].items() if k != "runs"}), flush=True)
    result["loadavg_end"] = os.getloadavg()
    out = Path(__file__).parent / "results" / "float16.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
