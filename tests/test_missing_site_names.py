"""A site that fails after answering is noted missing under its own name, not its node id.

An error reply carries no site name, and when the SuperLink builds it (a node that went
away) not even the node's id: it comes from the SuperLink's own node id and names the
message it answers. So the server finds the node from the message it sent and names it
from its earlier replies. A node that never answered stays "node ID"."""

from __future__ import annotations

import pytest
from flwr.app import Context, Error, Message

from fedir.client.client_app import build_client_app
from fedir.config import Settings
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid
from fedir.simulations.synthetic import generate_federation

SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the sender of Flower's own error replies

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _drop(partition: int, from_round: int):
    """A client mod: node `partition` answers with an error from `from_round` on."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        config = msg.content.config_records.get("config")
        server_round = int(config.get("server-round", 0)) if config is not None else 0
        if context.node_config["partition-id"] == partition and server_round >= from_round:
            reply = Message(error=Error(code=0, reason="Node Unavailable (test)"), reply_to=msg)
            # as the SuperLink makes it for a node that went away: from its own node id
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            return reply
        return call_next(msg, context)

    return mod


@pytest.mark.parametrize("from_round, named", [(2, "site-1"), (1, "node 101")])
def test_a_failed_node_is_noted_under_the_site_it_answered_as(tmp_path, from_round, named):
    fed = tmp_path / "fed"
    generate_federation(fed, sites=3, patients=12, seed=2, image_size=32, unlabelled_fraction=0.0,
                        progress=False)
    settings = Settings(federation_sites=";".join(str(fed / f"site-{i}") for i in range(3)),
                        model_name="resnet_small", model_image_size=32, train_rounds=2,
                        train_local_steps=1, train_batch_size=8, eval_bootstrap=10)
    grid = InProcessGrid(build_client_app(settings, mods=[_drop(1, from_round)]), 3,
                         settings.to_run_config())
    summary = run_study(grid, settings, tmp_path / "run", scenario="test")
    missing = [n for n in summary["notes"] if n["kind"] == "missing"]
    assert {(n["round"], n["site"]) for n in missing} == {
        (r, named) for r in range(from_round, 3)}
    assert len(missing) == 2 * (3 - from_round)  # train and evaluate
    assert all("Node Unavailable (test)" in n["message"] for n in missing)
    if named.startswith("site"):
        assert all("(node 101)" in n["message"] for n in missing)  # the node id is kept


def test_fedir_nodes_maps_each_flower_node_id_to_its_site(tmp_path, capsys):
    """`flwr supernode ls` lists node ids only; the run store says which node was which site."""
    from fedir.cli import main

    fed = tmp_path / "fed"
    generate_federation(fed, sites=2, patients=10, seed=3, image_size=32, unlabelled_fraction=0.0, progress=False)
    settings = Settings(federation_sites=";".join(str(fed / f"site-{i}") for i in range(2)),
                        model_name="resnet_small", model_image_size=32, train_rounds=2,
                        train_local_steps=1, train_batch_size=8, eval_bootstrap=10)
    grid = InProcessGrid(build_client_app(settings), 2, settings.to_run_config())
    summary = run_study(grid, settings, tmp_path / "run", scenario="test")
    # the in-process grid's nodes are 100 + partition id, as Flower numbers them in its simulation
    assert summary["nodes"] == [{"site": "site-0", "node_id": 100, "first_round": 1, "last_round": 2},
                                {"site": "site-1", "node_id": 101, "first_round": 1, "last_round": 2}]
    assert main(["nodes", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "site-0" in out and " 100  1-2" in out and " 101  1-2" in out
    assert main(["nodes", str(tmp_path / "nowhere")]) == 2
    # Flower's node ids are unsigned 64-bit (its simulation draws them so): stored whole
    from fedir.server.runstore import RunStore

    with RunStore(tmp_path / "run" / "runs.sqlite") as store:
        store.record_nodes(summary["run_id"], 3, {"site-0": 2**64 - 5})
        assert {row["node_id"] for row in store.nodes(summary["run_id"])} == {100, 101, 2**64 - 5}
