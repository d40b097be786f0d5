"""Update validation before aggregation: the checks on their own, then the mixin on a
Flower strategy with hand-made replies."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedir.protocol import ARRAYS_KEY, METRICS_KEY, SITE_KEY
from fedir.strategies.validation import (
    ValidatedUpdates,
    screen_updates,
    structural_problem,
    update_norm,
)


def _ar(arrays: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def _record(w=None, b=None, steps=3):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32) if w is None else w
    b = np.zeros(3, np.float32) if b is None else b
    return _ar({"w": w, "b": b, "steps": np.array(steps, np.int64)})


def _nudged(ref: ArrayRecord, scale: float, seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return _ar({k: (a.numpy() + scale * rng.normal(size=a.shape)).astype(a.numpy().dtype)
                        if a.numpy().dtype.kind == "f" else a.numpy() for k, a in ref.items()})


def test_a_clean_update_has_no_structural_problem():
    ref = _record()
    assert structural_problem(_nudged(ref, 0.01, 1), ref) is None


@pytest.mark.parametrize("bad, words", [
    ({"w": np.full((4, 3), np.nan, np.float32)}, "non-finite values: 12 in w"),
    ({"b": np.array([1.0, np.inf, 0.0], np.float32)}, "non-finite values: 1 in b"),
    ({"w": np.zeros((3, 4), np.float32)}, "wrong shape for w: (3, 4), expected (4, 3)"),
    ({"w": np.zeros((4, 3), np.float64)}, "wrong dtype for w: float64, expected float32"),
])
def test_each_structural_fault_is_named(bad, words):
    ref = _record()
    arrays = {k: a.numpy() for k, a in ref.items()} | bad
    assert structural_problem(_ar(arrays), ref) == words


def test_wrong_array_names_are_named():
    ref = _record()
    arrays = {k: a.numpy() for k, a in ref.items()}
    arrays["v"] = arrays.pop("w")
    why = structural_problem(_ar(arrays), ref)
    assert why.startswith("wrong array names") and "'w'" in why and "'v'" in why


def test_norm_counts_the_arrays_that_are_float_in_the_template():
    template = _record()
    sent = _ar({k: a.numpy().astype(np.float64) for k, a in template.items()})  # as FedAvg returns
    moved = _ar({"w": sent["w"].numpy() + 1.0, "b": sent["b"].numpy(), "steps": np.array(50, np.int64)})
    assert update_norm(moved, sent, template) == pytest.approx(np.sqrt(12))


def test_norm_is_the_distance_over_float_arrays():
    ref = _record()
    moved = _ar({"w": ref["w"].numpy() + 3.0, "b": ref["b"].numpy() + 4.0,
                         "steps": np.array(99, np.int64)})
    assert update_norm(moved, ref, ref) == pytest.approx(np.sqrt(12 * 9 + 3 * 16))


def test_an_update_far_above_the_others_median_is_rejected_alone():
    ref = _record()
    updates = {f"site-{i}": _nudged(ref, 0.01, i) for i in range(3)}
    huge = ref["w"].numpy() + 1000 * (updates["site-2"]["w"].numpy() - ref["w"].numpy())
    updates["site-2"] = _ar({"w": huge.astype(np.float32), "b": updates["site-2"]["b"].numpy(),
                                     "steps": np.array(3, np.int64)})
    rejected = screen_updates(updates, ref, ref, max_norm_ratio=10.0)
    assert list(rejected) == ["site-2"]
    assert "the median of the other sites" in rejected["site-2"]
    # with two sites the leave-one-out median still singles out the large one
    two = {"site-0": updates["site-0"], "site-2": updates["site-2"]}
    assert list(screen_updates(two, ref, ref, 10.0)) == ["site-2"]


def test_similar_updates_are_all_kept():
    ref = _record()
    updates = {f"site-{i}": _nudged(ref, 0.01 * (1 + i % 3), i) for i in range(6)}
    assert screen_updates(updates, ref, ref, max_norm_ratio=10.0) == {}


class _Validated(ValidatedUpdates, FedAvg):
    pass


def _reply(site: str, arrays: ArrayRecord, node: int) -> Message:
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord({"num-examples": 10}),
                          SITE_KEY: ConfigRecord({"name": site})})
    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id=f"i{node}", group_id="1", created_at=0.0, ttl=60.0,
                    message_type="train")
    return Message(metadata=meta, content=content)


def _start_round(strategy: _Validated, ref: ArrayRecord) -> None:
    strategy._sent = ref  # what configure_train records when it sends `ref`


def test_the_mixin_averages_only_accepted_updates_and_reports_the_rest():
    ref = _record()
    rejects: list[tuple[int, str, str]] = []
    strategy = _Validated(on_reject=lambda r, s, why: rejects.append((r, s, why)), template=ref,
                          min_accepted=2)
    _start_round(strategy, ref)
    good = [_nudged(ref, 0.01, i) for i in range(2)]
    nan = _ar({k: a.numpy() for k, a in ref.items()} | {"b": np.full(3, np.nan, np.float32)})
    replies = [_reply("a", good[0], 1), _reply("b", good[1], 2), _reply("c", nan, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert [(r, s) for r, s, _ in rejects] == [(1, "c")]
    assert np.allclose(arrays["w"].numpy(), (good[0]["w"].numpy() + good[1]["w"].numpy()) / 2)

    # a second reply claiming site "a"'s name is still checked on its own
    rejects.clear()
    impostor = _reply("a", nan, 4)
    arrays, _ = strategy.aggregate_train(1, [*replies[:2], impostor])
    assert [(r, s) for r, s, _ in rejects] == [(1, "a")]
    assert np.allclose(arrays["w"].numpy(), (good[0]["w"].numpy() + good[1]["w"].numpy()) / 2)

    rejects.clear()
    arrays, metrics = strategy.aggregate_train(2, [replies[0], replies[2]])
    assert arrays is None and metrics is None
    assert [(r, s) for r, s, _ in rejects] == [(2, "c"), (2, "global")]
