"""Strategies named in the scenario: Flower's classes with per-site capture, and sampling."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Krum

from fedir.config import Settings, SettingsError
from fedir.strategies.per_site import PerSiteCapture
from fedir.strategies.registry import STRATEGIES, build_strategy, strategy_kwargs


def _noop(*_args):
    return None


TEMPLATE = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
CALLBACKS = {"on_train": _noop, "on_evaluate": _noop, "on_reject": _noop, "template": TEMPLATE}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_name_builds_flowers_class_with_capture(name):
    strategy = build_strategy(Settings(strategy_name=name), 4, **CALLBACKS)
    assert isinstance(strategy, STRATEGIES[name].cls) and isinstance(strategy, PerSiteCapture)
    # the capture runs first, then Flower's own aggregation
    mro = type(strategy).__mro__
    assert mro.index(PerSiteCapture) < mro.index(STRATEGIES[name].cls)


def test_strategy_parameters_reach_flowers_constructor():
    adam = build_strategy(Settings(strategy_name="fedadam", strategy_eta=0.05, strategy_tau=1e-4),
                          4, **CALLBACKS)
    assert isinstance(adam, FedAdam) and adam.eta == 0.05 and adam.tau == 1e-4
    prox = build_strategy(Settings(strategy_name="fedprox", strategy_proximal_mu=0.3), 4,
                          **CALLBACKS)
    assert isinstance(prox, FedProx) and prox.proximal_mu == 0.3
    krum = build_strategy(Settings(strategy_name="krum", strategy_num_malicious_nodes=1), 4,
                          **CALLBACKS)
    assert isinstance(krum, Krum) and krum.num_malicious_nodes == 1


def test_unknown_strategy_is_a_settings_error():
    with pytest.raises(SettingsError, match="fedsgd"):
        strategy_kwargs(Settings(strategy_name="fedsgd"), 4)


def test_sampling_fraction_and_minimum_sites():
    kw = strategy_kwargs(Settings(strategy_fraction_train=0.5, strategy_fraction_evaluate=0.25), 8)
    assert kw["fraction_train"] == 0.5 and kw["min_train_nodes"] == 4
    assert kw["min_evaluate_nodes"] == 2 and kw["min_available_nodes"] == 8
    kw = strategy_kwargs(Settings(strategy_fraction_train=0.1, federation_min_sites=3), 8)
    assert kw["min_train_nodes"] == 3 and kw["min_available_nodes"] == 3
    kw = strategy_kwargs(Settings(), 4)  # default: every site, every round
    assert kw["min_train_nodes"] == kw["min_evaluate_nodes"] == kw["min_available_nodes"] == 4


def test_local_and_pooled_arms_aggregate_with_plain_fedavg():
    for arm in ("local", "pooled"):
        s = build_strategy(Settings(federation_arm=arm, strategy_name="fedadam"), 4,
                           **CALLBACKS)
        assert type(s).__mro__[3] is FedAvg  # capture, validation, then Flower's FedAvg
