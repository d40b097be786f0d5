"""A site's own state (FedBN layers, the local arm's weights) survives a restarted Flower run."""

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

from fedir.client import site_state
from fedir.protocol import RUN_ID_KEY


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _config(server_round: int, run_id: str = "20260101T000000Z-abc") -> ConfigRecord:
    return ConfigRecord({"server-round": server_round, RUN_ID_KEY: run_id})


def _train(context: Context, site, server_round: int) -> None:
    """What a training round does to the state: restore, change it, persist."""
    site_state.restore(context, site, _config(server_round), before_training=True)
    context.state["norm"] = ArrayRecord({"w": Array(np.full(2, float(server_round), np.float32))})
    context.state["card"] = ConfigRecord({"sent": 1})
    site_state.persist(context, site, _config(server_round))


def _norm(context: Context) -> float:
    return float(context.state.array_records["norm"]["w"].numpy()[0])


def test_a_new_flower_run_continues_from_the_last_saved_round(tmp_path):
    first = _context()
    for server_round in (1, 2, 3):
        _train(first, tmp_path, server_round)
    # the coordinator restarted after round 2's checkpoint: round 3 is redone in a new run
    resumed = _context()
    site_state.restore(resumed, tmp_path, _config(3), before_training=True)
    assert _norm(resumed) == 2.0 and resumed.state.config_records["card"]["sent"] == 1
    # an evaluation of round 3 in a new run starts from the state after round 3's training
    evaluating = _context()
    site_state.restore(evaluating, tmp_path, _config(3), before_training=False)
    assert _norm(evaluating) == 3.0


def test_a_node_that_has_seen_the_run_keeps_its_own_state(tmp_path):
    context = _context()
    _train(context, tmp_path, 1)
    context.state["norm"] = ArrayRecord({"w": Array(np.full(2, 9.0, np.float32))})
    site_state.restore(context, tmp_path, _config(2), before_training=True)
    assert _norm(context) == 9.0


def test_another_run_and_an_unkeyed_round_restore_nothing(tmp_path):
    _train(_context(), tmp_path, 1)
    other = _context()
    site_state.restore(other, tmp_path, _config(2, run_id="another-run"), before_training=True)
    assert "norm" not in other.state.array_records
    plain = _context()
    site_state.restore(plain, tmp_path, ConfigRecord({"server-round": 2}), before_training=True)
    site_state.persist(plain, tmp_path / "unused", ConfigRecord({"server-round": 2}))
    assert len(plain.state) == 0 and not (tmp_path / "unused").exists()


def test_only_the_last_two_rounds_are_kept_and_the_run_id_names_no_folder(tmp_path):
    context = _context()
    for server_round in range(1, 6):
        site_state.restore(context, tmp_path, _config(server_round, "../../escape"), before_training=True)
        context.state["norm"] = ArrayRecord({"w": Array(np.zeros(1, np.float32))})
        site_state.persist(context, tmp_path, _config(server_round, "../../escape"))
    files = sorted(p.name for p in tmp_path.rglob("round-*.npz"))
    assert files == ["round-000004.npz", "round-000005.npz"]
    assert all(tmp_path in p.parents for p in tmp_path.rglob("*")) and not (tmp_path.parent / "escape").exists()
