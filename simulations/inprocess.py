"""Run fedir's ServerApp logic and ClientApp in one process, without Ray: for benchmarks.

Flower's simulation engine starts Ray (about 12 s) and polls every 0.1 s; a benchmark of
70 short tabular runs would spend most of its time there. `InProcessGrid` is a Flower
`Grid` that hands each message straight to the ClientApp (`client_app(message,
context)`), with one persistent `Context` per node (its `state` survives rounds, as in
Flower's engine), so the strategy, the per-site capture, the records and the client code
are exactly those of a real run; only transport and scheduling differ. Each message's
content crosses as Flower serialises it (its objects deflated and inflated again), so a
site never shares an object with the server or another site, and the bytes are counted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fedir.client.client_app import build_client_app
from fedir.config import Settings
from fedir.protocol import ARRAYS_KEY, payload_bytes
from fedir.server.server_app import run_study
from fedir.simulations.companion import run_companion

SERVER_NODE_ID = 1


class InProcessGrid(Grid):
    """A Grid of `n_nodes` nodes served by one ClientApp in this process."""

    def __init__(self, client_app: ClientApp, n_nodes: int, run_config: dict) -> None:
        self.client_app = client_app
        # Flower stamps every new Message with the process's task identity, which its
        # runtime sets when it starts a ServerApp; here this process is that runtime.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, SERVER_NODE_ID, 0
        self.contexts = {
            100 + i: Context(run_id=0, node_id=100 + i, node_config={"partition-id": i,
                             "num-partitions": n_nodes}, state=RecordDict(), run_config=run_config)
            for i in range(n_nodes)
        }
        self.replies: dict[str, Message] = {}
        self.upload_bytes = 0  # serialised weights the sites sent back (fedir.protocol)
        self.sent_bytes = 0  # every message's serialised content, server to sites
        self.received_bytes = 0  # and sites to server
        self._run = None

    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run, unused here
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_src_node_id"] = SERVER_NODE_ID
            msg.metadata.__dict__["_created_at"] = time.time()
            msg.content, size = _transported(msg.content)
            self.sent_bytes += size
            reply = self._handle(msg)
            if not reply.has_error():
                reply.content, size = _transported(reply.content)
                self.received_bytes += size
            if not reply.has_error() and ARRAYS_KEY in reply.content.array_records:
                self.upload_bytes += payload_bytes(reply.content.array_records[ARRAYS_KEY])
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def _handle(self, msg: Message) -> Message:
        """The ClientApp's reply; a ClientApp that raises gets the error reply Flower's
        runtime makes (its reason formatted as Flower formats it), so the server sees a
        failing site exactly as in a real run."""
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # noqa: BLE001 - every exception becomes an error reply, as in Flower
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def _transported(content: RecordDict) -> tuple[RecordDict, int]:
    """`content` as the receiving side gets it (a copy built from its serialised objects,
    as Flower's push and pull move them) and the size of those objects in bytes."""
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    copy = inflate_object_from_contents(content.object_id, dict(objects))
    assert isinstance(copy, RecordDict)
    return copy, sum(len(b) for b in objects.values())


def run_inprocess(settings: Settings, out_dir: Path) -> dict:
    """A whole study (all rounds, run store, summary.json) without Ray; returns the summary
    with `upload_bytes` (the weights the sites sent, as serialised) and `wire_bytes` (every
    message's serialised content, both ways) added. A clinical
    companion study (`baseline.clinical`) runs first, in-process too. A segmentation study on a
    synthetic federation gets its example overlays afterwards (fedir.simulations.overlays)."""
    run_companion(settings, Path(out_dir), run_inprocess)
    grid = InProcessGrid(build_client_app(settings), len(settings.sites), settings.to_run_config())
    summary = run_study(grid, settings, Path(out_dir), scenario="in-process")
    # imported here: the overlays set up the evaluation as fedir.simulations.compare does,
    # and compare runs its arms on this module's grid
    from fedir.simulations.overlays import add_overlays

    add_overlays(settings, Path(out_dir), summary, grid.contexts)
    return {**summary, "upload_bytes": grid.upload_bytes, "wire_bytes": grid.sent_bytes + grid.received_bytes}
