"""The ClientApp a hospital runs: one small function per message type.

`query` answers the server's feature-statistics query (n / sum / sum of squares of a
tabular site's training features). `train` loads the site (decoded once, then cached),
sets the global weights (keeping the site's own normalisation layers under FedBN,
fedir.client.kept_state), trains
locally and returns the new weights with aggregate counts. `evaluate` scores the site's
held-out patients and returns aggregates only (fedir.protocol). The site folder comes from
node config `site-dir` in deployment, or, in simulation, from the run's site list indexed
by the node's `partition-id`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedir.client import site_state
from fedir.client.adapt_bn import adapted
from fedir.client.arms import keep_local, row_sites, start_weights, unlabelled_rows
from fedir.client.audit_log import audit_mod
from fedir.client.datacard import card_once
from fedir.client.dp_mods import dp_clipping_mod
from fedir.client.drift import period_metrics
from fedir.client.embedding import embedding_groups, embedding_moments, predict_with_embedding
from fedir.client.input_sensitivity import input_sensitivity
from fedir.client.inputs import SiteView, scale_rows, view_of
from fedir.client.kept_state import load_global, reply_arrays
from fedir.client.local_training import local_rows, round_recipe
from fedir.client.manifest import ManifestError
from fedir.client.objectives import ObjectiveParams, SimCLR
from fedir.client.personalise import personalised
from fedir.client.pretraining import NOT_SCORED, pretraining_metrics
from fedir.client.secure_aggregation import secure_aggregation_mod
from fedir.client.site import SiteUnusable
from fedir.client.training import pick_device, predict, train
from fedir.config import Settings
from fedir.models import as_tensors, build_model, kept_keys, projection_dim, resolve_model, state_shapes
from fedir.protocol import (
    decode_cross_site_models,
    decode_instruction,
    decode_round_config,
    decode_weights,
    encode_cross_site,
    encode_evaluation,
    encode_feature_sums,
    encode_training,
)
from fedir.tasks import task_of
from fedir.tasks.multiclass_metrics import class_priors

log = logging.getLogger(__name__)


def site_dir_of(context: Context, settings: Settings) -> Path:
    """The node's site folder: node config `site-dir`, else the simulation's partition."""
    if "site-dir" in context.node_config:
        return Path(str(context.node_config["site-dir"]))
    if "partition-id" in context.node_config:
        sites = settings.sites
        pid = int(context.node_config["partition-id"])
        if pid >= len(sites):
            raise ValueError(f"partition {pid} has no site: federation.sites lists {len(sites)}")
        return Path(sites[pid])
    raise ValueError("this node has no site: set node config site-dir=/path/to/site")


def cache_dir_of(context: Context) -> Path | None:
    """Node config `cache-dir`: where a site whose folder is read-only keeps its decoded
    images and its state between rounds (None: the site folder's `.fedir-cache/`)."""
    return Path(str(context.node_config["cache-dir"])) if "cache-dir" in context.node_config else None


def _view(context: Context, fixed: Settings | None) -> tuple[Settings, SiteView]:
    settings = fixed or Settings.from_run_config(context.run_config)
    try:
        cache = cache_dir_of(context)
        return settings, view_of(str(site_dir_of(context, settings).resolve()), settings,
                                 None if cache is None else str(cache))
    except ManifestError as exc:
        # The full message (with paths) stays in the site's log; only the path-free
        # text leaves the site, because file names can carry patient names.
        log.error("%s", exc)
        raise SiteUnusable(f"{exc.public}; run `fedir data check` at the site") from None


def _model_from(arrays: ArrayRecord, context: Context, settings: Settings, view: SiteView):
    """The model to train or evaluate, with the site's own normalisation layers under FedBN."""
    model = build_model(resolve_model(settings.model_name, view.tabular, settings.task_kind), n_features=view.n_features,
                        spatial_dims=settings.spatial_dims, n_outputs=task_of(settings.task_kind).n_outputs(settings.task_classes),
                        fused_image_size=settings.model_image_size if view.n_clinical else 0,
                        projection=projection_dim(settings))
    received = as_tensors(decode_weights(arrays, state_shapes(model)))  # DP's shapes undone
    load_global(model, received, context.state, kept_keys(model, settings))
    return model


def _received(content: RecordDict, context: Context, fixed: Settings | None, *, training: bool):
    """What a train or evaluate message sets up: the settings, the site, the round's
    config and the model to start from (the site's own weights under the local arm),
    with the site's saved state put back when a resumed run reaches this node
    (fedir.client.site_state)."""
    settings, site = _view(context, fixed)
    received, config = decode_instruction(content)
    site_state.restore(context, site_dir_of(context, settings).resolve(), config, before_training=training,
                       cache_dir=cache_dir_of(context))
    arrays = start_weights(settings, received, context)
    return settings, site, config, _model_from(arrays, context, settings, site)


def evaluation_model(content: RecordDict, context: Context, fixed: Settings | None = None):
    """(settings, site, config, model) as an evaluate message sets them up: the model the
    site scores with (the global weights, or its own under the local arm, with what it keeps,
    its personalisation and, under eval.adapt-bn or FedBN, its own BatchNorm statistics). Exposed so that a simulation's comparison of arms
    (fedir.simulations.compare) scores each arm's model exactly as the sites did."""
    settings, site, config, model = _received(content, context, fixed, training=False)
    return settings, site, config, adapted(personalised(model, settings, site, config, context), settings, site)


def scored_rows(settings: Settings, site: SiteView, config, split: str = "test") -> tuple:
    """The labelled inputs of the val or test split, their labels (numpy) and patient ids."""
    x, y, split_patients = site.split(split)
    labelled = y >= 0 if y.dim() == 1 else torch.ones(y.shape[0], dtype=torch.bool)  # survival: every row
    # The clinical columns (a tabular site's rows, fused rows' last ones) are scaled as the
    # protocol says: the federation's statistics, or this site's own training statistics
    # (never its validation or test rows).
    x = scale_rows(settings, config, site, x[labelled])
    patients = [p for p, keep in zip(split_patients, labelled.tolist()) if keep]
    return x, y[labelled].numpy(), patients


def _metrics(settings: Settings, config, site: SiteView, labels, scores, patients, *, intervals: bool = True) -> dict:
    """The task kind's site metrics (fedir.tasks) of one split's scores; without `intervals`
    no bootstrap runs (the validation split: only its point estimates and histograms choose
    the round and the threshold, so its intervals would cost as much as the test's and
    serve nothing). A K > 2 study with task.decision = balanced decides with the class
    prevalence of the site's labelled training patients (site.label_counts)."""
    balanced = settings.task_classes > 2 and settings.task_decision == "balanced"
    return task_of(settings.task_kind).site_metrics(
        labels,
        scores,
        patients,
        n_boot=settings.eval_bootstrap if intervals else 0,
        seed=settings.round_seed(decode_round_config(config).server_round),
        threshold=settings.eval_threshold,
        bins=settings.eval_hist_bins,
        classes=settings.task_classes,
        priors=class_priors(site.label_counts, settings.task_classes) if balanced else None,
        time_bins=settings.eval_time_bins,
        time_bin_days=settings.eval_time_bin_days,
    )


def _scores(settings: Settings, model, x):
    """The task kind's score of every row (fedir.tasks: a probability, a risk)."""
    return predict(model, x, pick_device(), score=task_of(settings.task_kind).score)


def _drift(settings: Settings, config, site: SiteView, labels, scores, patients) -> dict | None:
    """The test patients' metrics per acquisition period (fedir.client.drift); None when
    eval.drift-period is off, the site's manifest has no `acquired` column, or the task is
    not binary classification (the periods carry a binary AUC; task.classes > 2 has none yet)."""
    if (settings.eval_drift_period == "off" or not site.acquired or settings.task_kind != "classification"
            or settings.task_classes != 2):
        return None
    return period_metrics(labels, scores, patients, site.acquired, settings.eval_drift_period,
                          n_boot=settings.eval_bootstrap, bins=settings.eval_hist_bins,
                          seed=settings.round_seed(decode_round_config(config).server_round))


def _sensitivity(settings: Settings, config, site: SiteView, model, x, labels, patients) -> dict | None:
    """A fused model's per-input AUC drops on the test patients (fedir.client.input_sensitivity);
    None unless data.inputs = image+clinical."""
    if not site.n_clinical:
        return None
    return input_sensitivity(lambda rows: _scores(settings, model, rows), x, labels, patients, site.features,
                             (1,) + (settings.model_image_size,) * settings.spatial_dims,
                             repeats=settings.eval_sensitivity_repeats, blur=settings.eval_sensitivity_blur,
                             n_boot=settings.eval_bootstrap,
                             seed=settings.round_seed(decode_round_config(config).server_round))


def _pretraining_evaluation(settings: Settings, site: SiteView, config, model) -> RecordDict:
    """The evaluation reply of a pretraining study (train.objective = simclr; what it
    reports: fedir.client.pretraining): the pretraining metrics of the validation and test
    images, labelled or not, the embedding's moments over the test images (per class where
    labelled), and the classification metric sets empty, their reasons saying why."""
    seed = settings.round_seed(decode_round_config(config).server_round)
    objective = SimCLR(ObjectiveParams(temperature=settings.train_temperature,
                                       strong_cutout=settings.train_strong_cutout, seed=seed))
    device = pick_device()
    splits = {}
    for split in ("test", "val"):
        x, _, _ = site.split(split)
        splits[split] = pretraining_metrics(model, x, device, objective)
    moments = None
    if settings.bias_embedding:
        x, y, _ = site.split("test")
        _, features = predict_with_embedding(model, x, device)
        moments = embedding_moments(features, *embedding_groups(settings.task_kind, y.numpy(), settings.task_classes))
    empty = torch.zeros(0, dtype=torch.int64).numpy(), torch.zeros(0).numpy(), []
    unscored = [_metrics(settings, config, site, *empty, intervals=False) for _ in range(2)]
    for metrics in unscored:
        for level in (metrics, metrics.get("per_patient") or {}):
            level["reasons"] = {name: NOT_SCORED for name in level.get("reasons", {})}
    return encode_evaluation(site.name, unscored[0], moments, unscored[1], kind=settings.task_kind,
                             pretraining=splits)


def build_client_app(settings: Settings | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp. Settings come from the run config Flower delivers, unless given
    here (`fedir simulate` builds the apps from a scenario file). `mods` are Flower client
    mods wrapped around every message handler (the wire audit test captures replies so);
    then the site's own audit log (fedir.client.audit_log), which records what leaves the
    site after everything else (under secure aggregation: the masked vectors), then SecAgg+
    when the run asks for it (fedir.client.secure_aggregation), and innermost the client-side
    DP clipping the run may ask for (fedir.client.dp_mods)."""
    audit = audit_mod(lambda context: site_dir_of(context, settings or Settings.from_run_config(context.run_config)))
    app = ClientApp(mods=[*mods, audit, secure_aggregation_mod(settings), dp_clipping_mod(settings)])
    fixed = settings

    @app.query()
    def query_fn(msg: Message, context: Context) -> Message:
        """The feature-statistics query: a tabular site's n / sum / sum of squares."""
        _, view = _view(context, fixed)
        return Message(content=encode_feature_sums(view.features, view.train_sums()), reply_to=msg)

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        settings, site, config, model = _received(msg.content, context, fixed, training=True)
        sent = decode_round_config(config)
        seed = settings.round_seed(sent.server_round)
        objective, recipe = round_recipe(settings, seed, sent.server_round, sent.proximal_mu)
        x, y, synthetic = local_rows(settings, site, config, context, seed)
        result = train(model, x, y, objective, recipe, pick_device(), unlabelled_rows(settings, site, context),
                       row_sites(settings, site, context))
        keep_local(settings, ArrayRecord(model.cpu().state_dict()), context)
        arrays = reply_arrays(model, context.state, kept_keys(model, settings), settings.train_update_dtype,
                              settings.dp)
        content = encode_training(
            site.name,
            arrays,
            loss=result.loss if result.steps else None,
            steps=result.steps,
            n_labelled=result.n_labelled - synthetic,  # real patients only (fedir.client.smote)
            n_unlabelled=result.n_unlabelled,
            label_counts=site.label_counts,
            num_classes=settings.task_classes,
            skipped=site.skipped,
            card=None if site.imaging is None else card_once(context, site.imaging, settings),
            foreground=site.foreground,
            weight=result.weight - synthetic,
        )
        site_state.persist(context, site_dir_of(context, settings).resolve(), config, cache_dir_of(context))
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        settings, site, config, model = evaluation_model(msg.content, context, fixed)
        if settings.train_objective == "simclr":  # nothing to score with labels (fedir.client.pretraining)
            return Message(content=_pretraining_evaluation(settings, site, config, model), reply_to=msg)
        x, labels, patients = scored_rows(settings, site, config)
        moments = None
        if settings.task_kind != "survival" and settings.bias_embedding:  # moments per class
            scores, features = predict_with_embedding(model, x, pick_device(), score=task_of(settings.task_kind).score)
            moments = embedding_moments(features, *embedding_groups(settings.task_kind, labels, settings.task_classes))
        else:
            scores = _scores(settings, model, x)
        metrics = _metrics(settings, config, site, labels, scores, patients)
        # the validation patients' aggregates, from which the server chooses
        val_x, val_labels, val_patients = scored_rows(settings, site, config, "val")
        val = _metrics(settings, config, site, val_labels, _scores(settings, model, val_x), val_patients,
                       intervals=False)
        drift = _drift(settings, config, site, labels, scores, patients)
        sensitivity = _sensitivity(settings, config, site, model, x, labels, patients)
        return Message(content=encode_evaluation(site.name, metrics, moments, val, drift, kind=settings.task_kind,
                                                 sensitivity=sensitivity),
                       reply_to=msg)

    @app.evaluate("cross_site")
    def cross_site_fn(msg: Message, context: Context) -> Message:
        """Score every site's model (sent by the server after the last round) on this
        site's test patients: one row of the cross-site matrix, aggregates only."""
        settings, site = _view(context, fixed)
        models, config = decode_cross_site_models(msg.content)
        x, labels, patients = scored_rows(settings, site, config)
        row = {}
        for model_site, arrays in models.items():
            model = adapted(_model_from(arrays, context, settings, site), settings, site)
            # the kind's score and site metrics, as evaluate_fn's (a segmentation's label
            # maps and per-patient Dice with its patient-bootstrap CI)
            row[model_site] = _metrics(settings, config, site, labels, _scores(settings, model, x), patients)
        metric = task_of(settings.task_kind).CROSS_SITE_METRIC
        return Message(content=encode_cross_site(site.name, row, metric=metric), reply_to=msg)

    return app


app = build_client_app()
