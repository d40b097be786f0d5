"""The records that cross the trust boundary (fedir.protocol): same keys for every site,
lossless round-trips, and the one codec of a model's weights."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedir.models import as_tensors, build_model, norm_keys, state_arrays, state_shapes
from fedir.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    decode_cross_site_models,
    decode_evaluation,
    decode_instruction,
    decode_round_config,
    decode_training,
    decode_weights,
    encode_cross_site_models,
    encode_evaluation,
    encode_feature_query,
    encode_round_config,
    encode_training,
    encode_weights,
    payload_bytes,
    site_name,
    widened,
)


def _metrics(auc):
    return {
        "n": 12, "n_patients": 4, "positives": 5, "tp": 4, "tn": 6, "fp": 1, "fn": 1,
        "auc": auc, "auc_ci": None if auc is None else [0.6, 0.95],
        "accuracy": 10 / 12, "accuracy_ci": [0.6, 0.95],
        "sensitivity": 0.8, "sensitivity_ci": [0.4, 0.96],
        "specificity": 6 / 7, "specificity_ci": [0.5, 0.97],
        "hist_neg": [3, 2, 1, 1, 0], "hist_pos": [0, 0, 1, 1, 3],
        "hist_score_sum": [0.3, 0.6, 0.95, 1.3, 2.7], "ece": 0.125 if auc is not None else None,
        "reasons": {} if auc is not None else {"auc": "only one class", "ece": "no test images"},
    }


def test_evaluation_round_trip_and_null_metrics():
    for auc in (0.8, None):
        site, decoded = decode_evaluation(encode_evaluation("site-a", _metrics(auc)))
        assert site == "site-a"
        expected = _metrics(auc)
        for key, value in expected.items():
            assert decoded[key] == value, key


def test_every_site_sends_the_same_metric_keys():
    a = encode_evaluation("a", _metrics(0.8)).metric_records[METRICS_KEY]
    b = encode_evaluation("b", _metrics(None)).metric_records[METRICS_KEY]
    assert set(a.keys()) == set(b.keys())


def test_training_round_trip():
    content = encode_training(
        "s", encode_weights(_state()), loss=None, steps=0, n_labelled=0, n_unlabelled=7,
        label_counts={1: 3}, num_classes=2, skipped={"truncated": 2},
    )
    assert set(content.array_records) == {ARRAYS_KEY}  # the update, the only ArrayRecord
    site, out = decode_training(content)
    assert site == "s" and site_name(content) == "s"
    assert out == {"train_loss": None, "steps": 0, "n_labelled": 0, "n_unlabelled": 7,
                   "label_counts": {0: 0, 1: 3}, "skipped": {"truncated": 2}}


def test_round_config_round_trip_with_what_flowers_strategies_add():
    config = encode_round_config((np.array([1.0, 2.0]), np.array([0.5, 1.0])))
    assert decode_round_config(config).server_round == 0  # the strategy adds the round itself
    config["server-round"], config["proximal-mu"] = 3, 0.01  # as Flower's FedProx does
    sent = decode_round_config(config)
    assert (sent.server_round, sent.proximal_mu) == (3, 0.01)
    assert sent.mean.tolist() == [1.0, 2.0] and sent.std.tolist() == [0.5, 1.0]
    imaging = decode_round_config(encode_round_config(None, server_round=5))
    assert imaging.server_round == 5 and imaging.mean is None and imaging.std is None
    content = RecordDict({ARRAYS_KEY: ArrayRecord(), CONFIG_KEY: config})
    assert decode_instruction(content)[1] is config
    assert list(encode_feature_query().array_records) == []  # the query carries no arrays


def test_cross_site_request_carries_the_models_by_site_and_the_config():
    models = {"a": encode_weights({"w": np.ones(2)}), "b": encode_weights({"w": np.zeros(2)})}
    config = encode_round_config(None, server_round=2)
    decoded, sent = decode_cross_site_models(encode_cross_site_models(models, config))
    assert list(decoded) == ["a", "b"] and decoded["b"] is models["b"]
    assert decode_round_config(sent).server_round == 2
    assert site_name(RecordDict({CONFIG_KEY: ConfigRecord()})) is None


# ---- model weights ----------------------------------------------------------------------------


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(64, 32)).astype(np.float32), "count": np.array(7, dtype=np.int64),
            "b": rng.normal(size=(2,)).astype(np.float32)}


def test_float16_casts_floats_only_and_decoding_widens_back():
    state = _state()
    half = encode_weights(state, dtype="float16")
    assert half["w"].dtype == "float16" and half["count"].dtype == "int64"
    back = decode_weights(half)
    assert back["w"].dtype == np.float32 and np.allclose(back["w"], state["w"], atol=1e-2)
    assert back["count"].dtype == np.int64 and back["count"] == 7
    assert payload_bytes(half) < 0.6 * payload_bytes(encode_weights(state))
    assert widened(half)["w"].dtype == "float32"
    full = encode_weights(state)
    assert widened(full) is full  # nothing to widen: the record as received
    with pytest.raises(ValueError, match="train.update-dtype"):
        encode_weights(state, dtype="bfloat8")


def test_kept_entries_are_never_encoded():
    assert set(encode_weights(_state(), kept={"b", "not-a-key"})) == {"w", "count"}


def test_dp_shapes_are_float_arrays_and_decoding_restores_the_models_shapes():
    model = build_model("resnet_small")
    sent = encode_weights(state_arrays(model), dp=True)
    assert all(a.dtype == "float32" and len(a.shape) >= 1 for a in sent.values())
    assert tuple(sent["bn1.num_batches_tracked"].shape) == (1,)
    decoded = decode_weights(sent, state_shapes(model))
    assert {k: v.shape for k, v in decoded.items()} == state_shapes(model)
    assert decode_weights(sent)["bn1.num_batches_tracked"].shape == (1,)  # no shapes: as sent
    fresh = build_model("resnet_small", seed=1)
    fresh.load_state_dict(as_tensors(decoded))  # the int buffer stays an int buffer
    assert fresh.bn1.num_batches_tracked.dtype == torch.int64
    assert torch.equal(fresh.conv1.weight, model.conv1.weight)


def test_saved_weights_take_the_models_dtypes_when_averaging_made_counters_float():
    model = build_model("resnet_small")
    averaged = {k: (v.astype(np.float64) + 0.6 if v.dtype == np.int64 else v) for k, v in state_arrays(model).items()}
    assert averaged["bn1.num_batches_tracked"].dtype == np.float64  # as FedAvg's weighted mean leaves it
    saved = as_tensors(averaged, like=model)
    assert {k: t.dtype for k, t in saved.items()} == {k: t.dtype for k, t in model.state_dict().items()}
    assert saved["bn1.num_batches_tracked"].item() == model.bn1.num_batches_tracked.item() + 1  # rounded, not cut
    assert as_tensors(averaged)["bn1.num_batches_tracked"].dtype == torch.float64  # without `like`: as decoded


def test_a_model_round_trips_without_its_kept_entries():
    model = build_model("resnet_small")
    kept = norm_keys(model)
    decoded = decode_weights(encode_weights(state_arrays(model), kept=kept), state_shapes(model))
    assert set(decoded) == set(model.state_dict()) - kept
    assert all(np.array_equal(decoded[k], v) for k, v in state_arrays(model).items() if k not in kept)
