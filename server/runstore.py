"""The run store: ``runs.sqlite``, the single source of truth of a federated run.

Everything the server learns during a run (per-site evaluation aggregates, training
aggregates, bias verdicts, notes) is written here as it arrives; the summary, the
HTML report and the dashboard are all rebuilt from this file and nothing else.

The file uses WAL journaling so a dashboard can read while the server writes. Every
``record_*`` call is one transaction, and the calls inside ``with store.batch():`` share
one: the ServerApp writes each stage of a round (training; evaluation with its verdict)
in one transaction, so a reader never sees half a stage and a round costs two commits
however many sites' cards and notes it carries.

Schema
------
``runs(run_id TEXT PRIMARY KEY, scenario TEXT, config_json TEXT, sites_json TEXT,
started_at TEXT, finished_at TEXT, status TEXT)``
    One row per run. ``status`` is "running", "finished" or "failed"; timestamps are
    UTC ISO-8601.

``metrics(run_id TEXT, round INTEGER, site TEXT, split TEXT, metric TEXT, value REAL,
ci_low REAL, ci_high REAL)``
    One row per round, site, split and metric (a contract: tools count on it).
    ``split`` is "test" for evaluation of the global model and "train" for training
    aggregates. ``site`` is "global" for the pooled metrics. ``value`` is NULL when
    the metric could not be computed (the reason is in ``notes``); ``ci_low`` and
    ``ci_high`` are NULL when there is no confidence interval (counts, losses).
    Indexed on ``(run_id, round)``.

    Under ``privacy.dp`` every aggregated round also has site "global", split "privacy"
    rows: ``dp_epsilon`` (spent so far, NULL when infinite: no noise), ``dp_delta`` and
    ``dp_noise_multiplier`` (the round's effective one, fedir.strategies.privacy_budget).

``vectors(run_id TEXT, round INTEGER, site TEXT, split TEXT, name TEXT, json TEXT)``
    Vector-valued aggregates: score histograms (``hist_neg``, ``hist_pos``) and their
    per-bin score sums (``hist_score_sum``), the per-patient metrics (``per_patient``, one
    object), the decision threshold the test metrics were counted at (``threshold``:
    value, rule, how it was chosen; fedir.strategies.thresholds), label counts per class,
    skipped-file counts per reason. ``json`` is the JSON value.

``notes(run_id TEXT, round INTEGER, site TEXT, kind TEXT, message TEXT, metric TEXT)``
    Human-readable facts: why a metric is null (``kind`` "null_metric", ``metric``
    names it), skipped files, missing sites, rejected updates, why a study stopped early
    (``privacy_budget``, ``early_stop``). ``round`` is NULL for run-level notes and
    ``metric`` is NULL for notes about no particular metric.

``bias(run_id TEXT, round INTEGER, json TEXT)``
    The bias verdict of each round, as JSON (``{"alarm", "reasons", "tests"}``).

``cards(run_id TEXT, site TEXT, json TEXT)``
    Each site's data card (k-suppressed counts, fedir.client.datacard), sent once.

``model_init(run_id TEXT PRIMARY KEY, json TEXT)``
    What ``model.init`` loaded into the first global model (fedir.server.model_init);
    no row for a run that started from random weights.

Non-finite floats (NaN, inf) are stored as NULL: JSON consumers downstream refuse them.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedir.metrics import COUNTS

GLOBAL_SITE = "global"
PRIVACY_SPLIT = "privacy"
NULL_METRIC_NOTE = "null_metric"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, scenario TEXT, config_json TEXT, sites_json TEXT,
    started_at TEXT, finished_at TEXT, status TEXT);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, split TEXT NOT NULL,
    metric TEXT NOT NULL, value REAL, ci_low REAL, ci_high REAL,
    UNIQUE (run_id, round, site, split, metric));
CREATE INDEX IF NOT EXISTS metrics_run_round ON metrics (run_id, round);
CREATE TABLE IF NOT EXISTS vectors (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, site TEXT NOT NULL, split TEXT NOT NULL,
    name TEXT NOT NULL, json TEXT NOT NULL,
    UNIQUE (run_id, round, site, split, name));
CREATE INDEX IF NOT EXISTS vectors_run_round ON vectors (run_id, round);
CREATE TABLE IF NOT EXISTS notes (
    run_id TEXT NOT NULL, round INTEGER, site TEXT, kind TEXT NOT NULL, message TEXT NOT NULL,
    metric TEXT);
CREATE INDEX IF NOT EXISTS notes_run ON notes (run_id);
CREATE TABLE IF NOT EXISTS bias (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, json TEXT NOT NULL,
    PRIMARY KEY (run_id, round));
CREATE TABLE IF NOT EXISTS cards (
    run_id TEXT NOT NULL, site TEXT NOT NULL, json TEXT NOT NULL,
    PRIMARY KEY (run_id, site));
CREATE TABLE IF NOT EXISTS nodes (
    run_id TEXT NOT NULL, site TEXT NOT NULL, node_id TEXT NOT NULL,
    first_round INTEGER NOT NULL, last_round INTEGER NOT NULL,
    PRIMARY KEY (run_id, site, node_id));
CREATE TABLE IF NOT EXISTS model_init (
    run_id TEXT PRIMARY KEY, json TEXT NOT NULL);
"""

# Metrics that are counts: stored as REAL (the contract), handed back as int.
_COUNT_METRICS = frozenset(COUNTS)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _finite_or_none(value: Any) -> float | None:
    """A number SQLite and strict JSON can both hold, or None."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf by None everywhere, so stored JSON always parses strictly."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return _json_safe(value.item())
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy array
        return _json_safe(value.tolist())
    return value


def _dumps(value: Any) -> str:
    """Strict JSON, keys in the producer's order (the report shows them in that order)."""
    return json.dumps(_json_safe(value), allow_nan=False)


def _is_number(value: Any) -> bool:
    if isinstance(value, (bool, int, float)):
        return True
    return hasattr(value, "dtype") and getattr(value, "shape", None) == ()


def _is_count(metric: str) -> bool:
    return metric in _COUNT_METRICS or metric.startswith("n_")


def _ci_bounds(ci: Any) -> tuple[float | None, float | None]:
    if ci is None or len(ci) != 2:
        return None, None
    return _finite_or_none(ci[0]), _finite_or_none(ci[1])


def _value_out(metric: str, value: float | None) -> float | int | None:
    if value is not None and _is_count(metric) and float(value).is_integer():
        return int(value)
    return value


class RunStore:
    """Read and write one ``runs.sqlite`` file (see the module docstring for the schema)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only from the start (SQLite gives its -wal and -shm files the same mode): the
        # store holds every site's aggregates and notes, for the coordinator's operator alone.
        os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        # Autocommit mode: transactions are explicit (see _transaction), never implicit.
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._batch: sqlite3.Cursor | None = None  # the open batch() transaction, if any
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        with self._transaction() as cur:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    cur.execute(statement)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every write inside commits together, in one transaction, or not at all."""
        with self._transaction() as cur:
            self._batch = cur
            try:
                yield
            finally:
                self._batch = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        """One atomic write: all statements inside commit together or not at all; inside
        a batch() they join its transaction."""
        if self._batch is not None:
            yield self._batch
            return
        cur = self._conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        cur.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Cursor]:
        """A consistent read across several queries, even while another process writes."""
        cur = self._conn.cursor()
        cur.execute("BEGIN")
        try:
            yield cur
        finally:
            cur.execute("COMMIT")

    # ---- writers -------------------------------------------------------------------

    def start_run(self, run_id: str, scenario: str, config: dict, sites: list[str]) -> None:
        with self._transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, NULL, 'running')",
                (run_id, scenario, _dumps(config), _dumps(list(sites)), _now()),
            )

    def finish_run(self, run_id: str, status: str = "finished") -> None:
        with self._transaction() as cur:
            cur.execute(
                "UPDATE runs SET finished_at = ?, status = ? WHERE run_id = ?",
                (_now(), status, run_id),
            )

    def reopen_run(self, run_id: str, after_round: int) -> None:
        """Continue `run_id` after `after_round` (a resumed ServerApp): mark it running and
        drop every row of later rounds, which an interrupted round may have half written."""
        with self._transaction() as cur:
            cur.execute("UPDATE runs SET finished_at = NULL, status = 'running' WHERE run_id = ?",
                        (run_id,))
            for table in ("metrics", "vectors", "notes", "bias"):
                cur.execute(f"DELETE FROM {table} WHERE run_id = ? AND round > ?", (run_id, after_round))

    def record_evaluation(
        self, run_id: str, server_round: int, per_site: Mapping[str, dict], pooled: dict | None,
        split: str = "test",
    ) -> None:
        """Store one round of evaluation of `split` ("test", or "val": the validation
        patients, which choose) for every site, plus the pooled "global" entry.

        Re-recording a round replaces it, so a retried round never doubles its rows.
        """
        entries = dict(per_site)
        if pooled is not None:
            entries[GLOBAL_SITE] = pooled
        with self._transaction() as cur:
            for site, aggregates in entries.items():
                self._write_site(cur, run_id, server_round, site, split, aggregates)

    def record_training(self, run_id: str, server_round: int, per_site: Mapping[str, dict]) -> None:
        """Store one round of training aggregates: numbers as metrics, lists/dicts as vectors."""
        with self._transaction() as cur:
            for site, aggregates in per_site.items():
                self._write_site(cur, run_id, server_round, site, "train", aggregates)

    def record_privacy(self, run_id: str, server_round: int, epsilon: float, delta: float,
                       noise_multiplier: float) -> None:
        """The epsilon spent up to and including `server_round`, at `delta`."""
        values = {"dp_epsilon": epsilon, "dp_delta": delta, "dp_noise_multiplier": noise_multiplier}
        with self._transaction() as cur:
            cur.executemany(
                "INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                [(run_id, server_round, GLOBAL_SITE, PRIVACY_SPLIT, name, _finite_or_none(value))
                 for name, value in values.items()],
            )

    def privacy_rounds(self, run_id: str) -> list[dict]:
        """Per accounted round: {"round", "epsilon", "delta", "noise_multiplier"}, in order."""
        rows = self._conn.execute(
            "SELECT round, metric, value FROM metrics WHERE run_id = ? AND split = ? ORDER BY round",
            (run_id, PRIVACY_SPLIT),
        )
        by_round: dict[int, dict] = {}
        for row in rows:
            entry = by_round.setdefault(row["round"], {"round": row["round"]})
            entry[row["metric"].removeprefix("dp_")] = row["value"]
        return list(by_round.values())

    def record_note(self, run_id: str, server_round: int | None, site: str | None, kind: str, message: str) -> None:
        with self._transaction() as cur:
            cur.execute(
                "INSERT INTO notes VALUES (?, ?, ?, ?, ?, NULL)",
                (run_id, server_round, site, kind, message),
            )

    def record_bias(self, run_id: str, server_round: int, verdict: dict) -> None:
        with self._transaction() as cur:
            cur.execute(
                "INSERT OR REPLACE INTO bias VALUES (?, ?, ?)", (run_id, server_round, _dumps(verdict))
            )

    def record_card(self, run_id: str, site: str, card: dict) -> None:
        """Store a site's data card (a later one from the same site replaces it)."""
        with self._transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO cards VALUES (?, ?, ?)", (run_id, site, _dumps(card)))

    def record_model_init(self, run_id: str, report: dict) -> None:
        """What `model.init` loaded into the first global model (fedir.server.model_init)."""
        with self._transaction() as cur:
            cur.execute("INSERT OR REPLACE INTO model_init VALUES (?, ?)", (run_id, _dumps(report)))

    def model_init(self, run_id: str) -> dict | None:
        """The run's `model.init` report; None for a run that started from random weights
        (or a store, opened read-only, written before the table existed)."""
        try:
            row = self._conn.execute("SELECT json FROM model_init WHERE run_id = ?", (run_id,)).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return None
        return None if row is None else json.loads(row["json"])

    def record_nodes(self, run_id: str, server_round: int, nodes: Mapping[str, int]) -> None:
        """Which Flower node answered as which site in `server_round`: what `flwr supernode ls`
        lists by node id alone (a site whose SuperNode was replaced gets a second row)."""
        with self._transaction() as cur:
            cur.executemany(
                "INSERT INTO nodes VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, site, node_id)"
                " DO UPDATE SET last_round = MAX(last_round, excluded.last_round)",
                # Flower's node ids are unsigned 64-bit: beyond SQLite's INTEGER, so kept as text
                [(run_id, site, str(int(node)), server_round, server_round) for site, node in nodes.items()],
            )

    def nodes(self, run_id: str) -> list[dict]:
        """``[{"site", "node_id", "first_round", "last_round"}]`` of a run, by site."""
        rows = self._conn.execute(
            "SELECT site, node_id, first_round, last_round FROM nodes WHERE run_id = ? ORDER BY site, first_round, node_id",
            (run_id,),
        )
        return [{**dict(row), "node_id": int(row["node_id"])} for row in rows]

    def cards(self, run_id: str) -> dict[str, dict]:
        """``{site: card}`` of a run, by site name."""
        rows = self._conn.execute(
            "SELECT site, json FROM cards WHERE run_id = ? ORDER BY site", (run_id,)
        )
        return {row["site"]: json.loads(row["json"]) for row in rows}

    def _write_site(
        self, cur: sqlite3.Cursor, run_id: str, server_round: int, site: str, split: str, aggregates: dict
    ) -> None:
        key = (run_id, server_round, site, split)
        cur.execute("DELETE FROM metrics WHERE run_id=? AND round=? AND site=? AND split=?", key)
        cur.execute("DELETE FROM vectors WHERE run_id=? AND round=? AND site=? AND split=?", key)
        cur.executemany(
            "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(*key, metric, *row) for metric, row in _metric_rows(aggregates).items()],
        )
        cur.executemany(
            "INSERT INTO vectors VALUES (?, ?, ?, ?, ?, ?)",
            [(*key, name, _dumps(value)) for name, value in _vector_items(aggregates).items()],
        )
        reasons = aggregates.get("reasons") or {}
        if split != "test":
            # only the test metrics' reasons are notes (what the report explains); the
            # others' travel with their split's vectors
            if reasons:
                cur.execute("INSERT INTO vectors VALUES (?, ?, ?, ?, ?, ?)", (*key, "reasons", _dumps(reasons)))
            return
        # null-metric reasons of a re-recorded round are replaced too
        cur.execute(
            "DELETE FROM notes WHERE run_id=? AND round=? AND site=? AND kind=?",
            (run_id, server_round, site, NULL_METRIC_NOTE),
        )
        cur.executemany(
            "INSERT INTO notes VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, server_round, site, NULL_METRIC_NOTE, str(why), str(metric))
             for metric, why in reasons.items()],
        )

    # ---- readers -------------------------------------------------------------------

    def run(self, run_id: str) -> dict:
        row = self._conn.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        record = dict(row)
        record["config"] = json.loads(record.pop("config_json") or "{}")
        record["sites"] = json.loads(record.pop("sites_json") or "[]")
        return record

    def latest_run_id(self) -> str | None:
        row = self._conn.execute(
            "SELECT run_id FROM runs ORDER BY started_at DESC, rowid DESC LIMIT 1"
        ).fetchone()
        return None if row is None else row["run_id"]

    def metric_rows(self, run_id: str) -> list[dict]:
        rows = self._conn.execute(
            "SELECT * FROM metrics WHERE run_id = ? ORDER BY round, split, site, metric", (run_id,)
        )
        return [dict(row) for row in rows]

    def last_round(self, run_id: str, split: str | None = None) -> int | None:
        """The highest round with metrics (of ``split`` when given), None before any."""
        query, args = "SELECT MAX(round) FROM metrics WHERE run_id = ?", [run_id]
        if split is not None:
            query, args = query + " AND split = ?", [run_id, split]
        return self._conn.execute(query, args).fetchone()[0]

    def evaluated_rounds(self, run_id: str, split: str = "test") -> list[int]:
        """The rounds with metrics of ``split``, in order."""
        rows = self._conn.execute(
            "SELECT DISTINCT round FROM metrics WHERE run_id = ? AND split = ? ORDER BY round", (run_id, split)
        )
        return [row[0] for row in rows]

    def site_metrics(self, run_id: str, server_round: int, split: str = "test") -> dict[str, dict]:
        """Rebuild ``{site: {metric: value, metric_ci: [lo, hi] | None, vector: [...], "reasons": {}}}``."""
        with self._snapshot() as cur:
            args = (run_id, server_round, split)
            metrics = cur.execute(
                "SELECT site, metric, value, ci_low, ci_high FROM metrics"
                " WHERE run_id=? AND round=? AND split=? ORDER BY site, metric", args
            ).fetchall()
            vectors = cur.execute(
                "SELECT site, name, json FROM vectors WHERE run_id=? AND round=? AND split=?", args
            ).fetchall()
            reasons = cur.execute(
                "SELECT site, metric, message FROM notes WHERE run_id=? AND round=? AND kind=?",
                (run_id, server_round, NULL_METRIC_NOTE),
            ).fetchall()
        sites: dict[str, dict] = {}
        for row in metrics:
            entry = sites.setdefault(row["site"], {"reasons": {}})
            entry[row["metric"]] = _value_out(row["metric"], row["value"])
            has_ci = row["ci_low"] is not None and row["ci_high"] is not None
            entry[row["metric"] + "_ci"] = [row["ci_low"], row["ci_high"]] if has_ci else None
        for row in vectors:
            sites.setdefault(row["site"], {"reasons": {}})[row["name"]] = json.loads(row["json"])
        if split == "test":
            for row in reasons:
                sites.setdefault(row["site"], {"reasons": {}})["reasons"][row["metric"]] = row["message"]
        return sites

    def vectors(self, run_id: str, server_round: int | None = None) -> list[dict]:
        query, args = "SELECT * FROM vectors WHERE run_id = ?", [run_id]
        if server_round is not None:
            query, args = query + " AND round = ?", [run_id, server_round]
        rows = self._conn.execute(query + " ORDER BY round, split, site, name", args)
        return [{**dict(row), "json": json.loads(row["json"])} for row in rows]

    def notes(self, run_id: str) -> list[dict]:
        rows = self._conn.execute(
            "SELECT round, site, kind, message, metric FROM notes WHERE run_id = ?"
            " ORDER BY round IS NULL, round, site, rowid", (run_id,)
        )
        return [dict(row) for row in rows]

    def bias(self, run_id: str, server_round: int | None = None) -> dict | None:
        """The verdict of ``server_round``, or of the last round that has one."""
        if server_round is None:
            row = self._conn.execute(
                "SELECT json FROM bias WHERE run_id = ? ORDER BY round DESC LIMIT 1", (run_id,)
            ).fetchone()
        else:
            row = self._conn.execute(
                "SELECT json FROM bias WHERE run_id = ? AND round = ?", (run_id, server_round)
            ).fetchone()
        return None if row is None else json.loads(row["json"])

    def verdict_history(self, run_id: str) -> list[dict]:
        """Every round's recorded verdict, in order: ``{"round", "alarm", "signals"}`` (alarm None
        where a round's verdict was not computed). A round's verdict is provisional: the study's
        verdict is the one the summary reads, once the study has ended (:func:`verdict_is_final`)."""
        rows = self._conn.execute(
            "SELECT round, json_extract(json, '$.alarm') AS alarm, json_extract(json, '$.signals') AS signals "
            "FROM bias WHERE run_id = ? ORDER BY round", (run_id,),
        )
        return [{"round": row["round"], "alarm": None if row["alarm"] is None else bool(row["alarm"]),
                 "signals": json.loads(row["signals"]) if row["signals"] else []} for row in rows]


def verdict_is_final(status: str) -> bool:
    """A study's verdict is final once no round can follow (the run finished or failed); while
    it runs, the latest round's verdict is provisional and the next round may change it."""
    return status != "running"


def verdict_changes(history: list[dict]) -> int:
    """How many times the recorded verdict flips between consecutive rounds (uncomputed
    rounds skipped): what the dashboard and the report show beside the per-round verdicts,
    and the stability benchmarks/bias_calibration.py --stability measures."""
    alarms = [entry["alarm"] for entry in history if entry["alarm"] is not None]
    return sum(a != b for a, b in zip(alarms, alarms[1:]))


def _metric_rows(aggregates: dict) -> dict[str, tuple[float | None, float | None, float | None]]:
    """``{metric: (value, ci_low, ci_high)}`` for every scalar (or None) entry.

    ``x_ci`` pairs belong to ``x``; "reasons" and list/dict entries are not metrics.
    """
    rows = {}
    for name, value in aggregates.items():
        if name == "reasons" or name.endswith("_ci"):
            continue
        if value is None or _is_number(value):
            rows[name] = (_finite_or_none(value), *_ci_bounds(aggregates.get(name + "_ci")))
    return rows


def _vector_items(aggregates: dict) -> dict[str, Any]:
    """List/dict entries (histograms, counts per class), except CIs and reasons; strings are not stored."""
    return {
        name: value
        for name, value in aggregates.items()
        if name != "reasons" and not name.endswith("_ci") and not (value is None or _is_number(value))
        and not isinstance(value, str)
    }
