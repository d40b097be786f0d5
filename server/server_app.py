"""The ServerApp the coordinator runs: read the settings, start the strategy, keep the record.

Each round, the scenario's Flower strategy (with per-site capture) hands the sites' decoded replies to a StudyRecorder, which
pools the evaluation aggregates, runs the first bias checks, writes everything to the
run store (runs.sqlite) and keeps the global model of the round `eval.select` chooses on
the validation patients (fedir.strategies.selection; early stopping by `train.patience`).
When the rounds are done, the selected round's verdict is made final, summary.json and
report.html are built from the store alone, and the selected round's weights are saved.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedir.config import FUSED_INPUTS, MEAN_AGGREGATORS, Settings, SettingsError
from fedir.errors import StudyFailed, UserError
from fedir.models import as_tensors, build_model, kept_keys, projection_dim, resolve_model, state_arrays, state_shapes
from fedir.protocol import VAL_KEY, EmbeddingMoments, decode_weights, encode_weights
from fedir.server.checkpoint import (
    CHECKPOINT_NAME,
    Checkpoint,
    ResumedRounds,
    ResumeError,
    RoundPlan,
    restore_strategy_state,
    resume_point,
    strategy_state,
)
from fedir.server.cross_site_round import cross_site_matrix
from fedir.server.export import RoundExport, evaluation_scalars, open_exports, training_scalars
from fedir.server.feature_stats import gather_feature_sums
from fedir.server.model_init import initialise
from fedir.server.report import write_report
from fedir.server.report.baseline import with_baselines
from fedir.server.run_lock import serverapp_lock
from fedir.server.runstore import RunStore
from fedir.server.summary import build_summary, write_summary
from fedir.strategies.differential_privacy import inner_strategy, sampled_sites
from fedir.strategies.frankenstein import Thresholds, analyse
from fedir.strategies.per_site import RoundReplies
from fedir.strategies.privacy_budget import PrivacyBudget
from fedir.strategies.registry import build_strategy, strategy_kwargs
from fedir.strategies.selection import Selection
from fedir.strategies.stopping import StudyStopped
from fedir.strategies.thresholds import at, thresholded
from fedir.tasks import task_of

log = logging.getLogger(__name__)


def new_run_id(settings: Settings) -> str:
    """Time-ordered and unique enough for one run folder: UTC time plus a config digest."""
    digest = hashlib.sha256(json.dumps(settings.to_run_config(), sort_keys=True).encode()).hexdigest()
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + digest[:8]


class StudyRecorder:
    """Receives each round's per-site replies, records them with the bias checks, and keeps
    what the final result needs of the selected round (fedir.strategies.selection): its
    global arrays, its per-site test metrics and embedding moments (for the final verdict)
    and the site updates that made it (for the cross-site matrix)."""

    def __init__(self, store: RunStore, run_id: str, settings: Settings, rounds: int,
                 exports: list[RoundExport] | None = None, budget: PrivacyBudget | None = None) -> None:
        self.store = store
        self.budget = budget  # under privacy.dp: the epsilon spent, the limit
        self.run_id = run_id
        self.settings = settings
        self.exports = exports or []
        # what the site-label test reads: class counts, or foreground tables (segmentation)
        self.label_counts: dict[str, dict] = {}
        self.site_models: dict[str, ArrayRecord] = {}  # each site's latest accepted update
        self.selection = Selection(settings.eval_select, settings.train_patience,
                                   metric=task_of(settings.task_kind).SELECTION_METRIC)
        self.selected: tuple[int, dict, dict] | None = None  # the selected round, its per-site metrics, moments
        self.selected_model: ArrayRecord | None = None  # the global arrays that round evaluated
        self.selected_site_models: dict[str, ArrayRecord] = {}  # the site updates averaged into them
        self.failed: dict[str, str] = {}  # each site's latest failure reason
        self.progress = tqdm(total=rounds, desc="rounds", unit="round", dynamic_ncols=True)

    def on_train(self, replies: RoundReplies) -> None:
        # Before anything of the round is recorded: a round over the budget is not released
        # (BudgetExhausted leaves Flower's loop before the noised average is made).
        spent = self._spend(replies)
        with self.store.batch():  # the stage's every row in one transaction
            self._record_train(replies)
            if spent is not None and self.budget is not None:
                self.store.record_privacy(self.run_id, replies.server_round, spent, self.budget.delta,
                                          self.budget.spent[-1])

    def _spend(self, replies: RoundReplies) -> float | None:
        """Account the round's release under privacy.dp (fedir.strategies.privacy_budget);
        None when there is none: no DP, or a round Flower's DP wrapper does not aggregate
        (a site's reply is an error, or no site answered)."""
        if self.budget is None or replies.failed or not replies.per_site:
            return None
        weights = [float(v["n_labelled"]) for v in replies.per_site.values()]
        return self.budget.release(replies.server_round, weights)

    def _record_train(self, replies: RoundReplies) -> None:
        for site, values in replies.per_site.items():
            card = values.pop("card", None)  # a node's first reply only; stored apart
            if card is not None:
                self.store.record_card(self.run_id, site, card)
        self.store.record_training(self.run_id, replies.server_round, replies.per_site)
        self.store.record_nodes(self.run_id, replies.server_round, replies.nodes)
        if self.settings.bias_cross_site and len(replies.arrays) <= self.settings.bias_cross_site_max_sites:
            self.site_models = dict(replies.arrays)
        for site, values in replies.per_site.items():
            # what the site-label test reads: class counts, or a segmentation site's foreground table
            self.label_counts[site] = values.get("foreground", values["label_counts"])
            for reason, count in values["skipped"].items():
                self.store.record_note(
                    self.run_id, replies.server_round, site, "skipped", f"{count} file(s): {reason}"
                )
        self._record_failures(replies, "train")
        if not replies.per_site and replies.failed and not self.label_counts:
            # every site failed and none has ever trained: more rounds would fail alike
            raise StudyFailed.no_site(f"train in round {replies.server_round}", replies.failed)
        for export in self.exports:
            export.write(replies.server_round, training_scalars(replies.per_site))

    def on_evaluate(self, replies: RoundReplies) -> None:
        """Record the round; EarlyStopped (after the round is committed) when `train.patience`
        evaluated rounds have passed without a better validation AUC, unless this was the
        planned last round anyway."""
        with self.store.batch():  # the stage's every row, the verdict's too, in one transaction
            self._record_evaluation(replies)
        stop = self.selection.stop()
        if stop is not None and replies.server_round < self.settings.train_rounds:
            raise stop

    def _record_evaluation(self, replies: RoundReplies) -> None:
        self._record_failures(replies, "evaluate")
        moments = {site: v.pop("embedding") for site, v in replies.per_site.items() if "embedding" in v}
        val = {site: v.pop(VAL_KEY) for site, v in replies.per_site.items() if VAL_KEY in v}
        if self.settings.task_kind == "classification" and self.settings.task_classes == 2:
            # the decision threshold from the validation patients; the test metrics at it
            # (each site's at its own under eval.threshold-per-site, the pool's at the federation's)
            chosen = thresholded(replies.per_site, val, rule=self.settings.eval_threshold_rule,
                                 fixed=self.settings.eval_threshold, per_site=self.settings.eval_threshold_per_site)
            replies.per_site.update(chosen.per_site)
            pooled = self._pooled(chosen.for_pool)
            if pooled is not None:
                pooled = at(pooled, chosen.federation)
        else:  # a risk score, or K > 2 classes (the argmax predicts), has no decision threshold
            pooled = self._pooled(replies.per_site)
        pooled_val = self._pooled(val, intervals=False)  # point estimates choose; no CI is shown
        self.store.record_evaluation(self.run_id, replies.server_round, replies.per_site, pooled)
        if val:
            self.store.record_evaluation(self.run_id, replies.server_round, val, pooled_val, split="val")
        # the choice sees the validation entry only (the test metrics are not passed)
        if replies.per_site and self.selection.offer(replies.server_round, pooled_val):
            self.selected = (replies.server_round, replies.per_site, moments)
            self.selected_model = replies.model
            self.selected_site_models = dict(self.site_models)
        # the sensitivity analysis and the separability interval: the last round's only
        result = self.bias(replies.per_site, moments, final=replies.server_round >= self.settings.train_rounds)
        self.store.record_bias(self.run_id, replies.server_round, result)
        for export in self.exports:
            export.write(replies.server_round, evaluation_scalars(replies.per_site, pooled, result["alarm"]))
        level = (pooled or {}).get("per_patient") or pooled or {}  # per patient where there is
        metric = task_of(self.settings.task_kind).SELECTION_METRIC
        value = level.get(metric)
        self.progress.set_postfix(
            {metric: "n/a" if value is None else f"{value:.3f}", "alarm": {True: "YES", False: "no", None: "n/a"}[result["alarm"]]}
        )
        self.progress.update(1)

    def _pooled(self, per_site: dict, intervals: bool = True) -> dict | None:
        """The federation's metrics from the sites' aggregates (None when no site reported)."""
        if not per_site:
            return None
        return task_of(self.settings.task_kind).pooled_metrics(
            per_site, n_boot=self.settings.eval_bootstrap if intervals else 0, seed=self.settings.train_seed,
            time_bins=self.settings.eval_time_bins)

    def bias(self, per_site: dict, moments: dict, cross_site: dict | None = None, final: bool = True) -> dict:
        """Every bias signal and the verdict (fedir.strategies.frankenstein)."""
        return analyse(self.label_counts, per_site, moments, thresholds(self.settings), cross_site,
                       seed=self.settings.train_seed, final=final, kind=self.settings.task_kind,
                       time_bins=self.settings.eval_time_bins)

    def finalise(self) -> None:
        """The rounds are over: the selected round's verdict is the study's, so when that is
        not the planned last round (an earlier round selected, or a study stopped early) it
        is redone with the analyses of a final round; the other rounds' stay provisional."""
        if self.selected is not None and self.selected[0] < self.settings.train_rounds:
            server_round, per_site, moments = self.selected
            self.store.record_bias(self.run_id, server_round, self.bias(per_site, moments, final=True))

    def on_cross_site(self, matrix: dict) -> None:
        """Redo the selected round's verdict with the cross-site matrix."""
        if self.selected is None:
            return
        server_round, per_site, moments = self.selected
        self.store.record_bias(self.run_id, server_round, self.bias(per_site, moments, matrix))

    def selection_state(self) -> dict[str, Any]:
        """What the checkpoint keeps of the selection: the criterion's state, the selected
        round's global arrays, per-site metrics and embedding moments (not the site
        updates: a model per site per checkpoint would be too large)."""
        server_round, per_site, moments = self.selected or (None, {}, {})
        # numpy, not the ArrayRecord: a deployment's arrays hold memoryviews, which the
        # checkpoint's dataclass copy (dataclasses.asdict) cannot deep-copy
        model = None if self.selected_model is None else {k: a.numpy() for k, a in self.selected_model.items()}
        return {"state": self.selection.state(), "model": model, "round": server_round,
                "per_site": per_site,
                "moments": {site: {"counts": m.counts, "means": m.means, "covs": m.covs} for site, m in moments.items()}}

    def restore_selection(self, saved: dict[str, Any]) -> None:
        """The inverse of selection_state, for a resumed run."""
        self.selection = Selection(**saved["state"])
        model = saved["model"]
        self.selected_model = None if model is None else ArrayRecord({k: Array(v) for k, v in model.items()})
        if saved["round"] is not None:
            moments = {site: EmbeddingMoments(**m) for site, m in saved["moments"].items()}
            self.selected = (saved["round"], saved["per_site"], moments)

    def on_reject(self, server_round: int, site: str, reason: str) -> None:
        """An update left out of the average (fedir.strategies.validation), with its reason."""
        self.site_models.pop(site, None)  # a rejected update is no model to score elsewhere
        log.warning("round %d: update from %s rejected: %s", server_round, site, reason)
        self.store.record_note(self.run_id, server_round, site, "rejected", reason)

    def _record_failures(self, replies: RoundReplies, stage: str) -> None:
        self.failed.update(replies.failed)
        for site, reason in replies.failed.items():
            self.store.record_note(
                self.run_id, replies.server_round, site, "missing", f"{stage} failed: {reason}"
            )


def shared_arrays(model: torch.nn.Module, settings: Settings) -> ArrayRecord:
    """What crosses the boundary, as the first global model and the server's validation
    template (fedir.protocol.encode_weights): without the entries the sites keep
    (fedir.models.kept_keys), in DP's shapes under differential privacy."""
    return encode_weights(state_arrays(model), kept=kept_keys(model, settings), dp=settings.dp)


def thresholds(settings: Settings) -> Thresholds:
    """The bias thresholds and verdict rule of the scenario's `[bias]` section."""
    return Thresholds(
        alpha=settings.bias_alpha, min_cramers_v=settings.bias_min_cramers_v,
        max_auc_gap=settings.bias_max_auc_gap, min_i2=settings.bias_min_i2,
        min_site_accuracy=settings.bias_min_site_accuracy,
        min_separability_excess=settings.bias_min_separability_excess,
        max_cross_site_gap=settings.bias_max_cross_site_gap,
        max_cross_site_dice_gap=settings.bias_max_cross_site_dice_gap, bootstrap=settings.bias_bootstrap,
        secondary_to_alarm=settings.bias_secondary_to_alarm,
    )


def _cross_site(grid: Grid, recorder: StudyRecorder, settings: Settings, features) -> None:
    """The cross-site matrix after the last round, when the scenario asks for it and it means
    something (two or more site models; not the pooled arm, whose sites train nothing)."""
    models = recorder.selected_site_models
    if not settings.bias_cross_site or settings.federation_arm == "pooled":
        return
    if len(models) < 2:
        if len(recorder.site_models) >= 2 and recorder.selected is not None:
            recorder.store.record_note(
                recorder.run_id, None, None, "cross_site",
                f"cross-site evaluation skipped: fewer than two site updates of the selected round "
                f"{recorder.selected[0]} are held (updates rejected in that round, or a ServerApp restart since)")
        return
    try:
        metric = task_of(settings.task_kind).CROSS_SITE_METRIC
        recorder.on_cross_site(cross_site_matrix(grid, models, features.config(settings.train_rounds), metric=metric))
    except Exception as exc:  # the study's rounds are done and recorded: keep them
        log.warning("cross-site evaluation failed: %s", exc)
        recorder.store.record_note(recorder.run_id, None, None, "cross_site", f"cross-site evaluation failed: {exc}")


def run_study(grid: Grid, settings: Settings, out_dir: Path, scenario: str) -> dict[str, Any]:
    """Run every round, then write summary.json, report.html and model.pt into out_dir.

    With an unfinished run's checkpoint in out_dir (fedir.server.checkpoint), continue
    that run after its last completed round instead of starting a new one. The folder is
    locked for the ServerApp's lifetime (fedir.server.run_lock): a second ServerApp on it,
    such as one orphaned by a SuperLink restart, is refused. A study that
    cannot go on (fedir.errors.StudyFailed: no site answered, trained or was evaluated; a
    model that does not fit the sites' data) is recorded as failed, with its reason, in
    the run store, summary.json and report.html, and the error is raised.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config = settings.to_run_config()
    with serverapp_lock(out_dir), RunStore(out_dir / "runs.sqlite") as store:
        resumed = resume_point(out_dir / CHECKPOINT_NAME, lambda rid: store.run(rid)["status"], config)
        if resumed is None:
            run_id = new_run_id(settings)
            store.start_run(run_id, scenario, config, [Path(s).name for s in settings.sites])
        else:
            run_id = resumed.run_id
            store.reopen_run(run_id, after_round=resumed.completed_round)
            # the interruption stays on the record: the report and summary.json list it
            store.record_note(run_id, resumed.completed_round, None, "resumed",
                              f"the run was interrupted after round {resumed.completed_round} and resumed "
                              f"from its checkpoint at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
            log.info("resuming run %s after round %d", run_id, resumed.completed_round)
        try:
            _rounds(grid, settings, out_dir, store, run_id, resumed)
        except UserError as exc:
            store.record_note(run_id, None, None, "failed", str(exc))
            store.finish_run(run_id, "failed")
            write_summary(build_summary(store, run_id), out_dir / "summary.json")
            write_report(store, run_id, out_dir / "report.html")
            raise
        except BaseException:
            store.finish_run(run_id, "failed")
            raise
        store.finish_run(run_id, "finished")
        summary = with_baselines(build_summary(store, run_id), out_dir, config)
        write_summary(summary, out_dir / "summary.json")
        write_report(store, run_id, out_dir / "report.html")
    return summary


def _rounds(grid: Grid, settings: Settings, out_dir: Path, store: RunStore, run_id: str,
            resumed: Checkpoint | None) -> None:
    """The rounds of `run_id` (after a resumed run's completed ones), the cross-site
    matrix and model.pt; StudyFailed when no evaluation was ever recorded."""
    n_sites = len(settings.sites)
    min_nodes = settings.federation_min_sites or max(n_sites, 1)
    done = 0 if resumed is None else resumed.completed_round
    # Tabular sites: the feature names and federated statistics come first (a query), and
    # with them the kind of data, which `model.name` must fit before round 1.
    features = gather_feature_sums(grid, min_nodes)
    if settings.train_objective == "simclr" and features.sums is not None:
        raise SettingsError("train.objective = \"simclr\" pretrains an image encoder on views of images, but the "
                            "sites hold tabular rows (no views to contrast); choose train.objective = \"supervised\"")
    # data.inputs = image+clinical: imaging sites answer with their clin_* sums, and the model
    # is the image network fused with that many clinical columns (fedir.models.FusionNet)
    fused = settings.data_inputs == FUSED_INPUTS
    if fused and features.sums is None:
        raise StudyFailed(f"data.inputs = {FUSED_INPUTS}: no site sent clin_* columns (see each site's manifest.csv)")
    model = build_model(resolve_model(settings.model_name, tabular=features.sums is not None and not fused,
                                      kind=settings.task_kind),
                        seed=settings.train_seed, n_features=len(features.names),
                        spatial_dims=settings.spatial_dims,
                        n_outputs=task_of(settings.task_kind).n_outputs(settings.task_classes),
                        fused_image_size=settings.model_image_size if fused else 0,
                        projection=projection_dim(settings))
    if resumed is None and settings.model_init:
        # transfer learning: the checkpoint's weights are round 0's global model (a resumed
        # run continues from its own checkpoint; the report stays in the store)
        store.record_model_init(run_id, initialise(model, settings.model_init))
    # entries the sites keep (FedBN, a local intercept) are never sent, not even at the
    # start: server optimisers (FedAdam...) need the same keys every round
    start_arrays = shared_arrays(model, settings) if resumed is None else resumed.array_record()
    exports = open_exports(settings, out_dir, run_id)
    budget = None
    if settings.dp and settings.strategy_name in MEAN_AGGREGATORS:
        budget = PrivacyBudget(settings.privacy_noise_multiplier,
                               sampled_sites(settings, n_sites, _min_train_nodes(settings, n_sites)),
                               settings.privacy_delta, settings.privacy_max_epsilon,
                               spent=[] if resumed is None else resumed.app_state.get("budget", []))
    recorder = StudyRecorder(store, run_id, settings, settings.train_rounds, exports, budget)
    strategy = build_strategy(
        settings,
        n_sites,
        on_train=recorder.on_train,
        on_evaluate=recorder.on_evaluate,
        on_reject=recorder.on_reject,
        # entries the sites keep (FedBN, fedir.models): updates come without them
        template=shared_arrays(model, settings),
        outer=(ResumedRounds,),
        plan=RoundPlan(out_dir / CHECKPOINT_NAME, run_id, settings.to_run_config(), first_round=done + 1,
                       seed=settings.train_seed, generators=None if resumed is None else resumed.generators),
        # a DP wrapper's own state (an adaptive clipping norm) shapes later rounds too
        app_state=lambda: {"label_counts": recorder.label_counts,
                           "budget": [] if budget is None else list(budget.spent),
                           "privacy": {} if strategy is inner else strategy_state(strategy),
                           "selection": recorder.selection_state()},
    )
    inner = inner_strategy(strategy)
    if resumed is not None:
        if "selection" not in resumed.app_state:
            raise ResumeError(f"the checkpoint in {out_dir} was written by a fedir without model selection: "
                              "delete it to start a new run, or use another output folder")
        restore_strategy_state(inner, resumed.strategy_state)
        restore_strategy_state(strategy, resumed.app_state["privacy"])
        recorder.label_counts = resumed.app_state["label_counts"]
        recorder.restore_selection(resumed.app_state["selection"])
        recorder.progress.update(done)
    try:
        strategy.start(
            grid=grid,
            initial_arrays=start_arrays,
            num_rounds=settings.train_rounds - done,
            train_config=features.config(),
            evaluate_config=features.config(),
        )
    except StudyStopped as stop:
        # the privacy budget or early stopping: the rounds done are kept, the study finishes
        log.warning("%s", stop)
        store.record_note(run_id, stop.server_round, None, stop.kind, str(stop))
    finally:
        recorder.progress.close()
        for export in exports:
            export.close()
    if store.last_round(run_id, split="test") is None or recorder.selected_model is None:
        # no metric to report and no verdict to give: a failure, not an empty success
        raise StudyFailed.no_site(f"be evaluated in {settings.train_rounds} round(s)", recorder.failed)
    recorder.finalise()
    _cross_site(grid, recorder, settings, features)
    # the selected round's global model (under FedBN or train.personalise, the shared
    # entries only: each site keeps its own, as they were after the last round it trained)
    torch.save(as_tensors(decode_weights(recorder.selected_model, state_shapes(model)), like=model),
               out_dir / "model.pt")


def _min_train_nodes(settings: Settings, n_sites: int) -> int:
    """The fewest sites a round trains on (fedir.strategies.registry's rule)."""
    return int(strategy_kwargs(settings, n_sites)["min_train_nodes"])


def build_server_app(settings: Settings | None = None, out_dir: Path | None = None,
                     scenario: str = "pyproject") -> ServerApp:
    """The ServerApp; without arguments it reads everything from the run config."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_settings = settings or Settings.from_run_config(context.run_config)
        run_study(grid, run_settings, out_dir or Path(run_settings.output_dir), scenario)

    return app


app = build_server_app()
