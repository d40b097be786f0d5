"""The site's allow-list (fedir.client.approval) and the SuperNode gate (fedir.client.app_gate),
fast: a tiny Flower app in a temporary folder, Flower's own `flwr build`, and Flower's real
SuperNode pull-and-store step with an in-memory NodeState (no network, no processes)."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import flwr.supernode.start_client_internal as supernode_loop
import pytest
from flwr.app import ConfigRecord, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode.nodestate import NodeStateFactory

from fedir.cli import main
from fedir.client.app_gate import gated, install_gate
from fedir.client.approval import ApprovalError, approve, fab_bytes, fab_digest, find_approval, read_allow_list

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "0.1.0"

[tool.flwr.app]
publisher = "fedir"

[tool.flwr.app.components]
serverapp = "tinyapp.server:app"
clientapp = "tinyapp.client:app"
"""
NODE_ID, RUN_ID = 7, 5


def write_app(folder: Path, client_line: str = "app = None") -> Path:
    (folder / "tinyapp").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "tinyapp" / "__init__.py").write_text("")
    (folder / "tinyapp" / "server.py").write_text("app = None\n")
    (folder / "tinyapp" / "client.py").write_text(f"{client_line}\n")
    return folder


@pytest.fixture
def app(tmp_path) -> Path:
    return write_app(tmp_path / "app")


def test_the_digest_is_the_hash_flowers_own_build_gives_the_bundle(app, tmp_path):
    built = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(app)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stdout + built.stderr
    (fab_file,) = tmp_path.glob("*.fab")
    assert fab_digest(fab_bytes(app)) == hashlib.sha256(fab_file.read_bytes()).hexdigest()


def test_one_changed_line_changes_the_digest_and_touching_files_does_not(app, tmp_path):
    digest = fab_digest(fab_bytes(app))
    (app / "tinyapp" / "client.py").touch()
    assert fab_digest(fab_bytes(app)) == digest
    changed = write_app(tmp_path / "changed", client_line="app = 'changed'")
    assert fab_digest(fab_bytes(changed)) != digest


def test_approve_records_the_digest_once_with_time_and_note(app, tmp_path):
    allow = tmp_path / "site" / "approved.json"
    assert read_allow_list(allow) == []
    approval, added = approve(app, allow, note="reviewed by IT")
    assert added and approval.sha256 == fab_digest(fab_bytes(app))
    assert approval.app == "fedir/tinyapp 0.1.0" and approval.note == "reviewed by IT"
    assert approval.source == str(app.resolve()) and approval.approved_at.endswith("+00:00")
    again, added = approve(app, allow, note="twice")
    assert not added and again == approval
    assert json.loads(allow.read_text())["approved"] == [approval.__dict__]
    assert find_approval(approval.sha256, allow) == approval
    assert find_approval("0" * 64, allow) is None


def test_a_folder_without_an_app_or_a_broken_list_is_one_clear_error(tmp_path, capsys, app):
    assert main(["site", "approve", str(tmp_path), "--allow-list", str(tmp_path / "a.json")]) == 2
    assert capsys.readouterr().err == f"fedir: error: {tmp_path} is not a Flower app: it has no pyproject.toml\n"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ApprovalError, match="is not a fedir allow-list"):
        read_allow_list(broken)
    assert main(["site", "approve", str(app), "--allow-list", str(broken)]) == 2


def test_the_cli_approves_and_lists(app, tmp_path, capsys):
    allow = tmp_path / "approved.json"
    assert main(["site", "approve", str(app), "--allow-list", str(allow), "--note", "v1"]) == 0
    digest = fab_digest(fab_bytes(app))
    assert capsys.readouterr().out.startswith(f"approved fedir/tinyapp 0.1.0 sha256 {digest} in ")
    assert main(["site", "approved", "--allow-list", str(allow)]) == 0
    assert capsys.readouterr().out.startswith(f"{digest}  fedir/tinyapp 0.1.0  ")


def _pull(allow: Path, content: bytes):
    """Flower's real pull-and-store step, gated, for one train message of a run whose FAB is
    `content`; the SuperLink's side (receive, get-run, get-fab, pull-object) is in memory."""
    metadata = Metadata(run_id=RUN_ID, message_id="", src_node_id=1, dst_node_id=NODE_ID,
                        reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                        message_type="train")
    message = make_message(metadata, RecordDict({"config": ConfigRecord({"server-round": 1})}))
    message.metadata.__dict__["_message_id"] = message.object_id
    tree = get_object_tree(message)
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    run = Run.create_empty(RUN_ID)
    run.fab_id, run.fab_version, run.fab_hash = "fedir/tinyapp", "0.1.0", fab_digest(content)
    stores = ObjectStoreFactory()
    state, store = NodeStateFactory(stores).state(), stores.store()
    state.set_node_id(NODE_ID)
    step = gated(supernode_loop._pull_and_store_message, allow)
    returned = step(state=state, object_store=store, node_config={}, receive=lambda: (message, tree),
                    get_run=lambda run_id: run, get_fab=lambda fab_hash, run_id: Fab(fab_hash, content, {}),
                    pull_object=lambda run_id, object_id: objects[object_id],
                    confirm_message_received=lambda run_id, message_id: None, trusted_entities=None)
    assert returned == RUN_ID
    return state, run


def test_the_gate_answers_an_unapproved_bundle_with_an_error_and_stores_nothing(app, tmp_path, caplog):
    # the gate logs through Flower's logger, which a simulation run earlier in this process
    # may have turned down (fedir.simulations.simulate): this test sees its ERROR whatever ran before
    caplog.set_level(logging.ERROR, logger="flwr")
    approve(app, tmp_path / "approved.json")
    changed = fab_bytes(write_app(tmp_path / "changed", client_line="app = 'changed'"))
    state, run = _pull(tmp_path / "approved.json", changed)
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and reply.error.code == ErrorCode.INVALID_FAB
    assert reply.error.reason == f"app sha256 {fab_digest(changed)} is not approved at this site"
    assert state.get_run(RUN_ID) is None and state.get_fab(run.fab_hash) is None
    assert f"run {RUN_ID} refused: app fedir/tinyapp 0.1.0 sha256 {fab_digest(changed)} is not in the allow-list" \
        in caplog.text


def test_the_gate_lets_the_approved_bundle_through_and_refuses_with_a_broken_list(app, tmp_path):
    approve(app, tmp_path / "approved.json")
    state, run = _pull(tmp_path / "approved.json", fab_bytes(app))
    assert state.get_messages_legacy(is_reply=True) == []
    assert state.get_run(RUN_ID) is not None and state.get_fab(run.fab_hash) is not None
    broken = tmp_path / "broken.json"
    broken.write_text("[]")
    state, _ = _pull(broken, fab_bytes(app))
    (reply,) = state.get_messages_legacy(is_reply=True)
    assert reply.error.reason.endswith("refused: this site's allow-list cannot be read")


def test_the_gate_will_not_start_under_a_flower_it_was_not_written_for(tmp_path, monkeypatch):
    monkeypatch.setattr(supernode_loop, "_pull_and_store_message", supernode_loop._pull_and_store_message)
    monkeypatch.setattr("fedir.client.app_gate.package_version", "1.42.0")
    with pytest.raises(ApprovalError, match="written for Flower 1.41.0, this environment has Flower 1.42.0"):
        install_gate(tmp_path / "approved.json")
    monkeypatch.undo()
    monkeypatch.setattr(supernode_loop, "_pull_and_store_message", lambda state, object_store: None)
    with pytest.raises(ApprovalError, match="SuperNode loop is not the one"):
        install_gate(tmp_path / "approved.json")
    monkeypatch.undo()
    original = supernode_loop._pull_and_store_message
    monkeypatch.setattr(supernode_loop, "_pull_and_store_message", original)
    install_gate(tmp_path / "approved.json")
    assert supernode_loop._pull_and_store_message.__name__ == "pull_and_store_approved"
