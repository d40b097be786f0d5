"""After the last round: the cross-site matrix, by sending every site's model to every site.

Each node gets one `evaluate.cross_site` message carrying all the sites' last models
(fedir.protocol), scores each on its own test patients and returns one row of the task
kind's CROSS_SITE_METRIC (fedir.tasks: AUC, per-patient Dice) with the CIs the site
computed. Models are weights, which the sites already send to the server every round; no
patient data moves. The analysis of the matrix is fedir.strategies.cross_site_gap.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedir.protocol import CROSS_SITE_ACTION, decode_cross_site, encode_cross_site_models

log = logging.getLogger(__name__)


def cross_site_matrix(
    grid: Grid, models: Mapping[str, ArrayRecord], config, *, metric: str, timeout: float = 600
) -> dict[str, dict[str, dict]]:
    """`{model_site: {data_site: {metric, f"{metric}_ci", "n"}}}` over the nodes that answered."""
    messages = []
    for node_id in grid.get_node_ids():
        messages.append(Message(encode_cross_site_models(models, config), node_id, CROSS_SITE_ACTION))
    matrix: dict[str, dict[str, dict]] = {name: {} for name in models}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("cross-site evaluation: node %d failed: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        data_site, row = decode_cross_site(reply.content, metric=metric)
        for model_site, entry in row.items():
            matrix.setdefault(model_site, {})[data_site] = entry
    return matrix
