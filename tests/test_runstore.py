"""The run store: the one-row-per-metric contract, round trips, and atomic rounds."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from fedir.server.runstore import RunStore
from tests.store_factory import RUN, SITES, VERDICT, round_eval, site_eval, stored_round


def test_one_row_per_round_site_split_metric(store: RunStore) -> None:
    rows = store.metric_rows(RUN)
    keys = [(r["round"], r["site"], r["split"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys))
    test_metrics = {"n", "n_patients", "positives", "auc", "accuracy", "sensitivity", "specificity",
                    "tp", "tn", "fp", "fn", "ece"}
    for server_round in (1, 2):
        for site in [*SITES, "global"]:
            got = {m for r, s, sp, m in keys if (r, s, sp) == (server_round, site, "test")}
            assert got == test_metrics | ({"auc_binning_error"} if site == "global" else set())
        for site in SITES:
            got = {m for r, s, sp, m in keys if (r, s, sp) == (server_round, site, "train")}
            assert got == {"train_loss", "n_labelled", "n_unlabelled"}


def test_rerecording_a_round_replaces_it(store: RunStore) -> None:
    before = len(store.metric_rows(RUN))
    store.record_evaluation(RUN, 2, *stored_round(2))
    assert len(store.metric_rows(RUN)) == before
    assert len([n for n in store.notes(RUN) if n["kind"] == "null_metric" and n["round"] == 2]) == 1


def test_site_metrics_round_trip(store: RunStore) -> None:
    got = store.site_metrics(RUN, 2)
    assert set(got) == {*SITES, "global"}
    expected = round_eval(2)
    for site in SITES:
        for key in ("n", "positives", "auc", "accuracy", "sensitivity", "specificity", "tp", "fn",
                    "auc_ci", "accuracy_ci", "specificity_ci"):
            want = expected[site][key]
            assert got[site][key] == (None if want is None else pytest.approx(want)), (site, key)
        assert got[site]["hist_neg"] == expected[site]["hist_neg"]
        assert isinstance(got[site]["n"], int)
    assert got["site-b"]["auc"] is None
    assert got["site-b"]["reasons"] == {"auc": "only one class among the test patients"}
    assert store.site_metrics(RUN, 2, split="train")["site-a"]["label_counts"] == {"0": 20, "1": 20}


def test_readers(store: RunStore) -> None:
    assert store.latest_run_id() == RUN
    assert store.last_round(RUN) == 2
    run = store.run(RUN)
    assert run["status"] == "finished" and run["sites"] == SITES and run["finished_at"]
    assert store.bias(RUN)["alarm"] is True
    assert store.bias(RUN, 1) == VERDICT
    assert {v["name"] for v in store.vectors(RUN, 1) if v["split"] == "test"} == {
        "hist_neg", "hist_pos", "hist_score_sum", "per_patient", "threshold"}
    kinds = {n["kind"] for n in store.notes(RUN)}
    assert kinds == {"null_metric", "skipped_file"}


def test_nan_is_stored_as_null(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as s:
        s.start_run("r", "x", {}, ["a"])
        s.record_evaluation("r", 1, {"a": {"n": 3, "auc": float("nan")}}, None)
        s.record_bias("r", 1, {"alarm": False, "reasons": [], "tests": {"t": {"p_value": float("nan")}}})
        assert s.site_metrics("r", 1)["a"]["auc"] is None
        assert s.bias("r")["tests"]["t"]["p_value"] is None


def test_reader_never_sees_half_a_round(tmp_path: Path) -> None:
    """While a round is being written, a second connection sees none of it, then all of it."""
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    store.start_run(RUN, "s", {}, SITES)
    reader = sqlite3.connect(path)
    seen: list[int] = []

    def count_rows() -> int:
        return reader.execute("SELECT COUNT(*) FROM metrics WHERE round = 1").fetchone()[0]

    def during_write(statement: str) -> None:
        if statement.startswith("INSERT INTO metrics"):
            seen.append(count_rows())

    store._conn.set_trace_callback(during_write)
    store.record_evaluation(RUN, 1, round_eval(1), site_eval(135, 36, 0.8))
    store._conn.set_trace_callback(None)
    full = count_rows()
    assert len(seen) > 1 and set(seen) == {0}
    assert full == 4 * 11
    assert reader.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    reader.close()
    store.close()


def test_a_batch_is_one_transaction_and_rolls_back_whole(tmp_path: Path) -> None:
    """Inside batch() every record_* joins one transaction: one COMMIT for a stage of
    many sites and notes, nothing visible until it ends, nothing kept if it fails."""
    path = tmp_path / "runs.sqlite"
    store = RunStore(path)
    store.start_run(RUN, "s", {}, SITES)
    reader = sqlite3.connect(path)
    statements: list[str] = []
    store._conn.set_trace_callback(statements.append)
    with store.batch():
        store.record_evaluation(RUN, 1, round_eval(1), site_eval(135, 36, 0.8))
        for site in SITES:
            store.record_note(RUN, 1, site, "skipped", "1 file(s): truncated")
        store.record_bias(RUN, 1, VERDICT)
        assert reader.execute("SELECT COUNT(*) FROM notes WHERE kind = 'skipped'").fetchone()[0] == 0
    store._conn.set_trace_callback(None)
    assert statements.count("COMMIT") == 1
    assert reader.execute("SELECT COUNT(*) FROM notes WHERE kind = 'skipped'").fetchone()[0] == 3
    with pytest.raises(RuntimeError), store.batch():
        store.record_note(RUN, 2, "site-a", "skipped", "lost with its stage")
        raise RuntimeError("the stage failed")
    assert store.notes(RUN)[-1]["round"] == 1 and store.bias(RUN, 1) == VERDICT
    store.record_note(RUN, None, None, "after", "a write after a failed batch is its own transaction")
    assert reader.execute("SELECT COUNT(*) FROM notes WHERE kind = 'after'").fetchone()[0] == 1
    reader.close()
    store.close()


def test_the_run_store_and_a_checkpoint_are_readable_by_their_owner_only(tmp_path):
    import stat

    from fedir.statefile import write_state

    with RunStore(tmp_path / "runs.sqlite") as store:
        store.start_run("r1", "s", {}, ["a"])
    write_state(tmp_path / "checkpoint.npz", {"round": 1})
    for name in ("runs.sqlite", "checkpoint.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    for wal in tmp_path.glob("runs.sqlite-*"):
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600, wal.name
