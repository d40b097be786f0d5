"""One round's local training set-up, shared by a training round and local fine-tuning.

A site trains in two places: each round (`train`), and, under `train.personalise =
finetune`, before scoring (fedir.client.personalise). Both must see the same rows, scaled
the same way, and the same objective and budget, or the fine-tuned arm would measure a
different recipe rather than personalisation.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context

from fedir.client.arms import training_rows
from fedir.client.inputs import SiteView, scaled, scaler
from fedir.client.objectives import Objective, ObjectiveParams, build_objective
from fedir.client.smote import oversampled
from fedir.client.training import TrainConfig
from fedir.config import Settings
from fedir.protocol import FeatureSums


def local_rows(settings: Settings, site: SiteView, config: ConfigRecord, context: Context,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y, n_synthetic): the rows this node trains on under its arm; tabular features
    standardised as the protocol says (the federation's statistics, or these rows' own);
    under `train.smote`, synthetic minority rows appended (fedir.client.smote), counted so
    that the site reports only its real patients."""
    x, y = training_rows(settings, site, context)
    if site.tabular and len(x):
        x = scaled(x, *scaler(settings, config, FeatureSums.of(x.numpy())))
    if not settings.train_smote:
        return x, y, 0
    if not site.tabular:
        raise ValueError("train.smote applies to tabular rows (a tabular site, or data.inputs = clinical)")
    return oversampled(x, y, seed)


def round_recipe(settings: Settings, seed: int, proximal_mu: float = 0.0) -> tuple[Objective, TrainConfig]:
    """The local objective and budget of one round (local-epochs or local-steps)."""
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
    config = TrainConfig(
        epochs=settings.train_local_epochs,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr,
        weight_decay=settings.train_weight_decay,
        seed=seed,
        unlabelled_ratio=settings.train_unlabelled_ratio,
        optimizer=settings.train_optimizer,
        steps=settings.train_local_steps,
        proximal_mu=proximal_mu,
    )
    return objective, config
