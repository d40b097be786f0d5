"""Secure aggregation (`privacy.secure-aggregation = "secagg+"`): time and bytes per round
against plain FedAvg, on the same federation with the same seeds.

Two federations through the in-process grid (fedir.simulations.inprocess: the real strategy
stack, ClientApp and SecAgg+ mods, every message serialised as Flower sends it, no Ray):

- heart: FedAvg, logistic regression (14 weights), the four UCI heart hospitals, 5 rounds
  of 30 local SGD steps, seeds 0-2;
- imaging: FedAvg, resnet_small (MONAI's ResNet, 0.3 M weights) at 32 x 32, three synthetic
  XA sites of 40 patients, 3 rounds of 5 local steps, seed 0, where the masks cover every
  weight.

Seeds outside, arms inside (off, secagg+, alternating), so a change of load on the shared
machine hits both arms. Bytes per round: every train and evaluate message's serialised
content, both ways (server to sites and back), over the rounds. Time per round: the median
gap between the ends of consecutive rounds' evaluations (rounds 2 on: the first round also
loads the sites).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/secure_aggregation.py
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from flwr.app import Message
from machine import describe  # benchmarks/ is on sys.path

from fedir.client.client_app import build_client_app
from fedir.config import Settings
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid, run_inprocess
from fedir.simulations.synthetic import generate_federation
from fedir.simulations.uci_heart import CENTRES, import_heart

ARMS = ("off", "secagg+")
HEART_SEEDS = (0, 1, 2)
HEART_ROUNDS = 5
IMAGING_ROUNDS = 3


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class TimedGrid(InProcessGrid):
    """The in-process grid, also noting when each evaluation stage ends and the bytes of
    the train and evaluate messages (the feature query before round 1 left out)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.round_ends: list[float] = []
        self.round_bytes = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages: list[Message] = list(messages)
        before = self.sent_bytes + self.received_bytes
        replies = list(super().send_and_receive(messages, timeout=timeout))
        if messages and messages[0].metadata.message_type in ("train", "evaluate"):
            self.round_bytes += self.sent_bytes + self.received_bytes - before
        if messages and messages[0].metadata.message_type == "evaluate":
            self.round_ends.append(time.perf_counter())
        return replies


def _run(settings: Settings, out: Path) -> dict:
    grid = TimedGrid(build_client_app(settings), len(settings.sites), settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="benchmark")
    gaps = [b - a for a, b in zip(grid.round_ends, grid.round_ends[1:])]
    return {"seconds_per_round": statistics.median(gaps), "round_gaps": gaps,
            "bytes_per_round": grid.round_bytes / settings.train_rounds,
            "auc": summary["global"]["auc"], "notes": [n["kind"] for n in summary["notes"]]}


def _compare(runs: dict[str, list[dict]]) -> dict:
    """Per arm the means, and secagg+ / off as ratios of the means and per seed."""
    out: dict = {arm: {"runs": r, "seconds_per_round": statistics.fmean(x["seconds_per_round"] for x in r),
                       "bytes_per_round": statistics.fmean(x["bytes_per_round"] for x in r),
                       "auc": statistics.fmean(x["auc"] for x in r)} for arm, r in runs.items()}
    for key in ("seconds_per_round", "bytes_per_round"):
        out[f"ratio_{key}"] = out["secagg+"][key] / out["off"][key]
        out[f"ratio_{key}_per_seed"] = [s[key] / o[key] for s, o in zip(runs["secagg+"], runs["off"])]
    out["auc_difference_per_seed"] = [s["auc"] - o["auc"] for s, o in zip(runs["secagg+"], runs["off"])]
    return out


def main() -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    result: dict = {"machine": describe(shared_machine=True),
                    "uptime_start": _uptime()}
    with tempfile.TemporaryDirectory() as tmp:
        import_heart(Path(tmp) / "heart")
        sites = ";".join(str(Path(tmp) / "heart" / c) for c in CENTRES)
        base = dict(federation_sites=sites, model_name="logreg", train_local_steps=30, train_batch_size=4,
                    train_optimizer="sgd", train_lr=0.02, train_weight_decay=0.0, eval_bootstrap=100)
        for arm in ARMS:  # warm-up: imports and first site loads, not timed
            run_inprocess(Settings(**base, train_rounds=1, privacy_secure_aggregation=arm), Path(tmp) / f"w-{arm}")
        heart: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for seed in HEART_SEEDS:
            for arm in ARMS:
                s = Settings(**base, train_rounds=HEART_ROUNDS, train_seed=seed, privacy_secure_aggregation=arm)
                heart[arm].append(_run(s, Path(tmp) / f"h-{arm}-{seed}"))
                print("heart", seed, arm, heart[arm][-1], flush=True)
        result["heart"] = _compare(heart)
        fed = Path(tmp) / "xa"
        generate_federation(fed, sites=3, patients=40, seed=1, image_size=32, unlabelled_fraction=0.0, progress=False)
        img = dict(federation_sites=";".join(str(fed / f"site-{i}") for i in range(3)), model_name="resnet_small",
                   model_image_size=32, train_rounds=IMAGING_ROUNDS, train_local_steps=5, train_batch_size=16,
                   eval_bootstrap=100)
        run_inprocess(Settings(**{**img, "train_rounds": 1}), Path(tmp) / "xa-warm")  # decodes into the caches
        imaging = {arm: [_run(Settings(**img, privacy_secure_aggregation=arm), Path(tmp) / f"xa-{arm}")]
                   for arm in ARMS}
        print("imaging", imaging, flush=True)
        result["imaging"] = _compare(imaging)
    result["uptime_end"] = _uptime()
    out = Path(__file__).parent / "results" / "secure_aggregation.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
