"""Differential privacy (`privacy.dp`): time per round and accuracy, with and without.

Heart (FedAvg, logistic regression, four hospitals, 15 rounds of 100 local SGD steps,
seeds 42-44) through the in-process grid (fedir.simulations.inprocess: the real
strategy stack and ClientApp, no Ray), once without DP and once per DP mode and noise
multiplier; numpy's global generator (Flower's noise) is seeded per run. The clipping
norm 0.5 is about the median update norm of the first round without DP (0.5-0.6; later
rounds 0.1-0.5). The imaging cost is measured on a synthetic two-site federation with
MONAI's ResNet (resnet_small, 0.3 M parameters, 64 x 64, 10 local steps, 3 rounds),
where clipping and noise touch every weight (timing only: see the comment there).

    .venv/bin/python benchmarks/privacy.py
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.synthetic import generate_federation
from fedir.simulations.uci_heart import CENTRES, import_heart

SEEDS = (42, 43, 44)
ROUNDS = 15
CLIP = 0.5
ARMS = [("off", 0.0)] + [("server-fixed", z) for z in (0.1, 0.5, 1.0)] + [
    ("client-fixed", 0.5), ("server-adaptive", 0.5), ("client-adaptive", 0.5)]


def _run(settings: Settings, out: Path, seed: int, rounds: int) -> dict:
    np.random.seed(seed)
    started = time.perf_counter()
    summary = run_inprocess(settings, out)
    seconds = time.perf_counter() - started
    return {"accuracy": statistics.fmean(v["accuracy"] for v in summary["per_site"].values()),
            "auc": summary["global"]["auc"], "seconds_per_round": seconds / rounds}


def main() -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    result = {"machine": describe(shared_machine=True),
              "loadavg_start": os.getloadavg(), "clipping_norm": CLIP, "heart": {}, "imaging": {}}
    with tempfile.TemporaryDirectory() as tmp:
        import_heart(Path(tmp) / "heart")
        sites = ";".join(str(Path(tmp) / "heart" / c) for c in CENTRES)
        # warm-up (imports, first site loads), so no arm's timing carries one-time costs
        run_inprocess(Settings(federation_sites=sites, model_name="logreg", train_rounds=2,
                               eval_bootstrap=10), Path(tmp) / "warm-up")
        # seeds outside, arms inside: a change of load on the shared machine hits every arm
        runs: dict[tuple[str, float], list] = {arm: [] for arm in ARMS}
        for seed in SEEDS:
            for mode, z in ARMS:
                s = Settings(federation_sites=sites, model_name="logreg", train_rounds=ROUNDS,
                             train_local_steps=100, train_batch_size=4, train_optimizer="sgd",
                             train_lr=0.01, train_weight_decay=0.0, train_seed=seed, eval_bootstrap=100,
                             privacy_dp=mode, privacy_noise_multiplier=z, privacy_clipping_norm=CLIP,
                             privacy_clipped_count_stddev=0.5)  # 4 sites: Flower's 4/20 is too little
                runs[(mode, z)].append(_run(s, Path(tmp) / f"h-{mode}-{z}-{seed}", seed, ROUNDS))
        for (mode, z), arm_runs in runs.items():
            arm = {"runs": arm_runs, **{k: statistics.fmean(r[k] for r in arm_runs)
                                        for k in ("accuracy", "auc", "seconds_per_round")}}
            result["heart"][f"{mode} z={z}"] = arm
            print(mode, z, {k: round(v, 4) for k, v in arm.items() if k != "runs"}, flush=True)
        fed = Path(tmp) / "xa"
        generate_federation(fed, sites=2, patients=40, seed=1, image_size=64, unlabelled_fraction=0.0,
                            progress=False)
        # Timing only: noise 0.1 x bound 0.05 / 2 sites keeps BatchNorm's running variances
        # positive (a noise std near 0.25, as z = 0.5 and bound 1 give, drives some negative
        # and the model's scores to NaN), and the bound is far below the updates' norms.
        for mode in ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive", "off"):
            s = Settings(federation_sites=f"{fed / 'site-0'};{fed / 'site-1'}", model_name="resnet_small",
                         model_image_size=64, train_rounds=3, train_local_steps=10, train_batch_size=16,
                         eval_bootstrap=100, privacy_dp=mode, privacy_noise_multiplier=0.1,
                         privacy_clipping_norm=0.05, privacy_clipped_count_stddev=0.5)
            run = _run(s, Path(tmp) / f"xa-{mode}-{len(result['imaging'])}", 0, 3)
            # "off" runs first (its first round decodes the images into the sites' caches)
            # and again last: the second is the one to compare
            result["imaging"][mode if mode not in result["imaging"] else "off (again, caches warm)"] = run
            print("imaging", mode, run, flush=True)
    result["loadavg_end"] = os.getloadavg()
    out = Path(__file__).parent / "results" / "privacy.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
