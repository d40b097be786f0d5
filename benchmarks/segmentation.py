"""Segmentation on the synthetic XA federation: federated against local and pooled, and what
the unlabelled frames of each run add (issue 16, "Targets").

Data: `fedir data synth`'s generator (simulations/synthetic.generate_federation, the function
behind `fedir data synth OUT --sites 4 --image-size 64 --mask-fraction F`) writes the same
federation twice from one seed: with `mask_fraction = 0` (one outlined frame per image: a
cine run's best-opacified frame; the rest unlabelled) and with `mask_fraction = 1` (every
frame outlined). Only the masks differ (checked: every split's images are identical).
Arms, all through fedir's ServerApp logic and ClientApp in one process
(fedir.simulations.inprocess.InProcessGrid), `data.frame-policy = "all"`:

- `fed_sup_one`: FedAvg, supervised DiceCE on the one outlined frame per run;
- `fed_sup_all`: FedAvg, supervised on every frame outlined (the ceiling of semi-supervision);
- `fed_mean_teacher_one`, `fed_fixmatch_one`: FedAvg, the one outlined frame plus the run's
  other frames through the semi-supervised objective (fedir.client.segmentation_objectives);
- `pooled_one`: every site's one-frame training set at one node (`federation.arm = pooled`),
  with n_sites x the local steps per round (the federation's compute per round);
- `local_one`: each site alone on its one-frame set (`federation.arm = local`).

Every arm trains the same local steps per round (`train.local-steps`) and keeps its last
round (`eval.select = "last"`: nothing is chosen, so no arm is tuned on anything). Each
arm's model (for `local_one`, each site's own, read from its node's Flower context) is
scored on the same images: every frame of each site's test patients, against the
every-frame masks. Dice per image is fedir's (fedir.tasks.segmentation_metrics, MONAI
DiceMetric over vessel and stenosis), averaged per patient; CIs are 95% percentile
intervals of 2,000 patient-bootstrap resamples; comparisons are paired per patient
(federated minus local at each site; semi-supervised minus supervised on all test
patients), bootstrapped the same way. The federated/pooled Dice ratio is reported beside
FLamby's published FedAvg/pooled ratios (Fed-IXI 0.772/0.987, Fed-KiTS19 0.514/0.664).
One seed only: CPU time on a shared 2-core machine. Dice is also given per class
(`dice_vessel`, `dice_stenosis`: MONAI's per-class Dice, a test image without stenosis in
its reference has none), each with its patient-bootstrap CI.

`--curve` (the training-budget sweep, one run per arm): the global model that each round
sends out to be evaluated (the pooled or federated arm; local_one keeps one model per
site, so it has no curve) is scored after every round, on the same test images and on
every frame of each site's validation patients against their every-frame masks. Each
round is one budget (rounds x local steps per site); the `selected_round` of an arm is the
one with the best validation Dice (as `eval.select = "best"` would pick it), never the
test Dice; the final table is still the last round's.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/segmentation.py [--patients 16]
        [--rounds 4] [--local-steps 10] [--arms fed_sup_one ...] [--curve] [--out benchmarks/results/segmentation.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message
from machine import describe  # benchmarks/ is on sys.path

from fedir.client.arms import LOCAL_KEY
from fedir.client.client_app import build_client_app
from fedir.client.inputs import view_of
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.models import as_tensors, build_model, state_shapes
from fedir.protocol import ARRAYS_KEY, decode_weights
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.synthetic import generate_federation
from fedir.tasks import segmentation
from fedir.tasks.segmentation_metrics import CLASS_DICE, FOREGROUND_NAMES, N_CLASSES, per_image_class_metrics

ARMS = {  # name -> (federation.arm, train.objective, masks: "one" outlined frame per run | "all")
    "fed_sup_one": ("federated", "supervised", "one"),
    "fed_sup_all": ("federated", "supervised", "all"),
    "fed_mean_teacher_one": ("federated", "mean_teacher", "one"),
    "fed_fixmatch_one": ("federated", "fixmatch", "one"),
    "pooled_one": ("pooled", "supervised", "one"),
    "local_one": ("local", "supervised", "one"),
}
SEMI = ("fed_mean_teacher_one", "fed_fixmatch_one")
FLAMBY = {  # FLamby (du Terrail et al. 2022), Table 2: FedAvg and pooled Dice
    "fed_ixi": {"federated": 0.772, "pooled": 0.987},
    "fed_kits19": {"federated": 0.514, "pooled": 0.664},
}
N_BOOT = 2000
METRICS = ("dice", *CLASS_DICE)  # per patient: the mean over classes, then each class
Scores = dict[str, dict[str, dict[str, float]]]  # metric -> site -> patient -> Dice


def settings_for(arm: str, sites: list[Path], args: argparse.Namespace) -> Settings:
    federation_arm, objective, _ = ARMS[arm]
    steps = args.local_steps * (len(sites) if federation_arm == "pooled" else 1)
    return Settings(
        task_kind="segmentation", federation_sites=";".join(str(s) for s in sites), federation_arm=federation_arm,
        train_objective=objective, train_rounds=args.rounds, train_local_steps=steps,
        train_batch_size=args.batch_size, train_lr=args.lr, train_seed=args.seed, model_image_size=args.image_size,
        data_frame_policy="all", eval_select="last", eval_bootstrap=100,
    )


Frames = tuple[torch.Tensor, np.ndarray, list[str]]  # images, (N, S, S) labels, patients


def test_sets(sites: list[Path], settings: Settings, split: str = "test") -> dict[str, Frames]:
    """Each site's test (or val) frames with their every-frame masks."""
    out = {}
    for site in sites:
        view = view_of(str(site), settings)
        x, y, who = (view.test_x, view.test_y, view.test_patients) if split == "test" else (
            view.val_x, view.val_y, view.val_patients)
        out[site.name] = (x, y[:, 0].numpy(), list(who))
    return out


def per_patient_dice(state: dict, data: Frames) -> dict[str, dict[str, float]]:
    """metric (METRICS) -> patient -> the model's Dice: the mean over the patient's frames
    with a defined value (fedir's rule, fedir.tasks.segmentation_metrics)."""
    model = build_model("basic_unet", n_outputs=N_CLASSES)
    model.load_state_dict(state)
    images, target, patients = data
    predicted = predict(model, images, pick_device(), batch_size=32, score=segmentation.score)
    per_class, _ = per_image_class_metrics(target, predicted)
    with np.errstate(all="ignore"):
        columns = {"dice": np.nanmean(per_class, axis=1),
                   **{f"dice_{n}": per_class[:, c] for c, n in enumerate(FOREGROUND_NAMES)}}
    out: dict[str, dict[str, float]] = {m: {} for m in METRICS}
    for metric, dice in columns.items():
        for p in sorted(set(patients)):
            values = dice[[i for i, q in enumerate(patients) if q == p]]
            values = values[np.isfinite(values)]
            if len(values):
                out[metric][p] = float(values.mean())
    return out


def score_all(state: dict, sets: dict[str, Frames]) -> Scores:
    """metric -> site -> patient -> Dice of one model on every site's frames."""
    per_site = {s: per_patient_dice(state, data) for s, data in sets.items()}
    return {m: {s: v[m] for s, v in per_site.items()} for m in METRICS}


def summarise(scores: Scores, seed: int) -> dict:
    """Each metric over all patients of all sites, with its patient-bootstrap CI."""
    return {m: bootstrap_mean(np.array([x for v in scores[m].values() for x in v.values()]), seed) for m in METRICS}


class CurveGrid(InProcessGrid):
    """InProcessGrid that scores the global model each round sends out for evaluation
    (fedir's ServerApp evaluates every round: one snapshot a round)."""

    def __init__(self, *args, sets: dict[str, dict[str, Frames]], seed: int, **kwargs) -> None:  # noqa: ANN002,ANN003
        super().__init__(*args, **kwargs)
        self.sets, self.seed, self.curve = sets, seed, []
        self.shapes = state_shapes(build_model("basic_unet", n_outputs=N_CLASSES))

    def push_messages(self, messages):  # noqa: ANN001,ANN201 - flwr's Grid signature
        messages = list(messages)
        sent = [m for m in messages if m.metadata.message_type.split(".")[0] == "evaluate"
                and ARRAYS_KEY in m.content.array_records]
        if sent:
            self._score(sent[0])
        return super().push_messages(messages)

    def _score(self, msg: Message) -> None:
        state = as_tensors(decode_weights(msg.content.array_records[ARRAYS_KEY], self.shapes))
        self.curve.append({"round": len(self.curve) + 1,
                           **{split: summarise(score_all(state, sets), self.seed) for split, sets in self.sets.items()}})


def bootstrap_mean(values: np.ndarray, seed: int) -> dict:
    """Mean with a 95% percentile patient-bootstrap CI."""
    rng = np.random.default_rng(seed)
    if len(values) < 2:
        return {"mean": float(values.mean()) if len(values) else None, "ci": None, "n_patients": len(values)}
    means = values[rng.integers(len(values), size=(N_BOOT, len(values)))].mean(axis=1)
    return {"mean": float(values.mean()), "ci": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
            "n_patients": len(values)}


def paired(a: dict[str, float], b: dict[str, float], seed: int) -> dict:
    """a - b over the patients both define, paired bootstrap; ci_excludes_0 when it does."""
    common = sorted(set(a) & set(b))
    d = bootstrap_mean(np.array([a[p] - b[p] for p in common]), seed)
    ci = d["ci"]
    return {"difference": d["mean"], "difference_ci": ci, "n_patients": d["n_patients"],
            "ci_excludes_0": None if ci is None else bool(ci[0] > 0 or ci[1] < 0)}


def run_arm(arm: str, sites: list[Path], args: argparse.Namespace, out: Path,
            curve_sets: dict[str, dict[str, Frames]] | None = None) -> tuple[dict, dict[str, dict]]:
    """(run facts, each site's model state) of one arm; with `curve_sets` ({"val": ...,
    "test": ...}) and a global model, the facts carry its per-round `curve`."""
    settings = settings_for(arm, sites, args)
    started = time.time()
    if curve_sets is not None and ARMS[arm][0] != "local":
        grid: InProcessGrid = CurveGrid(build_client_app(settings), len(sites), settings.to_run_config(),
                                        sets=curve_sets, seed=args.seed)
    else:
        grid = InProcessGrid(build_client_app(settings), len(sites), settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="benchmark")
    wall = time.time() - started
    if ARMS[arm][0] == "local":
        states = {f"site-{node - 100}": ctx.state.array_records[LOCAL_KEY].to_torch_state_dict()
                  for node, ctx in grid.contexts.items()}
    else:
        state = torch.load(out / "model.pt", weights_only=True)
        states = {site.name: state for site in sites}
    facts = {"wall_s": round(wall, 1), "s_per_round": round(wall / args.rounds, 1),
             "evaluated_round": summary.get("evaluated_round"),
             "own_summary_global_dice": summary["global"].get("dice")}
    if isinstance(grid, CurveGrid):
        if len(grid.curve) != args.rounds:
            raise RuntimeError(f"{arm}: {len(grid.curve)} evaluated models for {args.rounds} rounds")
        steps = settings.train_local_steps // (len(sites) if ARMS[arm][0] == "pooled" else 1)
        for point in grid.curve:
            point["local_steps_per_site"] = point["round"] * steps
        best = max(grid.curve, key=lambda p: -1.0 if p["val"]["dice"]["mean"] is None else p["val"]["dice"]["mean"])
        facts["curve"] = grid.curve
        facts["selected_round_on_val"] = best["round"]
    return facts, states


def analyse(result: dict, scores: dict[str, Scores], seed: int) -> dict:
    """Dice tables with CIs (the mean over classes, then each class), paired differences,
    the gap share and the FLamby ratios."""
    tables: dict = {}
    for metric in METRICS:
        table: dict = {}
        for arm in scores:
            per_site = {s: bootstrap_mean(np.array(list(v.values())), seed) for s, v in scores[arm][metric].items()}
            pooled = bootstrap_mean(np.array([x for v in scores[arm][metric].values() for x in v.values()]), seed)
            table[arm] = {"all_test_patients": pooled, "per_site": per_site}
        tables[metric] = table
    dice = {arm: scores[arm]["dice"] for arm in scores}
    out: dict = {"dice": tables["dice"], **{m: tables[m] for m in CLASS_DICE}}

    def everyone(arm: str) -> dict[str, float]:
        return {f"{s}/{p}": x for s, v in dice[arm].items() for p, x in v.items()}

    if "fed_sup_one" in dice and "local_one" in dice:
        out["federated_minus_local_per_site"] = {
            s: paired(dice["fed_sup_one"][s], dice["local_one"][s], seed) for s in dice["fed_sup_one"]}
        out["every_site_federated_above_local_paired"] = all(
            v["ci_excludes_0"] and v["difference"] > 0 for v in out["federated_minus_local_per_site"].values())
    if "fed_sup_one" in dice and "pooled_one" in dice:
        fed, pool = (table[a]["all_test_patients"]["mean"] for a in ("fed_sup_one", "pooled_one"))
        out["federated_over_pooled"] = {
            "fedir_synthetic_xa": {"federated": fed, "pooled": pool, "ratio": fed / pool if pool else None},
            **{k: {**v, "ratio": v["federated"] / v["pooled"]} for k, v in FLAMBY.items()},
            "federated_minus_pooled_paired": paired(everyone("fed_sup_one"), everyone("pooled_one"), seed)}
    if "fed_sup_one" in dice and "fed_sup_all" in dice:
        gap = paired(everyone("fed_sup_all"), everyone("fed_sup_one"), seed)
        out["gap_all_minus_one"] = {**gap, "resolved": bool(gap["ci_excludes_0"] and gap["difference"] > 0)}
        for arm in SEMI:
            if arm in dice:
                gain = paired(everyone(arm), everyone("fed_sup_one"), seed)
                share = gain["difference"] / gap["difference"] if gap["difference"] and gap["difference"] > 0 else None
                # a share of a gap whose paired CI includes 0 is noise: no verdict then
                out[f"{arm}_minus_sup_one"] = {**gain, "share_of_gap": share, "closes_half_the_gap": None
                                               if share is None or not out["gap_all_minus_one"]["resolved"]
                                               else share >= 0.5}
    fed = out.get("dice", {}).get("fed_sup_one", {}).get("all_test_patients", {}).get("mean")
    out["target_federated_dice_at_least_0.80"] = None if fed is None else fed >= 0.80
    return out


def markdown(result: dict) -> str:
    def cell(m: dict) -> str:
        return "n/a" if m["mean"] is None else (
            f"{m['mean']:.3f}" + ("" if m["ci"] is None else f" [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]"))

    dice = result["analysis"]["dice"]
    sites = sorted(next(iter(dice.values()))["per_site"])
    lines = ["| arm | all test patients | " + " | ".join(sites) + " | vessel | stenosis | s/round |",
             "|---|---|" + "---|" * len(sites) + "---|---|---|"]
    for arm, t in dice.items():
        classes = " | ".join(cell(result["analysis"][m][arm]["all_test_patients"]) for m in CLASS_DICE)
        lines.append(f"| {arm} | {cell(t['all_test_patients'])} | "
                     + " | ".join(cell(t["per_site"][s]) for s in sites)
                     + f" | {classes} | {result['runs'][arm]['s_per_round']} |")
    for arm, run in result["runs"].items():
        if "curve" not in run:
            continue
        lines += ["", f"{arm}: Dice by budget (the selected round, best on validation, is {run['selected_round_on_val']})",
                  "| round | local steps per site | val Dice | test Dice | vessel | stenosis |", "|---|---|---|---|---|---|"]
        for p in run["curve"]:
            lines.append(f"| {p['round']} | {p['local_steps_per_site']} | {p['val']['dice']['mean']:.3f} | "
                         + " | ".join(cell(p["test"][m]) for m in METRICS) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--patients", type=int, default=16, help="per site")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--curve", action="store_true",
                        help="score every round's global model on validation and test (the budget sweep)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "segmentation.json")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    result: dict = {"benchmark": "segmentation", "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "command": "OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python " + shlex.join(sys.argv),
                    "machine": describe(), "budget": {k: v for k, v in vars(args).items() if k not in ("out", "arms")},
                    "arms": {a: ARMS[a] for a in args.arms}, "seeds": [args.seed],
                    "note": "one seed (CPU time on a shared 2-core machine); CIs are over test patients only",
                    "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        feds = {}
        for masks, fraction in (("one", 0.0), ("all", 1.0)):
            generate_federation(root / masks, sites=args.sites, patients=args.patients, seed=args.seed,
                                image_size=args.image_size, progress=False, mask_fraction=fraction)
            feds[masks] = [(root / masks / f"site-{i}").resolve() for i in range(args.sites)]
        probe = settings_for("fed_sup_all", feds["all"], args)
        for one, every in zip(feds["one"], feds["all"]):  # the two federations differ by their masks only
            a, b = view_of(str(one), probe).imaging, view_of(str(every), probe).imaging
            assert a is not None and b is not None
            for split in ("train", "val", "test"):
                assert torch.equal(a.split(split).images, b.split(split).images), (one, split)
        tests = test_sets(feds["all"], probe)
        curve_sets = {"val": test_sets(feds["all"], probe, "val"), "test": tests} if args.curve else None
        result["test_set"] = {s: {"frames": len(t[1]), "patients": len(set(t[2]))} for s, t in tests.items()}
        result["train_set"] = {
            masks: {s.name: {"masked_frames": len(v.train_x), "unlabelled_frames": 0 if v.train_unlabelled is None
                             else len(v.train_unlabelled)} for s in feds[masks] for v in [view_of(str(s), probe)]}
            for masks in feds}
        scores: dict[str, Scores] = {}
        for arm in args.arms:
            facts, states = run_arm(arm, feds[ARMS[arm][2]], args, root / "runs" / arm, curve_sets)
            per_site = {s: per_patient_dice(states[s], tests[s]) for s in tests}
            scores[arm] = {m: {s: v[m] for s, v in per_site.items()} for m in METRICS}
            result["runs"][arm] = facts
            print(arm, {k: v for k, v in facts.items() if k != "curve"}, flush=True)
    result["analysis"] = analyse(result, scores, args.seed)
    result["table"] = markdown(result)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])
    print(json.dumps({k: v for k, v in result["analysis"].items() if k not in METRICS}, indent=2))


if __name__ == "__main__":
    main()
