"""Per-site capture for any Flower strategy: every site's reply reaches the server before aggregation.

Flower's strategies keep the weighted average of the sites' MetricRecords and drop the
rest; fedir needs each site's own aggregates (per-site metrics, histograms, label counts)
for the per-site table and the bias analysis. So `aggregate_train` and
`aggregate_evaluate` decode each reply (fedir.protocol) and pass them, keyed by site name,
to callbacks the ServerApp provides, then let the strategy (FedAvg, FedAdam, Krum...) do
exactly what it always does. The capture is a mixin placed before Flower's class in the
MRO (`with_per_site_capture(FedAdam)`), so there is one implementation for all of them.
Replies that carry an error (a site whose ClientApp failed, a SuperNode that dropped) are
passed on as missing, with Flower's error reason, under the site's name when the node
answered earlier in the run (an error reply carries no site name; the node id is kept in
the reason), else as "node ID". The reason is the site's own message (fedir.protocol.error_text).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedir.protocol import decode_evaluation, decode_training, error_text, widened
from fedir.strategies.validation import ValidatedUpdates


@dataclass
class RoundReplies:
    """One round's replies: decoded aggregates per site, and the sites that failed."""

    server_round: int
    per_site: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # site (or "node ID" if never seen) -> reason
    arrays: dict[str, ArrayRecord] = field(default_factory=dict)  # site -> its update (training)
    model: ArrayRecord | None = None  # evaluation: the global arrays the sites were sent to score
    nodes: dict[str, int] = field(default_factory=dict)  # site -> the Flower node id that answered as it


Callback = Callable[[RoundReplies], None]


def collect_replies(
    server_round: int, replies: list[Message], decode: Callable[..., tuple[str, dict]],
    known: dict[int, str], sent: list[Message], arrays_key: str = "",
) -> RoundReplies:
    """Decode the replies; a failed node is named by the site it answered as before
    (`known`, node id -> site, updated here), else by its Flower node id. An error reply
    the SuperLink makes for a node that went away comes from the SuperLink's own node id,
    so a failed node is found from the message it was `sent` that the error replies to."""
    out = RoundReplies(server_round)
    dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    for msg in replies:
        if msg.has_error():
            node = dst.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            name = known.get(node, f"node {node}")
            reason = error_text(msg.error.reason)
            out.failed[name] = f"(node {node}) {reason}" if node in known else reason
            continue
        site, values = decode(msg.content)
        known[msg.metadata.src_node_id] = site
        out.nodes[site] = msg.metadata.src_node_id
        out.per_site[site] = values
        if arrays_key and arrays_key in msg.content.array_records:
            out.arrays[site] = msg.content.array_records[arrays_key]
    return out


class PerSiteCapture:
    """Mixin: report each site's decoded replies to `on_train` / `on_evaluate`, then defer
    to the next class in the MRO (a Flower strategy) for the aggregation itself."""

    def __init__(self, *, on_train: Callback, on_evaluate: Callback, **strategy_kwargs: Any) -> None:
        super().__init__(**strategy_kwargs)
        self.on_train = on_train
        self.on_evaluate = on_evaluate
        # A site's name is in every reply it sends (ConfigRecord "site"); an error reply
        # carries none, so a node that fails is named from its earlier replies.
        self._site_of_node: dict[int, str] = {}
        # The messages of the current stage: the grid gives them their ids when it sends them.
        self._sent_messages: list[Message] = []
        # The global arrays sent for the current evaluation: the model its replies score,
        # which the server keeps when the round is the one it selects.
        self._evaluated: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent_messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        return self._sent_messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._evaluated = arrays
        self._sent_messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        return self._sent_messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        key = self.arrayrecord_key  # type: ignore[attr-defined]
        for msg in replies:  # float16 uploads are averaged in float32 (fedir.protocol)
            if not msg.has_error() and key in msg.content.array_records:
                msg.content[key] = widened(msg.content.array_records[key])
        self.on_train(collect_replies(server_round, replies, decode_training, self._site_of_node,
                               self._sent_messages, key))
        return super().aggregate_train(server_round, replies)  # type: ignore[misc]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        collected = collect_replies(server_round, replies, decode_evaluation, self._site_of_node, self._sent_messages)
        collected.model = self._evaluated
        self.on_evaluate(collected)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]


def with_per_site_capture(strategy_class: type[Strategy], *outer: type) -> type[Strategy]:
    """`FedAdam` -> `PerSiteFedAdam`: Flower's class with the capture and the update
    validation (fedir.strategies.validation) mixed in, in that order: every reply is
    reported and float16 uploads are widened first, then only the updates that pass
    validation reach Flower's aggregation. `outer` mixins go first (the server's
    round numbering and checkpoints, fedir.server.checkpoint.ResumedRounds)."""
    bases = (*outer, PerSiteCapture, ValidatedUpdates, strategy_class)
    return type(f"PerSite{strategy_class.__name__}", bases, {})

