"""Site-specific normalisation on a synthetic XA federation: FedAvg, FedBN, AdaBN before scoring.

Protocol (issue 14): a federation like `make demo`'s (fedir.simulations.synthetic, 4 sites,
half the patients unlabelled), supervised training of resnet_small with the default recipe
(weak augmentation of the labelled batch). Training runs, each through fedir's own
ServerApp logic and ClientApp in one process (fedir.simulations.inprocess, no Ray):

- `fedavg`: FedAvg, constant learning rate;
- `fedbn`: FedAvg with `train.fedbn` (normalisation layers stay at the sites);
- `fedavg_cosine`: FedAvg with `train.lr-schedule = cosine` (the schedule's measurement).

Each trained federation is then scored the way a site scores it in its last evaluation
(the final global weights, a FedBN site's own normalisation layers from its node's
Flower context, fedir.client.kept_state.load_global), twice: as is, and after AdaBN
(fedir.client.adapt_bn.recompute_bn on the site's own training images, labels unused).
So `fedbn` scored as is is FedBN as it was before the fix, and `fedbn+adabn` is FedBN as
a site now scores it (under FedBN the statistics are always re-estimated; see
fedir.client.adapt_bn). Every arm scores the same test patients, so differences against
`fedavg` are paired: a patient bootstrap (resampling each site's test patients, all their
images with them) gives their 95% CIs. Per-patient scores are the mean over a patient's
images. Nothing is tuned on the test split.

    OMP_NUM_THREADS=2 nice -n 5 .venv/bin/python benchmarks/normalisation.py [--seeds 0] [--rounds 3]
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/normalisation.py --seeds 1 --merge   # add a seed
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict
from machine import describe  # benchmarks/ is on sys.path

from fedir.client.adapt_bn import recompute_bn
from fedir.client.client_app import build_client_app
from fedir.client.inputs import SiteView, view_of
from fedir.client.kept_state import load_global
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.metrics import site_metrics
from fedir.models import build_model, kept_keys
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.synthetic import generate_federation

TRAINING = {  # run -> Settings overrides
    "fedavg": {},
    "fedbn": {"train_fedbn": True},
    "fedavg_cosine": {"train_lr_schedule": "cosine"},
}
BASELINE = "fedavg"




def auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC (ties count half)."""
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def held_out_rows(view: SiteView) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The site's labelled test images, labels and patient ids (prefixed by the site)."""
    keep = view.test_y >= 0
    patients = [f"{view.name}/{p}" for p, k in zip(view.test_patients, keep.tolist()) if k]
    return view.test_x[keep], view.test_y[keep].numpy(), patients


def site_scores(settings: Settings, out: Path, grid: InProcessGrid, views: dict[str, SiteView]) -> dict:
    """site -> {"plain": scores, "adabn": scores} of the final model as each site scores it."""
    state = torch.load(out / "model.pt", weights_only=True)
    result = {}
    for node, context in grid.contexts.items():
        view = views[f"site-{node - 100}"]
        model = build_model("resnet_small")
        load_global(model, state, context.state if settings.train_fedbn else RecordDict(), kept_keys(model, settings))
        x, _, _ = held_out_rows(view)
        adapted = recompute_bn(copy.deepcopy(model), view.train_x, settings.train_batch_size, pick_device())
        result[view.name] = {"plain": predict(model, x, pick_device()), "adabn": predict(adapted, x, pick_device())}
    return result


def patient_means(y: np.ndarray, s: np.ndarray, patients: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One row per patient: its label and the mean score of its images."""
    ids = sorted(set(patients))
    index = {p: i for i, p in enumerate(ids)}
    rows = np.array([index[p] for p in patients])
    scores = np.bincount(rows, weights=s, minlength=len(ids)) / np.bincount(rows, minlength=len(ids))
    labels = np.zeros(len(ids))
    labels[rows] = y
    return labels, scores, ids


def arm_metrics(per_site: dict, n_boot: int, seed: int) -> dict:
    """Per site and pooled: mean score per class, sensitivity / specificity at 0.5 and the
    image- and patient-level AUCs with patient-bootstrap CIs (fedir.metrics.site_metrics)."""
    out: dict = {"per_site": {}}
    all_y, all_s, all_p = [], [], []
    for site, (y, s, patients) in per_site.items():
        py, ps, ids = patient_means(y, s, patients)
        image = site_metrics(y, s, patients, n_boot=n_boot, seed=seed)
        patient = site_metrics(py, ps, ids, n_boot=n_boot, seed=seed)
        out["per_site"][site] = {
            "mean_score_negative": float(s[y == 0].mean()), "mean_score_positive": float(s[y == 1].mean()),
            "image": {k: image[k] for k in ("auc", "auc_ci", "sensitivity", "specificity", "n", "positives")},
            "patient": {k: patient[k] for k in ("auc", "auc_ci", "sensitivity", "specificity", "n", "positives")},
        }
        all_y.append(y)
        all_s.append(s)
        all_p += patients
    y, s = np.concatenate(all_y), np.concatenate(all_s)
    py, ps, ids = patient_means(y, s, all_p)
    keys = ("auc", "auc_ci", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci", "n", "positives")
    out["pooled_image"] = {k: v for k, v in site_metrics(y, s, all_p, n_boot=n_boot, seed=seed).items() if k in keys}
    out["pooled_patient"] = {k: v for k, v in site_metrics(py, ps, ids, n_boot=n_boot, seed=seed).items() if k in keys}
    means = [v["mean_score_negative"] for v in out["per_site"].values()]
    out["site_offset_range_negative"] = max(means) - min(means)  # spread of the sites' mean negative score
    return out


def paired_differences(arms: dict, per_arm_sites: dict, n_boot: int, seed: int) -> dict:
    """AUC(arm) - AUC(fedavg), image- and patient-level, pooled over the sites, with a 95%
    patient-bootstrap CI (each site's test patients resampled with replacement)."""
    base = per_arm_sites[BASELINE]
    rng = np.random.default_rng(seed)
    sites = list(base)
    # patients of each site, and their image indices in the pooled arrays (same for every arm)
    y = np.concatenate([base[s][0] for s in sites])
    patients = [p for s in sites for p in base[s][2]]
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        by_patient.setdefault(p, []).append(i)
    site_patients = [[p for p in dict.fromkeys(base[s][2])] for s in sites]
    draws = []
    for _ in range(n_boot):
        chosen = [p for group in site_patients for p in rng.choice(group, size=len(group), replace=True)]
        draws.append(chosen)

    def both(scores: np.ndarray, chosen: list[str]) -> tuple[float, float]:
        idx = [i for p in chosen for i in by_patient[p]]
        image = auc(y[idx], scores[idx])
        py = np.array([y[by_patient[p][0]] for p in chosen])
        ps = np.array([scores[by_patient[p]].mean() for p in chosen])
        return image, auc(py, ps)

    everyone = list(dict.fromkeys(patients))
    base_scores = np.concatenate([base[s][1] for s in sites])
    base_point = both(base_scores, everyone)
    base_boot = [both(base_scores, c) for c in draws]
    out = {}
    for arm in arms:
        if arm == BASELINE:
            continue
        scores = np.concatenate([per_arm_sites[arm][s][1] for s in sites])
        point = both(scores, everyone)
        boot = np.array([np.subtract(both(scores, c), b) for c, b in zip(draws, base_boot)])
        out[arm] = {
            "image_auc_diff": point[0] - base_point[0],
            "image_auc_diff_ci": np.nanpercentile(boot[:, 0], [2.5, 97.5]).tolist(),
            "patient_auc_diff": point[1] - base_point[1],
            "patient_auc_diff_ci": np.nanpercentile(boot[:, 1], [2.5, 97.5]).tolist(),
        }
    return out


def run_seed(args: argparse.Namespace, seed: int, tmp: Path, save: Callable[[dict], None]) -> dict:
    fed = tmp / f"fed-{seed}"
    record = generate_federation(fed, sites=args.sites, patients=args.patients, seed=seed,
                                 unlabelled_fraction=args.unlabelled, image_size=args.image_size, progress=False)
    sites = [fed / s for s in record["sites"]]
    per_arm_sites: dict[str, dict] = {}
    runs = {}
    for name in args.runs:
        settings = Settings(
            federation_sites=";".join(str(s) for s in sites), train_rounds=args.rounds,
            train_local_epochs=args.local_epochs, train_batch_size=16, train_lr=args.lr, train_seed=seed,
            model_name="resnet_small", model_image_size=args.image_size, eval_bootstrap=50, bias_embedding=False,
            eval_adapt_bn=False,  # the runs' own summary is the plain scoring (FedBN's is adapted regardless)
            **TRAINING[name],
        )
        views = {Path(s).name: view_of(str(s), settings) for s in sites}
        started = time.time()
        out = tmp / f"run-{seed}-{name}"
        grid = InProcessGrid(build_client_app(settings), len(sites), settings.to_run_config())
        summary = run_study(grid, settings, out, scenario="benchmark")
        scores = site_scores(settings, out, grid, views)
        runs[name] = {"wall_s": round(time.time() - started, 1),
                      "summary_per_site_auc": {s: v["auc"] for s, v in summary["per_site"].items()}}
        for variant in ("plain", "adabn"):
            arm = name if variant == "plain" else f"{name}+adabn"
            per_arm_sites[arm] = {}
            for site, view in views.items():
                _, y, patients = held_out_rows(view)
                per_arm_sites[arm][site] = (y, scores[site][variant], patients)
        print(f"seed {seed} {name}: {runs[name]['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f}", flush=True)
        arms = {arm: arm_metrics(per_site, args.bootstrap, seed) for arm, per_site in per_arm_sites.items()}
        block = {"federation": record, "runs": runs, "arms": arms,
                 "paired_vs_fedavg": paired_differences(arms, per_arm_sites, args.bootstrap, seed)}
        save(block)  # after every training run: a slow machine still leaves what it finished
    return block


def markdown(result: dict) -> str:
    lines = ["| seed | arm | site mean score neg / pos (sites 0-3) | spec / sens at 0.5 (images) | image AUC [95% CI] "
             "| patient AUC [95% CI] | patient AUC - fedavg [95% CI] |", "|---|---|---|---|---|---|---|"]
    for seed, block in result["seeds"].items():
        for arm, m in block["arms"].items():
            means = " ".join(f"{v['mean_score_negative']:.2f}/{v['mean_score_positive']:.2f}" for v in m["per_site"].values())
            im, pa = m["pooled_image"], m["pooled_patient"]
            diff = block["paired_vs_fedavg"].get(arm)
            d = "" if diff is None else (f"{diff['patient_auc_diff']:+.3f} [{diff['patient_auc_diff_ci'][0]:+.3f}, "
                                         f"{diff['patient_auc_diff_ci'][1]:+.3f}]")
            lines.append(f"| {seed} | {arm} | {means} | {im['specificity']:.2f} / {im['sensitivity']:.2f} | "
                         f"{im['auc']:.3f} [{im['auc_ci'][0]:.3f}, {im['auc_ci'][1]:.3f}] | "
                         f"{pa['auc']:.3f} [{pa['auc_ci'][0]:.3f}, {pa['auc_ci'][1]:.3f}] | {d} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", nargs="+", default=list(TRAINING))
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=120, help="per site, as make demo")
    parser.add_argument("--unlabelled", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "normalisation.json")
    parser.add_argument("--table", action="store_true", help="print the table of an existing --out and stop")
    parser.add_argument("--merge", action="store_true", help="keep the seeds an existing --out already holds")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(args.out.read_text())))
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    result = {"machine": describe(shared_machine="yes: 2 cores shared with 3 other jobs (tests, other benchmarks) throughout"),
              "loadavg_start": os.getloadavg(),
              "budget": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("table", "merge")},
              "model": "resnet_small (MONAI ResNet, basic blocks 16-128), AdamW, batch 16, supervised, train.augment = weak",
              "runner": "in-process grid (fedir.simulations.inprocess), no Ray", "seeds": {}}
    if args.merge and args.out.exists():
        earlier = json.loads(args.out.read_text())
        result["seeds"] = earlier["seeds"]
        result["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {k: earlier.get(k) for k in ("machine", "budget", "loadavg_start", "loadavg_end", "wall_s")}]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            def save(block: dict, key: str = str(seed)) -> None:
                result["seeds"][key] = block
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({**result, "partial": True}, indent=1))

            run_seed(args, seed, Path(tmp), save)
    result["loadavg_end"] = os.getloadavg()
    result["wall_s"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
