"""The ClientApp a hospital runs: one small function per message type.

`train` loads the site (decoded once, then cached), sets the global weights (keeping the
site's own normalisation layers under FedBN, fedir.client.fedbn), trains
locally and returns the new weights with aggregate counts. `evaluate` scores the site's
held-out patients and returns aggregates only (fedir.records). The site folder comes from
node config `site-dir` in deployment, or, in simulation, from the run's site list indexed
by the node's `partition-id`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from fedir.client.datacard import card_once
from fedir.client.fedbn import load_global, reply_arrays
from fedir.client.site import SiteData, SiteUnusable, load_site
from fedir.config import Settings
from fedir.manifest import ManifestError
from fedir.metrics import site_metrics
from fedir.objectives import ObjectiveParams, build_objective
from fedir.records import ARRAYS_KEY, METRICS_KEY, SITE_KEY, encode_evaluation, encode_training
from fedir.task import NUM_CLASSES, TrainConfig, build_model, pick_device, predict, train

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


@lru_cache(maxsize=8)
def _load_site_cached(
    site_dir: str, image_size: int, frame_policy: str, val_fraction: float, test_fraction: float
) -> SiteData:
    """Keep a decoded site in memory for the life of the process (a simulation actor
    serves every round); across processes the site's disk cache does the same job."""
    return load_site(
        site_dir,
        image_size=image_size,
        frame_policy=frame_policy,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )


def _site(context: Context, fixed: Settings | None) -> tuple[Settings, SiteData]:
    settings = fixed or Settings.from_run_config(context.run_config)
    try:
        site = _load_site_cached(
            str(site_dir_of(context, settings).resolve()),
            settings.model_image_size,
            settings.data_frame_policy,
            settings.data_val_fraction,
            settings.data_test_fraction,
        )
    except ManifestError as exc:
        log.error("%s", exc)
        raise SiteUnusable(f"{exc.public}; run `fedir data check` at the site") from None
    return settings, site


def _model_from(msg: Message, context: Context, settings: Settings):
    """The global model, with the site's own normalisation layers under FedBN."""
    model = build_model(settings.model_name)
    received = msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    load_global(model, received, context.state, settings.train_fedbn)
    return model


def build_client_app(settings: Settings | None = None, mods: Sequence[Mod] = ()) -> ClientApp:
    """The ClientApp. Settings come from the run config Flower delivers, unless given
    here (`fedir simulate` builds the apps from a scenario file). `mods` are Flower client
    mods wrapped around every message handler (the wire audit test captures replies so)."""
    app = ClientApp(mods=list(mods))
    fixed = settings

    @app.train()
    def train_fn(msg: Message, context: Context) -> Message:
        settings, site = _site(context, fixed)
        model = _model_from(msg, context, settings)
        server_round = int(msg.content.config_records["config"].get("server-round", 0))
        seed = settings.train_seed * 1000 + server_round
        objective = build_objective(
            settings.train_objective,
            ObjectiveParams(
                threshold=settings.train_threshold,
                unlabelled_weight=settings.train_unlabelled_weight,
                ema_decay=settings.train_ema_decay,
                mixup_alpha=settings.train_mixup_alpha,
                seed=seed,
            ),
        )
        result = train(
            model,
            site.train.images,
            site.train.labels,
            objective,
            TrainConfig(
                epochs=settings.train_local_epochs,
                batch_size=settings.train_batch_size,
                lr=settings.train_lr,
                weight_decay=settings.train_weight_decay,
                seed=seed,
                unlabelled_ratio=settings.train_unlabelled_ratio,
            ),
            pick_device(),
        )
        metrics, site_rec = encode_training(
            site.name,
            loss=result.loss if result.steps else None,
            steps=result.steps,
            n_labelled=result.n_labelled,
            n_unlabelled=result.n_unlabelled,
            label_counts=site.patient_label_counts("train"),
            num_classes=NUM_CLASSES,
            skipped=Counter(s.reason for s in site.skipped),
            card=card_once(context, site, settings),
        )
        content = RecordDict(
            {
                ARRAYS_KEY: reply_arrays(model, context.state, settings.train_fedbn),
                METRICS_KEY: metrics,
                SITE_KEY: site_rec,
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        settings, site = _site(context, fixed)
        model = _model_from(msg, context, settings)
        labelled = site.test.labels >= 0
        scores = predict(model, site.test.images[labelled], pick_device())
        labels = site.test.labels[labelled].numpy()
        patients = [p for p, keep in zip(site.test.patients, labelled.tolist()) if keep]
        server_round = int(msg.content.config_records["config"].get("server-round", 0))
        metrics = site_metrics(
            labels,
            scores,
            patients,
            n_boot=settings.eval_bootstrap,
            seed=settings.train_seed * 1000 + server_round,
            threshold=settings.eval_threshold,
            bins=settings.eval_hist_bins,
        )
        return Message(content=encode_evaluation(site.name, metrics), reply_to=msg)

    return app


app = build_client_app()
