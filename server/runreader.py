"""Read-only access to run stores, for watchers (the dashboard) that must never disturb a run.

``RunStore`` opens ``runs.sqlite`` read-write and creates its schema, which is right for
the server and wrong for a watcher: a watcher must not create a file where there is none,
must not take the write lock, and must read each page it shows as one consistent
snapshot, so that it never shows half of a round while the server is writing the other
half. ``ReadOnlyRunStore`` keeps every reader of ``RunStore`` (so the dashboard and
``summary.json`` are built by the same code) but opens the file with ``mode=ro`` and
runs all the queries of one ``snapshot()`` inside a single read transaction. With the
store's WAL journal, such a reader never blocks the writer, nor the writer it.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedir.server.runstore import RunStore

STORE_NAME = "runs.sqlite"


class StoreUnreadable(Exception):
    """The run store is missing, not SQLite, or not a fedir run store; the message says which."""


class ReadOnlyRunStore(RunStore):
    """A ``RunStore`` that only reads (see the module docstring)."""

    def __init__(self, path: str | Path, timeout: float = 5.0) -> None:
        # RunStore.__init__ is not called: it creates the file and its schema.
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreUnreadable(f"no {self.path.name} at {self.path.parent}: the run has not started yet,"
                                  " or this is not a run folder")
        uri = self.path.resolve().as_uri() + "?mode=ro"
        try:
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout)
            self._conn.row_factory = sqlite3.Row
            tables = {row[0] for row in self._conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreUnreadable(f"{self.path} cannot be read as SQLite ({exc}): the file is damaged"
                                  " or is not a run store") from None
        self._tables = tables
        missing = {"runs", "metrics", "notes", "bias", "vectors"} - tables
        if missing:
            self._conn.close()
            raise StoreUnreadable(f"{self.path} is SQLite but not a fedir run store"
                                  f" (no table {', '.join(sorted(missing))})")

    @contextmanager
    def snapshot(self) -> Iterator[ReadOnlyRunStore]:
        """Every read inside the block sees the store as of one committed moment."""
        self._conn.execute("BEGIN")
        try:
            yield self
        except sqlite3.DatabaseError as exc:
            raise StoreUnreadable(f"{self.path} could not be read ({exc})") from None
        finally:
            self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Cursor]:
        """RunStore's multi-query reads join an open ``snapshot()`` instead of nesting one."""
        if self._conn.in_transaction:
            yield self._conn.cursor()
        else:
            with super()._snapshot() as cur:
                yield cur

    def nodes(self, run_id: str) -> list[dict]:
        """RunStore.nodes; none for a store an older fedir wrote (it kept no node ids)."""
        return super().nodes(run_id) if "nodes" in self._tables else []

    def run_ids(self) -> list[str]:
        """Every run in the file, oldest first."""
        rows = self._conn.execute("SELECT run_id FROM runs ORDER BY started_at, rowid")
        return [row["run_id"] for row in rows]

    def fingerprint(self, run_id: str) -> str:
        """Changes whenever anything about ``run_id`` is written (rows are only added or replaced)."""
        counts = [
            self._conn.execute(f"SELECT COUNT(*), MAX(rowid) FROM {table} WHERE run_id = ?", (run_id,)).fetchone()
            for table in ("metrics", "vectors", "notes", "bias")
        ]
        status = self._conn.execute("SELECT status, finished_at FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        parts = [str(tuple(status) if status else None), *(f"{n}:{m}" for n, m in counts)]
        return "|".join(parts)


    def series(self, run_id: str, metrics: tuple[str, ...]) -> dict[str, dict[str, list]]:
        """``{metric: {site: [[round, value, ci_low, ci_high], ...]}}`` of the test split, nulls left out."""
        marks = ",".join("?" * len(metrics))
        rows = self._conn.execute(
            "SELECT metric, site, round, value, ci_low, ci_high FROM metrics WHERE run_id = ?"
            f" AND split = 'test' AND metric IN ({marks}) AND value IS NOT NULL ORDER BY round",
            (run_id, *metrics),
        )
        out: dict[str, dict[str, list]] = {m: defaultdict(list) for m in metrics}
        for metric, site, server_round, *numbers in rows:  # 4 decimals: for plots, not the table
            out[metric][site].append([server_round, *(None if v is None else round(v, 4) for v in numbers)])
        return {m: dict(by_site) for m, by_site in out.items()}

    def patient_series(self, run_id: str, metrics: tuple[str, ...]) -> dict[str, dict[str, list]]:
        """As :meth:`series`, of the per-patient test metrics (each round's ``per_patient``
        vector), under ``patient_<metric>``; sites without per-patient metrics left out."""
        rows = self._conn.execute(
            "SELECT site, round, json FROM vectors WHERE run_id = ? AND split = 'test' AND name = 'per_patient'"
            " ORDER BY round", (run_id,),
        )
        out: dict[str, dict[str, list]] = {f"patient_{m}": defaultdict(list) for m in metrics}
        for site, server_round, text in rows:
            entry = json.loads(text)
            if not isinstance(entry, dict):
                continue
            for metric in metrics:
                if entry.get(metric) is None:
                    continue
                ci = entry.get(metric + "_ci") or [None, None]
                out[f"patient_{metric}"][site].append(
                    [server_round, *(None if v is None else round(v, 4) for v in (entry[metric], *ci))])
        return {m: dict(by_site) for m, by_site in out.items()}

    def data_cards(self, run_id: str) -> dict[str, dict]:
        """Each site's data card (the ``cards`` table the ServerApp fills from first replies)."""
        rows = self._conn.execute(
            "SELECT site, json FROM cards WHERE run_id = ? ORDER BY site", (run_id,)
        )
        cards = {site: json.loads(text) for site, text in rows}
        return {site: card for site, card in cards.items() if isinstance(card, dict)}

    def last_verdict_round(self, run_id: str) -> int | None:
        """The latest round with a bias verdict (it lags its evaluation by one transaction)."""
        return self._conn.execute("SELECT MAX(round) FROM bias WHERE run_id = ?", (run_id,)).fetchone()[0]

    def alarm_rounds(self, run_id: str) -> list[int]:
        """The rounds whose bias verdict raised the alarm."""
        rows = self._conn.execute(
            "SELECT round FROM bias WHERE run_id = ? AND json_extract(json, '$.alarm') ORDER BY round",
            (run_id,),
        )
        return [row[0] for row in rows]


def find_stores(folder: str | Path) -> list[Path]:
    """``folder/runs.sqlite`` if there is one, else every ``folder/*/runs.sqlite``, sorted."""
    folder = Path(folder)
    own = folder / STORE_NAME
    if own.exists():
        return [own]
    return sorted(p for p in folder.glob(f"*/{STORE_NAME}") if p.is_file())
