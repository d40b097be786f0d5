"""Calibrate the Frankenstein detector: false alarms on clean federations, detection on confounded ones.

Every federation is a full fedir study (the real ClientApp, strategy, per-site capture and
bias analysis) run in-process (fedir.simulations.inprocess). Families:

- clean: MedMNIST files cut IID into K sites (`fedir data import medmnist`) with different
  seeds and site counts, and clean synthetic XA federations (`fedir data synth`);
- confounded MedMNIST (PneumoniaMNIST, 74% positive): a prevalence skew of strength S
  (a share S of site-0's negatives dropped by the importer, and a share S of every other
  site's positives dropped here, so that positives gather at site-0: S = 0.95 gives about
  98% against 12%), with and without a burned-in marker patch at site-0, and the marker
  alone;
- confounded synthetic XA: `--confound` strength c;
- the real case: the UCI Heart Disease four hospitals (`fedir data import heart`), logistic
  regression as in benchmarks/heart.py; its verdict must name Switzerland.

Honest thresholds: the thresholds are chosen on a separate *tuning* set of clean
federations (their own seeds), never on the federations whose alarm rates are reported.
Rule: each signal keeps its default threshold unless a tuning federation's statistic
crosses it; then the threshold moves just past the largest tuning value. The verdict of
every reported federation is then recomputed with those thresholds by the same
`fedir.strategies.frankenstein.analyse` the server runs, from the inputs captured at the
run's last round.

Results: benchmarks/results/bias_calibration.json (every federation's signals, the chosen
thresholds, the false-alarm rate, the detection curve per family and strength).

    python benchmarks/bias_calibration.py [--reps 5] [--work DIR]
    python benchmarks/bias_calibration.py --add-strengths 0.2 0.35   # more points on the
        # MedMNIST curves, with the thresholds already chosen in the results file
    python benchmarks/bias_calibration.py --families synthetic heart --reps 6 \
        --out benchmarks/results/bias_calibration_synthetic.json   # the tuning set and these only
    python benchmarks/bias_calibration.py --stability --rounds 4   # the verdict of every round,
        # per seed, on clean and --confound 0.5 synthetic XA: benchmarks/results/bias_stability.json
    python benchmarks/bias_calibration.py --null 1000   # the gap's false alarms on simulated clean
        # federations (no training), per image and per patient: benchmarks/results/bias_gap_null.json

Studies write under --work and keep their bias inputs there (the stability measurement,
every round's); a later call with the same --work and protocol judges those again without
training (named with a hash of the synthetic generator's source, so that a changed generator
is never reused).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import pickle
import subprocess
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from machine import describe  # benchmarks/ is on sys.path

from fedir.config import Settings
from fedir.metrics import site_metrics
from fedir.server import server_app
from fedir.server.runstore import RunStore
from fedir.simulations import synthetic
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.medmnist import import_medmnist
from fedir.simulations.synthetic import generate_federation
from fedir.simulations.uci_heart import CENTRES, import_heart
from fedir.strategies.bias import pooled_vs_within_auc
from fedir.strategies.frankenstein import Thresholds, analyse

RESULTS = Path(__file__).parent / "results" / "bias_calibration.json"
DATA = Path(os.environ.get("FEDIR_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


class Captured:
    """The inputs of the server's `analyse` calls: `last` (the final round, with cross-site)
    and `rounds` (each evaluated round's, in order, the last with cross-site where it ran).

    The server calls `analyse` once per evaluated round, in order, and once more for the last
    round with the cross-site matrix (StudyRecorder.on_cross_site), which replaces that
    round's verdict in the store; `rounds` mirrors that.
    """

    def __init__(self) -> None:
        self.last: tuple | None = None
        self.rounds: list[tuple] = []
        self._real = server_app.analyse

    def __call__(self, label_counts, per_site, moments, thresholds, cross_site=None, seed=0, **kwargs):
        self.last = (dict(label_counts), dict(per_site), dict(moments), cross_site, seed)
        if cross_site is not None and self.rounds:
            self.rounds[-1] = self.last
        else:
            self.rounds.append(self.last)
        return self._real(label_counts, per_site, moments, thresholds, cross_site, seed, **kwargs)


def medmnist_federation(work: Path, name: str, *, sites: int, seed: int, skew: float = 0.0,
                        marker: bool = False) -> list[str]:
    out = work / f"{name}-k{sites}-s{seed}-skew{skew}-m{int(marker)}"
    if not (out / "federation.json").exists():
        import_medmnist(DATA / "medmnist" / f"{name}.npz", out, sites=sites, seed=seed,
                        prevalence_skew=skew, marker_site=0 if marker else None)
        rng = np.random.default_rng(seed)
        for k in range(1, sites):
            deplete_positives(out / f"site-{k}" / "manifest.csv", skew, rng)
    return [str(out / f"site-{k}") for k in range(sites)]


def deplete_positives(manifest: Path, share: float, rng: np.random.Generator) -> None:
    """Drop a random `share` of the positive rows (every split) from a site's manifest."""
    if share <= 0:
        return
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0])
    keep = [r for r in rows if not (r["label"] == "1" and rng.random() < share)]  # every row labelled
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)





def generator_version() -> str:
    """A hash of the synthetic XA generator's source: in the names of the federations (and
    kept inputs) written under --work, so that a changed generator never reuses old ones."""
    return hashlib.sha1(Path(synthetic.__file__).read_bytes()).hexdigest()[:10]


def synthetic_federation(work: Path, *, sites: int, seed: int, confound: float) -> list[str]:
    out = work / f"synth-{generator_version()}-k{sites}-s{seed}-c{confound}"
    generate_federation(out, sites=sites, patients=60, seed=seed, confound=confound,
                        unlabelled_fraction=0.0, image_size=64, progress=False)
    return [str(out / f"site-{k}") for k in range(sites)]


def study(sites: list[str], out: Path, *, image_size: int, seed: int, rounds: int, steps: int) -> dict:
    """One full study; returns the captured bias inputs and the default verdict."""
    settings = Settings(
        federation_sites=";".join(sites), train_rounds=rounds, train_local_steps=steps,
        train_batch_size=32, model_image_size=image_size, eval_bootstrap=200, train_seed=seed,
        bias_cross_site=True,  # the calibration covers the cross-site signal too
    )
    capture = Captured()
    server_app.analyse = capture
    try:
        start = time.perf_counter()
        summary = run_inprocess(settings, out)
        seconds = time.perf_counter() - start
    finally:
        server_app.analyse = capture._real
    return {"inputs": capture.last, "rounds": capture.rounds, "seconds": seconds,
            "pooled_auc": summary["global"]["auc"]}


STATISTICS = {  # per signal, the numbers worth keeping for every federation
    "site_label_association": ("p_value", "cramers_v"),
    "pooled_vs_within_auc": ("gap", "gap_ci"),
    "auc_heterogeneity": ("p_value", "i2"),
    "site_separability": ("site_accuracy", "class_accuracy", "excess"),
    "cross_site": ("gap", "gap_ci"),
}


def verdict_of(inputs: tuple, thresholds: Thresholds) -> dict:
    label_counts, per_site, moments, cross_site, seed = inputs
    return analyse(label_counts, per_site, moments, thresholds, cross_site, seed)


def summarise(v: dict) -> dict:
    return {
        "alarm": v["alarm"], "signals": v["signals"], "warned": bool(v.get("warnings")),
        "sites": sorted({s for t in v["tests"].values() if t.get("alarm") for s in t.get("sites", [])}),
        "stats": {name: {k: v["tests"][name].get(k) for k in keys}
                  for name, keys in STATISTICS.items() if name in v["tests"]},
    }


def choose_thresholds(tuning: list[dict], default: Thresholds) -> tuple[Thresholds, list[str]]:
    """Move a threshold just past the largest clean tuning value where one crosses it."""
    chosen, notes = default, []
    margin = 0.01

    def worst(signal: str, key: str, index: int | None = None) -> float | None:
        values = []
        for run in tuning:
            value = run["stats"].get(signal, {}).get(key)
            if value is not None:
                values.append(value[index] if index is not None else value)
        return max(values) if values else None

    gap_low = worst("pooled_vs_within_auc", "gap_ci", 0)
    gap = worst("pooled_vs_within_auc", "gap")
    if gap_low is not None and gap_low > 0 and gap is not None and gap > chosen.max_auc_gap:
        chosen = replace(chosen, max_auc_gap=round(gap + margin, 3))
        notes.append(f"max_auc_gap raised to {chosen.max_auc_gap} (a clean tuning gap of {gap:.3f})")
    i2 = [r["stats"]["auc_heterogeneity"] for r in tuning if "auc_heterogeneity" in r["stats"]]
    fired = [s["i2"] for s in i2 if s["p_value"] is not None and s["p_value"] < chosen.alpha and s["i2"] >= chosen.min_i2]
    if fired:
        chosen = replace(chosen, min_i2=round(min(max(fired) + margin, 0.99), 3))
        notes.append(f"min_i2 raised to {chosen.min_i2}")
    for run in tuning:
        sep = run["stats"].get("site_separability", {})
        if sep.get("site_accuracy") is not None and sep["site_accuracy"] >= chosen.min_site_accuracy \
                and (sep.get("excess") or 0) >= chosen.min_separability_excess:
            chosen = replace(chosen, min_site_accuracy=round(min(sep["site_accuracy"] + margin, 1.0), 3))
            notes.append(f"min_site_accuracy raised to {chosen.min_site_accuracy}")
    cs = worst("cross_site", "gap")
    cs_low = worst("cross_site", "gap_ci", 0)
    if cs is not None and cs_low is not None and cs > chosen.max_cross_site_gap and cs_low > 0:
        chosen = replace(chosen, max_cross_site_gap=round(cs + margin, 3))
        notes.append(f"max_cross_site_gap raised to {chosen.max_cross_site_gap}")
    return chosen, notes


def plan(reps: int) -> list[dict]:
    """Every federation of the benchmark: its role, family, condition and strength."""
    runs = []
    for i in range(5):  # tuning: clean, own seeds
        runs.append({"role": "tuning", "family": "pneumoniamnist", "condition": "clean", "strength": 0.0,
                     "seed": 100 + i, "sites": 3 + i % 3})
    for i in range(16):  # reported clean: MedMNIST IID with various seeds and site counts
        name = "pneumoniamnist" if i < 12 else "breastmnist"
        runs.append({"role": "clean", "family": name, "condition": "clean", "strength": 0.0,
                     "seed": i, "sites": 3 + i % 4 if name == "pneumoniamnist" else 3})
    for i in range(4):  # reported clean: synthetic XA
        runs.append({"role": "clean", "family": "synthetic", "condition": "clean", "strength": 0.0,
                     "seed": i, "sites": 4})
    for condition in ("skew+marker", "skew"):
        for strength in (0.5, 0.8, 0.95):
            for r in range(reps):
                runs.append({"role": "confounded", "family": "pneumoniamnist", "condition": condition,
                             "strength": strength, "seed": 200 + r, "sites": 4})
    for r in range(reps):
        runs.append({"role": "confounded", "family": "pneumoniamnist", "condition": "marker",
                     "strength": 1.0, "seed": 300 + r, "sites": 4})
    for strength in (0.25, 0.5, 1.0):
        for r in range(max(reps // 2, 2)):
            runs.append({"role": "confounded", "family": "synthetic", "condition": "confound",
                         "strength": strength, "seed": 400 + r, "sites": 4})
    return runs


def execute(run: dict, work: Path, rounds: int, steps: int) -> dict:
    """One federation's study, or its result kept under `work` by an earlier call with the
    same protocol (the bias inputs are all a verdict needs, so other code can judge them)."""
    version = generator_version() if run["family"] == "synthetic" else "medmnist"
    kept = work / "kept" / (f"{run['family']}-{version}-{run['condition']}-{run['strength']}-{run['seed']}-"
                            f"{run['sites']}-r{rounds}-st{steps}.pkl")
    if kept.exists():
        return pickle.loads(kept.read_bytes())
    result = _execute(run, work, rounds, steps)
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(pickle.dumps(result))
    return result


def _execute(run: dict, work: Path, rounds: int, steps: int) -> dict:
    if run["family"] == "synthetic":
        sites = synthetic_federation(work, sites=run["sites"], seed=run["seed"], confound=run["strength"])
        size = 64
    else:
        skew = run["strength"] if "skew" in run["condition"] else 0.0
        sites = medmnist_federation(work, run["family"], sites=run["sites"], seed=run["seed"], skew=skew,
                                    marker="marker" in run["condition"])
        size = 28
    key = f"{run['family']}-{run['condition']}-{run['strength']}-{run['seed']}-{run['sites']}"
    return study(sites, work / "runs" / key, image_size=size, seed=run["seed"], rounds=rounds, steps=steps)


def heart_case(work: Path, thresholds: Thresholds) -> dict:
    """The real case: the four Heart Disease hospitals, FedAvg logistic regression (its bias
    inputs kept under `work` like every study's: see `execute`)."""
    kept = work / "kept" / "heart.pkl"
    if kept.exists():
        inputs = pickle.loads(kept.read_bytes())
    else:
        out = work / "heart"
        import_heart(out, DATA / "uci_heart_disease")
        settings = Settings(
            federation_sites=";".join(str(out / c) for c in CENTRES), model_name="logreg", train_rounds=15,
            train_local_steps=100, train_batch_size=4, train_optimizer="sgd", train_lr=0.01,
            train_weight_decay=0.0, train_seed=42, eval_bootstrap=200, bias_cross_site=True,
        )
        capture = Captured()
        server_app.analyse = capture
        try:
            run_inprocess(settings, work / "runs" / "heart")
        finally:
            server_app.analyse = capture._real
        inputs = capture.last
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_bytes(pickle.dumps(inputs))
    v = verdict_of(inputs, thresholds)
    return {**summarise(v), "reasons": v["reasons"], "warnings": v["warnings"],
            "sensitivity": v["sensitivity"]["flags"]}


def rates(runs: list[dict]) -> dict:
    table: dict = {}
    for r in runs:
        cell = table.setdefault(r["family"], {}).setdefault(r["condition"], {}).setdefault(str(r["strength"]), [])
        cell.append(r["verdict"])
    return {family: {cond: {s: {"n": len(v), "alarm_rate": float(np.mean([x["alarm"] for x in v])),
                                "warning_or_alarm_rate": float(np.mean([x["alarm"] or x["warned"] for x in v])),
                                "site0_named_rate": float(np.mean([x["alarm"] and "site-0" in x["sites"] for x in v]))}
                            for s, v in by_s.items()}
                     for cond, by_s in by_c.items()}
            for family, by_c in table.items()}


def add_strengths(args: argparse.Namespace) -> None:
    """Run the MedMNIST skew conditions at more strengths, judged with the thresholds the
    results file already chose (on its tuning federations), and add them to it."""
    result = json.loads(RESULTS.read_text())
    chosen = Thresholds(**result["chosen_thresholds"])
    default = Thresholds(**result["default_thresholds"])
    for condition in ("skew+marker", "skew"):
        for strength in args.add_strengths:
            for r in range(args.reps):
                run = {"role": "confounded", "family": "pneumoniamnist", "condition": condition,
                       "strength": strength, "seed": 200 + r, "sites": 4}
                out = execute(run, args.work, result["protocol"]["rounds"], result["protocol"]["local_steps"])
                result["federations"].append({
                    **run, "seconds": round(out["seconds"], 1), "pooled_auc": out["pooled_auc"],
                    "verdict": summarise(verdict_of(out["inputs"], chosen)),
                    "default_verdict": summarise(verdict_of(out["inputs"], default)),
                })
                print(f"{condition} {strength} seed {run['seed']}: {out['seconds']:.0f} s", flush=True)
    result["rates"] = rates(result["federations"])
    RESULTS.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps(result["rates"], indent=1))


STABILITY = Path(__file__).parent / "results" / "bias_stability.json"


def code_version() -> dict:
    """The commit the code ran from, and whether the work tree differed from it."""
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "dirty": bool(dirty)}


def stability_study(work: Path, *, confound: float, seed: int, rounds: int, steps: int, patients: int) -> dict:
    """One synthetic XA study whose every round's bias inputs are kept (in `work`, pickled), so
    that later code can judge the same rounds again without retraining. Also kept: the verdict
    the server recorded per round, with the commit of the code that recorded it."""
    key = f"synth-{generator_version()}-k4-p{patients}-s{seed}-c{confound}-r{rounds}-st{steps}"
    cache = work / "stability" / f"{key}.pkl"
    if cache.exists():
        return pickle.loads(cache.read_bytes())
    data = work / "stability" / "data" / key
    generate_federation(data, sites=4, patients=patients, seed=seed, confound=confound,
                        unlabelled_fraction=0.0, image_size=64, progress=False)
    out = work / "stability" / "runs" / key
    result = study([str(data / f"site-{k}") for k in range(4)], out, image_size=64, seed=seed, rounds=rounds,
                   steps=steps)
    with RunStore(out / "runs.sqlite") as store:
        run_id = store.latest_run_id()
        assert run_id is not None  # the study just wrote it
        recorded = [(store.bias(run_id, r) or {}).get("alarm") for r in range(1, len(result["rounds"]) + 1)]
    kept = {"rounds": result["rounds"], "seconds": result["seconds"], "pooled_auc": result["pooled_auc"],
            "recorded_alarm": recorded, "recorded_by": {**code_version(), "generator": generator_version()}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(pickle.dumps(kept))
    return kept


def changes(alarms: list[bool]) -> int:
    """How many times the verdict flips between consecutive rounds."""
    return sum(a != b for a, b in zip(alarms, alarms[1:]))


def stability(args: argparse.Namespace) -> None:
    """Per seed, the verdict of every round of a clean and a confounded synthetic federation
    (the server's default thresholds), and how often it changes over the last rounds."""
    started = time.time()
    thresholds = Thresholds()
    federations = []
    for confound in args.confounds:
        for seed in args.seeds:
            kept = stability_study(args.work, confound=confound, seed=seed, rounds=args.rounds, steps=args.steps,
                                   patients=args.patients)
            per_round = []
            for i, inputs in enumerate(kept["rounds"]):
                label_counts, per_site, moments, cross_site, run_seed = inputs
                v = analyse(label_counts, per_site, moments, thresholds, cross_site, run_seed,
                            final=i == len(kept["rounds"]) - 1)
                gap = v["tests"]["pooled_vs_within_auc"]
                per_round.append({"round": i + 1, "alarm": v["alarm"], "signals": v["signals"],
                                  "gap": {k: gap.get(k) for k in ("level", "gap", "gap_ci", "gap_ci_sites")}})
            alarms = [r["alarm"] for r in per_round]
            federations.append({
                "confound": confound, "seed": seed, "seconds": round(kept["seconds"], 1),
                "pooled_auc": kept["pooled_auc"], "final_alarm": alarms[-1], "alarms": alarms,
                "changes": changes(alarms), f"changes_last_{args.last}": changes(alarms[-args.last:]),
                "recorded_alarm": kept["recorded_alarm"], "recorded_by": kept["recorded_by"], "rounds": per_round,
            })
            print(f"confound {confound} seed {seed}: alarms per round {alarms}", flush=True)
    result = {
        "machine": describe(shared_machine=True),
        "protocol": {"sites": 4, "patients_per_site": args.patients, "rounds": args.rounds, "local_steps": args.steps,
                     "batch_size": 32, "model": "resnet_small", "image_size": 64, "eval_bootstrap": 200,
                     "thresholds": asdict(thresholds), "last_rounds": args.last},
        "judged_by": code_version(),
        "final_alarms": {str(c): sum(f["final_alarm"] for f in federations if f["confound"] == c)
                         for c in args.confounds},
        "seeds": len(args.seeds),
        "max_changes_last": max(f[f"changes_last_{args.last}"] for f in federations),
        "federations": federations,
        "wall_seconds": round(time.time() - started, 1),
    }
    out = args.stability_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("final_alarms", "seeds", "max_changes_last", "judged_by")}, indent=1))


NULL = Path(__file__).parent / "results" / "bias_gap_null.json"


def null_site(rng: np.random.Generator, patients: int, prevalence: float, shift: float) -> dict:
    """A clean site's test aggregates (fedir.metrics.site_metrics) without training: each
    patient has 1-5 images that share the patient's score level (a patient effect of SD 1,
    image noise of SD 0.3), the disease moves the score a little (0.6 on the logit), and the
    site its own way (`shift`, unrelated to the label): no confounding."""
    y = (rng.random(patients) < prevalence).astype(int)
    if y.min() == y.max():
        y[0] = 1 - y[0]
    effect = 0.6 * (y - 0.5) + shift + rng.normal(0, 1.0, patients)
    images = rng.integers(1, 6, patients)
    scores = 1 / (1 + np.exp(-(np.repeat(effect, images) + rng.normal(0, 0.3, images.sum()))))
    ids = np.repeat([f"p{i}" for i in range(patients)], images)
    return site_metrics(np.repeat(y, images), scores, ids, n_boot=50, seed=0)


def gap_null(args: argparse.Namespace) -> None:
    """How often the pooled-vs-within gap alone alarms on clean federations whose images are
    correlated within patients, judged per image and per patient (the same aggregates)."""
    started = time.time()
    rng = np.random.default_rng(args.null_seed)
    alarms = {"image": 0, "patient": 0}
    for replicate in range(args.null):
        per_site = {f"site-{k}": null_site(rng, args.null_patients, 0.4, float(rng.normal(0, 0.5)))
                    for k in range(4)}
        images_only = {site: {**m, "per_patient": None} for site, m in per_site.items()}
        alarms["patient"] += pooled_vs_within_auc(per_site, seed=replicate)["alarm"]
        alarms["image"] += pooled_vs_within_auc(images_only, seed=replicate)["alarm"]
    result = {
        "machine": describe(with_torch=False, shared_machine=True),
        "protocol": {"federations": args.null, "sites": 4, "test_patients_per_site": args.null_patients,
                     "images_per_patient": "1-5", "prevalence": 0.4, "seed": args.null_seed,
                     "max_gap": Thresholds().max_auc_gap, "bootstrap": 200},
        "code": code_version(),
        "alarms": alarms,
        "rate": {level: count / args.null for level, count in alarms.items()},
        "wall_seconds": round(time.time() - started, 1),
    }
    NULL.parent.mkdir(parents=True, exist_ok=True)
    NULL.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["rate"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="federations per confounded condition and strength")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="local optimiser steps per round")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fedir-bias-calibration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription)")
    parser.add_argument("--add-strengths", type=float, nargs="+", default=None,
                        help="only run the MedMNIST skew conditions at these strengths and add them to the results")
    parser.add_argument("--families", nargs="+", default=None,
                        choices=["pneumoniamnist", "breastmnist", "synthetic", "heart"],
                        help="only these families' reported federations (the tuning ones always run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file of a calibration run")
    parser.add_argument("--stability", action="store_true",
                        help="only the stability measurement: the verdict of every round, per seed (bias_stability.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="--stability: the seeds")
    parser.add_argument("--confounds", type=float, nargs="+", default=[0.0, 0.5], help="--stability: confound strengths")
    parser.add_argument("--patients", type=int, default=60, help="--stability: patients per site")
    parser.add_argument("--last", type=int, default=3, help="--stability: the verdict changes counted over these last rounds")
    parser.add_argument("--stability-out", type=Path, default=STABILITY, help="--stability: the results file")
    parser.add_argument("--null", type=int, default=0,
                        help="only the gap's false alarms on this many simulated clean federations (bias_gap_null.json)")
    parser.add_argument("--null-seed", type=int, default=0)
    parser.add_argument("--null-patients", type=int, default=15,
                        help="--null: test patients per site (12-19 in the 60-patient synthetic sites)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.null:
        gap_null(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stability:
        stability(args)
        return
    if args.add_strengths:
        add_strengths(args)
        return
    started = time.time()
    runs = [r for r in plan(args.reps) if r["role"] == "tuning" or not args.families or r["family"] in args.families]
    done = []
    for i, run in enumerate(runs, 1):
        result = execute(run, args.work, args.rounds, args.steps)
        done.append({**run, "inputs": result["inputs"], "seconds": round(result["seconds"], 1),
                     "pooled_auc": result["pooled_auc"]})
        print(f"[{i}/{len(runs)}] {run['role']} {run['family']} {run['condition']} {run['strength']} "
              f"seed {run['seed']}: {result['seconds']:.0f} s", flush=True)
    default = Thresholds()
    tuning = [summarise(verdict_of(r["inputs"], default)) for r in done if r["role"] == "tuning"]
    chosen, notes = choose_thresholds(tuning, default)
    reported = []
    for r in done:
        if r["role"] == "tuning":
            continue
        entry = {k: v for k, v in r.items() if k != "inputs"}
        entry["verdict"] = summarise(verdict_of(r["inputs"], chosen))
        entry["default_verdict"] = summarise(verdict_of(r["inputs"], default))
        reported.append(entry)
    clean = [r for r in reported if r["role"] == "clean"]
    heart = heart_case(args.work, chosen) if not args.families or "heart" in args.families else None
    result = {
        "machine": describe(shared_machine=True),
        "protocol": {"rounds": args.rounds, "local_steps": args.steps, "batch_size": 32, "model": "resnet_small",
                     "image_size": {"medmnist": 28, "synthetic": 64}, "eval_bootstrap": 200,
                     "tuning_federations": len(tuning), "reps": args.reps, "families": args.families or "all"},
        "code": {**code_version(), "generator": generator_version()},
        "default_thresholds": asdict(default), "chosen_thresholds": asdict(chosen), "threshold_notes": notes,
        "false_alarm_rate": float(np.mean([r["verdict"]["alarm"] for r in clean])),
        "false_alarms": sum(r["verdict"]["alarm"] for r in clean), "clean_federations": len(clean),
        "clean_warning_rate": float(np.mean([r["verdict"]["warned"] for r in clean])),
        "rates": rates(reported),
        "heart": heart,
        "tuning": tuning,
        "federations": reported,
        "wall_seconds": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=float))
    print(json.dumps({k: result[k] for k in ("chosen_thresholds", "false_alarm_rate", "clean_federations", "rates",
                                             "heart")},
                     indent=1))


if __name__ == "__main__":
    main()
