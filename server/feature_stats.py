"""Before round 1: ask every site for its feature sums and turn them into standardisation.

The server sends one `query` message to each node; a tabular site replies with n, the
sum and the sum of squares of its training features, an imaging site with n = 0
(fedir.client.tabular). The federation's mean and standard deviation follow from the totals,
exactly as if the rows had been pooled, without any row leaving its site. The same query
tells the server how many features the tabular model takes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedir.errors import StudyFailed
from fedir.protocol import (
    FeatureSums,
    combine,
    decode_feature_sums,
    encode_feature_query,
    encode_round_config,
    error_text,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederationFeatures:
    """The features every tabular site shares, and the federation's sums (None: imaging)."""

    names: list[str]
    sums: FeatureSums | None

    def config(self, server_round: int | None = None) -> ConfigRecord:
        """What each train/evaluate message carries (fedir.protocol.encode_round_config):
        the federation's mean and std; `server_round` for a message sent outside the
        strategy, which adds the round itself to the others."""
        return encode_round_config(None if self.sums is None else self.sums.mean_std(), server_round)


def gather_feature_sums(grid: Grid, min_nodes: int, timeout: float = 600) -> FederationFeatures:
    """Query every node (waiting for `min_nodes`) and combine the replies."""
    sample_nodes(grid, min_nodes, min_nodes)  # waits until min_nodes have connected
    node_ids = list(grid.get_node_ids())  # then ask every connected node
    messages = [
        Message(encode_feature_query(), node_id, MessageType.QUERY) for node_id in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    answered = [m for m in replies if not m.has_error()]
    failed = {f"node {m.metadata.src_node_id}": error_text(m.error.reason) for m in replies if m.has_error()}
    for node, reason in failed.items():
        # A site that cannot answer (an invalid manifest, say) will fail its training
        # too, and be recorded missing there; it must not stop the other sites' run.
        log.warning("feature-statistics query: %s failed: %s", node, reason)
    if not answered:
        # every site failed (or none replied): the study cannot start, say why at once
        raise StudyFailed.no_site("answer the feature-statistics query before round 1", failed)
    decoded = [decode_feature_sums(m.content) for m in answered]
    tabular = [(names, sums) for names, sums in decoded if sums is not None]
    if not tabular:
        return FederationFeatures([], None)
    names = tabular[0][0]
    if len(tabular) != len(decoded):
        raise StudyFailed(f"{len(tabular)} of {len(decoded)} sites hold tabular rows and the others "
                          "images: a study needs one kind (see each site's manifest.csv)")
    if any(n != names for n, _ in tabular):
        raise StudyFailed("the tabular sites do not share the same clin_* columns: a model needs "
                          "the same features at every site (see each site's manifest.csv)")
    return FederationFeatures(names, combine([s for _, s in tabular]))
