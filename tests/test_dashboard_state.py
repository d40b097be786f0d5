"""The dashboard's reading side: read-only, consistent snapshots, a writer never locked out, clear errors."""

from __future__ import annotations

import json
import multiprocessing
import random
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from run_factory import site_eval, start, write_round, write_run
from store_factory import RUN, fabricate

from fedir.cli import build_parser
from fedir.server.dashboard_state import overview, run_detail
from fedir.server.runreader import ReadOnlyRunStore, StoreUnreadable
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary, fmt_with_ci

SITES = [f"site-{i}" for i in range(20)]


def test_reader_never_writes(tmp_path: Path) -> None:
    with pytest.raises(StoreUnreadable, match="no runs.sqlite"):
        ReadOnlyRunStore(tmp_path / "runs.sqlite")
    assert not (tmp_path / "runs.sqlite").exists()
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "r", SITES[:3], 2)
    reader = ReadOnlyRunStore(tmp_path / "runs.sqlite")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._conn.execute("DELETE FROM metrics")
    reader.close()


def test_open_snapshot_does_not_lock_the_writer_out(tmp_path: Path) -> None:
    """A page being read while the server commits a round: no wait, and the page sees no part of it."""
    store = RunStore(tmp_path / "runs.sqlite")
    write_run(store, "r", SITES, 1, finish=False)
    store._conn.execute("PRAGMA busy_timeout = 0")  # any lock held by the reader would raise at once
    reader = ReadOnlyRunStore(tmp_path / "runs.sqlite")
    with reader.snapshot():
        assert reader.last_round("r") == 1
        write_round(store, "r", SITES, 2)
        store.finish_run("r")
        assert reader.last_round("r") == 1 and reader.run("r")["status"] == "running"
    with reader.snapshot():
        assert reader.last_round("r") == 2 and reader.run("r")["status"] == "finished"
    reader.close()
    store.close()


def _write_rounds(path: str, rounds: int, seen) -> None:
    """Write each round once the reader has seen the one before (`seen`), however slow a
    loaded machine makes the reader: it reads while the next round is being written, and
    watches every round arrive."""
    with RunStore(path) as store:
        for server_round in range(2, rounds + 1):
            while seen.value < server_round - 1:
                time.sleep(0.01)
            write_round(store, "r", SITES, server_round)
        store.finish_run("r")


def test_reader_never_sees_half_a_round_while_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite"
    with RunStore(path) as store:
        start(store, "r", SITES, 40)
        write_round(store, "r", SITES, 1)
    spawn = multiprocessing.get_context("spawn")
    seen = spawn.Value("i", 0)
    writer = spawn.Process(target=_write_rounds, args=(str(path), 40, seen))
    writer.start()
    seen_rounds = set()
    while True:
        assert writer.exitcode in (None, 0), "the writer failed"
        detail = run_detail(tmp_path, ".", "r")
        series = detail["series"]["accuracy"]
        rounds = {site: [p[0] for p in points] for site, points in series.items()}
        evaluated = detail["run"]["rounds_evaluated"]
        # Every site and the pooled entry have exactly the rounds evaluated so far, no more, no less.
        assert set(rounds) == {*SITES, "global"}
        assert all(r == list(range(1, evaluated + 1)) for r in rounds.values()), rounds
        assert len(detail["table"]) == len(SITES) + 1
        seen_rounds.add(evaluated)
        seen.value = evaluated
        if detail["run"]["status"] == "finished":
            break
    writer.join()
    assert writer.exitcode == 0
    assert seen_rounds == set(range(1, 41)), seen_rounds  # the reader watched it grow


def test_corrupt_and_foreign_files_are_named_clearly(tmp_path: Path) -> None:
    (tmp_path / "runs.sqlite").write_bytes(b"\x00garbage" * 512)
    assert "cannot be read as SQLite" in overview(tmp_path)["error"]
    (tmp_path / "runs.sqlite").unlink()
    sqlite3.connect(tmp_path / "runs.sqlite").execute("CREATE TABLE other (x)").connection.close()
    assert "not a fedir run store" in overview(tmp_path)["error"]
    assert "no runs.sqlite" in overview(tmp_path / "nothing-here")["error"]


def test_parent_folder_lists_every_run_of_every_store(tmp_path: Path) -> None:
    with RunStore(tmp_path / "a" / "runs.sqlite") as store:
        write_run(store, "a-1", SITES[:2], 2)
        write_run(store, "a-2", SITES[:2], 3, finish=False)
    with RunStore(tmp_path / "b" / "runs.sqlite") as store:
        write_run(store, "b-1", SITES[:3], 1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "runs.sqlite").write_bytes(b"not sqlite" * 200)
    view = overview(tmp_path)
    assert [(r["source"], r["run_id"], r["status"]) for r in view["runs"]] == [
        ("a", "a-1", "finished"), ("a", "a-2", "running"), ("b", "b-1", "finished")]
    assert "c/runs.sqlite" in view["error"]  # the broken one is named, the others still shown
    assert [p[0] for p in view["runs"][1]["auc_series"]] == [1, 2, 3]
    with pytest.raises(StoreUnreadable, match="no run store"):
        run_detail(tmp_path, "../elsewhere", "a-1")


def test_unchanged_run_is_not_sent_again(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "r", SITES[:2], 1, finish=False)
        first = run_detail(tmp_path, ".", "r")
        assert run_detail(tmp_path, ".", "r", since=first["fingerprint"]) == {
            "unchanged": True, "fingerprint": first["fingerprint"]}
        store.record_note("r", 1, "site-0", "skipped", "1 file(s): truncated")
        assert "table" in run_detail(tmp_path, ".", "r", since=first["fingerprint"])


def test_cli_binds_loopback_by_default_and_serves(tmp_path: Path) -> None:
    args = build_parser().parse_args(["dashboard", str(tmp_path)])
    assert args.host == "127.0.0.1"
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "r", SITES[:2], 1)
    proc = subprocess.Popen([sys.executable, "-m", "fedir.cli", "dashboard", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line
        url = line.split()[3]
        with urllib.request.urlopen(url + "api/runs", timeout=10) as response:
            assert [r["run_id"] for r in json.load(response)["runs"]] == ["r"]
        with urllib.request.urlopen(url + "static/plotly.min.js", timeout=10) as response:
            assert b"plotly" in response.read(2000).lower()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_verdict_is_labelled_with_its_own_round(tmp_path: Path) -> None:
    """Between a round's evaluation and its verdict (two transactions) the page shows the previous verdict as such."""
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "r", SITES[:2], 1, finish=False, alarm_from=1)
        store.record_evaluation("r", 2, {"site-0": site_eval(random.Random(0), 0.7)}, None)
        detail = run_detail(tmp_path, ".", "r")
        assert detail["run"]["rounds_evaluated"] == 2
        assert (detail["verdict"]["round"], detail["verdict"]["alarm"]) == (1, True)
        store.record_bias("r", 2, {"alarm": False, "reasons": [], "tests": {}})
        detail = run_detail(tmp_path, ".", "r")
        assert (detail["verdict"]["round"], detail["verdict"]["alarm"]) == (2, False)
        assert detail["verdict"]["alarm_rounds"] == [1]


def test_per_patient_metrics_lead_the_table_and_the_plots(tmp_path: Path) -> None:
    fabricate(tmp_path / "runs.sqlite").close()
    detail = run_detail(tmp_path, ".", RUN)
    with RunStore(tmp_path / "runs.sqlite") as store:
        summary = build_summary(store, RUN)
    for row in detail["table"]:
        entry = summary["global"] if row["site"] == "global" else summary["per_site"][row["site"]]
        patient = entry["per_patient"]
        assert row["patients"] == str(patient["n_test"]) and row["ece"] == f"{patient['ece']:.3f}"
        assert row["patient_auc"] == fmt_with_ci(patient["auc"], patient["auc_ci"])
        assert row["auc"] == fmt_with_ci(entry["auc"], entry["auc_ci"])  # per image, beside
    site_b = next(row for row in detail["table"] if row["site"] == "site-b")
    assert site_b["patient_auc"] == "n/a" and "only one class" in site_b["reasons"]["patient_auc"]
    # the per-patient AUC by round, from each round's per-patient vector
    assert [p[0] for p in detail["series"]["patient_auc"]["site-a"]] == [1, 2]
    assert detail["series"]["patient_auc"]["global"][-1][1] == pytest.approx(summary["global"]["per_patient"]["auc"])
    assert "Decision threshold 0.450: Youden" in detail["threshold"] and "+-0.008" in detail["binning"]


def test_the_overview_compares_runs_by_their_per_patient_auc(tmp_path: Path) -> None:
    fabricate(tmp_path / "runs.sqlite").close()
    with RunStore(tmp_path / "runs.sqlite") as store:
        pooled = build_summary(store, RUN)["global"]
    line = overview(tmp_path)["runs"][0]
    assert pooled["per_patient"]["auc"] != pytest.approx(pooled["auc"])  # the fabricated levels differ
    assert line["global_auc"] == pytest.approx(pooled["per_patient"]["auc"])


def test_verdict_is_provisional_while_the_study_runs_and_final_once_it_ends(tmp_path: Path) -> None:
    """Every round's verdict is provisional; the page lists them with how often the verdict
    changed, and labels the study's verdict final only once no round can follow."""
    with RunStore(tmp_path / "runs.sqlite") as store:
        write_run(store, "r", SITES[:3], 4, finish=False, alarm_from=2)
        store.record_bias("r", 4, {"alarm": False, "reasons": [], "signals": [], "tests": {}})
        assert overview(tmp_path)["runs"][0]["verdict_final"] is False
        running = run_detail(tmp_path, ".", "r")["verdict"]
        assert (running["round"], running["final"]) == (4, False)
        assert running["history"] == [[1, False], [2, True], [3, True], [4, False]]
        assert running["changes"] == 2
        store.finish_run("r")
        assert overview(tmp_path)["runs"][0]["verdict_final"] is True
        finished = run_detail(tmp_path, ".", "r")["verdict"]
        assert (finished["round"], finished["final"], finished["alarm"]) == (4, True, False)
        assert finished["history"] == running["history"]
