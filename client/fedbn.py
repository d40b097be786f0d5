"""FedBN (Li et al. 2021): a site's normalisation layers never leave it.

Scanners differ in grey levels, noise and contrast; FedBN lets each site keep the
normalisation statistics and affine parameters that fit its own images while every other
weight is averaged. Under `train.fedbn`, the ClientApp strips normalisation entries
(weights, biases, running statistics, num_batches_tracked) from its reply and keeps them
in the node's `context.state`, which Flower persists per node for the whole run in
simulation and in deployment (module globals would not survive: a deployed ClientApp runs
each message in a fresh process). The server therefore never receives them, and after
the first round its global model has no normalisation entries to send.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

STATE_KEY = "fedbn-local-norm"
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
)


def norm_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's normalisation layers."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys |= {f"{prefix}.{k}" if prefix else k for k in module.state_dict()}
    return keys


def load_global(
    model: nn.Module, received: dict[str, torch.Tensor], state: RecordDict, fedbn: bool
) -> None:
    """Load the server's weights; under FedBN, then the site's own normalisation layers.

    Under FedBN the server may send the normalisation entries (round 1: the initial
    model) or not (later rounds); either way the site's stored ones win. A site with none
    stored yet starts from what it received, or from the model's initialisation. Any
    other missing or unexpected key is an error, as without FedBN.
    """
    if not fedbn:
        model.load_state_dict(received)
        return
    result = model.load_state_dict(received, strict=False)
    not_norm = sorted(set(result.missing_keys) - norm_keys(model))
    if not_norm or result.unexpected_keys:
        raise ValueError(
            f"global weights do not fit the model: missing {not_norm}, unexpected {result.unexpected_keys}"
        )
    if STATE_KEY in state.array_records:
        model.load_state_dict(state.array_records[STATE_KEY].to_torch_state_dict(), strict=False)


def reply_arrays(model: nn.Module, state: RecordDict, fedbn: bool) -> ArrayRecord:
    """The weights a site sends back; under FedBN its normalisation layers go to `state` instead."""
    weights = model.cpu().state_dict()
    if not fedbn:
        return ArrayRecord(weights)
    local = norm_keys(model)
    state[STATE_KEY] = ArrayRecord({k: v for k, v in weights.items() if k in local})
    return ArrayRecord({k: v for k, v in weights.items() if k not in local})
