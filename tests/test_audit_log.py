"""The site's audit log (fedir.client.audit_log): names and shapes of every message, never values."""

from __future__ import annotations

import json
import re

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, MetricRecord, RecordDict

from fedir.client import audit_log

SECRET_METRIC = 0.123456789
SECRET_CONFIG = "patient-Jane-Doe"


def _context(node_config: dict | None = None) -> Context:
    return Context(run_id=7, node_id=3, node_config=node_config or {}, state=RecordDict(), run_config={})


def _train_message() -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.zeros((4, 3), dtype=np.float32))}),
        "config": ConfigRecord({"server-round": 2, "lr": 0.1}),
    })
    metadata = Metadata(run_id=7, message_id="m1", src_node_id=1, dst_node_id=3, reply_to_message_id="",
                        group_id="2", created_at=0.0, ttl=3600.0, message_type="train")
    return Message(content=content, metadata=metadata)


def _handler(msg: Message, context: Context) -> Message:
    reply = RecordDict({
        "arrays": ArrayRecord({"w": Array(np.ones((4, 3), dtype=np.float16))}),
        "metrics": MetricRecord({"auc": SECRET_METRIC, "hist": [1, 2, 3]}),
        "site": ConfigRecord({"name": SECRET_CONFIG}),
    })
    return Message(content=reply, reply_to=msg)


def test_each_message_is_logged_in_both_directions_as_names_and_shapes(tmp_path):
    mod = audit_log.audit_mod(lambda context: tmp_path)
    mod(_train_message(), _context(), _handler)
    folder = tmp_path / audit_log.AUDIT_DIR
    received, sent = audit_log.read_log(folder)
    assert received["direction"] == "received" and sent["direction"] == "sent"
    assert received["message_type"] == sent["message_type"] == "train"
    assert received["round"] == 2
    assert received["arrays"] == {"arrays": {"w": ["float32", [4, 3]]}}
    assert received["array_bytes"] >= 4 * 3 * 4
    assert received["configs"] == {"config": ["lr", "server-round"]}
    assert sent["arrays"] == {"arrays": {"w": ["float16", [4, 3]]}}
    assert sent["metrics"] == {"metrics": {"auc": "float", "hist": "list[3]"}}
    assert sent["configs"] == {"site": ["name"]}
    text = (folder / audit_log.LOG_NAME).read_text()
    assert str(SECRET_METRIC) not in text and SECRET_CONFIG not in text
    line = audit_log.format_entry(sent)
    assert "-> run 7 round - train" in line and "1 array(s)" in line


def test_an_error_reply_is_logged_with_its_code(tmp_path):
    def failing(msg: Message, context: Context) -> Message:
        from flwr.app import Error

        return Message(Error(code=3, reason="site unusable"), reply_to=msg)

    audit_log.audit_mod(lambda context: tmp_path)(_train_message(), _context(), failing)
    _, sent = audit_log.read_log(tmp_path / audit_log.AUDIT_DIR)
    assert sent["error"] == {"code": 3}
    assert "error code 3" in audit_log.format_entry(sent)


def test_node_config_audit_dir_moves_the_log_out_of_a_read_only_site(tmp_path):
    elsewhere = tmp_path / "audit"
    audit_log.audit_mod(lambda context: tmp_path / "site")(
        _train_message(), _context({"audit-dir": str(elsewhere)}), _handler)
    assert len(audit_log.read_log(elsewhere)) == 2
    assert not (tmp_path / "site").exists()


def test_the_log_rotates_and_reads_back_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_log, "MAX_BYTES", 600)
    mod = audit_log.audit_mod(lambda context: tmp_path)
    for _ in range(6):
        mod(_train_message(), _context(), _handler)
    folder = tmp_path / audit_log.AUDIT_DIR
    assert (folder / f"{audit_log.LOG_NAME}.1").is_file()  # rotated
    entries = audit_log.read_log(folder)
    assert [e["direction"] for e in entries] == ["received", "sent"] * (len(entries) // 2)
    times = [e["time"] for e in entries]
    assert times == sorted(times)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", t) for t in times)  # UTC, to the ms
    assert all(json.dumps(e) for e in entries)


def test_fedir_site_log_prints_the_log_and_refuses_a_site_without_one(tmp_path, capsys):
    from fedir.cli import main

    audit_log.audit_mod(lambda context: tmp_path)(_train_message(), _context(), _handler)
    assert main(["site", "log", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "<- run 7 round 2 train" in lines[0] and "-> run 7" in lines[1]
    assert main(["site", "log", str(tmp_path), "--json"]) == 0
    assert [json.loads(line)["direction"] for line in capsys.readouterr().out.splitlines()] == ["received", "sent"]
    assert main(["site", "log", str(tmp_path / "elsewhere")]) == 2
    assert "no audit log" in capsys.readouterr().err
