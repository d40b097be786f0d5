"""A Flower client mod that records every reply a ClientApp sends, for the wire audit.

Simulated ClientApps run in Ray worker processes, so each reply is written to a folder
as a pickle; the test reads the folder afterwards. Model weights are recorded by name,
shape and dtype only (their values are the model's, not the site's data); metric and
config values are recorded in full.
"""

from __future__ import annotations

import pickle
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message


@dataclass(frozen=True)
class CaptureReplies:
    """Client mod: pass the message on, then save what the reply carries."""

    folder: str

    def __call__(self, msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        content = reply.content
        record = {
            "message_type": msg.metadata.message_type,
            "arrays": {
                f"{name}/{key}": (tuple(array.shape), str(array.dtype))
                for name, rec in content.array_records.items() for key, array in rec.items()
            },
            "metrics": {f"{name}/{key}": value for name, rec in content.metric_records.items()
                        for key, value in rec.items()},
            "configs": {f"{name}/{key}": value for name, rec in content.config_records.items()
                        for key, value in rec.items()},
        }
        path = Path(self.folder) / f"{uuid.uuid4().hex}.pkl"
        path.write_bytes(pickle.dumps(record))
        return reply


def read_captured(folder: Path) -> list[dict]:
    """Every reply recorded in `folder`."""
    return [pickle.loads(path.read_bytes()) for path in sorted(folder.glob("*.pkl"))]
