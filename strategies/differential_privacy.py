"""Differential privacy at the coordinator: Flower's own central-DP wrappers around the
scenario's strategy (`privacy.dp`, fedir.config).

The wrapper is the outermost strategy: Flower's `start` loop runs its `configure_train`
(client-side modes add the clipping norm to the train config for the sites' mods) and
its `aggregate_train`, which clips each update (server-side modes), hands the replies to
the wrapped strategy (fedir's per-site capture, update validation, checkpoints, then
FedAvg or whichever Flower strategy the scenario names) and adds Gaussian noise to the
average. Evaluation passes through untouched.

Adaptive clipping (Andrew et al. 2021) moves the bound C each round by
C <- C exp(lr (clipped fraction - target clipped quantile)): more updates clipped than the
target raises the bound. Flower 1.41's `_geometric_update` has the sign the other way
round (the paper's rule is written for the *unclipped* fraction, and Flower feeds it the
clipped one), so with every update clipped its bound shrinks every round, towards zero
(tests/test_privacy.py measured 0.05 -> 0.045 where the paper's rule gives 0.055). fedir
extends both adaptive wrappers with `PaperQuantileRule`, which restores the paper's sign.

What Flower's wrappers do that a study should know: a round in which any site's reply is
an error is not aggregated at all (the model stays as it was, and that round's training
replies are not recorded; evaluation still is); noise is calibrated to the number of
sites sampled per round, given here as the federation's size times fraction-train.
"""

from __future__ import annotations

import math

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedir.config import Settings, SettingsError, check_dp


class PaperQuantileRule:
    """Mixin for Flower's adaptive-clipping wrappers: the clipping bound grows when more
    updates than `target_clipped_quantile` were clipped, and shrinks when fewer were."""

    clipping_norm: float
    clip_norm_lr: float
    target_clipped_quantile: float

    def _geometric_update(self, clipped_fraction: float) -> None:
        self.clipping_norm *= math.exp(self.clip_norm_lr * (clipped_fraction - self.target_clipped_quantile))


class ServerSideAdaptiveClipping(PaperQuantileRule, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping with the paper's update of the bound."""


class ClientSideAdaptiveClipping(PaperQuantileRule, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping with the paper's update of the bound."""


_FIXED = {"server-fixed": DifferentialPrivacyServerSideFixedClipping,
          "client-fixed": DifferentialPrivacyClientSideFixedClipping}
_ADAPTIVE = {"server-adaptive": ServerSideAdaptiveClipping,
             "client-adaptive": ClientSideAdaptiveClipping}


def sampled_sites(settings: Settings, n_sites: int, min_train_nodes: int) -> int:
    """How many sites Flower samples to train each round (its own rule, given n_sites)."""
    return max(int(n_sites * settings.strategy_fraction_train), min_train_nodes, 1)


def with_differential_privacy(strategy: Strategy, settings: Settings, n_sites: int,
                              min_train_nodes: int) -> Strategy:
    """`strategy` wrapped in the Flower DP wrapper `privacy.dp` names, or unchanged when off."""
    check_dp(settings.privacy_dp, fedbn=settings.train_fedbn,
             update_dtype=settings.train_update_dtype, arm=settings.federation_arm)
    mode = settings.privacy_dp
    if mode == "off":
        return strategy
    sampled = sampled_sites(settings, n_sites, min_train_nodes)
    if mode in _FIXED:
        try:
            return _FIXED[mode](strategy, noise_multiplier=settings.privacy_noise_multiplier,
                                clipping_norm=settings.privacy_clipping_norm, num_sampled_clients=sampled)
        except ValueError as exc:
            raise SettingsError(f"privacy.dp = {mode!r}: {exc}") from None
    try:
        return _ADAPTIVE[mode](strategy, noise_multiplier=settings.privacy_noise_multiplier,
                               num_sampled_clients=sampled,
                               initial_clipping_norm=settings.privacy_clipping_norm,
                               target_clipped_quantile=settings.privacy_target_quantile,
                               clip_norm_lr=settings.privacy_clip_norm_lr,
                               clipped_count_stddev=settings.privacy_clipped_count_stddev or None)
    except ValueError as exc:  # Flower's own check of the parameters, e.g. too little count noise
        raise SettingsError(f"privacy.dp = {mode!r}: {exc}") from None


def inner_strategy(strategy: Strategy) -> Strategy:
    """The scenario's own strategy inside a DP wrapper (for checkpoint state), else itself."""
    wrappers = (*_FIXED.values(), *_ADAPTIVE.values())
    return strategy.strategy if isinstance(strategy, wrappers) else strategy
