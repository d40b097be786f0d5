"""Differential privacy through Flower's own wrappers and client mods (`privacy.dp`).

Each mode runs a one-round study in process (fedir.simulations.inprocess: the real
ServerApp logic, strategy stack and ClientApp, no Ray) on a two-site synthetic imaging
federation with a BatchNorm model, so the integer-buffer path is exercised too. What is
checked is what DP promises: the global model moves by at most the clipping norm, the
clipping happens where the mode says (at the site or at the coordinator), the added
noise has the calibrated standard deviation, adaptive clipping adapts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedir.client.client_app import build_client_app
from fedir.config import Settings, SettingsError
from fedir.models import build_model
from fedir.protocol import ARRAYS_KEY
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.synthetic import generate_federation
from fedir.strategies.differential_privacy import with_differential_privacy

pytestmark = pytest.mark.timeout(600)
study = pytest.mark.slow  # a real (in-process) study per test: 10-30 s each on 2 loaded cores


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp-fed")
    generate_federation(out, sites=2, patients=16, seed=9, image_size=32, unlabelled_fraction=0.0,
                        progress=False)
    return out


def _settings(fed, **kw) -> Settings:
    base = dict(federation_sites=f"{fed / 'site-0'};{fed / 'site-1'}", model_name="resnet_small",
                model_image_size=32, train_rounds=1, train_local_steps=3, train_batch_size=8,
                eval_bootstrap=20, privacy_noise_multiplier=0.0)
    return Settings(**{**base, **kw})


class Sent:
    """A client mod outside fedir's own: what left each site (the reply, as sent)."""

    def __init__(self) -> None:
        self.update_norms: list[float] = []
        self.train_norms_received: list[float] = []

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            cfg = msg.content.config_records["config"]
            if KEY_CLIPPING_NORM in cfg:
                self.train_norms_received.append(float(cfg[KEY_CLIPPING_NORM]))
            self.update_norms.append(_distance(reply.content.array_records[ARRAYS_KEY].to_torch_state_dict(),
                                               msg.content.array_records[ARRAYS_KEY].to_torch_state_dict()))
        return reply


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """L2 distance over every entry, BatchNorm counters included (DP clips them too)."""
    return float(np.sqrt(sum(((a[k].double().flatten() - b[k].double().flatten()) ** 2).sum().item()
                             for k in b)))


def _run(settings: Settings, out) -> tuple[dict[str, torch.Tensor], Sent]:
    """One study; the final global model (model.pt, the model's own shapes) and what the sites sent."""
    sent = Sent()
    grid = InProcessGrid(build_client_app(settings, mods=[sent]), len(settings.sites), settings.to_run_config())
    summary = run_study(grid, settings, out, scenario="test")
    assert set(summary["per_site"]) == {"site-0", "site-1"}
    return torch.load(out / "model.pt"), sent


def _initial(settings: Settings) -> dict[str, torch.Tensor]:
    return build_model(settings.model_name, seed=settings.train_seed).state_dict()


CLIP = 0.05


@study
def test_without_dp_the_model_moves_further_than_the_clipping_norm(fed, tmp_path):
    settings = _settings(fed)
    final, sent = _run(settings, tmp_path)
    assert _distance(final, _initial(settings)) > 10 * CLIP
    assert min(sent.update_norms) > 10 * CLIP


@study
@pytest.mark.parametrize("mode", ["server-fixed", "client-fixed"])
def test_fixed_clipping_bounds_the_step_where_the_mode_says(fed, tmp_path, mode):
    settings = _settings(fed, privacy_dp=mode, privacy_clipping_norm=CLIP)
    final, sent = _run(settings, tmp_path)
    # the average of updates clipped to CLIP moves the model by at most CLIP
    assert _distance(final, _initial(settings)) <= CLIP * 1.001
    build_model(settings.model_name).load_state_dict(final)  # model.pt fits the model
    if mode == "client-fixed":  # clipped before it left the site; the site was told the norm
        assert sent.train_norms_received == [CLIP, CLIP]
        assert max(sent.update_norms) <= CLIP * 1.001
    else:  # the coordinator clips: the sites send their raw updates
        assert sent.train_norms_received == []
        assert min(sent.update_norms) > 10 * CLIP


@study
def test_server_side_noise_has_the_calibrated_standard_deviation(fed, tmp_path):
    clean, _ = _run(_settings(fed, privacy_dp="server-fixed", privacy_clipping_norm=CLIP), tmp_path / "a")
    noisy, _ = _run(_settings(fed, privacy_dp="server-fixed", privacy_clipping_norm=CLIP,
                              privacy_noise_multiplier=2.0), tmp_path / "b")
    diff = torch.cat([(noisy[k].double() - clean[k].double()).flatten() for k in clean])
    expected = 2.0 * CLIP / 2  # noise multiplier x clipping norm / sampled sites (Flower's compute_stdv)
    assert float(diff.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(diff.mean())) < expected / 20


# Every update exceeds CLIP, so the paper's rule (Andrew et al.) with target quantile 0.5
# and learning rate 0.2 raises the bound by exp(0.2 x (1 - 0.5)); Flower's own rule would
# lower it by the same factor (fedir.strategies.differential_privacy.PaperQuantileRule).
RAISED = CLIP * math.exp(0.2 * 0.5)


@study
def test_client_adaptive_clipping_raises_a_bound_every_update_exceeds(fed, tmp_path):
    settings = _settings(fed, privacy_dp="client-adaptive", privacy_clipping_norm=CLIP, train_rounds=2)
    _, sent = _run(settings, tmp_path)
    first, second = sent.train_norms_received[:2], sent.train_norms_received[2:]
    assert first == [CLIP, CLIP]
    assert second == pytest.approx([RAISED, RAISED])
    assert max(sent.update_norms[:2]) <= CLIP * 1.001
    assert max(sent.update_norms[2:]) <= RAISED * 1.001


@study
def test_server_adaptive_clipping_adapts_its_norm(fed, tmp_path, monkeypatch):
    seen: list[float] = []
    original = DifferentialPrivacyServerSideAdaptiveClipping.aggregate_train

    def spy(self, server_round, replies):
        seen.append(self.clipping_norm)
        return original(self, server_round, replies)

    monkeypatch.setattr(DifferentialPrivacyServerSideAdaptiveClipping, "aggregate_train", spy)
    settings = _settings(fed, privacy_dp="server-adaptive", privacy_clipping_norm=CLIP, train_rounds=2)
    final, sent = _run(settings, tmp_path)
    assert seen == pytest.approx([CLIP, RAISED])
    assert sent.train_norms_received == []


@pytest.mark.parametrize("kw, message", [
    (dict(privacy_dp="laplace"), "privacy.dp"),
    (dict(privacy_dp="server-fixed", train_fedbn=True), "train.fedbn"),
    (dict(privacy_dp="client-fixed", train_update_dtype="float16"), "train.update-dtype"),
    (dict(privacy_dp="server-adaptive", federation_arm="local"), "federation.arm"),
    (dict(privacy_dp="server-fixed", privacy_clipping_norm=0.0), "clipping norm"),
    # 2 sites: Flower's default count noise (2/20) cannot carry noise multiplier 1 ...
    (dict(privacy_dp="client-adaptive", privacy_noise_multiplier=1.0), "clipped_count_stddev"),
])
def test_combinations_dp_cannot_serve_are_refused_by_name(tmp_path, kw, message):
    with pytest.raises(SettingsError, match=message.replace(".", r"\.")):
        settings = _settings(tmp_path, **kw)  # combinations are refused as the settings are read
        with_differential_privacy(FedAvg(), settings, n_sites=2, min_train_nodes=2)  # Flower's own checks


def test_cross_site_evaluation_is_off_by_default_and_refused_under_dp(tmp_path):
    assert Settings().bias_cross_site is False
    _settings(tmp_path, bias_cross_site=True)  # without DP it may be turned on
    with pytest.raises(SettingsError, match=r"bias\.cross-site.*privacy\.dp = 'client-fixed'"):
        _settings(tmp_path, privacy_dp="client-fixed", bias_cross_site=True)


def test_more_count_noise_lets_adaptive_clipping_carry_a_larger_noise_multiplier(tmp_path):
    # ... 0.6 (> 1 / 2) can, and reaches Flower's wrapper
    settings = _settings(tmp_path, privacy_dp="client-adaptive", privacy_noise_multiplier=1.0,
                         privacy_clipped_count_stddev=0.6)
    wrapped = with_differential_privacy(FedAvg(), settings, n_sites=2, min_train_nodes=2)
    assert wrapped.clipped_count_stddev == 0.6
