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

Label-fraction sweep (`--fractions 0.01 0.05 0.1`, one partition): per seed, `sup100` once
(every label; shared by every fraction), then per fraction F `sup@F` (supervised on F) and
`fixmatch@F` (the F plus the unlabelled rest; `--sweep-arms` adds mean_teacher). Every model
of a seed is scored on the same official test images, its scores kept (and written), so
that differences are paired: sup100 - sup@F and fixmatch@F - sup@F, each with a paired
bootstrap 95% CI (fedir.metrics.paired_auc_difference, the same resamples for both). The
gap counts as resolved at F when the paired CI excludes 0; whether the two arms' separate
CIs overlap is reported beside it. FixMatch's share of the gap closed is given per seed and
from the seed means. `--resume` adds seeds (or, with `--sweep-arms`, a semi-supervised
arm) to an existing sweep file (same budget only) and
the file is rewritten after every arm, marked partial until every planned seed and arm is in:

    nice -n 5 .venv/bin/python benchmarks/semi_supervised.py --dataset breastmnist --partitions iid
        --fractions 0.01 0.05 0.1 --seeds 0 --planned-seeds 0 1 2 --rounds 5 --resume
"""

from __future__ import annotations

import argparse
import datetime
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

from fedir.client.arms import LOCAL_KEY
from fedir.client.client_app import build_client_app
from fedir.client.site import load_site
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.metrics import paired_auc_difference, site_metrics
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


def split_tensors(sites: list[Path], split: str, image_size: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The union of the sites' shares of one official split: images, labels, ids."""
    parts = [load_site(s, image_size=image_size).split(split) for s in sites]
    return (torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]).numpy(),
            [i for p in parts for i in p.patients])


def score(state: dict, data: tuple, image_size: int, seed: int, keep_scores: bool = False) -> dict:
    """AUC of a model (state dict) on one split union, with a 1,000-resample bootstrap CI
    (and, with keep_scores, every image's score in the split's order, for paired tests)."""
    model = build_model("resnet_small")
    model.load_state_dict(state)
    images, labels, ids = data
    scores = predict(model, images, pick_device())
    m = site_metrics(labels, scores, ids, n_boot=1000, seed=seed)
    out = {"auc": m["auc"], "auc_ci": m["auc_ci"], "n": m["n"], "positives": m["positives"]}
    if keep_scores:
        out["scores"] = [float(v) for v in scores]
    return out


def run_arm(name: str, sites: list[Path], args: argparse.Namespace, seed: int, out: Path,
            test: tuple, val: tuple, keep_scores: bool = False) -> dict:
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
        result["official_test"] = score(state, test, args.image_size, seed, keep_scores=keep_scores)
        result["official_val"] = score(state, val, args.image_size, seed)
        result["selected_round"] = summary.get("selection", {}).get("round")
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


# ---- label-fraction sweep -------------------------------------------------------------

SWEEP_SEMI = ("fixmatch", "mean_teacher")
SWEEP_BUDGET_KEYS = ("partitions", "sites", "rounds", "local_steps", "batch_size", "mu", "lr", "image_size", "fractions",
                     "sweep_arms")


def sweep_keys(fractions: list[float], semi: list[str]) -> list[str]:
    """Run order within a seed: the ceiling, the supervised arms (cheap), then the semi-supervised ones."""
    return ["sup100"] + [f"sup@{f:g}" for f in fractions] + [f"{a}@{f:g}" for a in semi for f in fractions]


def overlap(a: list[float] | None, b: list[float] | None) -> bool | None:
    if a is None or b is None:
        return None
    return bool(a[0] <= b[1] and b[0] <= a[1])


def paired(labels: np.ndarray, a: dict, b: dict, seed: int) -> dict:
    """AUC(a) - AUC(b) on the same test images, paired bootstrap (1,000 resamples; the same
    resamples for every pair of a seed: the weights depend only on the seed and n)."""
    d = paired_auc_difference(labels, np.asarray(a["scores"]), np.asarray(b["scores"]), n_boot=1000, seed=seed)
    ci = d["difference_ci"]
    return {"difference": d["difference"], "difference_ci": ci, "reason": d["reason"],
            "ci_excludes_0": None if ci is None else bool(ci[0] > 0 or ci[1] < 0)}


def sweep_analysis(result: dict) -> dict:
    """Per fraction: per seed paired gap and gains, then across the seeds done."""
    fractions, semi = result["budget"]["fractions"], result["budget"]["sweep_arms"]
    out: dict = {}
    for f in fractions:
        lo = f"sup@{f:g}"
        per_seed, gaps, gains = {}, [], {a: [] for a in semi}
        for seed, block in sorted(result["seeds"].items(), key=lambda kv: int(kv[0])):
            runs, labels = block["runs"], np.asarray(block["test_labels"])
            if "sup100" not in runs or lo not in runs:
                continue
            hi_t, lo_t = runs["sup100"]["official_test"], runs[lo]["official_test"]
            gap = paired(labels, hi_t, lo_t, int(seed))
            row: dict = {"sup100_auc": hi_t["auc"], "sup100_ci": hi_t["auc_ci"], "sup_auc": lo_t["auc"],
                         "sup_ci": lo_t["auc_ci"], "gap_sup100_minus_sup": gap,
                         "gap_resolved_paired_ci": None if gap["ci_excludes_0"] is None
                         else bool(gap["ci_excludes_0"] and gap["difference"] > 0),
                         "separate_cis_overlap": overlap(hi_t["auc_ci"], lo_t["auc_ci"])}
            gaps.append(gap["difference"])
            for a in semi:
                key = f"{a}@{f:g}"
                if key not in runs:
                    continue
                a_t = runs[key]["official_test"]
                gain = paired(labels, a_t, lo_t, int(seed))
                row[a] = {"auc": a_t["auc"], "auc_ci": a_t["auc_ci"], "gain_minus_sup": gain,
                          "share_of_gap": gain["difference"] / gap["difference"] if gap["difference"] > 0 else None}
                gains[a].append((int(seed), gain["difference"], gap["difference"]))
            per_seed[seed] = row
        if not per_seed:
            continue
        across: dict = {"seeds": [int(s) for s in per_seed], "gap_mean": statistics.fmean(gaps),
                        "gap_sd": statistics.stdev(gaps) if len(gaps) > 1 else None,
                        "seeds_gap_resolved_paired_ci": sum(bool(r["gap_resolved_paired_ci"]) for r in per_seed.values()),
                        "seeds_separate_cis_disjoint": sum(r["separate_cis_overlap"] is False for r in per_seed.values())}
        for a in semi:
            if not gains[a]:
                continue
            g = [x[1] for x in gains[a]]
            d = [x[2] for x in gains[a]]  # the gaps of the same seeds
            across[a] = {"seeds": [x[0] for x in gains[a]], "gain_mean": statistics.fmean(g),
                         "gain_sd": statistics.stdev(g) if len(g) > 1 else None,
                         "share_of_mean_gap": statistics.fmean(g) / statistics.fmean(d) if statistics.fmean(d) > 0 else None}
        out[f"{f:g}"] = {"per_seed": per_seed, "across_seeds": across}
    resolved = [f for f, v in out.items()
                if v["across_seeds"]["seeds_gap_resolved_paired_ci"] == len(v["per_seed"])]
    disjoint = [f for f, v in out.items()
                if v["across_seeds"]["seeds_separate_cis_disjoint"] == len(v["per_seed"])]
    return {"per_fraction": out,
            "fractions_gap_resolved_every_seed_paired_ci": resolved,
            "fractions_separate_cis_disjoint_every_seed": disjoint,
            "largest_fraction_gap_resolved_every_seed_paired_ci": max(resolved, key=float) if resolved else None}


def _ci(ci: list[float] | None) -> str:
    return "[n/a]" if ci is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def sweep_markdown(result: dict) -> str:
    semi = result["budget"]["sweep_arms"]
    head = "| fraction | seed | sup@F AUC [CI] | " + " | ".join(f"{a}@F AUC [CI]" for a in semi) + \
        " | sup100 AUC [CI] | gap sup100 - sup@F [paired CI] | resolved (paired CI) | separate CIs overlap | " + \
        " | ".join(f"{a} - sup@F [paired CI] | {a} share of gap" for a in semi) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for f, block in result["analysis"]["per_fraction"].items():
        for seed, r in block["per_seed"].items():
            g = r["gap_sup100_minus_sup"]
            cells = [f"{float(f):.0%}", seed, f"{r['sup_auc']:.3f} {_ci(r['sup_ci'])}"]
            cells += [f"{r[a]['auc']:.3f} {_ci(r[a]['auc_ci'])}" if a in r else "not run" for a in semi]
            cells += [f"{r['sup100_auc']:.3f} {_ci(r['sup100_ci'])}", f"{g['difference']:+.3f} {_ci(g['difference_ci'])}",
                      "yes" if r["gap_resolved_paired_ci"] else "no", "yes" if r["separate_cis_overlap"] else "no"]
            for a in semi:
                if a not in r:
                    cells += ["", ""]
                    continue
                share = r[a]["share_of_gap"]
                cells += [f"{r[a]['gain_minus_sup']['difference']:+.3f} {_ci(r[a]['gain_minus_sup']['difference_ci'])}",
                          "" if share is None else f"{share:.0%}"]
            lines.append("| " + " | ".join(cells) + " |")
        acr = block["across_seeds"]
        n = len(block["per_seed"])
        sd = "" if acr["gap_sd"] is None else f" +- {acr['gap_sd']:.3f}"
        cells = [f"{float(f):.0%}", f"mean of {n}", "", *["" for _ in semi], "", f"{acr['gap_mean']:+.3f}{sd}",
                 f"{acr['seeds_gap_resolved_paired_ci']} of {n}", f"disjoint in {acr['seeds_separate_cis_disjoint']} of {n}"]
        for a in semi:
            if a not in acr:
                cells += ["", ""]
                continue
            gsd = "" if acr[a]["gain_sd"] is None else f" +- {acr[a]['gain_sd']:.3f}"
            share = acr[a]["share_of_mean_gap"]
            cells += [f"{acr[a]['gain_mean']:+.3f}{gsd} ({len(acr[a]['seeds'])} seeds)",
                      "" if share is None else f"{share:.0%} of mean gap"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(args: argparse.Namespace, npz: Path, out_file: Path) -> None:
    """The label-fraction sweep: one partition, the seeds in order, the file rewritten after every arm."""
    if len(args.partitions) != 1:
        raise SystemExit("--fractions: give one partition (--partitions iid)")
    budget = {k: getattr(args, k) for k in SWEEP_BUDGET_KEYS}
    planned = args.planned_seeds or args.seeds
    if args.resume and out_file.exists():
        result = json.loads(out_file.read_text())
        same = {k: v for k, v in result["budget"].items() if k != "sweep_arms"}
        if same != {k: v for k, v in budget.items() if k != "sweep_arms"}:
            raise SystemExit(f"--resume: {out_file} was run with another budget: {result['budget']} != {budget}")
        # A resumed sweep may add a semi-supervised arm: the file's arms are the union.
        result["budget"]["sweep_arms"] += [a for a in args.sweep_arms if a not in result["budget"]["sweep_arms"]]
        result.setdefault("invocations", [])
    else:
        result = {"machine": describe(shared_machine=True), "dataset": args.dataset, "budget": budget, "seeds": {}, "invocations": [],
                  "model": "resnet_small (MONAI ResNet, basic blocks 16-128, 7x7 stem) at 28x28, AdamW",
                  "runner": "in-process grid (fedir.simulations.inprocess), no Ray",
                  "selection": "eval.select = val-auc: the saved model is the round with the highest pooled val AUC "
                               "(the val split is fully labelled at every fraction); test is only scored",
                  "scoring": "official test split (union of the site test shares), each image its own patient; "
                             "AUC with a 1,000-resample bootstrap CI; paired differences by fedir.metrics."
                             "paired_auc_difference (1,000 paired resamples, seed = the run seed)"}
    keys = sweep_keys(args.fractions, result["budget"]["sweep_arms"])  # every arm the file is complete with
    todo_arms = sweep_keys(args.fractions, args.sweep_arms)  # what this invocation runs
    invocation = {"seeds": args.seeds, "sweep_arms": args.sweep_arms,
                  "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                  "loadavg_start": os.getloadavg(), "machine": describe(shared_machine=True)}
    result["invocations"].append(invocation)
    result["planned_seeds"] = planned
    started = time.time()
    deadline = None
    if args.stop_launching_at:
        hh, mm = (int(x) for x in args.stop_launching_at.split(":"))
        now = datetime.datetime.now(datetime.UTC)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)

    def write() -> None:
        result["analysis"] = sweep_analysis(result)
        missing = [f"seed{s}:{k}" for s in planned for k in keys if k not in result["seeds"].get(str(s), {}).get("runs", {})]
        result["partial"] = bool(missing)
        result["not_run"] = missing
        invocation["wall_s"] = round(time.time() - started, 1)
        invocation["loadavg_end"] = os.getloadavg()
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=1))

    part = args.partitions[0]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            block = result["seeds"].setdefault(str(seed), {"runs": {}, "federations": {}})
            todo = [k for k in todo_arms if k not in block["runs"]]
            if not todo:
                continue
            feds: dict[str, list[Path]] = {}
            for level in ["1"] + [f"{f:g}" for f in args.fractions]:
                root = Path(tmp) / f"{part.replace(':', '')}-s{seed}-f{level}"
                record = import_medmnist(npz, root, sites=args.sites, partition=part,
                                         labelled_fraction=float(level), seed=seed)
                feds[level] = [root / s for s in record["per_site"]]
                made = json.loads(json.dumps(record["per_site"]))
                if block["federations"].setdefault(f"fraction{level}", made) != made:  # a resumed seed rebuilds the same sites
                    raise SystemExit(f"seed {seed}, fraction {level}: the federation differs from the one in {out_file}")
            # Every arm of the seed is scored on these same test images (the full federation's
            # test shares: every fraction's federation of a seed splits the images alike).
            test = split_tensors(feds["1"], "test", args.image_size)
            val = split_tensors(feds["1"], "val", args.image_size)
            block["test_labels"] = [int(v) for v in test[1]]
            block["test_ids"] = test[2]
            for key in todo:
                if deadline is not None and datetime.datetime.now(datetime.UTC) >= deadline:
                    print(f"stop: {args.stop_launching_at} UTC reached, {key} seed {seed} not launched", flush=True)
                    write()
                    return
                name, _, level = key.partition("@")
                arm = {"sup100": "sup100", "sup": "sup10"}.get(name, name)
                sites = feds["1"] if key == "sup100" else feds[level]
                r = run_arm(arm, sites, args, seed, Path(tmp) / f"run-s{seed}-{key.replace('@', '-')}", test, val,
                            keep_scores=True)
                r["loadavg_after"] = os.getloadavg()
                block["runs"][key] = r
                write()
                print(f"{args.dataset} seed {seed} {key:18s} test AUC {r['official_test']['auc']:.3f} "
                      f"(round {r.get('selected_round')}, {r['wall_s']:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        write()


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
    parser.add_argument("--fractions", type=float, nargs="+", default=None,
                        help="label-fraction sweep (one partition): sup100 once per seed, sup and --sweep-arms per fraction")
    parser.add_argument("--sweep-arms", nargs="+", default=["fixmatch"], choices=SWEEP_SEMI)
    parser.add_argument("--planned-seeds", type=int, nargs="+", default=None,
                        help="sweep: the seeds the file is complete with (default --seeds); marks it partial until then")
    parser.add_argument("--resume", action="store_true", help="sweep: add to an existing file with the same budget")
    parser.add_argument("--stop-launching-at", default=None, help="sweep: HH:MM UTC after which no arm is started")
    args = parser.parse_args()
    if args.fractions:
        args.fractions = sorted(args.fractions)
    stem = "semi_supervised_sweep" if args.fractions else "semi_supervised"
    out_file = args.out or Path(__file__).parent / "results" / f"{stem}_{args.dataset}.json"
    if args.table:
        data = json.loads(out_file.read_text())
        print(sweep_markdown(data) if "analysis" in data else markdown(data))
        return
    logging.getLogger("flwr").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    npz = DATA / f"{args.dataset}.npz"
    if args.fractions:
        sweep(args, npz, out_file)
        print(sweep_markdown(json.loads(out_file.read_text())))
        print(f"wrote {out_file}")
        return
    result = {"machine": describe(shared_machine=True), "loadavg_start": os.getloadavg(), "dataset": args.dataset,
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
