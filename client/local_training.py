"""One round's local training set-up, shared by a training round and local fine-tuning.

A site trains in two places: each round (`train`), and, under `train.personalise =
finetune`, before scoring (fedir.client.personalise). Both must see the same rows, scaled
the same way, and the same objective and budget, or the fine-tuned arm would measure a
different recipe rather than personalisation.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, Context

from fedir.client.arms import training_rows
from fedir.client.inputs import SiteView, scale_rows
from fedir.client.objectives import Objective, ObjectiveParams, build_objective
from fedir.client.smote import oversampled
from fedir.client.training import TrainConfig
from fedir.config import Settings
from fedir.protocol import FeatureSums


def local_rows(settings: Settings, site: SiteView, config: ConfigRecord, context: Context,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x, y, n_synthetic): the rows this node trains on under its arm; tabular features
    standardised as the protocol says (the federation's statistics, or these rows' own; fused
    rows' clinical columns with the site's training patients' own: fedir.client.inputs.scale_rows);
    under `train.smote`, synthetic minority rows appended (fedir.client.smote), counted so
    that the site reports only its real patients."""
    x, y = training_rows(settings, site, context)
    if len(x):  # a tabular site's rows with these rows' own statistics; fused rows' clinical columns
        x = scale_rows(settings, config, site, x, FeatureSums.of(x.numpy()) if site.tabular else None)
    if not settings.train_smote:
        return x, y, 0
    if not site.tabular:
        raise ValueError("train.smote applies to tabular rows (a tabular site, or data.inputs = clinical)")
    return oversampled(x, y, seed)


LR_FLOOR = 0.05  # the cosine schedule's last round trains at this share of train.lr


def lr_factor(schedule: str, server_round: int, rounds: int) -> float:
    """The share of `train.lr` that round `server_round` of `rounds` trains at.

    "constant": 1. "cosine": half a cosine from 1 at round 1 to LR_FLOOR at the last round,
    floor + (1 - floor) * (1 + cos(pi * (r - 1) / (R - 1))) / 2, so the late rounds take small
    steps around the federation's model instead of each site pulling it toward its own
    optimum. Rounds past the last (a study extended on resume) stay at the floor; a
    one-round study trains at the full rate.
    """
    if schedule == "constant" or rounds <= 1:
        return 1.0
    progress = min(max(server_round - 1, 0) / (rounds - 1), 1.0)
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def round_recipe(settings: Settings, seed: int, server_round: int,
                 proximal_mu: float = 0.0) -> tuple[Objective, TrainConfig]:
    """The local objective and budget of round `server_round` (local-epochs or local-steps),
    its learning rate scaled by `train.lr-schedule` (lr_factor), the encoder frozen in
    rounds 1 to `train.freeze-rounds` under `train.freeze = "encoder"` (the round number
    is the one Flower's strategy puts in every train message, fedir.protocol.RoundConfig)."""
    objective = build_objective(
        settings.train_objective,
        ObjectiveParams(
            threshold=settings.train_threshold,
            unlabelled_weight=settings.train_unlabelled_weight,
            ema_decay=settings.train_ema_decay,
            mixup_alpha=settings.train_mixup_alpha,
            augment=settings.train_augment,
            temperature=settings.train_temperature,
            strong_cutout=settings.train_strong_cutout,
            bn_views=settings.train_bn_views,
            seed=seed,
        ),
        settings.task_kind,
    )
    config = TrainConfig(
        epochs=settings.train_local_epochs,
        batch_size=settings.train_batch_size,
        lr=settings.train_lr * lr_factor(settings.train_lr_schedule, server_round, settings.train_rounds),
        weight_decay=settings.train_weight_decay,
        seed=seed,
        unlabelled_ratio=settings.train_unlabelled_ratio,
        optimizer=settings.train_optimizer,
        steps=settings.train_local_steps,
        proximal_mu=proximal_mu,
        freeze_encoder=settings.train_freeze == "encoder" and server_round <= settings.train_freeze_rounds,
    )
    return objective, config
