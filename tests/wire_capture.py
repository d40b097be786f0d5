"""A Flower client mod that records every message a ClientApp receives and every reply it
sends, for the wire audit.

Simulated ClientApps run in Ray worker processes, so each message is written to a folder
as a pickle; the test reads the folder afterwards. A received message is recorded before
the ClientApp's handler (and its other mods) run, so a site whose handler fails is audited
too. Model weights are recorded by name, shape and dtype, plus one digest of each
ArrayRecord's values, so that the test can tell the global model from a site's own update
without keeping either; metric and config values are recorded in full.
"""

from __future__ import annotations

import hashlib
import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, RecordDict

RECEIVED, SENT = "received", "sent"


def digest(record: ArrayRecord) -> str:
    """A digest of the record's names, shapes, dtypes and values (in name order)."""
    h = hashlib.sha256()
    for key in sorted(record):
        value = record[key].numpy()
        h.update(f"{key}:{value.shape}:{value.dtype}".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def _summary(content: RecordDict) -> dict[str, Any]:
    return {
        "arrays": {
            f"{name}/{key}": (tuple(array.shape), str(array.dtype))
            for name, rec in content.array_records.items() for key, array in rec.items()
        },
        "digests": {name: digest(rec) for name, rec in content.array_records.items()},
        "metrics": {f"{name}/{key}": value for name, rec in content.metric_records.items()
                    for key, value in rec.items()},
        "configs": {f"{name}/{key}": value for name, rec in content.config_records.items()
                    for key, value in rec.items()},
    }


@dataclass(frozen=True)
class CaptureMessages:
    """Client mod: save what the message carries, pass it on, then save what the reply carries."""

    folder: str

    def _save(self, direction: str, msg: Message, context: Context, content: RecordDict) -> None:
        record = {"direction": direction, "message_type": msg.metadata.message_type,
                  "partition": context.node_config.get("partition-id"), **_summary(content)}
        path = Path(self.folder) / f"{uuid.uuid4().hex}.pkl"
        path.write_bytes(pickle.dumps(record))

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        self._save(RECEIVED, msg, context, msg.content)
        reply = call_next(msg, context)
        self._save(SENT, msg, context, reply.content)
        return reply


def read_captured(folder: Path, direction: str) -> list[dict]:
    """Every message recorded in `folder` in one direction (RECEIVED or SENT)."""
    records = [pickle.loads(path.read_bytes()) for path in sorted(folder.glob("*.pkl"))]
    return [r for r in records if r["direction"] == direction]
