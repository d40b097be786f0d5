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

Which entries stay is decided once, by fedir.models.kept_keys (FedBN's normalisation
layers, the output bias under `train.personalise = intercept`); this module only withholds,
stores and restores that set, and fedir.protocol encodes what is left.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from flwr.app import ArrayRecord, RecordDict
from torch import nn

from fedir.models import state_arrays
from fedir.protocol import encode_weights

STATE_KEY = "fedbn-local-norm"


def load_global(
    model: nn.Module, received: Mapping[str, torch.Tensor], state: RecordDict, kept: Collection[str] = (),
) -> None:
    """Load the server's weights, then the site's own `kept` entries (fedir.models.kept_keys).

    The server may send kept entries (round 1: the initial model) or not (later rounds);
    either way the site's stored ones win. A site with none stored yet starts from what it
    received, or from the model's initialisation. Any other missing or unexpected key is
    an error, as when nothing is kept.
    """
    if not kept:
        model.load_state_dict(received)
        return
    result = model.load_state_dict(received, strict=False)
    not_kept = sorted(set(result.missing_keys) - set(kept))
    if not_kept or result.unexpected_keys:
        raise ValueError(
            f"global weights do not fit the model: missing {not_kept}, unexpected {result.unexpected_keys}"
        )
    if STATE_KEY in state.array_records:
        model.load_state_dict(state.array_records[STATE_KEY].to_torch_state_dict(), strict=False)


def reply_arrays(model: nn.Module, state: RecordDict, kept: Collection[str] = (), dtype: str = "float32",
                 dp: bool = False) -> ArrayRecord:
    """The weights a site sends back (fedir.protocol.encode_weights: floats as `dtype`, DP's
    shapes under differential privacy); the `kept` entries go to `state` instead."""
    if kept:
        state[STATE_KEY] = ArrayRecord({k: v for k, v in model.cpu().state_dict().items() if k in kept})
    return encode_weights(state_arrays(model), kept=kept, dtype=dtype, dp=dp)
