"""Checkpoints: the file, the strategy state it carries, the run store's reopening, and a
ServerApp killed mid-run and started again on the same run folder."""

import contextlib
import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping as ServerSideAdaptiveClipping
from flwr.serverapp.strategy import FedAdam

from fedir.protocol import SITE_KEY
from fedir.server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    ResumeError,
    in_site_order,
    load_checkpoint,
    restore_strategy_state,
    resume_point,
    save_checkpoint,
    server_generators,
    set_server_generators,
    strategy_state,
)
from fedir.server.runstore import RunStore
from fedir.simulations.scenario import load_scenario
from fedir.simulations.simulate import simulate
from fedir.simulations.synthetic import generate_federation


def _ckpt(run_id="r1", done=2, settings=None):
    return Checkpoint(run_id=run_id, settings=settings or {"train.rounds": 4, "output.dir": "a"},
                      completed_round=done, arrays={"w": np.arange(6, dtype=np.float32).reshape(2, 3)})


def test_checkpoint_round_trips_and_replaces_atomically(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    assert load_checkpoint(path) is None
    save_checkpoint(path, _ckpt(done=1))
    save_checkpoint(path, _ckpt(done=2))
    got = load_checkpoint(path)
    assert got.completed_round == 2 and list(tmp_path.iterdir()) == [path]
    assert np.array_equal(got.array_record()["w"].numpy(), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_resume_point_resumes_only_an_unfinished_run_with_the_same_settings(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _ckpt())
    same = {"train.rounds": 4, "output.dir": "moved"}
    assert resume_point(path, lambda rid: "running", same).run_id == "r1"
    assert resume_point(path, lambda rid: "failed", same).run_id == "r1"
    assert resume_point(path, lambda rid: "finished", same) is None
    with pytest.raises(ResumeError, match="other settings"):
        resume_point(path, lambda rid: "running", {"train.rounds": 5, "output.dir": "a"})


def test_fedadam_moments_survive_a_checkpoint(tmp_path):
    adam = FedAdam()
    adam.current_arrays = {"w": np.ones(3)}
    adam.m_t = {"w": np.full(3, 0.5)}
    adam.v_t = {"w": np.full(3, 0.25)}
    save_checkpoint(tmp_path / "c.npz", Checkpoint("r", {}, 1, {}, strategy_state=strategy_state(adam)))
    fresh = FedAdam()
    assert fresh.m_t is None and fresh.v_t is None
    restore_strategy_state(fresh, load_checkpoint(tmp_path / "c.npz").strategy_state)
    assert np.array_equal(fresh.m_t["w"], adam.m_t["w"]) and np.array_equal(fresh.v_t["w"], adam.v_t["w"])
    assert np.array_equal(fresh.current_arrays["w"], np.ones(3))


def test_a_checkpoint_holds_no_pickle_and_keeps_types(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    ckpt = _ckpt()
    ckpt.app_state = {"label_counts": {"site-0": {0: 3, 1: 2}}, "t": (1, 2.5), "s": np.float32(0.5)}
    ckpt.generators = server_generators()
    save_checkpoint(path, ckpt)
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            assert name.endswith(".npy")
            header = archive.read(name)[:200]
            assert b"'descr': '|O'" not in header and b"pickle" not in header
    got = load_checkpoint(path)
    assert got.app_state["label_counts"] == {"site-0": {0: 3, 1: 2}}  # integer keys stay integers
    assert got.app_state["t"] == (1, 2.5) and got.app_state["s"].dtype == np.float32
    assert got.generators["random"] == ckpt.generators["random"]


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {_Boom.marker}",))


def test_a_tampered_checkpoint_is_refused_without_running_anything(tmp_path):
    path = tmp_path / CHECKPOINT_NAME
    _Boom.marker = tmp_path / "pwned"
    # a pickle payload under the checkpoint's name, and a pickled object array inside an npz
    path.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ResumeError, match="not a readable fedir checkpoint"):
        resume_point(path, lambda rid: "running", {})
    np.savez(open(path, "wb"), __document__=np.frombuffer(b"{}", np.uint8),
             a0=np.array([_Boom()], dtype=object))
    with pytest.raises(ResumeError, match="delete it to start a new run"):
        load_checkpoint(path)
    path.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ResumeError):
        load_checkpoint(path)
    assert not _Boom.marker.exists()


def test_a_legacy_pickle_checkpoint_is_never_loaded(tmp_path):
    _Boom.marker = tmp_path / "pwned"
    (tmp_path / "checkpoint.pkl").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ResumeError, match="older fedir"):
        resume_point(tmp_path / CHECKPOINT_NAME, lambda rid: "running", {})
    assert not _Boom.marker.exists()


def test_server_generators_are_seeded_and_restored():
    set_server_generators(7, None)
    state = server_generators()
    first = (random.sample(range(100), 5), np.random.normal(size=3))
    set_server_generators(0, state)
    again = (random.sample(range(100), 5), np.random.normal(size=3))
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    set_server_generators(7, None)
    assert random.sample(range(100), 5) == first[0]


def _reply(site, node):
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=60.0,
                        message_type="train")
    return Message(content=RecordDict({SITE_KEY: ConfigRecord({"name": site})}), metadata=metadata)


def test_replies_are_aggregated_in_site_order():
    replies = [_reply("site-2", 5), _reply("site-0", 9), _reply("site-1", 1)]
    assert [m.content.config_records[SITE_KEY]["name"] for m in in_site_order(replies)] == [
        "site-0", "site-1", "site-2"]


def test_an_adaptive_dp_clipping_norm_survives_a_checkpoint(tmp_path):
    """The DP wrapper's own state (its clipping norm moves every round) is saved beside the
    strategy's, as the ServerApp does (app_state "privacy")."""
    wrapper = ServerSideAdaptiveClipping(FedAdam(), noise_multiplier=0.1, num_sampled_clients=3,
                                         initial_clipping_norm=1.0)
    wrapper.clipping_norm = 0.37
    save_checkpoint(tmp_path / CHECKPOINT_NAME, Checkpoint("r", {}, 1, {}, app_state={"privacy": strategy_state(wrapper)}))
    fresh = ServerSideAdaptiveClipping(FedAdam(), noise_multiplier=0.1, num_sampled_clients=3,
                                       initial_clipping_norm=1.0)
    restore_strategy_state(fresh, load_checkpoint(tmp_path / CHECKPOINT_NAME).app_state["privacy"])
    assert fresh.clipping_norm == 0.37 and isinstance(fresh.strategy, FedAdam)


def test_array_records_in_strategy_state_come_back_as_array_records():
    class S:
        def __init__(self):
            self.kept = ArrayRecord({"a": Array(np.zeros(2, np.float32))})
            self.callback = print
            self._scratch = [1]

    state = strategy_state(S())
    assert set(state) == {"kept"}
    target = S()
    restore_strategy_state(target, state)
    assert isinstance(target.kept, ArrayRecord) and target.kept["a"].shape == (2,)


def test_reopening_a_run_drops_the_interrupted_rounds(tmp_path):
    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r", "s", {}, ["site-0"])
        for rnd in (1, 2, 3):
            store.record_training("r", rnd, {"site-0": {"steps": rnd, "label_counts": {0: 1}}})
            store.record_note("r", rnd, "site-0", "skipped", "x")
            store.record_bias("r", rnd, {"alarm": False})
        store.finish_run("r", "failed")
        store.reopen_run("r", after_round=2)
        assert store.run("r")["status"] == "running"
        assert store.last_round("r") == 2
        assert {n["round"] for n in store.notes("r")} == {1, 2}
        assert store.bias("r") == {"alarm": False} and store.bias("r", 3) is None
        assert {v["round"] for v in store.vectors("r")} == {1, 2}


def _rows(run_dir):
    con = sqlite3.connect(run_dir / "runs.sqlite")
    rows = con.execute("SELECT round, site, split, metric, value FROM metrics").fetchall()
    runs = con.execute("SELECT run_id, status FROM runs").fetchall()
    con.close()
    return {r[:4]: r[4] for r in rows}, len(rows), runs


@pytest.mark.slow
def test_a_server_killed_after_round_2_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """Under FedBN, so that each site's own layers (kept at the site, fedir.client.site_state)
    must survive the restart too."""
    fed = tmp_path / "fed"
    generate_federation(fed, sites=3, patients=16, seed=5, image_size=32, progress=False)
    toml = tmp_path / "s.toml"
    toml.write_text(
        '[federation]\nsites = ["fed/site-0", "fed/site-1", "fed/site-2"]\n'
        "[train]\nrounds = 4\nlocal-epochs = 1\nfedbn = true\n[model]\nimage-size = 32\n[eval]\nbootstrap = 50\n"
    )
    reference = simulate(load_scenario(toml), tmp_path / "ref", scenario=str(toml))

    run = tmp_path / "run"
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedir.cli", "simulate", str(toml), "--out", str(run)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        # no deadline: the wait ends at the event (round 2's checkpoint) or when the run ends
        while (ckpt := load_checkpoint(run / CHECKPOINT_NAME)) is None or ckpt.completed_round < 2:
            assert proc.poll() is None, f"the run ended before round 2's checkpoint:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = load_checkpoint(run / CHECKPOINT_NAME).completed_round
    assert killed_after < 4, "the run finished before it could be killed"
    assert _rows(run)[2][0][1] == "running"

    resumed = simulate(load_scenario(toml), run, scenario=str(toml))

    ref_rows, ref_count, _ = _rows(tmp_path / "ref")
    got_rows, got_count, runs = _rows(run)
    assert runs == [(resumed["run_id"], "finished")]  # the same run, continued, not a new one
    assert got_count == ref_count and set(got_rows) == set(ref_rows)  # nothing lost or repeated
    # exactly: the same replies, averaged in the same order, from the same site state
    assert {k: v for k, v in got_rows.items() if got_rows[k] != ref_rows[k]} == {}
    assert resumed["global"] == reference["global"] and resumed["per_site"] == reference["per_site"]
    # the interruption is on the record, with the round it followed
    assert [(n["round"], n["kind"]) for n in resumed["notes"] if n["kind"] == "resumed"] == [(2, "resumed")]
