"""What FedBN keeps at the site: the model's normalisation layers.

Both sides need the same answer: the client withholds these entries from its reply
(fedir.client.fedbn), and the server's update validation must then expect a reply
without them (its template is `shared_state`), or it would reject every site.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm,
)


def norm_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of the model's normalisation layers (weights, biases, running
    statistics, num_batches_tracked)."""
    keys: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_LAYERS):
            keys |= {f"{prefix}.{k}" if prefix else k for k in module.state_dict()}
    return keys


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the normalisation layers: what a site sends under FedBN."""
    local = norm_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in local}
