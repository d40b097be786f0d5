"""The site's own audit log: every message the site receives and sends, as names and shapes.

A hospital's IT and data-protection staff must be able to answer "what did we send, what
did we receive, and when" without trusting the coordinator. This Flower client mod writes
one JSON line per message, in both directions, at the site: the time (UTC), the Flower run,
the round, the message type, the nodes, the size of the arrays, and what the message
carried as record names, array names, dtypes and shapes, metric names with their kind,
and config keys. Never a value: the weights are the model's, but metric and config
values include the site's own aggregates, and the log is for auditing the channel, not
for a second copy of the data. An error reply is logged with its code.

The log is append-only JSON lines, rotated by size (`logging.handlers.RotatingFileHandler`:
`audit.jsonl`, then `audit.jsonl.1` ... the oldest last), in `SITE/.fedir-audit/` or in the
folder named by the node config `audit-dir` (for a read-only site folder). `fedir site log
SITE` prints it (`read_log` reads the rotated files oldest first).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable, Mod

AUDIT_DIR = ".fedir-audit"
LOG_NAME = "audit.jsonl"
MAX_BYTES = 10 * 1024 * 1024  # per file, before rotation
BACKUPS = 5  # rotated files kept
CONFIG_RECORD = "config"  # the server's round config (fedir.protocol), where the round is named
ROUND_KEY = "server-round"


def describe(content: RecordDict) -> dict[str, Any]:
    """What a message carries, as names and shapes only.

    Returns ``{"arrays": {record: {name: [dtype, shape]}}, "metrics": {record: {name: kind}},
    "configs": {record: [keys]}, "array_bytes": int}``, where a metric's kind is ``int``,
    ``float`` or ``list[N]``.
    """
    arrays = {
        name: {key: [str(arr.dtype), list(arr.shape)] for key, arr in rec.items()}
        for name, rec in content.array_records.items()
    }
    metrics = {
        name: {key: f"list[{len(v)}]" if isinstance(v, list) else type(v).__name__ for key, v in rec.items()}
        for name, rec in content.metric_records.items()
    }
    configs = {name: sorted(rec.keys()) for name, rec in content.config_records.items()}
    size = sum(len(arr.data) for rec in content.array_records.values() for arr in rec.values())
    return {"arrays": arrays, "metrics": metrics, "configs": configs, "array_bytes": size}


def _utc(when: float) -> str:
    """ISO 8601 UTC to the millisecond: a message handled in under a second still shows how
    long the site held it (received to sent)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when * 1000) % 1000:03d}Z"


def entry(direction: str, msg: Message, when: float | None = None) -> dict[str, Any]:
    """One log line for `msg` ("received" or "sent")."""
    meta = msg.metadata
    out: dict[str, Any] = {
        "time": _utc(time.time() if when is None else when),
        "direction": direction,
        "run": meta.run_id,
        "message_type": meta.message_type,
        "message_id": meta.message_id,
        "reply_to": meta.reply_to_message_id or None,
        "src_node": meta.src_node_id,
        "dst_node": meta.dst_node_id,
        "round": None,
    }
    if msg.has_error():
        out["error"] = {"code": msg.error.code}
        return out
    content = msg.content
    if CONFIG_RECORD in content.config_records and ROUND_KEY in content.config_records[CONFIG_RECORD]:
        out["round"] = int(content.config_records[CONFIG_RECORD][ROUND_KEY])
    out.update(describe(content))
    return out


def log_folder(site_dir: Path, context: Context) -> Path:
    """`audit-dir` from node config, else the site folder's `.fedir-audit/`."""
    if "audit-dir" in context.node_config:
        return Path(str(context.node_config["audit-dir"]))
    return site_dir / AUDIT_DIR


def _logger(path: Path) -> logging.Logger:
    """A logger that appends lines to `path`, rotating by size; one per file per process."""
    logger = logging.getLogger(f"fedir.audit.{path}")
    if not logger.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS,
                                                       encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # the audit trail is not the application log
    return logger


def write(path: Path, line: dict[str, Any]) -> None:
    """Append one entry and flush it to disk before the message is handled further."""
    logger = _logger(path)
    logger.info(json.dumps(line, sort_keys=True))
    for handler in logger.handlers:
        handler.flush()


def audit_mod(site_dir_of: Callable[[Context], Path]) -> Mod:
    """A client mod that logs every message received and every reply sent at the site.

    Args:
        site_dir_of: the node's site folder for a context (fedir.client.client_app), where
            the log lives unless node config `audit-dir` names another folder.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        path = log_folder(site_dir_of(context), context) / LOG_NAME
        write(path, entry("received", msg))
        reply = call_next(msg, context)
        write(path, entry("sent", reply))
        return reply

    return mod


def read_log(folder: Path) -> list[dict[str, Any]]:
    """Every entry in `folder`, oldest first (rotated files, then the current one)."""
    files = sorted(folder.glob(f"{LOG_NAME}.*"), key=lambda p: -int(p.suffix[1:]))
    files += [folder / LOG_NAME] if (folder / LOG_NAME).is_file() else []
    return [json.loads(line) for f in files for line in f.read_text(encoding="utf-8").splitlines() if line]


def format_entry(e: dict[str, Any]) -> str:
    """One line for a person: time, direction, run, round, type, and what it carried."""
    if "error" in e:
        carried = f"error code {e['error']['code']}"
    else:
        n_arrays = sum(len(r) for r in e["arrays"].values())
        parts = [f"{n_arrays} array(s), {e['array_bytes']:,} bytes" if n_arrays else "no arrays"]
        parts += [f"{name}: {len(keys)} metric(s)" for name, keys in e["metrics"].items()]
        parts += [f"{name}: {', '.join(keys)}" for name, keys in e["configs"].items() if keys]
        carried = "; ".join(parts)
    rnd = "-" if e["round"] is None else e["round"]
    arrow = "<-" if e["direction"] == "received" else "->"
    return f"{e['time']} {arrow} run {e['run']} round {rnd} {e['message_type']}: {carried}"
