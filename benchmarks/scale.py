"""Round overhead against bare Flower, and growth to 1,000 simulated sites.

(a) Overhead: fedir's ServerApp/ClientApp against a bare Flower pair (FedAvg, a ClientApp
    that trains the same logistic regression for the same SGD steps on rows of the same
    shape and returns only weights and a count), 4 tabular sites, on Flower's simulation
    engine (Ray, two actors) in the same process, one after the other. Time per round is
    the median gap between the ends of consecutive rounds (rounds 2..R_LONG), stamped by
    wrapping Flower's `FedAvg.aggregate_evaluate`, which both servers call once per round
    (fedir's through its per-site capture): Ray's start-up and the first round's imports
    are excluded (a difference of total wall times drowned in start-up noise on this
    shared machine). The ratio is fedir / bare. `--repeat N` measures the pair N times,
    each with the load average before and after it (the machine is shared: the ratio
    within one measurement is what counts, not the wall times).
(b, c) 10, 100 and 1,000 sites, 3 rounds, logistic regression on synthetic tabular sites:
    wall time and peak resident memory of the whole process tree (this process, Ray's
    GCS and raylet, every worker), sampled every 0.2 s with psutil.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python benchmarks/scale.py
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.simulations.simulate import backend_config, simulate

N_FEATURES, ROWS, STEPS = 5, 40, 20
R_LONG = 8


def write_sites(root: Path, n: int) -> list[str]:
    """n tabular sites of ROWS patients with N_FEATURES covariates and a learnable label."""
    rng = np.random.default_rng(0)
    sites = []
    for i in range(n):
        site = root / f"site-{i:04d}"
        site.mkdir(parents=True)
        x = rng.normal(size=(ROWS, N_FEATURES))
        y = (x[:, 0] + 0.5 * rng.normal(size=ROWS) > 0).astype(int)
        with (site / "manifest.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "label", *[f"clin_x{j}" for j in range(N_FEATURES)]])
            w.writerows([f"p{k}", y[k], *np.round(x[k], 4)] for k in range(ROWS))
        sites.append(str(site))
    return sites


def settings_for(sites: list[str], rounds: int) -> Settings:
    return Settings(federation_sites=";".join(sites), model_name="logreg", train_rounds=rounds,
                    train_local_steps=STEPS, train_batch_size=4, train_optimizer="sgd",
                    train_lr=0.05, train_weight_decay=0.0, eval_bootstrap=100)


def bare_apps(rounds: int, n_sites: int) -> tuple[ServerApp, ClientApp]:
    """The bare Flower pair doing the same local work, without anything fedir adds."""
    client = ClientApp()
    data = torch.randn(ROWS * 3 // 4, N_FEATURES), torch.randint(0, 2, (ROWS * 3 // 4,))

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model = torch.nn.Linear(N_FEATURES, 2)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(STEPS):
            idx = torch.randint(0, len(data[1]), (4,))
            loss = torch.nn.functional.cross_entropy(model(data[0][idx]), data[1][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"num-examples": len(data[1])})})
        return Message(content=content, reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model = torch.nn.Linear(N_FEATURES, 2)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        acc = float((model(data[0]).argmax(1) == data[1]).float().mean())
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": len(data[1]), "accuracy": acc})}),
                       reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        FedAvg(min_train_nodes=n_sites, min_evaluate_nodes=n_sites, min_available_nodes=n_sites).start(
            grid=grid, initial_arrays=ArrayRecord(torch.nn.Linear(N_FEATURES, 2).state_dict()),
            num_rounds=rounds)

    return server, client


class TreeMemory:
    """Peak summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn) -> dict:  # noqa: ANN001
    start = time.perf_counter()
    with TreeMemory() as mem:
        fn()
    return {"wall_s": time.perf_counter() - start, "peak_rss_gib": mem.peak / 2**30}


def round_ends(run) -> list[float]:
    """Run `run()` and return the time at which each round's evaluation was aggregated."""
    stamps: list[float] = []
    original = FedAvg.aggregate_evaluate

    def stamped(self, server_round, replies):  # noqa: ANN001, ANN202
        out = original(self, server_round, replies)
        stamps.append(time.perf_counter())
        return out

    FedAvg.aggregate_evaluate = stamped
    try:
        run()
    finally:
        FedAvg.aggregate_evaluate = original
    return stamps


def overhead(root: Path) -> dict:
    sites = write_sites(root / "four", 4)
    s = settings_for(sites, R_LONG)
    server, client = bare_apps(R_LONG, 4)
    ends = {
        "fedir": round_ends(lambda: simulate(s, root / "fedir", "scale")),
        "bare": round_ends(lambda: run_simulation(server_app=server, client_app=client, num_supernodes=4,
                                                  backend_config=backend_config(s))),
    }
    gaps = {k: [b - a for a, b in zip(v, v[1:])] for k, v in ends.items()}
    per_round = {k: statistics.median(v) for k, v in gaps.items()}
    # Flower's engine polls every 0.1 s, so a gap is 0.2, 0.3 or 0.4 s depending on where a
    # round falls between polls: the mean over the rounds is the steadier figure beside the median
    means = {k: statistics.mean(v) for k, v in gaps.items()}
    return {"round_gaps_s": gaps, "per_round_s": per_round, "ratio": per_round["fedir"] / per_round["bare"],
            "mean_round_s": means, "ratio_of_means": means["fedir"] / means["bare"]}


def repeated_overhead(root: Path, repeat: int) -> dict:
    """`overhead` `repeat` times, each with the load average around it, and the median ratio."""
    runs = []
    for i in range(repeat):
        before = os.getloadavg()
        run = overhead(root / f"overhead-{i}")
        runs.append({**run, "loadavg_before": before, "loadavg_after": os.getloadavg()})
        print("overhead", run["per_round_s"], run["ratio"], flush=True)
    return {"runs": runs, "ratio_median": statistics.median(r["ratio"] for r in runs),
            "ratio_of_means_median": statistics.median(r["ratio_of_means"] for r in runs)}


def growth(root: Path, sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        sites = write_sites(root / f"n{n}", n)
        s = settings_for(sites, 3)
        before = os.getloadavg()
        out[str(n)] = timed(lambda s=s, n=n: simulate(s, root / f"run-{n}", "scale"))
        out[str(n)]["loadavg_before"], out[str(n)]["loadavg_after"] = before, os.getloadavg()
        print(n, out[str(n)], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="*", default=[10, 100, 1000])
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="measure the 4-site overhead this many times")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    result = {"machine": describe(shared_machine=True),
              "loadavg_start": os.getloadavg(), "steps": STEPS, "rows_per_site": ROWS}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every measurement: a run cut short still leaves its numbers
        result["loadavg_end"] = os.getloadavg()
        args.out.write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_overhead:
            result["overhead"] = repeated_overhead(Path(tmp), args.repeat)
            save()
        result["growth"] = {}
        for n in args.sizes:
            result["growth"].update(growth(Path(tmp), [n]))
            save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
