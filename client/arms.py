"""The three arms of a study, as seen by a site: federated, local-only, pooled.

- federated: train from the global weights the server sends (the strategy aggregates).
- local: every site trains alone: it starts each round from its own previous weights,
  kept in `context.state` (which persists per node for the run), and is evaluated with
  them. The floor a federation must beat.
- pooled: all sites' training rows at one node (simulation only: partition 0 reads the
  other sites' folders, which no deployment may do); the other nodes train nothing and
  send a zero-weight update, so the server's FedAvg keeps the pooled model. Every site
  evaluates it on its own test patients. The ceiling. Under `federation.pooled-batches =
  "per-site"` (the default) each of its batches comes from one site (`row_sites`), as at a
  FedAvg site, so that BatchNorm never normalises two scanners in one batch; a pooled node
  that mixes them is a weaker model, not a ceiling (benchmarks/README.md, "Does the demo
  pay off?").
Every arm is evaluated in the same way, by the same `evaluate` of the ClientApp.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context

from fedir.client.inputs import SiteView, view_of
from fedir.config import Settings

LOCAL_KEY = "local-model"


def start_weights(settings: Settings, received: ArrayRecord, context: Context) -> ArrayRecord:
    """The weights a site trains or evaluates from: its own under the local arm."""
    if settings.federation_arm == "local" and LOCAL_KEY in context.state.array_records:
        return context.state.array_records[LOCAL_KEY]
    return received


def keep_local(settings: Settings, arrays: ArrayRecord, context: Context) -> None:
    """Under the local arm, remember this site's weights for its next round and evaluation."""
    if settings.federation_arm == "local":
        context.state.array_records[LOCAL_KEY] = arrays


def training_rows(settings: Settings, own: SiteView, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) this node trains on under its arm."""
    if settings.federation_arm != "pooled":
        return own.train_x, own.train_y
    if "partition-id" not in context.node_config:
        raise ValueError("federation.arm = pooled is a simulation arm: it needs federation.sites")
    if int(context.node_config["partition-id"]) != 0:
        return own.train_x[:0], own.train_y[:0]
    views = [view_of(str(site), settings) for site in settings.sites]
    return torch.cat([v.train_x for v in views]), torch.cat([v.train_y for v in views])


def unlabelled_rows(settings: Settings, own: SiteView, context: Context) -> torch.Tensor | None:
    """The unlabelled images this node trains on under its arm, where its targets cannot
    mark a row unlabelled (SiteView.train_unlabelled: segmentation's frames without a mask);
    None where they can (train_y's -1) or the objective ignores them. Pooled: every site's
    at partition 0, none elsewhere, as training_rows."""
    if own.train_unlabelled is None or settings.train_objective == "supervised":
        return None
    if settings.federation_arm != "pooled":
        return own.train_unlabelled
    if int(context.node_config["partition-id"]) != 0:
        return own.train_unlabelled[:0]
    parts = [view_of(str(site), settings).train_unlabelled for site in settings.sites]
    return torch.cat([p for p in parts if p is not None])


def row_sites(settings: Settings, own: SiteView, context: Context) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The site index of every row training_rows and unlabelled_rows return, where batches
    must come from one site (the pooled node under `federation.pooled-batches = "per-site"`);
    None where a batch may mix rows (every other node and setting).

    Returns:
        (sites of the training rows, (N,) int64; sites of the unlabelled rows, (M,) int64,
        or None where unlabelled_rows returns None), in the order of `settings.sites`.
    """
    if settings.federation_arm != "pooled" or settings.federation_pooled_batches != "per-site":
        return None
    if int(context.node_config["partition-id"]) != 0:
        return None
    views = [view_of(str(site), settings) for site in settings.sites]

    def indices(counts: list[int]) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))

    train = indices([len(v.train_y) for v in views])
    if unlabelled_rows(settings, own, context) is None:
        return train, None
    return train, indices([0 if v.train_unlabelled is None else len(v.train_unlabelled) for v in views])
