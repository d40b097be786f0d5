"""Differential privacy options, as both sides of the trust boundary must read them.

`privacy.dp` picks one of Flower 1.41's own central-DP wrappers
(`flwr.serverapp.strategy.DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`):
each site's model update (its weights minus the global model it was sent) is clipped to
an L2 norm, and the server adds Gaussian noise of standard deviation
noise-multiplier x clipping-norm / sites to the average. Server-side modes clip at the
coordinator (it still sees each raw update); client-side modes clip at the site with
Flower's `fixedclipping_mod` / `adaptiveclipping_mod` before the update leaves it.

Two properties of Flower 1.41's clipping (`flwr.supercore.differential_privacy`) shape
what travels under DP. It scales every array of the update in place, so an integer array
cannot be scaled (numpy refuses the cast); and it computes each update with `np.subtract`,
which returns a numpy scalar, not an array, for a 0-d array, so the in-place scaling never
reaches it: a 0-d array (BatchNorm's `num_batches_tracked`) counts in the norm but is
left unclipped (tests/test_privacy.py caught it as a step of norm 10 under a bound of
0.05). So under DP every array travels as float32 with at least one dimension
(`dp_arrays`), and a site or the server puts them back into the model's own shapes
(`model_shaped`); load_state_dict casts the counters back to int64.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")


def check_dp(mode: str, *, fedbn: bool, update_dtype: str, arm: str) -> None:
    """Refuse combinations Flower's DP clipping cannot serve, naming the setting.

    FedBN: the site's reply lacks the normalisation layers it was sent, and Flower's
    client mods refuse a reply whose array names differ from the message's. float16
    uploads: the update would be clipped in half precision. Local and pooled arms average
    nothing a DP guarantee would apply to.
    """
    from fedir.config import SettingsError

    if mode not in DP_MODES:
        raise SettingsError(f"privacy.dp = {mode!r} is not one of {', '.join(DP_MODES)}")
    if mode == "off":
        return
    if fedbn:
        raise SettingsError(f"privacy.dp = {mode!r} cannot be combined with train.fedbn = true")
    if update_dtype != "float32":
        raise SettingsError(f"privacy.dp = {mode!r} needs train.update-dtype = \"float32\"")
    if arm != "federated":
        raise SettingsError(f"privacy.dp = {mode!r} needs federation.arm = \"federated\"")


def dp_arrays(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights as Flower's DP clipping can scale: integer buffers as float32,
    0-d tensors as shape (1,)."""
    out = {}
    for k, v in state_dict.items():
        v = v if v.is_floating_point() else v.to(torch.float32)
        out[k] = v.reshape(1) if v.dim() == 0 else v
    return out


def model_shaped(received: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """`dp_arrays` undone: each tensor back in the shape the model's own state has."""
    return {k: v.reshape(model_state[k].shape) if k in model_state else v for k, v in received.items()}
