"""The privacy budget (fedir.strategies.privacy_budget): the epsilon spent under
`privacy.dp`, checked against dp-accounting and Flower's accountant computed here
independently, and `privacy.max-epsilon` stopping a study with the model within budget."""

from __future__ import annotations

import json
import sqlite3

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.serverapp import RdpAccountant as FlowerRdpAccountant
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)

from fedir.config import Settings, SettingsError
from fedir.server.dashboard_state import run_detail
from fedir.simulations.inprocess import run_inprocess
from fedir.simulations.uci_heart import CENTRES, default_source, import_heart
from fedir.strategies.privacy_budget import BudgetExhausted, PrivacyBudget, effective_noise, epsilon_of

pytestmark = pytest.mark.timeout(600)


def _independent(noise_multipliers: list[float], delta: float) -> float:
    accountant = RdpAccountant()
    for z in noise_multipliers:
        accountant.compose(dp_accounting.GaussianDpEvent(z))
    return accountant.get_epsilon(delta)


def _flower(noise_multiplier: float, rounds: int, sites: int, delta: float) -> float:
    config = PrivacyConfig(delta, sites, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    accountant = FlowerRdpAccountant(config)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sites, sites), rounds)
    return accountant.get_privacy_spent().epsilon


@pytest.mark.parametrize(("rounds", "target"), [(1, 3.54), (5, 9.73), (10, 15.46)])
def test_equal_weights_give_flowers_figures(rounds, target):
    """TARGETS.md's figures (6 sites, z = 1, delta = 1e-3) are plain Gaussian composition
    without amplification: fedir's, dp-accounting's and Flower's accountant's agree."""
    z = effective_noise(1.0, 6, [50.0] * 6)
    assert z == 1.0
    ours = epsilon_of([z] * rounds, 1e-3)
    assert ours == pytest.approx(_independent([1.0] * rounds, 1e-3), rel=1e-12)
    assert ours == pytest.approx(_flower(1.0, rounds, 6, 1e-3), rel=1e-12)
    assert round(ours, 2) == target


def test_unequal_weights_lower_the_effective_noise_and_raise_epsilon():
    weights = [199.0, 172.0, 30.0, 85.0]  # the heart centres' training patients
    z = effective_noise(1.0, 4, weights)
    assert z == pytest.approx(1.0 / (4 * 199 / 486))
    assert epsilon_of([z] * 3, 1e-5) == pytest.approx(_independent([z] * 3, 1e-5))
    assert epsilon_of([z] * 3, 1e-5) > _independent([1.0] * 3, 1e-5)
    # fewer sites answering than the noise was calibrated for: less noise per site's share
    assert effective_noise(1.0, 4, [10.0] * 3) == pytest.approx(0.75)
    assert epsilon_of([], 1e-5) == 0.0 and epsilon_of([0.0], 1e-5) == float("inf")


def test_the_budget_refuses_the_round_that_would_pass_it_and_accounts_nothing():
    one, two, three = (_independent([1.0] * n, 1e-5) for n in (1, 2, 3))
    budget = PrivacyBudget(1.0, 4, 1e-5, max_epsilon=(two + three) / 2)
    assert budget.release(1, [5.0] * 4) == pytest.approx(one)
    assert budget.release(2, [5.0] * 4) == pytest.approx(two)
    with pytest.raises(BudgetExhausted, match=r"round 3 would spend epsilon .* > max") as stop:
        budget.release(3, [5.0] * 4)
    assert stop.value.projected == pytest.approx(three)
    assert budget.spent == [1.0, 1.0] and budget.epsilon == pytest.approx(two)


@pytest.mark.parametrize(("kw", "message"), [
    (dict(privacy_max_epsilon=5.0), "needs a privacy.dp mode"),
    (dict(privacy_dp="server-fixed", privacy_max_epsilon=5.0, privacy_noise_multiplier=0.0),
     "noise-multiplier > 0"),
    (dict(privacy_delta=1.0), "privacy.delta"),
    (dict(privacy_delta=0.0), "privacy.delta"),
    (dict(privacy_max_epsilon=-1.0), "privacy.max-epsilon"),
])
def test_budget_settings_are_checked(kw, message):
    with pytest.raises(SettingsError, match=message):
        Settings(**kw)


# ---- a study in process: heart sites, server-side fixed clipping ---------------------------

SOURCE = default_source()
heart_data = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"UCI heart data not at {SOURCE}")
NOISE, DELTA = 1.0, 1e-5
# the effective noise multiplier, from the centres' training patients (199, 172, 30, 85 of 486):
# Cleveland's share of the weighted average bounds one site's influence
HEART_Z = NOISE / (4 * 199 / 486)


@pytest.fixture(scope="module")
def heart(tmp_path_factory):
    out = tmp_path_factory.mktemp("heart-dp")
    import_heart(out)
    return out


def _settings(heart, **kw) -> Settings:
    base = dict(federation_sites=";".join(str(heart / c) for c in CENTRES), model_name="logreg",
                train_rounds=3, train_local_steps=5, train_batch_size=8, train_optimizer="sgd",
                train_lr=0.02, train_weight_decay=0.0, eval_bootstrap=20, privacy_dp="server-fixed",
                privacy_noise_multiplier=NOISE, privacy_clipping_norm=0.5, privacy_delta=DELTA)
    return Settings(**{**base, **kw})


def _store_epsilons(out) -> list[tuple[int, float]]:
    with sqlite3.connect(out / "runs.sqlite") as conn:
        return conn.execute("SELECT round, value FROM metrics WHERE split = 'privacy' AND "
                            "site = 'global' AND metric = 'dp_epsilon' ORDER BY round").fetchall()


@heart_data
@pytest.mark.slow
def test_a_study_reports_the_epsilon_it_spends_every_round(heart, tmp_path):
    summary = run_inprocess(_settings(heart), tmp_path)
    expected = [_independent([HEART_Z] * n, DELTA) for n in (1, 2, 3)]
    privacy = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert privacy["mode"] == "server-fixed" and privacy["delta"] == DELTA
    assert privacy["noise_multiplier"] == NOISE and privacy["rounds_accounted"] == 3
    assert privacy["epsilon"] == pytest.approx(expected[-1], rel=1e-9)
    assert "dp-accounting" in privacy["accountant"] and privacy["stopped"] is None
    stored = _store_epsilons(tmp_path)
    assert [r for r, _ in stored] == [1, 2, 3]
    assert [e for _, e in stored] == pytest.approx(expected, rel=1e-9)
    assert stored[0][1] < stored[1][1] < stored[2][1]
    report = (tmp_path / "report.html").read_text()
    assert f"epsilon {expected[-1]:.3f} at delta 1e-05 after 3 round(s)" in report
    shown = run_detail(tmp_path, ".", summary["run_id"])["privacy"]  # what the dashboard is sent
    assert [e for _, e in shown["per_round"]] == pytest.approx(expected, rel=1e-9)


@heart_data
@pytest.mark.slow
def test_max_epsilon_stops_before_the_round_that_would_pass_it(heart, tmp_path):
    two, three = _independent([HEART_Z] * 2, DELTA), _independent([HEART_Z] * 3, DELTA)
    stopped = run_inprocess(_settings(heart, train_rounds=4, privacy_max_epsilon=(two + three) / 2),
                            tmp_path / "stopped")
    assert stopped["status"] == "finished" and stopped["evaluated_round"] == 2
    privacy = stopped["privacy"]
    assert privacy["rounds_accounted"] == 2 and privacy["epsilon"] == pytest.approx(two)
    assert privacy["epsilon"] <= privacy["max_epsilon"]
    assert privacy["stopped"] == f"stopped: round 3 would spend epsilon {three:.3f} > max {(two + three) / 2:g}"
    assert stopped["bias"]["sensitivity"].get("reason") != "computed on the study's final round only"
    # the model kept is round 2's: the same as a two-round study's (the server's noise is seeded)
    two_rounds = run_inprocess(_settings(heart, train_rounds=2), tmp_path / "two")
    assert two_rounds["privacy"]["epsilon"] == pytest.approx(two)
    kept, reference = (torch.load(tmp_path / name / "model.pt") for name in ("stopped", "two"))
    assert kept.keys() == reference.keys()
    for key in kept:
        torch.testing.assert_close(kept[key], reference[key])


def test_max_epsilon_needs_a_mean_aggregator():
    with pytest.raises(SettingsError, match="needs a mean aggregator"):
        Settings(privacy_dp="server-fixed", privacy_noise_multiplier=1.0, privacy_max_epsilon=5.0,
                 strategy_name="fedmedian")


def test_the_summary_accounts_only_a_mean_and_says_so(tmp_path):
    from fedir.server.runstore import RunStore
    from fedir.server.summary import privacy_entry

    config = {"privacy.dp": "server-fixed", "privacy.delta": DELTA, "privacy.noise-multiplier": NOISE,
              "privacy.max-epsilon": 0.0}
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("mean", "t", {**config, "strategy.name": "fedavg"}, ["a"])
        store.record_privacy("mean", 1, 1.5, DELTA, 1.0)
        store.record_privacy("mean", 2, 2.5, DELTA, 1.0)
        mean = privacy_entry(store, "mean", store.run("mean")["config"])
        store.start_run("median", "t", {**config, "strategy.name": "fedmedian"}, ["a"])
        median = privacy_entry(store, "median", store.run("median")["config"])
        store.start_run("off", "t", {"privacy.dp": "off"}, ["a"])
        off = privacy_entry(store, "off", store.run("off")["config"])
    assert mean["epsilon"] == 2.5 and mean["per_round"] == [[1, 1.5], [2, 2.5]]
    assert mean["rounds_accounted"] == 2 and mean["delta"] == DELTA and mean["max_epsilon"] is None
    assert median["epsilon"] is None and median["accountant"].startswith("none: strategy.name = 'fedmedian'")
    assert off == {"mode": "off", "secure_aggregation": "off"}


@heart_data
@pytest.mark.slow
def test_a_resumed_study_keeps_the_epsilon_already_spent(heart, tmp_path, monkeypatch):
    """The rounds accounted before a crash are in the checkpoint: after resuming, round 3's
    epsilon is that of three rounds, not of one."""
    from fedir.server.server_app import StudyRecorder

    original = StudyRecorder.on_train

    def crash_in_round_3(self, replies):
        if replies.server_round == 3:
            raise RuntimeError("coordinator lost in round 3")
        original(self, replies)

    monkeypatch.setattr(StudyRecorder, "on_train", crash_in_round_3)
    with pytest.raises(RuntimeError, match="round 3"):
        run_inprocess(_settings(heart), tmp_path)
    monkeypatch.setattr(StudyRecorder, "on_train", original)
    resumed = run_inprocess(_settings(heart), tmp_path)
    expected = [_independent([HEART_Z] * n, DELTA) for n in (1, 2, 3)]
    assert resumed["privacy"]["rounds_accounted"] == 3
    assert [e for _, e in _store_epsilons(tmp_path)] == pytest.approx(expected, rel=1e-9)
