"""The strategy a scenario names (`[strategy] name = "fedadam"`), built from Flower's own classes.

Each name maps to a class of `flwr.serverapp.strategy` and to the `strategy.*` settings
its constructor takes; the class is extended only with fedir's per-site capture
(fedir.strategies.per_site). Sampling (`fraction-train`, `fraction-evaluate`, the minimum
number of sites) is common to all of them. Keeping the parameter lists here, next to
the names, means a setting that a strategy does not take is never passed to it silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from fedir.config import Settings
from fedir.strategies.differential_privacy import with_differential_privacy
from fedir.strategies.per_site import Callback, with_per_site_capture
from fedir.strategies.secure_aggregation import build_secure_strategy
from fedir.strategies.validation import RejectCallback


@dataclass(frozen=True)
class StrategySpec:
    """A Flower strategy class and the `strategy.*` settings (field suffixes) it takes."""

    cls: type[Strategy]
    params: tuple[str, ...] = ()


_FEDOPT = ("eta", "eta_l", "tau")
# one entry per fedir.config.StrategyName (tests/test_settings.py checks they agree)
STRATEGIES: dict[str, StrategySpec] = {
    "fedavg": StrategySpec(FedAvg),
    "fedprox": StrategySpec(FedProx, ("proximal_mu",)),
    "fedadam": StrategySpec(FedAdam, _FEDOPT + ("beta_1", "beta_2")),
    "fedyogi": StrategySpec(FedYogi, _FEDOPT + ("beta_1", "beta_2")),
    "fedadagrad": StrategySpec(FedAdagrad, _FEDOPT),
    "fedavgm": StrategySpec(FedAvgM, ("server_learning_rate", "server_momentum")),
    "fedmedian": StrategySpec(FedMedian),
    "fedtrimmedavg": StrategySpec(FedTrimmedAvg, ("beta",)),
    "krum": StrategySpec(Krum, ("num_malicious_nodes",)),
}


def strategy_kwargs(settings: Settings, n_sites: int) -> dict[str, float | int]:
    """Constructor arguments: sampling for every strategy, plus the named one's own."""
    name = settings.strategy_name
    min_nodes = settings.federation_min_sites or max(n_sites, 1)
    # With sampling, the minimum is what the fraction asks of the sites (at least one),
    # unless min-sites says more: Flower samples max(fraction x available, min-nodes).
    min_train = min(min_nodes, max(1, int(n_sites * settings.strategy_fraction_train)))
    min_eval = min(min_nodes, max(1, int(n_sites * settings.strategy_fraction_evaluate)))
    kwargs: dict[str, float | int] = {
        "fraction_train": settings.strategy_fraction_train,
        "fraction_evaluate": settings.strategy_fraction_evaluate,
        "min_train_nodes": max(min_train, settings.federation_min_sites),
        "min_evaluate_nodes": max(min_eval, settings.federation_min_sites),
        "min_available_nodes": min_nodes,
    }
    for param in STRATEGIES[name].params:
        kwargs[param] = getattr(settings, f"strategy_{param}")
    return kwargs


def build_strategy(
    settings: Settings,
    n_sites: int,
    *,
    on_train: Callback,
    on_evaluate: Callback,
    on_reject: RejectCallback,
    template: ArrayRecord,
    outer: tuple[type, ...] = (),
    **extra: Any,
) -> Strategy:
    """The scenario's Flower strategy for a federation of n_sites, with per-site capture
    and update validation against `template` (the model's own arrays); `outer` mixins and
    their `extra` arguments go first (fedir.strategies.per_site.with_per_site_capture).
    Under `privacy.secure-aggregation`, the SecAgg+ path instead
    (fedir.strategies.secure_aggregation)."""
    kwargs = strategy_kwargs(settings, n_sites)
    if settings.secure_aggregation:
        # the sum of the sites' updates only: no per-update validation, no DP wrapper (refused)
        return build_secure_strategy(settings, kwargs, on_train=on_train, on_evaluate=on_evaluate,
                                     on_reject=on_reject, template=template, outer=outer, **extra)
    name = settings.strategy_name
    if settings.federation_arm != "federated":
        # Local-only and pooled arms keep one model per site / one pooled model: a server
        # optimiser (FedAdam...) or a robust rule would change what they measure.
        name, kwargs = "fedavg", {k: v for k, v in kwargs.items() if k.startswith(("fraction", "min"))}
    cls = with_per_site_capture(STRATEGIES[name].cls, *outer)
    strategy = cls(
        on_train=on_train,
        on_evaluate=on_evaluate,
        on_reject=on_reject,
        template=template,
        max_norm_ratio=settings.validation_max_norm_ratio,
        min_accepted=settings.validation_min_accepted,
        **kwargs,
        **extra,
    )
    return with_differential_privacy(strategy, settings, n_sites, int(kwargs["min_train_nodes"]))
