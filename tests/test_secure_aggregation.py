"""Secure aggregation (privacy.secure-aggregation = "secagg+"): Flower's SecAgg+ computes the
weighted mean of the sites' updates without the coordinator seeing one; sites that drop out
within the reconstruction threshold leave the round to the others; a site refuses to send an
update SecAgg+ cannot sum; the combinations that cannot work are refused when read.

The studies run through fedir's ServerApp logic and ClientApp in one process
(fedir.simulations.inprocess, each message serialised as Flower sends it), and once through
Flower's simulation engine, on small synthetic tabular sites (the TLS deployment:
tests/test_deployment.py); the updates each site computed are captured at the site, in the
clear, between its train handler and the SecAgg+ mod, to check the aggregate against them.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from fedir.client import secure_aggregation as site_secagg
from fedir.client.client_app import build_client_app
from fedir.client.secure_aggregation import update_problem
from fedir.config import SECURE_SUM_STRATEGIES, Settings, SettingsError
from fedir.models import build_model, kept_keys
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.strategies.registry import build_strategy
from fedir.strategies.secure_aggregation import LEGACY_STRATEGIES, SecureAggregation

pytestmark = pytest.mark.timeout(600)

N_SITES = 4


def _tabular_sites(root: Path, n_sites: int = N_SITES, seed: int = 0) -> list[str]:
    """Sites of 40-70 patients, 4 clinical features, a label that depends on two of them."""
    rng = np.random.default_rng(seed)
    sites = []
    for s in range(n_sites):
        site = root / f"site-{s}"
        site.mkdir(parents=True)
        n = int(rng.integers(40, 70))
        x = rng.normal(size=(n, 4)) + 0.3 * s
        y = (x[:, 0] - x[:, 1] + rng.normal(scale=0.7, size=n) > 0).astype(int)
        with (site / "manifest.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "label", "clin_a", "clin_b", "clin_c", "clin_d"])
            for i in range(n):
                w.writerow([f"s{s}p{i}", y[i], *(f"{v:.4f}" for v in x[i])])
        sites.append(str(site))
    return sites


def _settings(sites: list[str], **kw) -> Settings:
    base = dict(federation_sites=";".join(sites), model_name="logreg", train_rounds=2, train_local_steps=10,
                train_batch_size=8, train_optimizer="sgd", train_lr=0.05, eval_bootstrap=0, bias_bootstrap=0,
                privacy_secure_aggregation="secagg+")
    return Settings(**{**base, **kw})


class Spy:
    """What crossed, captured at the sites: each site's update in the clear (between its
    train handler and the SecAgg+ mod) with its weight, the global model each evaluation
    round was sent, and the array records of every training reply that left a site."""

    def __init__(self, monkeypatch, corrupt: tuple[int, int] | None = None) -> None:
        self.updates: dict[int, dict[int, tuple[dict[str, np.ndarray], float]]] = defaultdict(dict)
        self.globals: dict[int, dict[str, np.ndarray]] = {}
        self.sent: dict[int, dict[str, np.ndarray]] = {}  # the global model each round's training started from
        self.train_reply_arrays: list[int] = []
        original = site_secagg.legacy_fit

        def legacy_fit(msg, context, call_next, settings):
            server_round = int(msg.content.config_records["fitins.config"]["server-round"])
            partition = int(context.node_config["partition-id"])

            def handler(m, c):
                self.sent[server_round] = {k: a.numpy() for k, a in m.content.array_records["arrays"].items()}
                reply = call_next(m, c)
                arrays = reply.content.array_records["arrays"]
                if corrupt == (partition, server_round):  # the handler produced a NaN
                    name = next(iter(arrays))
                    bad = arrays[name].numpy().copy()
                    bad.flat[0] = np.nan
                    arrays[name] = Array(bad)
                weight = float(reply.content.metric_records["metrics"]["num-examples"])
                self.updates[server_round][partition] = ({k: a.numpy() for k, a in arrays.items()}, weight)
                return reply

            return original(msg, context, handler, settings)

        monkeypatch.setattr(site_secagg, "legacy_fit", legacy_fit)

    def mod(self, msg: Message, context: Context, call_next) -> Message:
        """Outermost client mod: the global model of each evaluate message, and what each
        train reply carries as arrays (an empty record under SecAgg+)."""
        if msg.metadata.message_type == "evaluate":
            config = msg.content.config_records["config"]
            self.globals[int(config["server-round"])] = {k: a.numpy() for k, a in msg.content.array_records["arrays"].items()}
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            self.train_reply_arrays.extend(len(r) for r in reply.content.array_records.values())
        return reply


def _study(tmp_path: Path, settings: Settings, spy: Spy, *extra_mods) -> dict:
    grid = InProcessGrid(build_client_app(settings, mods=[spy.mod, *extra_mods]), len(settings.sites),
                         settings.to_run_config())
    return run_study(grid, settings, tmp_path / "run", scenario="test")


def _tolerance(settings: Settings, weights: list[float]) -> float:
    """The most SecAgg+'s quantisation can move an entry of the mean: each site's stochastic
    rounding of its weighted value (one step of 2 C / Q, with its weight w / max_weight) and of
    its weight, over the summed weight; with float32's rounding of the result beside it."""
    step = 2 * settings.privacy_secagg_clipping_range / settings.privacy_secagg_quantization_range
    return (len(weights) + 1) * step * settings.privacy_secagg_max_weight / sum(weights) + 1e-6


def _assert_weighted_mean(settings: Settings, spy: Spy, server_round: int, sites: list[int]) -> float:
    """The global model after `server_round` is the num-examples-weighted mean of the updates
    of `sites` (FedAvg's aggregate of them), to quantisation tolerance; returns the largest
    difference."""
    updates = spy.updates[server_round]
    assert sorted(updates) == sorted(sites)
    weights = [updates[s][1] for s in sites]
    tol = _tolerance(settings, weights)
    worst = 0.0
    for name, got in spy.globals[server_round].items():
        expected = np.average(np.stack([updates[s][0][name] for s in sites]), axis=0, weights=weights)
        diff = float(np.abs(got - expected).max())
        assert diff <= tol, f"round {server_round} {name}: {diff:.3g} > {tol:.3g}"
        worst = max(worst, diff)
    return worst


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_secagg_computes_fedavgs_weighted_mean_and_the_server_sees_no_update(tmp_path, monkeypatch, strategy):
    sites = _tabular_sites(tmp_path / "fed")
    settings = _settings(sites, strategy_name=strategy, train_rounds=3)
    spy = Spy(monkeypatch)
    summary = _study(tmp_path, settings, spy)
    for server_round in (1, 2, 3):
        worst = _assert_weighted_mean(settings, spy, server_round, list(range(N_SITES)))
        assert worst > 0  # the quantised sum, not the updates themselves, made the model
    # every training reply left its site with empty array records: only masked integers
    assert spy.train_reply_arrays and set(spy.train_reply_arrays) == {0}
    assert summary["status"] == "finished" and set(summary["per_site"]) == {f"site-{i}" for i in range(N_SITES)}
    assert summary["privacy"]["secure_aggregation"] == "secagg+"
    assert not [n for n in summary["notes"] if n["kind"] in ("missing", "rejected")]
    # the bias analysis from the per-site evaluation aggregates stays
    assert summary["bias"]["alarm"] is not None


def test_fedavgm_takes_its_server_step_with_momentum_on_the_secure_mean(tmp_path, monkeypatch):
    """Flower's legacy FedAvgM on the unmasked mean: g_r = g_(r-1) - lr m_r with
    m_r = momentum m_(r-1) + (g_(r-1) - mean_r)."""
    sites = _tabular_sites(tmp_path / "fed")
    settings = _settings(sites, strategy_name="fedavgm", strategy_server_learning_rate=0.5,
                         strategy_server_momentum=0.5)
    spy = Spy(monkeypatch)
    _study(tmp_path, settings, spy)
    momentum: dict[str, np.ndarray] = {}
    for server_round in (1, 2):
        updates = spy.updates[server_round]
        weights = [updates[s][1] for s in range(N_SITES)]
        for name, start in spy.sent[server_round].items():
            mean = np.average(np.stack([updates[s][0][name] for s in range(N_SITES)]), axis=0, weights=weights)
            momentum[name] = 0.5 * momentum.get(name, 0.0) + (start - mean)
            expected = start - 0.5 * momentum[name]
            assert np.abs(spy.globals[server_round][name] - expected).max() <= 2 * _tolerance(settings, weights)


def _drop_at(partition: int, server_round: int, stage: str):
    """A client mod: node `partition` fails at SecAgg+'s `stage` of `server_round`."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        configs = msg.content.config_records.get("secaggplus_configs")
        if (configs is not None and configs.get("stage") == stage and int(msg.metadata.group_id) == server_round
                and context.node_config["partition-id"] == partition):
            raise ConnectionError(f"site went away during {stage} (test)")
        return call_next(msg, context)

    return mod


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_a_site_dropping_out_mid_round_leaves_the_round_to_the_others(tmp_path, monkeypatch, stage):
    sites = _tabular_sites(tmp_path / "fed")
    settings = _settings(sites)  # 4 sites, threshold max(round(0.67 x 4), 2) = 3: one may drop
    spy = Spy(monkeypatch)
    summary = _study(tmp_path, settings, spy, _drop_at(2, 2, stage))
    _assert_weighted_mean(settings, spy, 1, [0, 1, 2, 3])
    missing = [(n["round"], n["site"]) for n in summary["notes"] if n["kind"] == "missing"]
    if stage == "unmask":
        # its masked update was in by then: the sum is every site's, its mask rebuilt from the others' shares
        _assert_weighted_mean(settings, spy, 2, [0, 1, 2, 3])
        assert missing == []
    else:
        _assert_weighted_mean(settings, spy, 2, [0, 1, 3])
        assert missing == [(2, "site-2")]
        note = next(n for n in summary["notes"] if n["kind"] == "missing")
        assert f"site went away during {stage} (test)" in note["message"]
    assert summary["status"] == "finished"


def test_too_many_dropouts_leave_the_model_unchanged_with_a_note(tmp_path, monkeypatch):
    sites = _tabular_sites(tmp_path / "fed")
    settings = _settings(sites)
    spy = Spy(monkeypatch)
    summary = _study(tmp_path, settings, spy, _drop_at(1, 2, "share_keys"), _drop_at(3, 2, "share_keys"))
    for name, after_1 in spy.globals[1].items():
        assert np.array_equal(spy.globals[2][name], after_1)  # round 2 could not be unmasked
    notes = [n for n in summary["notes"] if n["kind"] == "rejected" and n["round"] == 2]
    assert notes and "secure aggregation did not complete" in notes[0]["message"]
    assert {n["site"] for n in summary["notes"] if n["kind"] == "missing"} == {"site-1", "site-3"}


def test_a_site_refuses_to_send_a_nan_update_and_the_coordinator_records_why(tmp_path, monkeypatch, caplog):
    sites = _tabular_sites(tmp_path / "fed")
    settings = _settings(sites)
    spy = Spy(monkeypatch, corrupt=(1, 2))
    with caplog.at_level(logging.ERROR, logger="fedir.client.secure_aggregation"):
        summary = _study(tmp_path, settings, spy)
    assert any("non-finite" in r.getMessage() for r in caplog.records)  # the site's own log says why
    note = next(n for n in summary["notes"] if n["kind"] == "missing")
    assert (note["round"], note["site"]) == (2, "site-1")
    assert "refused to send its update: 1 non-finite value(s)" in note["message"]
    # the round went on without it: the others' weighted mean, no NaN anywhere
    weights = [spy.updates[2][s][1] for s in (0, 2, 3)]
    for name, got in spy.globals[2].items():
        expected = np.average(np.stack([spy.updates[2][s][0][name] for s in (0, 2, 3)]), axis=0, weights=weights)
        assert np.abs(got - expected).max() <= _tolerance(settings, weights)


def test_update_checks_name_the_bound():
    ok = {"w": Array(np.array([0.5, -7.9], dtype=np.float32))}
    assert update_problem(ArrayRecord(ok), 10, 8.0, 1000.0) is None
    big = ArrayRecord({"w": Array(np.array([0.5, -8.5], dtype=np.float32))})
    assert "outside privacy.secagg-clipping-range = 8" in update_problem(big, 10, 8.0, 1000.0)
    inf = ArrayRecord({"w": Array(np.array([np.inf, 1.0], dtype=np.float32))})
    assert update_problem(inf, 10, 8.0, 1000.0) == "1 non-finite value(s) in w"
    assert "above privacy.secagg-max-weight = 1000" in update_problem(ArrayRecord(ok), 1001, 8.0, 1000.0)


@pytest.mark.parametrize("overrides, words", [
    ({"strategy_name": "krum"}, ["strategy.name = 'krum'"]),
    ({"strategy_name": "fedadam"}, ["strategy.name = 'fedadam'"]),
    ({"bias_cross_site": True}, ["bias.cross-site = true"]),
    ({"privacy_dp": "client-fixed"}, ["privacy.dp = 'client-fixed'"]),
    ({"privacy_dp": "server-fixed"}, ["privacy.dp = 'server-fixed'"]),
    ({"train_update_dtype": "float16"}, ["train.update-dtype"]),
    ({"federation_arm": "local"}, ["federation.arm"]),
    ({"federation_sites": "a;b"}, ["at least 3 sites"]),
])
def test_combinations_secagg_cannot_serve_are_refused_in_one_line(overrides, words):
    base = {"privacy_secure_aggregation": "secagg+", "federation_sites": "a;b;c"}
    with pytest.raises(SettingsError) as err:
        Settings(**{**base, **overrides})
    message = str(err.value)
    assert "\n" not in message and "privacy.secure-aggregation = 'secagg+'" in message
    assert all(w in message for w in words), message


def test_every_sum_strategy_has_its_legacy_class_and_builds_the_secure_path():
    assert set(LEGACY_STRATEGIES) == set(SECURE_SUM_STRATEGIES)
    template = build_model("logreg", n_features=3)
    for name in SECURE_SUM_STRATEGIES:
        settings = Settings(privacy_secure_aggregation="secagg+", strategy_name=name)
        strategy = build_strategy(settings, 4, on_train=print, on_evaluate=print, on_reject=print, template={})
        assert isinstance(strategy, SecureAggregation)
        assert isinstance(strategy._legacy, LEGACY_STRATEGIES[name][0])
    # counters stay at the site: SecAgg+ sums values within its clipping range
    bn = build_model("resnet_small", spatial_dims=2)
    kept = kept_keys(bn, Settings(privacy_secure_aggregation="secagg+"))
    assert kept and all(k.endswith("num_batches_tracked") for k in kept)
    assert not kept_keys(template, Settings(privacy_secure_aggregation="secagg+"))


def test_a_secagg_study_through_flowers_simulation_engine(tmp_path):
    """The same path through Flower's own engine (Ray, a SuperNode per site; about 35 s)."""
    from fedir.simulations.simulate import simulate

    sites = _tabular_sites(tmp_path / "fed", n_sites=3)
    summary = simulate(_settings(sites), tmp_path / "run", scenario="test")
    assert summary["status"] == "finished" and summary["rounds"] == 2
    assert summary["privacy"]["secure_aggregation"] == "secagg+"
    assert set(summary["per_site"]) == {f"site-{i}" for i in range(3)}
    assert not [n for n in summary["notes"] if n["kind"] in ("missing", "rejected")], summary["notes"]


def test_fedir_compare_runs_the_local_and_pooled_arms_without_it():
    from fedir.simulations.compare import arm_settings

    settings = Settings(privacy_secure_aggregation="secagg+", federation_sites="a;b;c")
    assert arm_settings(settings, "federated", None).secure_aggregation
    assert not arm_settings(settings, "local", None).secure_aggregation
    assert not arm_settings(settings, "pooled", None).secure_aggregation
