"""Personalised arms: what a site keeps for itself (`train.personalise`).

- `none`: every parameter is shared (plain federated learning).
- `intercept`: the output layer's bias (the model's intercept) never leaves the site. Each
  site learns it locally, from its own label prevalence, on top of the shared weights;
  the server never sees it, exactly as FedBN's normalisation layers (fedir.fedbn).
- `finetune`: every parameter is shared, but before each evaluation a site trains a copy
  of the global model for one round's local budget on its own training rows and scores
  that copy (fedir.client.personalise); the copy is then dropped.

Personalised gains come mostly from learning a site's prevalence, i.e. from the site
itself: the same shortcut the bias checks look for. Report them beside the bias verdict,
never as a better model. Both sides need `kept_keys`: the client withholds those entries,
and the server's update validation and initial arrays must leave them out too.
"""

from __future__ import annotations

import torch
from torch import nn

from fedir.config import Settings, SettingsError
from fedir.fedbn import norm_keys

PERSONALISE = ("none", "intercept", "finetune")


def check_personalise(settings: Settings) -> str:
    """The setting, validated: a known value, and only for the federated arm (the local
    arm is already fully personal; the pooled arm has one model by definition)."""
    mode = settings.train_personalise
    if mode not in PERSONALISE:
        raise SettingsError(f"train.personalise = {mode!r}: choose one of {', '.join(PERSONALISE)}")
    if mode != "none" and settings.federation_arm != "federated":
        raise SettingsError(f"train.personalise = {mode!r} needs federation.arm = federated")
    return mode


def intercept_key(model: nn.Module) -> str:
    """The state-dict key of the output layer's bias: the last Linear layer's bias."""
    heads = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if not heads:
        raise ValueError("train.personalise = intercept: the model has no Linear output layer with a bias")
    return f"{heads[-1]}.bias" if heads[-1] else "bias"


def kept_keys(model: nn.Module, settings: Settings) -> set[str]:
    """State-dict entries that stay at the site: FedBN's normalisation layers and, under
    `personalise = intercept`, the output bias."""
    keys = norm_keys(model) if settings.train_fedbn else set()
    if check_personalise(settings) == "intercept":
        keys.add(intercept_key(model))
    return keys


def sent_state(model: nn.Module, settings: Settings) -> dict[str, torch.Tensor]:
    """The entries that cross the boundary: the server's initial arrays and the template
    its update validation checks replies against."""
    kept = kept_keys(model, settings)
    return {k: v for k, v in model.state_dict().items() if k not in kept}
