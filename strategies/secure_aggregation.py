"""Secure aggregation (`privacy.secure-aggregation = "secagg+"`): each round's training through
Flower's SecAgg+, so the coordinator sees the sum of the sites' weighted updates and never one.

Flower 1.41 offers SecAgg+ only as the legacy `SecAggPlusWorkflow`, which needs a
`LegacyContext` and drives a legacy strategy (`flwr.server.strategy`: `configure_fit`,
`aggregate_fit`). So this mode has one path of its own for training and shares the rest:
`SecureAggregation` is a mixin for the Message-API strategy that Flower's `start` loop
runs (with fedir's checkpoints, per-site capture and evaluation, which stays Message-API
and aggregates-only). Its `configure_train` runs the workflow's four stages (setup, share
keys, collect masked vectors, unmask) on the grid itself, driving the legacy FedAvg,
FedProx or FedAvgM the scenario names, and hands Flower's loop no messages; its
`aggregate_train` returns the workflow's result. The legacy strategy samples the sites
(its `configure_fit`) and takes its step on the unmasked mean (`aggregate_fit`: FedAvg and
FedProx keep it, FedAvgM applies its server learning rate and momentum).

What the sum is: each site sends [w, w x params] masked, with w its `num-examples` (the
labelled training patients, fedir.protocol.encode_training) divided by `max_weight` and
quantised; the workflow divides the unmasked sum by the summed weight, so the aggregate is
FedAvg's weighted mean up to quantisation. The sites' aggregate records (counts, losses,
label counts, never weights) still reach the server one by one, beside the masked vectors,
and are recorded as in any round. Update validation by norm cannot run on a sum: its place
is taken by the checks each site makes before masking (fedir.client.secure_aggregation).
A site that fails or drops out at any stage is recorded missing; the round goes on when
every remaining site still has `reconstruction_threshold` live neighbours, and otherwise
leaves the global model unchanged, with a note.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.strategy import FedAvgM as LegacyFedAvgM
from flwr.server.strategy import FedProx as LegacyFedProx
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedir.config import SECURE_SUM_STRATEGIES, Settings
from fedir.protocol import decode_secure_aggregate, decode_training, encode_secure_config, is_secure_training
from fedir.strategies.per_site import PerSiteCapture, collect_replies
from fedir.strategies.validation import RejectCallback

# One legacy class per name of fedir.config.SECURE_SUM_STRATEGIES, with the `strategy.*`
# settings its constructor takes (tests/test_secure_aggregation.py checks they agree).
LEGACY_STRATEGIES: dict[str, tuple[type[LegacyFedAvg], tuple[str, ...]]] = {
    "fedavg": (LegacyFedAvg, ()),
    "fedprox": (LegacyFedProx, ("proximal_mu",)),
    "fedavgm": (LegacyFedAvgM, ("server_learning_rate", "server_momentum")),
}
TIMEOUT_S = 3600.0  # each stage waits this long for the sites, as Flower's start loop does


class RecordingGrid(Grid):
    """The grid as the workflow sees it: every message passes to `grid`, and the messages
    sent and the replies received are kept, so that the round's replies can be decoded per
    site and an error reply named by the node it was sent to."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.sent: list[list[Message]] = []  # one list per stage
        self.replies: list[Message] = []

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self.grid.send_and_receive(sent, timeout=timeout))
        self.sent.append(sent)
        self.replies.extend(replies)
        return replies


def legacy_strategy(settings: Settings, kwargs: dict[str, float | int]) -> LegacyFedAvg:
    """The legacy Flower strategy of `strategy.name`, with the sampling of
    fedir.strategies.registry.strategy_kwargs (`kwargs`) in the legacy names."""
    cls, params = LEGACY_STRATEGIES[settings.strategy_name]
    return cls(fraction_fit=float(kwargs["fraction_train"]), fraction_evaluate=0.0,
               min_fit_clients=int(kwargs["min_train_nodes"]), min_evaluate_clients=0,
               min_available_clients=int(kwargs["min_available_nodes"]),
               # the sites' aggregates are recorded one by one (PerSiteCapture), not averaged here
               fit_metrics_aggregation_fn=lambda _metrics: {},
               **{p: getattr(settings, f"strategy_{p}") for p in params})


class SecAggPlus(SecAggPlusWorkflow):
    """Flower's workflow, with dropouts before the masking handled.

    Flower 1.41's unmask stage takes every site sampled at setup that is no longer active
    as dropped after masking: it asks the others for that site's key shares and rebuilds the
    pairwise masks it would have added. A site that left at setup or while keys were shared
    never gave out shares and was never masked against (a site masks only against those
    whose shares it received), so the others fail to answer and the round is lost
    (tests/test_secure_aggregation.py). Such a site is therefore dropped from the round, and
    from every site's neighbours, once the keys are shared.
    """

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        ok = super().share_keys_stage(grid, context, state)
        shared = set(state.active_node_ids)
        state.sampled_node_ids = shared
        state.nid_to_neighbours = {nid: nbrs & shared for nid, nbrs in state.nid_to_neighbours.items()}
        return ok


def secagg_workflow(settings: Settings) -> SecAggPlusWorkflow:
    """Flower's workflow with the scenario's ranges; every sampled site holds a share of
    every other's keys (`num_shares` = 1.0, SecAgg's complete graph)."""
    return SecAggPlus(
        num_shares=1.0,
        reconstruction_threshold=float(settings.privacy_secagg_reconstruction_threshold),
        max_weight=settings.privacy_secagg_max_weight,
        clipping_range=settings.privacy_secagg_clipping_range,
        quantization_range=settings.privacy_secagg_quantization_range,
        timeout=TIMEOUT_S,
    )


class SecureAggregation:
    """Strategy mixin: the round's training as SecAgg+ (module docstring).

    Put it before `PerSiteCapture` and a Message-API strategy in the bases; it reports each
    round's training replies to `on_train` like the capture does, and a round that could not
    be unmasked to `on_reject` (site "global"). `momentum_vector` is FedAvgM's server
    momentum, kept here so that the checkpoint carries it.
    """

    on_train: Any  # set by PerSiteCapture
    _site_of_node: dict[int, str]

    def __init__(self, *, legacy: LegacyFedAvg, workflow: SecAggPlusWorkflow, template: ArrayRecord,
                 on_reject: RejectCallback, **strategy_kwargs: Any) -> None:
        super().__init__(**strategy_kwargs)
        self._legacy = legacy
        self._workflow = workflow
        self._template = template
        self.on_reject = on_reject
        self.momentum_vector: list | None = None
        self._aggregate: ArrayRecord | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Run SecAgg+ for this round; the round's messages are the workflow's, so none
        are left for Flower's loop to send."""
        seen = RecordingGrid(grid)
        run_id = grid.run.run_id if grid.run is not None else 0
        manager = SimpleClientManager()
        for node_id in grid.get_node_ids():
            manager.register(GridClientProxy(node_id, seen, run_id))
        round_config = encode_secure_config(config, server_round, list(arrays))
        self._legacy.on_fit_config_fn = lambda _round: round_config
        # FedAvgM's server step starts from the model sent, and continues its momentum
        self._legacy.initial_parameters = compat.arrayrecord_to_parameters(arrays, keep_input=True)
        if isinstance(self._legacy, LegacyFedAvgM):
            self._legacy.momentum_vector = self.momentum_vector
        state = RecordDict({MAIN_PARAMS_RECORD: arrays,
                            MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})})
        sent = state.array_records[MAIN_PARAMS_RECORD]
        context = LegacyContext(Context(run_id=run_id, node_id=0, node_config={}, state=state, run_config={}),
                                strategy=self._legacy, client_manager=manager)
        self._workflow(seen, context)
        if isinstance(self._legacy, LegacyFedAvgM):
            self.momentum_vector = self._legacy.momentum_vector
        result = state.array_records[MAIN_PARAMS_RECORD]
        self._aggregate = None if result is sent else decode_secure_aggregate(result, self._template)
        self._report(server_round, seen)
        return []

    def _report(self, server_round: int, seen: RecordingGrid) -> None:
        """The round's training replies, per site, to `on_train`: the masked updates'
        aggregate records, and the sites that failed at any stage before theirs was in."""
        trained = [m for m in seen.replies if not m.has_error() and is_secure_training(m.content)]
        in_sum = {m.metadata.src_node_id for m in trained}
        sent = [m for stage in seen.sent for m in stage]
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
        failed = [m for m in seen.replies if m.has_error()
                  and dst.get(m.metadata.reply_to_message_id, m.metadata.src_node_id) not in in_sum]
        self.on_train(collect_replies(server_round, trained + failed, decode_training, self._site_of_node, sent))
        sampled = len(seen.sent[0]) if seen.sent else 0
        if self._aggregate is None and sampled:
            self.on_reject(server_round, "global",
                           f"secure aggregation did not complete: {len(trained)} of {sampled} sampled site(s) "
                           "sent a masked update, too few to unmask the sum (privacy.secagg-reconstruction-"
                           "threshold); the global model is kept unchanged this round")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The unmasked aggregate of the round `configure_train` ran (None: kept as it was)."""
        return self._aggregate, None


def build_secure_strategy(settings: Settings, kwargs: dict[str, float | int], *, on_train: Any, on_evaluate: Any,
                          on_reject: RejectCallback, template: ArrayRecord, outer: tuple[type, ...] = (),
                          **extra: Any) -> Strategy:
    """The strategy of a secure-aggregation study: `outer` mixins (checkpoints), SecAgg+
    training, per-site capture, and Flower's Message-API FedAvg for the evaluation rounds
    (the same for every name of SECURE_SUM_STRATEGIES); `kwargs` are the sampling of
    fedir.strategies.registry.strategy_kwargs."""
    assert settings.strategy_name in SECURE_SUM_STRATEGIES, "refused when the settings are read"
    cls = type(f"Secure{settings.strategy_name.capitalize()}", (*outer, SecureAggregation, PerSiteCapture, FedAvg), {})
    sampling = {k: v for k, v in kwargs.items() if k.startswith(("fraction", "min"))}
    return cls(legacy=legacy_strategy(settings, kwargs), workflow=secagg_workflow(settings), template=template,
               on_reject=on_reject, on_train=on_train, on_evaluate=on_evaluate, **sampling, **extra)
