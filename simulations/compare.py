"""The questions a study team asks before any hospital signs, answered on a simulated federation.

A federated study is worth its paperwork only if the federated model beats what each
hospital could train alone, if the unlabelled images help, and if the images add something
to the clinical variables. `fedir compare` runs, for each seed, the scenario's study and the
arms that answer those questions, all through fedir's own ServerApp logic and ClientApp in
one process (fedir.simulations.inprocess), each with the same data, rounds and selection:

- ``federated``: the scenario as written (its objective, e.g. semi-supervised);
- ``supervised``: the same, supervised on the same labels (what semi-supervision must beat);
- ``all_labels``: supervised with every training label (the ceiling semi-supervision aims
  at; only for a synthetic federation, whose generator can write the same patients with
  every label: its ``federation.json`` says how);
- ``local``: each site alone (``federation.arm = "local"``), the floor;
- ``pooled``: every site's training data in one place (``federation.arm = "pooled"``, its
  batches as ``federation.pooled-batches`` says: by default each from one site);
  these two run without the scenario's secure aggregation, differential privacy and
  personalisation (NO_SHARED_MODEL);
- ``clinical``: the clinical-only model of the scenario's companion (fedir.simulations.companion);
- ``radiomics``: the radiomics companion's model, a logistic regression on each image's first-order
  and GLCM features (fedir.client.radiomics; a patient's score the mean over their images);
  skipped, with a line, on tabular sites or volumes (it reads 2D images).

Each arm's model is then scored on every site's test patients by the ClientApp's own
evaluation code (fedir.client.client_app.evaluation_model: the same weights, kept layers and
personalisation as the site's evaluation), one score per patient (the mean over the patient's
images), and the arms are compared **paired**, on the same patients, with a patient
bootstrap of the AUC difference (fedir.metrics.paired_auc_difference). Scores are read in
this process only: this is a simulation, where the coordinator may see what no deployment
shows it. The local arm is scored with each site's last-round model (a site alone has no
federation to select a round for it).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from fedir.client.client_app import build_client_app, evaluation_model, scored_rows
from fedir.client.inputs import SiteView, view_of
from fedir.client.tabular import is_tabular_site
from fedir.client.training import pick_device, predict
from fedir.config import Settings
from fedir.errors import UserError
from fedir.metrics import paired_auc_difference, patient_scores
from fedir.models import build_model, kept_keys, projection_dim, resolve_model, state_arrays
from fedir.protocol import ARRAYS_KEY, CONFIG_KEY, RUN_ID_KEY, FeatureSums, combine, encode_round_config, encode_weights
from fedir.server.server_app import run_study
from fedir.simulations.companion import clinical_settings, radiomics_settings
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.synthetic import generate_federation, synthetic_record
from fedir.tasks import task_of

log = logging.getLogger(__name__)

ARMS = ("federated", "supervised", "all_labels", "local", "pooled", "clinical", "radiomics")

# The local and pooled arms average nothing across sites, so a scenario's secure aggregation
# and differential privacy (and its epsilon budget) have nothing to act on there: they run
# without them, and what privacy costs the federated arm is part of what the comparison shows.
NO_AGGREGATE_PRIVACY = {"privacy_secure_aggregation": "off", "privacy_dp": "off", "privacy_max_epsilon": 0.0}
# Nor is there a shared model to personalise (train.personalise): a site alone already has its
# own, the pooled node one for all; a personalised federation is compared with them as it is.
NO_SHARED_MODEL = {**NO_AGGREGATE_PRIVACY, "train_personalise": "none"}
N_BOOT = 1000


@dataclass
class PatientScores:
    """One site's test patients and one arm's score for each (mean over their images)."""

    patients: list[str]
    labels: np.ndarray
    scores: np.ndarray


def arm_settings(settings: Settings, arm: str, all_label_sites: list[Path] | None) -> Settings:
    """The scenario's settings for `arm` (the module docstring lists them)."""
    quiet = {"monitor_tensorboard": "", "monitor_mlflow": "", "baseline_clinical": False, "baseline_radiomics": False}
    if arm == "federated":
        return replace(settings, **quiet)
    if arm == "supervised":
        return replace(settings, train_objective="supervised", **quiet)
    if arm == "all_labels":
        if all_label_sites is None:
            raise ValueError("the all_labels arm needs a synthetic federation")
        return replace(settings, train_objective="supervised", federation_sites=";".join(map(str, all_label_sites)),
                       **quiet)
    if arm in ("local", "pooled"):
        return replace(settings, federation_arm=arm, **NO_SHARED_MODEL, **quiet)
    if arm == "clinical":
        return clinical_settings(replace(settings, **quiet))
    if arm == "radiomics":
        return radiomics_settings(replace(settings, **quiet))
    raise ValueError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")


def all_labels_federation(settings: Settings, out: Path) -> list[Path] | None:
    """The scenario's synthetic federation written again with every training label (the same
    patients and images: the generator draws who is unlabelled apart from what it draws), or
    None when the sites were not made by `fedir data synth`."""
    if (record := synthetic_record(settings.sites)) is None:
        return None
    params = dict(record["parameters"])
    params.pop("generator_version", None)
    target = out / "all-labels-federation"
    generate_federation(target, sites=params["sites"], patients=params["patients"], seed=params["seed"],
                        confound=params["confound"], unlabelled_fraction=0.0, image_size=params["image_size"],
                        progress=False)
    return [target / Path(site).name for site in settings.sites]


def evaluation_content(settings: Settings, out: Path, summary: dict) -> RecordDict:
    """The evaluate message a site would get for the run's selected (saved) model: model.pt
    without the entries the sites keep (FedBN's, which model.pt does not hold either), the
    selected round and the run id (with which a site puts its kept state back)."""
    views = _views(settings)
    tabular = bool(views) and views[0].tabular
    fused = bool(views) and views[0].n_clinical > 0  # data.inputs = image+clinical
    model = build_model(resolve_model(settings.model_name, tabular=tabular, kind=settings.task_kind),
                        n_features=views[0].n_features if tabular or fused else 0, spatial_dims=settings.spatial_dims,
                        n_outputs=task_of(settings.task_kind).n_outputs(settings.task_classes),
                        fused_image_size=settings.model_image_size if fused else 0, projection=projection_dim(settings))
    state = torch.load(out / "model.pt", weights_only=True)
    kept = kept_keys(model, settings)
    model.load_state_dict(state, strict=not kept)
    arrays = encode_weights(state_arrays(model), kept=kept, dp=settings.dp)
    server_round = (summary.get("selection") or {}).get("round") or summary.get("evaluated_round") or settings.train_rounds
    config = encode_round_config(_standardisation(settings), server_round=int(server_round))
    config[RUN_ID_KEY] = summary["run_id"]
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})


def _views(settings: Settings) -> list[SiteView]:
    return [view_of(str(Path(site).resolve()), settings) for site in settings.sites]


def _standardisation(settings: Settings) -> tuple[np.ndarray, np.ndarray] | None:
    """The federation's feature statistics, as the server sends them to tabular (and fused) sites."""
    views = _views(settings)
    if not views or not (views[0].tabular or views[0].n_clinical) or settings.data_standardise == "site":
        return None
    sums: list[FeatureSums] = [s for s in (v.train_sums() for v in views) if s is not None]
    return combine(sums).mean_std()


def score_arm(settings: Settings, grid: InProcessGrid, out: Path, summary: dict) -> dict[str, PatientScores]:
    """Every site's test patients scored by the arm's model, as the site's evaluation does."""
    content = evaluation_content(settings, out, summary)
    scores: dict[str, PatientScores] = {}
    for context in grid.contexts.values():
        arm_settings_, site, config, model = evaluation_model(content, context, settings)
        x, labels, patients = scored_rows(arm_settings_, site, config, "test")
        ids, y, s = patient_scores(labels, predict(model, x, pick_device()), patients)
        scores[site.name] = PatientScores(ids, y, s)
    return scores


def run_arm(settings: Settings, arm: str, out: Path, all_label_sites: list[Path] | None) -> tuple[dict, dict]:
    """Train one arm; returns (its summary, its per-site patient scores)."""
    arm_s = arm_settings(settings, arm, all_label_sites)
    grid = InProcessGrid(build_client_app(arm_s), len(arm_s.sites), arm_s.to_run_config())
    summary = run_study(grid, arm_s, out, scenario=f"compare:{arm}")
    return summary, {site: vars(v) for site, v in score_arm(arm_s, grid, out, summary).items()}


def _union(scores: dict[str, PatientScores], sites: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
    ids = [f"{site}/{p}" for site in sites for p in scores[site].patients]
    return (ids, np.concatenate([scores[site].labels for site in sites]),
            np.concatenate([scores[site].scores for site in sites]))


def paired(a: dict[str, PatientScores], b: dict[str, PatientScores], sites: Sequence[str], seed: int) -> dict:
    """AUC(a) - AUC(b) on the union of `sites`' test patients, paired by patient."""
    ids_a, y, s_a = _union(a, sites)
    ids_b, y_b, s_b = _union(b, sites)
    if ids_a != ids_b or not np.array_equal(y, y_b):
        raise ValueError("the two arms were scored on different patients")
    return paired_auc_difference(y, s_a, s_b, n_boot=N_BOOT, seed=seed)


def questions(scores: dict[str, dict[str, PatientScores]], seed: int) -> dict:
    """The comparisons of one seed, each paired on the same test patients."""
    sites = sorted(scores["federated"])
    out: dict[str, Any] = {}
    pairs = {
        "federated_vs_pooled": ("federated", "pooled"),
        "semi_vs_supervised": ("federated", "supervised"),
        "all_labels_vs_supervised": ("all_labels", "supervised"),
        "imaging_vs_clinical": ("federated", "clinical"),
        "imaging_vs_radiomics": ("federated", "radiomics"),
        "radiomics_vs_clinical": ("radiomics", "clinical"),
    }
    for name, (a, b) in pairs.items():
        if a in scores and b in scores and a != b:
            out[name] = paired(scores[a], scores[b], sites, seed)
    if "local" in scores:
        out["federated_vs_local"] = {site: paired(scores["federated"], scores["local"], [site], seed) for site in sites}
    return out


def gap_closed(per_seed: list[dict]) -> dict | None:
    """Share of the supervised -> all-labels gap the scenario's objective closes: per seed and
    from the seed means (paired: the same seed's arms)."""
    rows = [q for q in per_seed if "semi_vs_supervised" in q and "all_labels_vs_supervised" in q]
    if not rows:
        return None
    gains = [q["semi_vs_supervised"]["difference"] for q in rows]
    gaps = [q["all_labels_vs_supervised"]["difference"] for q in rows]
    mean_gap = statistics.fmean(gaps)
    return {"gain_per_seed": gains, "gap_per_seed": gaps,
            "share_per_seed": [g / d if d > 0 else None for g, d in zip(gains, gaps)],
            "share_of_mean_gap": statistics.fmean(gains) / mean_gap if mean_gap > 0 else None}


def compare(settings: Settings, out: Path, seeds: Sequence[int], arms: Sequence[str] = ARMS,
            progress: Callable[[str], None] = print) -> dict:
    """Run every arm for every seed into `out` and return (and write) the comparison.

    Writes ``out/compare.json`` and the table ``out/compare.md``; each arm's run folder is
    ``out/seed-S/ARM`` (its summary.json, report.html, runs.sqlite, model.pt).
    """
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(ARMS)}")
    if settings.task_kind != "classification" or settings.task_classes != 2:
        study = (f"task.kind = {settings.task_kind!r}" if settings.task_kind != "classification"
                 else f"task.classes = {settings.task_classes}")
        raise UserError(f"fedir compare pairs the arms' per-patient AUCs of a binary classification; {study} is not "
                        "compared yet: run each arm with fedir simulate (--set federation.arm=local|pooled)")
    out.mkdir(parents=True, exist_ok=True)
    all_label_sites = all_labels_federation(settings, out) if "all_labels" in arms else None
    if "all_labels" in arms and all_label_sites is None:
        progress("all_labels: skipped (the sites were not written by `fedir data synth`)")
        arms = [a for a in arms if a != "all_labels"]
    if "radiomics" in arms and (settings.spatial_dims == 3 or any(is_tabular_site(s) for s in settings.sites)):
        progress("radiomics: skipped (its features are of 2D images, and these sites hold tables or volumes)")
        arms = [a for a in arms if a != "radiomics"]
    result: dict[str, Any] = {"arms": list(arms), "seeds": list(seeds), "runs": {}, "questions": {}}
    for seed in seeds:
        seeded = replace(settings, train_seed=seed)
        scores: dict[str, dict[str, PatientScores]] = {}
        runs: dict[str, Any] = {}
        for arm in arms:
            started = time.time()
            summary, arm_scores = run_arm(seeded, arm, out / f"seed-{seed}" / arm, all_label_sites)
            scores[arm] = {site: PatientScores(**v) for site, v in arm_scores.items()}
            runs[arm] = {"wall_s": round(time.time() - started, 1), "selection": summary.get("selection"),
                         "per_patient": (summary.get("global") or {}).get("per_patient"),
                         "bias_alarm": (summary.get("bias") or {}).get("alarm")}
            auc = (runs[arm]["per_patient"] or {}).get("auc")
            progress(f"seed {seed} {arm:10s} per-patient AUC {'n/a' if auc is None else f'{auc:.3f}'} "
                     f"({runs[arm]['wall_s']:.0f} s)")
        result["runs"][str(seed)] = runs
        result["questions"][str(seed)] = questions(scores, seed)
    result["semi_supervised_gap_closed"] = gap_closed(list(result["questions"].values()))
    (out / "compare.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    (out / "compare.md").write_text(markdown(result) + "\n")
    return result


def _cell(d: dict | None) -> str:
    if not d or d.get("difference") is None:
        return "n/a" if not d else f"n/a ({d.get('reason')})"
    ci = d.get("difference_ci")
    return f"{d['difference']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{d['difference']:+.3f} (no CI: {d['reason']})"


def markdown(result: dict) -> str:
    """The answers as a table: one row per question, one column per seed (paired AUC
    difference per patient [95% patient-bootstrap CI])."""
    seeds = list(result["questions"])
    lines = ["| question (per-patient AUC difference, paired) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]
    labels = {
        "federated_vs_pooled": "federated - pooled (all data in one place)",
        "semi_vs_supervised": "semi-supervised - supervised, same labels",
        "all_labels_vs_supervised": "supervised on all labels - supervised, same labels",
        "imaging_vs_clinical": "imaging - clinical (age, sex)",
        "imaging_vs_radiomics": "imaging - radiomics (first-order and GLCM features)",
        "radiomics_vs_clinical": "radiomics - clinical (age, sex)",
    }
    for key, label in labels.items():
        if any(key in result["questions"][s] for s in seeds):
            lines.append(f"| {label} | " + " | ".join(_cell(result["questions"][s].get(key)) for s in seeds) + " |")
    first = result["questions"][seeds[0]] if seeds else {}
    for site in sorted(first.get("federated_vs_local", {})):
        lines.append(f"| federated - {site} alone, on {site}'s patients | "
                     + " | ".join(_cell(result["questions"][s]["federated_vs_local"].get(site)) for s in seeds) + " |")
    lines.append("")
    lines.append("| arm | " + " | ".join(f"seed {s}: per-patient AUC [95% CI], selected round" for s in seeds) + " |")
    lines.append("|---|" + "---|" * len(seeds))
    for arm in result["arms"]:
        cells = []
        for s in seeds:
            run = result["runs"][s].get(arm) or {}
            pp = run.get("per_patient") or {}
            ci = pp.get("auc_ci")
            sel = (run.get("selection") or {}).get("round")
            cells.append("n/a" if pp.get("auc") is None else
                         f"{pp['auc']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "") + f", round {sel}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    closed = result.get("semi_supervised_gap_closed")
    gaps = [result["questions"][s].get("all_labels_vs_supervised") for s in seeds]
    if closed and any(g and g.get("difference_ci") and g["difference_ci"][0] <= 0 for g in gaps):
        lines.append("")
        lines.append("No share of the supervised -> all-labels gap is given: the gap's paired CI includes 0 "
                     "(every label does not beat the scenario's labels), so there is no gap to close.")
    elif closed and closed.get("share_of_mean_gap") is not None:
        lines.append("")
        lines.append(f"Share of the supervised -> all-labels gap closed by the scenario's objective: "
                     f"{closed['share_of_mean_gap']:.0%} of the mean gap (per seed: "
                     + ", ".join("n/a" if v is None else f"{v:.0%}" for v in closed["share_per_seed"]) + ").")
    return "\n".join(lines)
