"""FedBN (Li et al. 2021): a site's normalisation layers never leave it.

Scanners differ in grey levels, noise and contrast; FedBN lets each site keep the
normalisation statistics and affine parameters that fit its own images while every other
weight is averaged. Under `train.fedbn`, the ClientApp strips normalisation entries
(weights, biases, running statistics, num_batches_tracked) from its reply and keeps them
in the node's `context.state`, which Flower persists per node for the whole run in
simulation and in deployment (module globals would not survive: a deployed ClientApp runs
each message in a fresh process). The server therefore never receives them, and after
the first round its global model has no normalisation entries to send. Which entries
are normalisation layers is decided in fedir.models, shared with the server.

The same mechanism keeps any other named entries at the site: `extra` (the output bias
under `train.personalise = intercept`, fedir.models) is withheld, stored and
restored exactly like the normalisation layers, with or without FedBN.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedir.models import dp_arrays, norm_keys
from fedir.protocol import UPDATE_DTYPES

STATE_KEY = "fedbn-local-norm"


def _kept(model: nn.Module, fedbn: bool, extra: Collection[str]) -> set[str]:
    return (norm_keys(model) if fedbn else set()) | set(extra)


def load_global(
    model: nn.Module, received: dict[str, torch.Tensor], state: RecordDict, fedbn: bool,
    extra: Collection[str] = (),
) -> None:
    """Load the server's weights; under FedBN, then the site's own normalisation layers.

    Under FedBN the server may send the normalisation entries (round 1: the initial
    model) or not (later rounds); either way the site's stored ones win. A site with none
    stored yet starts from what it received, or from the model's initialisation. Any
    other missing or unexpected key is an error, as without FedBN. `extra` entries are
    kept at the site in the same way.
    """
    kept = _kept(model, fedbn, extra)
    if not kept:
        model.load_state_dict(received)
        return
    result = model.load_state_dict(received, strict=False)
    not_norm = sorted(set(result.missing_keys) - kept)
    if not_norm or result.unexpected_keys:
        raise ValueError(
            f"global weights do not fit the model: missing {not_norm}, unexpected {result.unexpected_keys}"
        )
    if STATE_KEY in state.array_records:
        model.load_state_dict(state.array_records[STATE_KEY].to_torch_state_dict(), strict=False)


def reply_arrays(model: nn.Module, state: RecordDict, fedbn: bool, dtype: str = "float32",
                 extra: Collection[str] = (), dp: bool = False) -> ArrayRecord:
    """The weights a site sends back, floats as `dtype` (fedir.protocol; under differential
    privacy every array as a float); under FedBN its normalisation layers, and the `extra`
    entries, go to `state` instead."""
    weights = model.cpu().state_dict()
    kept = _kept(model, fedbn, extra)
    if not kept:
        return to_wire(weights, dtype, dp)
    state[STATE_KEY] = ArrayRecord({k: v for k, v in weights.items() if k in kept})
    return to_wire({k: v for k, v in weights.items() if k not in kept}, dtype, dp)


_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_wire(state_dict: dict[str, torch.Tensor], dtype: str, dp: bool = False) -> ArrayRecord:
    """A site's weights as the ArrayRecord it sends, floats cast to `dtype`; under
    differential privacy every array a float with at least one dimension (fedir.config)."""
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"train.update-dtype = {dtype!r}: choose one of {', '.join(UPDATE_DTYPES)}")
    if dp:
        state_dict = dp_arrays(state_dict)
    target = _TORCH_DTYPES[dtype]
    return ArrayRecord({k: v.to(target) if v.is_floating_point() else v for k, v in state_dict.items()})
