"""Run settings: every knob of a study, as the flat `section.key` run config Flower carries.

A scenario TOML (`[train] rounds = 3`) and pyproject's `[tool.flwr.app.config]`
(`"train.rounds" = 3`) describe the same settings; both end up as one flat mapping that
Flower hands to the ServerApp and to every ClientApp in `context.run_config`. This module
is the one place that names the keys, their types, their allowed values and ranges, their
defaults and what they mean, so the two sides of the trust boundary cannot disagree about
them, and a typo is refused where the settings are read (the coordinator before round 1,
each site on its first message) instead of failing at every hospital every round.

Every enumerated setting is a `Literal`; its allowed values are read from the type
(`allowed`), never from a second list. `python -m fedir.config` prints the settings
reference (docs/settings.md) from these declarations.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import Field, dataclass, field, fields
from functools import cache
from typing import Any, Literal, get_args, get_origin, get_type_hints

from fedir.errors import UserError

SITE_SEPARATOR = ";"

Arm = Literal["federated", "local", "pooled"]
PooledBatches = Literal["mixed", "per-site"]
StrategyName = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
                       "fedmedian", "fedtrimmedavg", "krum"]
# simclr: self-supervised pretraining on every image, labels unused (fedir.client.objectives.SimCLR)
ObjectiveName = Literal["supervised", "fixmatch", "mean_teacher", "simclr"]
Optimizer = Literal["adamw", "sgd"]
UpdateDtype = Literal["float32", "float16"]
ImageModel = Literal["resnet_small", "resnet10", "resnet18", "densenet121", "basic_unet"]
TabularModel = Literal["logreg", "mlp"]
ModelName = Literal["auto", ImageModel, TabularModel]
FramePolicy = Literal["mip", "middle", "all", "peak", "volume"]  # and every-K (K >= 1)
Inputs = Literal["auto", "clinical", "radiomics", "image+clinical"]
FUSED_INPUTS = "image+clinical"  # the image network's embedding and the clin_* columns (fedir.models.FusionNet)
Standardise = Literal["federated", "site", "none"]
ThresholdRule = Literal["youden", "fixed"]
Personalise = Literal["none", "intercept", "finetune"]
Augment = Literal["weak", "none"]
BnViews = Literal["joint", "per-view"]  # forward passes of a semi-supervised step (fedir.client.objectives)
LrSchedule = Literal["constant", "cosine"]
Freeze = Literal["none", "encoder"]
Decision = Literal["argmax", "balanced"]
# Strategies whose aggregate is the weighted mean of the updates (the FedOpt family and
# FedAvgM then take a server step on it: post-processing). Only for these does the privacy
# budget's sensitivity bound hold (fedir.strategies.privacy_budget); a median or Krum's
# choice can move by a whole clipped update when one site changes.
MEAN_AGGREGATORS = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
# How the reported and saved round is chosen (fedir.strategies.selection): never on test.
Select = Literal["val-auc", "last"]
TaskKind = Literal["classification", "survival", "segmentation"]  # fedir.tasks.KINDS: one module per kind
# Test metrics per acquisition period (manifest column `acquired`; fedir.client.drift).
DriftPeriod = Literal["year", "quarter", "off"]
DPMode = Literal["off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive"]
SecureAggregation = Literal["off", "secagg+"]
# Strategies whose aggregate SecAgg+ can compute: a weighted sum of the sites' updates
# divided by the summed weight (FedAvgM then takes a server step on that mean). The others
# need each site's update (a median, Krum's choice) or Flower's Message-API server
# optimisers, which the legacy workflow does not drive (fedir.strategies.secure_aggregation).
SECURE_SUM_STRATEGIES = ("fedavg", "fedprox", "fedavgm")

EVERY_K = re.compile(r"every-([1-9][0-9]*)")


class SettingsError(UserError, ValueError):
    """A setting is missing, unknown, of the wrong type, out of range, or cannot be combined."""


@dataclass(frozen=True)
class Bounds:
    """The range a number setting must lie in; None = unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: the low end itself is excluded
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self) -> str:
        """`in (0, 1]`, `>= 1`, `> 0`: how the reference and the errors say it."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, "
                    f"{self.high:g}{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


AT_LEAST_0 = Bounds(0)
AT_LEAST_1 = Bounds(1)
POSITIVE = Bounds(0, low_open=True)
SHARE = Bounds(0, 1, low_open=True)  # a fraction of sites or patients that must not be empty
UNIT = Bounds(0, 1)
DECAY = Bounds(0, 1, high_open=True)  # a moment decay or momentum: 1 would freeze it


def setting(default: Any, doc: str, bounds: Bounds | None = None) -> Any:
    """A Settings field: its default, its one-line description and, for a number, its range
    (read by `check_values` and by the reference in docs/settings.md)."""
    return field(default=default, metadata={"doc": doc, "bounds": bounds})


@dataclass(frozen=True)
class Settings:
    """Typed view of the run config. Field names are the flat keys with '.'/'-' -> '_'."""

    task_kind: TaskKind = setting(
        "classification", "what the sites' manifests hold and the model predicts: classification (`label`, a class "
        "index) | survival (`time` in days and `event` 0/1: a Cox model, linear on tabular rows or an image "
        "network's risk head, C-indices) | segmentation (the `mask` "
        "column's label maps: a MONAI BasicUNet, DiceCE, Dice and HD95) (fedir.tasks)")
    task_classes: int = setting(
        2, "classification: K, the classes; labels are 0..K-1 (a label outside is refused with its row) and the "
        "model has K outputs; K > 2 reports the macro one-vs-rest AUC, balanced accuracy and the K x K confusion "
        "counts, predicting by task.decision (no decision threshold) (fedir.tasks.multiclass_metrics)", Bounds(2))
    task_decision: Decision = setting(
        "argmax", "task.classes > 2: the predicted class, argmax (the most probable: the highest accuracy) | balanced "
        "(the most probable relative to its prevalence among the site's labelled training patients: the highest "
        "balanced accuracy for calibrated probabilities, a rare class not swallowed by the common one) "
        "(fedir.tasks.multiclass_metrics)")
    federation_sites: str = setting("", "site folders, separated by ';' (simulation only)")
    federation_min_sites: int = setting(0, "sites that must answer each round; 0 = every site", AT_LEAST_0)
    federation_arm: Arm = setting(
        "federated", "federated; local (each site alone, its own weights); pooled (every site's "
        "rows at one node, simulation only) (fedir.client.arms)")
    federation_pooled_batches: PooledBatches = setting(
        "per-site", "federation.arm = pooled: how the pooled node fills a batch: per-site (each batch, and its "
        "unlabelled draw, from one site, as a FedAvg site trains: BatchNorm never normalises two scanners "
        "together) | mixed (rows of every site shuffled together; on the demo's federation 0.78/0.76 per "
        "patient against per-site's 0.90/0.89) (fedir.client.arms)")
    strategy_name: StrategyName = setting("fedavg", "the Flower strategy that aggregates (fedir.strategies.registry)")
    strategy_fraction_train: float = setting(1.0, "share of available sites sampled to train each round", SHARE)
    strategy_fraction_evaluate: float = setting(1.0, "share of available sites sampled to evaluate each round", SHARE)
    strategy_proximal_mu: float = setting(0.01, "fedprox: weight of the proximal term in the local loss", AT_LEAST_0)
    strategy_eta: float = setting(0.1, "fedadam/fedyogi/fedadagrad: server learning rate", POSITIVE)
    strategy_eta_l: float = setting(0.1, "fedadam/fedyogi/fedadagrad: client learning rate (Flower's record)", POSITIVE)
    strategy_beta_1: float = setting(0.9, "fedadam/fedyogi: first-moment decay", DECAY)
    strategy_beta_2: float = setting(0.99, "fedadam/fedyogi: second-moment decay", DECAY)
    strategy_tau: float = setting(0.001, "fedadam/fedyogi/fedadagrad: adaptivity", POSITIVE)
    strategy_server_learning_rate: float = setting(1.0, "fedavgm: server learning rate", POSITIVE)
    strategy_server_momentum: float = setting(0.0, "fedavgm: server momentum", DECAY)
    strategy_beta: float = setting(0.2, "fedtrimmedavg: fraction cut from each end", Bounds(0, 0.5, high_open=True))
    strategy_num_malicious_nodes: int = setting(0, "krum: sites assumed malicious", AT_LEAST_0)
    train_rounds: int = setting(3, "federated rounds", AT_LEAST_1)
    train_local_epochs: int = setting(2, "passes over a site's labelled training rows per round", AT_LEAST_1)
    train_batch_size: int = setting(16, "labelled rows (images) per optimiser step", AT_LEAST_1)
    train_lr: float = setting(1e-3, "local learning rate", POSITIVE)
    train_weight_decay: float = setting(1e-4, "local weight decay", AT_LEAST_0)
    train_objective: ObjectiveName = setting(
        "supervised", "what a site minimises: supervised, or a semi-supervised objective that also "
        "uses unlabelled images (fedir.client.objectives; for task.kind = segmentation the same names per "
        "pixel on the frames without a mask, fedir.client.segmentation_objectives), or simclr: contrastive "
        "pretraining on every image, labels unused, whose model.pt is the next study's model.init")
    train_seed: int = setting(0, "seed of the initial model and of every round's draws")
    train_optimizer: Optimizer = setting("adamw", "the local optimiser")
    train_update_dtype: UpdateDtype = setting("float32", "precision of the weights a site sends")
    train_local_steps: int = setting(
        0, "> 0: this many optimiser steps per round instead of local-epochs", AT_LEAST_0)
    train_patience: int = setting(
        0, "early stopping: stop after this many evaluated rounds without a better eval.select "
        "score; 0 = off (needs eval.select = val-auc)", AT_LEAST_0)
    model_name: ModelName = setting(
        "auto", "the network; auto = logreg for tabular sites, resnet_small for imaging sites (fedir.models)")
    model_init: str = setting(
        "", "a PyTorch state dict (.pt/.pth; .safetensors when the safetensors package is installed) the "
        "coordinator starts round 1 from; keys matched by name and shape, refused below 50% of the model's "
        "parameters; relative to the scenario file; empty = random init (fedir.server.model_init)")
    model_image_size: int = setting(128, "side of the square image (or cube) the model sees, in pixels", AT_LEAST_1)
    data_frame_policy: str = setting(
        "mip", "how a multi-frame file becomes model images: mip | middle | all | peak | volume | "
        "every-K (K >= 1) (fedir.client.imaging)")
    data_val_fraction: float = setting(0.15, "share of a site's patients held out for validation",
                                       Bounds(0, 1, high_open=True))
    data_test_fraction: float = setting(0.25, "share of a site's patients held out for testing",
                                        Bounds(0, 1, low_open=True, high_open=True))
    data_inputs: Inputs = setting(
        "auto", "auto (images, or the table of a tabular site) | clinical (clin_* columns only) | radiomics (IBSI "
        "first-order and GLCM features of each 2D image, a tabular model on them; fedir.client.radiomics) | "
        "image+clinical (the image network's embedding concatenated with the standardised clin_* columns, one "
        "linear head; every site's test set then gets the per-input sensitivity analysis, "
        "fedir.client.input_sensitivity)")
    data_standardise: Standardise = setting(
        "federated", "tabular features: federated (from every site's n / sum / sum of squares) | "
        "site (each site's own statistics) | none (the rows as they are: FLamby's Fed-TCGA-BRCA protocol)")
    eval_select: Select = setting(
        "val-auc", "the round whose model is saved and reported: val-auc (the highest pooled validation AUC, "
        "per patient; the earliest on ties) | last (the last evaluated round); never chosen on test "
        "(fedir.strategies.selection)")
    eval_bootstrap: int = setting(500, "bootstrap resamples of each metric's 95% CI; 0 = no CI", AT_LEAST_0)
    eval_hist_bins: int = setting(
        50, "bins of the per-label score histograms a site sends: finer bins make the pooled AUC exact to within less "
        "(fedir.metrics.pooled_auc_exact) and place a lone patient's score more closely", AT_LEAST_1)
    eval_time_bins: int = setting(
        20, "survival: time bins of the Kaplan-Meier counts and of the joint histogram the pooled C-index is "
        "rebuilt from (the last bin is open-ended) (fedir.tasks.survival_metrics)", Bounds(2))
    eval_time_bin_days: float = setting(180.0, "survival: width of a time bin, in days", POSITIVE)
    eval_threshold_rule: ThresholdRule = setting(
        "youden", "decision threshold: youden (the bin edge maximising Youden's J on the pooled validation patients, "
        "fedir.thresholds) | fixed (eval.threshold)")
    eval_threshold_per_site: bool = setting(
        False, "with youden: each site's test metrics at its own validation threshold instead of the federation's")
    eval_threshold: float = setting(
        0.5, "the fixed decision threshold (a score >= it is positive) and the one a site scores its own counts at", UNIT)
    eval_adapt_bn: bool = setting(
        True, "AdaBN: before scoring, re-estimate every BatchNorm layer's statistics on the site's own "
        "training images, labels unused; always on under train.fedbn (fedir.client.adapt_bn)")
    eval_drift_period: DriftPeriod = setting(
        "year", "drift over time: each site with an `acquired` manifest column reports its test patients' "
        "AUC per year | quarter of acquisition (small periods suppressed), and the summary tests for a trend; "
        "a site without the column reports none; off = no site reports (fedir.client.drift)")
    eval_sensitivity_repeats: int = setting(
        5, "data.inputs = image+clinical: seeded permutations of each clinical variable within a site's test "
        "patients; the variable's AUC drop is their mean (fedir.client.input_sensitivity)", AT_LEAST_1)
    eval_sensitivity_blur: float = setting(
        4.0, "data.inputs = image+clinical: the Gaussian sigma, in pixels, of the blurred image the sensitivity "
        "analysis scores beside a blank one", POSITIVE)
    bias_alpha: float = setting(0.01, "significance level of the bias tests", Bounds(0, 1, low_open=True, high_open=True))
    bias_min_cramers_v: float = setting(0.2, "site-label association: Cramer's V that raises the alarm", UNIT)
    bias_max_auc_gap: float = setting(0.05, "pooled minus within-site AUC (and its 95% CI above 0)", AT_LEAST_0)
    bias_min_i2: float = setting(0.5, "Cochran's Q p < bias.alpha and I^2 at least this: heterogeneity", UNIT)
    bias_min_site_accuracy: float = setting(0.8, "embedding identifies a site at least this well...", UNIT)
    bias_min_separability_excess: float = setting(
        0.1, "...and this much better than it separates classes", Bounds(-1, 1))
    bias_max_cross_site_gap: float = setting(0.1, "own-site minus other-site AUC of the sites' models", AT_LEAST_0)
    bias_max_cross_site_dice_gap: float = setting(
        0.2, "a segmentation study's: own-site minus other-site Dice of the sites' models (docs/methods.md)", AT_LEAST_0)
    bias_embedding: bool = setting(True, "sites send their embedding's moments (fedir.client.embedding)")
    bias_cross_site: bool = setting(False, "opt-in: after the last round, send every site's own update to every other site to score "
                                    "(the cross-site matrix); refused under privacy.dp")
    bias_cross_site_max_sites: int = setting(16, "above this many sites the cross-site matrix is skipped", AT_LEAST_0)
    bias_bootstrap: int = setting(
        200, "resamples of the bias intervals (pooled-vs-within gap, separability)", AT_LEAST_0)
    bias_secondary_to_alarm: int = setting(
        0, "how many secondary bias signals (heterogeneity, separability, cross-site; survival by site, follow-up "
        "by site) firing together raise the alarm; 0 = they only warn, and only a primary signal (site-label "
        "association, pooled-vs-within gap, foreground by site, pooled-vs-stratified C) raises it "
        "(docs/methods.md, \"The bias checks\", Verdict)", AT_LEAST_0)
    validation_max_norm_ratio: float = setting(
        10.0, "reject updates this far above the others' median norm", POSITIVE)
    validation_min_accepted: int = setting(
        1, "fewer acceptable updates: the round leaves the model unchanged", AT_LEAST_0)
    output_dir: str = setting("runs/flwr-run", "the run folder (summary.json, runs.sqlite, report.html)")
    monitor_tensorboard: str = setting(
        "", "TensorBoard log folder (relative: inside the run folder); empty = off")
    monitor_mlflow: str = setting("", "MLflow tracking URI, or a folder for DIR/mlflow.db; empty = off")
    report_overlays: int = setting(
        2, "segmentation, simulation on a `fedir data synth` federation only: example overlays (image, reference "
        "and predicted mask, the frame's Dice) of this many test frames per site in report.html; 0 = none. A real "
        "site sends no pixels, so a deployment never has any (fedir.simulations.overlays)", AT_LEAST_0)
    train_threshold: float = setting(0.95, "fixmatch: confidence a pseudo-label needs", UNIT)
    train_unlabelled_weight: float = setting(
        1.0, "fixmatch / mean_teacher: weight of the unlabelled loss", AT_LEAST_0)
    train_unlabelled_ratio: int = setting(1, "unlabelled images per labelled image in a step (mu)", AT_LEAST_1)
    train_ema_decay: float = setting(0.99, "mean_teacher: EMA decay of the teacher", DECAY)
    train_temperature: float = setting(
        0.5, "simclr: temperature of the NT-Xent contrastive loss (MONAI ContrastiveLoss)", POSITIVE)
    train_projection_dim: int = setting(
        64, "simclr: output width of the projection head (an MLP on the encoder's embedding, dropped "
        "when model.pt is the next study's model.init; fedir.models.add_projection_head)", AT_LEAST_1)
    train_mixup_alpha: float = setting(0.0, "MixUp of the labelled batch, Beta(alpha, alpha); 0 = off", AT_LEAST_0)
    train_strong_cutout: bool = setting(
        True, "fixmatch / mean_teacher / simclr (either task kind): the strong view ends with Cutout (a square "
        "set to 0); false leaves it out, every other transform unchanged: a cut-out square can erase a focal "
        "finding of a few pixels (fedir.client.augment.strong_view)")
    train_bn_views: BnViews = setting(
        "joint", "fixmatch / mean_teacher (either task kind): joint (one forward pass over the labelled batch "
        "and the unlabelled views, so BatchNorm normalises each with their mixed batch statistics, as the "
        "FixMatch reference does) | per-view (one pass per view: each its own batch statistics, the running "
        "statistics updated once per view); simclr keeps its one pass over both views (fedir.client.objectives)")
    train_augment: Augment = setting(
        "weak", "augmentation of every objective's labelled 2D images: weak (FixMatch's weak view, a small "
        "affine) | none; tabular rows and 3D volumes are never augmented (fedir.client.objectives)")
    train_lr_schedule: LrSchedule = setting(
        "constant", "learning rate across rounds: constant | cosine (round r of train.rounds uses lr x a "
        "cosine factor from 1 down to 5%) (fedir.client.local_training)")
    train_freeze: Freeze = setting(
        "none", "none | encoder: for the first train.freeze-rounds rounds the sites train the final "
        "classifier layer only, the encoder of model.init frozen with its BatchNorm statistics "
        "(fedir.models.encoder_names); needs model.init")
    train_freeze_rounds: int = setting(
        0, "rounds with the encoder frozen (train.freeze = encoder), then every layer is fine-tuned; "
        "below train.rounds", AT_LEAST_0)
    train_fedbn: bool = setting(
        False, "FedBN: normalisation layers stay at each site (fedir.client.kept_state)")
    train_personalise: Personalise = setting(
        "none", "none | intercept (the output bias stays at each site) | finetune (local "
        "fine-tuning before evaluation) (fedir.models)")
    train_smote: bool = setting(
        False, "SMOTE on a tabular site's labelled training rows, at the site (fedir.client.smote)")
    baseline_clinical: bool = setting(
        False, "also run a clinical-only companion study (fedir.simulations.companion)")
    baseline_clinical_steps: int = setting(
        50, "its local SGD steps per round (logistic regression on clin_*)", AT_LEAST_1)
    baseline_clinical_lr: float = setting(0.05, "its SGD learning rate", POSITIVE)
    baseline_radiomics: bool = setting(
        False, "also run a radiomics companion study: a logistic regression on each image's first-order and GLCM "
        "features (data.inputs = radiomics), shown beside the imaging model (fedir.simulations.companion)")
    baseline_radiomics_steps: int = setting(
        50, "its local SGD steps per round (logistic regression on the features)", AT_LEAST_1)
    baseline_radiomics_lr: float = setting(0.05, "its SGD learning rate", POSITIVE)
    privacy_dp: DPMode = setting("off", "differential privacy: who clips, fixed or adaptive bound")
    privacy_noise_multiplier: float = setting(
        0.1, "Gaussian noise std = this x clipping norm / sampled sites", AT_LEAST_0)
    privacy_clipping_norm: float = setting(1.0, "L2 bound of a site's update (adaptive: the initial bound)", AT_LEAST_0)
    privacy_target_quantile: float = setting(0.5, "adaptive: share of updates left unclipped", UNIT)
    privacy_clip_norm_lr: float = setting(0.2, "adaptive: learning rate of the clipping bound", POSITIVE)
    privacy_clipped_count_stddev: float = setting(
        0.0, "adaptive: noise on the clipped count; 0 = Flower's default (sites/20)", AT_LEAST_0)
    privacy_delta: float = setting(
        1e-5, "delta at which the epsilon spent is reported (fedir.strategies.privacy_budget); "
        "keep it below 1 / the number of sites", Bounds(0, 1, low_open=True, high_open=True))
    privacy_max_epsilon: float = setting(
        0.0, "stop the study before a round would spend more epsilon than this; 0 = no limit", AT_LEAST_0)
    privacy_secure_aggregation: SecureAggregation = setting(
        "off", "secagg+: the coordinator sees only the sum of the sites' weighted updates, never one site's "
        "(Flower's SecAgg+; fedavg, fedprox, fedavgm only; fedir.strategies.secure_aggregation)")
    privacy_secagg_clipping_range: float = setting(
        8.0, "secagg+: every weight a site sends must lie in [-this, this] (a site refuses to send otherwise)",
        POSITIVE)
    privacy_secagg_quantization_range: int = setting(
        4194304, "secagg+: integer levels each weighted value is quantised to (2^22); the sum of every site's "
        "must stay below 2^32", Bounds(2, 2**31))
    privacy_secagg_max_weight: float = setting(
        1000.0, "secagg+: the largest weight (labelled training patients) a site may send; a larger site refuses",
        POSITIVE)
    privacy_secagg_reconstruction_threshold: float = setting(
        0.67, "secagg+: share of the sampled sites (at least 2) whose key shares rebuild a dropped site's mask: "
        "more sites must then collude to unmask one site, fewer may drop out in a round", SHARE)

    def __post_init__(self) -> None:
        # Values and the combinations that cannot work are refused when the settings are
        # read (a scenario file, --set, the run config), before any run starts.
        check_values(self)
        check_combinations(self)
        check_task(self)
        check_radiomics(self)
        check_dp(self.privacy_dp, fedbn=self.train_fedbn, update_dtype=self.train_update_dtype,
                 arm=self.federation_arm)
        check_personalise(self.train_personalise, self.federation_arm)
        check_cross_site(self.bias_cross_site, self.privacy_dp)
        check_secure_aggregation(self)
        check_budget(self.privacy_dp, self.privacy_max_epsilon, self.privacy_noise_multiplier,
                     self.strategy_name)

    @staticmethod
    def key_of(field_name: str) -> str:
        """`train_local_epochs` -> `train.local-epochs`."""
        section, _, rest = field_name.partition("_")
        return f"{section}.{rest.replace('_', '-')}"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> Settings:
        """Build from a flat run config; unknown keys are an error (a typo must not pass silently)."""
        by_key = {cls.key_of(f.name): f for f in fields(cls)}
        unknown = sorted(set(config) - set(by_key))
        if unknown:
            raise SettingsError(
                f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(by_key))}"
            )
        values: dict[str, Any] = {}
        for key, value in config.items():
            f = by_key[key]
            values[f.name] = _coerce(key, value, kind_of(f))
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The flat mapping Flower carries (only str/int/float/bool values)."""
        return {self.key_of(f.name): getattr(self, f.name) for f in fields(self)}

    def round_seed(self, server_round: int) -> int:
        """The seed of one round's local work at every site (training draws, bootstraps):
        distinct per round, the same at every site, reproducible from `train.seed`."""
        return self.train_seed * 1000 + server_round

    @property
    def dp(self) -> bool:
        """Whether a differential-privacy mode is on (fedir.config)."""
        return self.privacy_dp != "off"

    @property
    def secure_aggregation(self) -> bool:
        """Whether the sites' updates are summed under SecAgg+ (privacy.secure-aggregation)."""
        return self.privacy_secure_aggregation != "off"

    @property
    def spatial_dims(self) -> int:
        """3 when the frame policy keeps volumes ("volume"), else 2: what build_model needs."""
        return 3 if self.data_frame_policy == "volume" else 2

    @property
    def sites(self) -> list[str]:
        return [s for s in self.federation_sites.split(SITE_SEPARATOR) if s]


@cache
def _hints() -> dict[str, Any]:
    return get_type_hints(Settings)


def hint_of(f: Field) -> Any:
    """The field's declared type, with the Literal aliases resolved."""
    return _hints()[f.name]


def allowed(hint: Any) -> tuple[Any, ...]:
    """The values of a Literal type (nested Literals flattened); () for any other type."""
    return get_args(hint) if get_origin(hint) is Literal else ()


def kind_of(f: Field) -> type:
    """The Python type a run-config value must have: str for a Literal of strings."""
    hint = hint_of(f)
    values = allowed(hint)
    return type(values[0]) if values else hint


def frame_policy_ok(policy: str) -> bool:
    """A frame policy of FramePolicy, or `every-K` with K >= 1 (every K-th frame)."""
    return policy in allowed(FramePolicy) or EVERY_K.fullmatch(policy) is not None


def check_values(settings: Settings) -> None:
    """Each enumerated setting one of its Literal's values, each number in its range."""
    for f in fields(settings):
        key, value, values = Settings.key_of(f.name), getattr(settings, f.name), allowed(hint_of(f))
        if values and value not in values:
            raise SettingsError(f"{key} = {value!r} is not allowed; choose one of "
                                f"{', '.join(map(str, values))}")
        bounds = f.metadata.get("bounds")
        if bounds is not None and not isinstance(value, bool) and value not in bounds:
            raise SettingsError(f"{key} = {value!r} is out of range; it must be {bounds.text()}")
    if not frame_policy_ok(settings.data_frame_policy):
        raise SettingsError(f"data.frame-policy = {settings.data_frame_policy!r} is not allowed; choose one "
                            f"of {', '.join(allowed(FramePolicy))}, or every-K with K >= 1")


def check_combinations(settings: Settings) -> None:
    """Refuse settings that are each valid but cannot work together, naming both."""
    if settings.data_val_fraction + settings.data_test_fraction >= 1:
        raise SettingsError(
            f"data.val-fraction ({settings.data_val_fraction:g}) + data.test-fraction "
            f"({settings.data_test_fraction:g}) must be below 1, or no patient is left to train on")
    if settings.data_frame_policy == "volume" and settings.train_objective != "supervised":
        raise SettingsError(
            f"train.objective = {settings.train_objective!r} augments 2D images; with "
            "data.frame-policy = \"volume\" choose train.objective = \"supervised\"")
    if settings.train_patience and settings.eval_select != "val-auc":
        raise SettingsError(
            f"train.patience = {settings.train_patience} stops when the validation AUC stops improving: "
            f"it needs eval.select = \"val-auc\", not {settings.eval_select!r}")
    if settings.federation_arm == "pooled" and settings.federation_pooled_batches == "per-site" and settings.train_smote:
        raise SettingsError("federation.pooled-batches = \"per-site\" (the default) draws each batch from one "
                            "site, and train.smote's synthetic rows belong to none: set federation.pooled-batches "
                            "= \"mixed\" or train.smote = false")
    check_freeze(settings)
    check_fused(settings)
    check_simclr(settings)
    n_sites = len(settings.sites)
    if n_sites and settings.federation_min_sites > n_sites:
        raise SettingsError(f"federation.min-sites = {settings.federation_min_sites} is more than the "
                            f"{n_sites} site(s) federation.sites lists")


def check_fused(settings: Settings) -> None:
    """What `data.inputs = "image+clinical"` cannot use: a fused row is an image's pixels then
    its patient's clin_* values (fedir.client.inputs), so the 2D views of the semi-supervised
    objectives and SMOTE's tabular rows do not apply; the fused model classifies."""
    if settings.data_inputs != FUSED_INPUTS:
        return
    refused = {
        "task.kind": (settings.task_kind != "classification", "classification"),
        "train.objective": (settings.train_objective != "supervised", "supervised"),
        "train.smote": (settings.train_smote, "false"),
        "model.name": (settings.model_name in ("logreg", "mlp", "basic_unet"), "auto or an image network"),
    }
    for key, (bad, choose) in refused.items():
        if bad:
            value = getattr(settings, key.replace(".", "_").replace("-", "_"))
            raise SettingsError(f"data.inputs = {FUSED_INPUTS!r} cannot use {key} = {value!r}; set {key} = {choose}")


def check_task(settings: Settings) -> None:
    """What a survival or segmentation study cannot use, naming the setting: MixUp and
    SMOTE need class labels, and so do survival's semi-supervised objectives (segmentation has
    its own, per pixel: fedir.client.segmentation_objectives); a Cox model has no intercept (the partial
    likelihood does not see it); the clinical companion scores AUCs, and so does survival's
    refused cross-site matrix (a segmentation's scores Dice: fedir.tasks' CROSS_SITE_METRIC).
    A segmentation model is a BasicUNet, and a BasicUNet segments only; a survival model
    (tabular or imaging) has one risk output, and its batches need pairs (train.batch-size >= 2)."""
    if settings.task_kind == "classification":
        if settings.model_name == "basic_unet":
            raise SettingsError("model.name = 'basic_unet' is a segmentation network: it needs "
                                "task.kind = \"segmentation\"")
        check_classes(settings)
        return
    kind = f"task.kind = {settings.task_kind!r}"
    if settings.task_classes != 2:
        raise SettingsError(f"{kind} has no classes: task.classes = {settings.task_classes} applies to "
                            "task.kind = \"classification\" only; leave it at 2")
    refused = {
        "train.objective": (settings.task_kind == "survival" and settings.train_objective != "supervised",
                            "supervised"),
        "train.mixup-alpha": (settings.train_mixup_alpha > 0, "0"),
        "train.smote": (settings.train_smote, "false"),
        "train.personalise": (settings.train_personalise == "intercept", "none or finetune"),
        # a survival model's C-index needs pairs across a site's patients: no cross-site cell
        # is defined for it yet; a segmentation's cells are Dice (fedir.tasks CROSS_SITE_METRIC)
        "bias.cross-site": (settings.task_kind == "survival" and settings.bias_cross_site, "false"),
        "baseline.clinical": (settings.baseline_clinical, "false"),
    }
    if settings.task_kind == "segmentation":
        refused["train.freeze"] = (settings.train_freeze != "none", "none")
    for key, (bad, choose) in refused.items():
        if bad:
            raise SettingsError(f"{kind} cannot use {key} = {getattr(settings, key.replace('.', '_').replace('-', '_'))!r} "
                                f"(it needs class labels or an intercept); set {key} = {choose}")
    if settings.task_kind == "segmentation":
        if settings.model_name not in ("auto", "basic_unet"):
            raise SettingsError(f"{kind} trains a MONAI BasicUNet: model.name = {settings.model_name!r} "
                                "is not a segmentation network; choose auto or basic_unet")
        return
    if settings.model_name == "basic_unet":
        raise SettingsError(f"{kind} trains a risk model with one output (a linear Cox model or an mlp on "
                            "tabular sites, an image network's risk head on imaging sites): model.name = "
                            "'basic_unet' is a segmentation network; choose auto or another model")
    if settings.train_batch_size < 2:
        raise SettingsError(f"{kind} trains on the Cox partial likelihood of each batch, and a batch of "
                            f"train.batch-size = {settings.train_batch_size} row has no pair to order: set it "
                            "to 2 or more (enough for several events per batch)")


def check_radiomics(settings: Settings) -> None:
    """Radiomics features (`data.inputs = "radiomics"`, `baseline.radiomics`) are 2D image
    features for a classification label (fedir.client.radiomics): refused for a 3D volume
    and for the other task kinds, naming the setting."""
    for key, on in (("data.inputs = \"radiomics\"", settings.data_inputs == "radiomics"),
                    ("baseline.radiomics = true", settings.baseline_radiomics)):
        if not on:
            continue
        if settings.task_kind != "classification":
            raise SettingsError(f"{key} is a classification baseline: it cannot serve task.kind = "
                                f"{settings.task_kind!r}")
        if settings.data_frame_policy == "volume":
            raise SettingsError(f"{key} computes 2D image features: it cannot read data.frame-policy = "
                                "\"volume\" (choose a 2D frame policy such as mip, middle or peak)")


def check_classes(settings: Settings) -> None:
    """What a K > 2 classification study cannot use yet, naming the setting: each reads a
    binary score (the positive-class probability) or a decision threshold, where K > 2
    predicts the argmax of K probabilities. (eval.drift-period, on by default, reports
    nothing for K > 2: fedir.client.client_app's _drift.)"""
    if settings.task_classes == 2:
        if settings.task_decision != "argmax":
            raise SettingsError(f"task.decision = {settings.task_decision!r} needs task.classes > 2 (a binary study "
                                "decides by eval.threshold-rule)")
        return
    refused = {
        "eval.threshold-per-site": (settings.eval_threshold_per_site, "false"),
        "bias.cross-site": (settings.bias_cross_site, "false"),
        "baseline.clinical": (settings.baseline_clinical, "false"),
        "baseline.radiomics": (settings.baseline_radiomics, "false"),
    }
    for key, (bad, choose) in refused.items():
        if bad:
            raise SettingsError(f"task.classes = {settings.task_classes} cannot use {key} = "
                                f"{getattr(settings, key.replace('.', '_').replace('-', '_'))!r} (it scores a binary "
                                f"positive-class probability); set {key} = {choose}")


def check_simclr(settings: Settings) -> None:
    """`train.objective = simclr` pretrains an image encoder without labels: what reads
    labels, a class score or a decision threshold cannot serve it, so it is refused naming
    the setting. Its sites score no classifier, so no validation AUC can choose the round
    (eval.select = last: the last round's encoder is the result, as SimCLR's is); tabular
    rows have no views (data.inputs = clinical here, a tabular federation at the
    coordinator before round 1: fedir.models.resolve_model); 3D volumes are refused with
    every objective but supervised (check_combinations)."""
    if settings.train_objective != "simclr":
        return
    refused = {
        "eval.select": (settings.eval_select != "last", "last"),
        "data.inputs": (settings.data_inputs == "clinical", "auto"),
        "train.mixup-alpha": (settings.train_mixup_alpha > 0, "0"),
        "train.freeze": (settings.train_freeze != "none", "none"),
        "train.personalise": (settings.train_personalise != "none", "none"),
        "train.smote": (settings.train_smote, "false"),
        "bias.cross-site": (settings.bias_cross_site, "false"),
        "baseline.clinical": (settings.baseline_clinical, "false"),
    }
    for key, (bad, choose) in refused.items():
        if bad:
            raise SettingsError(
                f"train.objective = \"simclr\" pretrains an image encoder without labels and cannot use {key} = "
                f"{getattr(settings, key.replace('.', '_').replace('-', '_'))!r} (no classifier is trained or "
                f"scored); set {key} = {choose}")


def check_freeze(settings: Settings) -> None:
    """`train.freeze = encoder` keeps a pretrained encoder while the new head learns: it
    needs the checkpoint (`model.init`; a frozen random encoder would only ever give random
    features), at least one frozen round, and a round after the frozen ones (the encoder is
    then fine-tuned; `freeze-rounds >= rounds` would never fine-tune it)."""
    rounds = settings.train_freeze_rounds
    if settings.train_freeze == "none":
        if rounds:
            raise SettingsError(f"train.freeze-rounds = {rounds} needs train.freeze = \"encoder\"")
        return
    if not settings.model_init:
        raise SettingsError("train.freeze = \"encoder\" freezes the encoder of a pretrained checkpoint: "
                            "set model.init to its state dict (a frozen random encoder learns nothing)")
    if not 1 <= rounds < settings.train_rounds:
        raise SettingsError(f"train.freeze-rounds = {rounds} must be at least 1 and below train.rounds = "
                            f"{settings.train_rounds} (the rounds after it fine-tune every layer)")


def check_dp(mode: str, *, fedbn: bool, update_dtype: str, arm: str) -> None:
    """Refuse combinations Flower's DP clipping cannot serve, naming the setting.

    FedBN: the site's reply lacks the normalisation layers it was sent, and Flower's
    client mods refuse a reply whose array names differ from the message's. float16
    uploads: the update would be clipped in half precision. Local and pooled arms average
    nothing a DP guarantee would apply to.
    """
    if mode == "off":
        return
    if fedbn:
        raise SettingsError(f"privacy.dp = {mode!r} cannot be combined with train.fedbn = true")
    if update_dtype != "float32":
        raise SettingsError(f"privacy.dp = {mode!r} needs train.update-dtype = \"float32\"")
    if arm != "federated":
        raise SettingsError(f"privacy.dp = {mode!r} needs federation.arm = \"federated\"")


def check_budget(mode: str, max_epsilon: float, noise_multiplier: float, strategy: str) -> None:
    """A privacy budget needs differential privacy, noise (without it every round spends an
    infinite epsilon, and the study would stop before its first round) and a mean
    aggregator (MEAN_AGGREGATORS: for the others no epsilon is accounted)."""
    if not max_epsilon:
        return
    if mode == "off":
        raise SettingsError(f"privacy.max-epsilon = {max_epsilon:g} needs a privacy.dp mode")
    if noise_multiplier <= 0:
        raise SettingsError(f"privacy.max-epsilon = {max_epsilon:g} needs privacy.noise-multiplier > 0")
    if strategy not in MEAN_AGGREGATORS:
        raise SettingsError(f"privacy.max-epsilon = {max_epsilon:g} needs a mean aggregator "
                            f"({', '.join(MEAN_AGGREGATORS)}), not strategy.name = {strategy!r}")


def check_cross_site(cross_site: bool, dp_mode: str) -> None:
    """Cross-site evaluation sends each site's own last update to every other site; under
    differential privacy those updates are at most clipped, never noised, so the two are
    not combined."""
    if cross_site and dp_mode != "off":
        raise SettingsError(
            f"bias.cross-site = true sends each site's un-noised update to every other site: "
            f"it cannot be combined with privacy.dp = {dp_mode!r} (set bias.cross-site = false)"
        )


def check_secure_aggregation(settings: Settings) -> None:
    """Refuse what SecAgg+ cannot serve, naming both settings. The coordinator sees only
    the sum of the sites' weighted updates: a strategy that needs each update (a median,
    Krum), the cross-site matrix (each site's update sent to the others), Flower's DP
    wrappers (they clip or check each site's reply) and the local and pooled arms (no
    sum to hide) cannot work; float16 uploads would lose precision before the sites'
    quantisation and save nothing (the masked values are integers); with two sites each
    would learn the other's update from the sum."""
    mode = settings.privacy_secure_aggregation
    if mode == "off":
        return
    key = f"privacy.secure-aggregation = {mode!r}"
    if settings.strategy_name not in SECURE_SUM_STRATEGIES:
        raise SettingsError(f"{key} computes only a weighted sum of the sites' updates, which "
                            f"strategy.name = {settings.strategy_name!r} cannot aggregate from; choose "
                            f"{', '.join(SECURE_SUM_STRATEGIES)}")
    if settings.bias_cross_site:
        raise SettingsError(f"{key} hides each site's update, which bias.cross-site = true sends to every other "
                            "site: set bias.cross-site = false")
    if settings.privacy_dp != "off":
        raise SettingsError(f"{key} cannot be combined with privacy.dp = {settings.privacy_dp!r}: Flower's DP "
                            "wrappers clip or check each site's reply, which SecAgg+ hides")
    if settings.train_update_dtype != "float32":
        raise SettingsError(f"{key} needs train.update-dtype = \"float32\" (the masked values are integers: "
                            f"{settings.train_update_dtype} would only lose precision)")
    if settings.federation_arm != "federated":
        raise SettingsError(f"{key} needs federation.arm = \"federated\", not {settings.federation_arm!r}: "
                            "the other arms sum nothing")
    if 0 < len(settings.sites) < 3:
        raise SettingsError(f"{key} needs at least 3 sites, federation.sites lists {len(settings.sites)}: "
                            "with two, each site learns the other's update from the sum")


def check_personalise(mode: str, arm: str) -> None:
    """`train.personalise` other than none only for the federated arm (the local arm is
    already fully personal; the pooled arm has one model by definition)."""
    if mode != "none" and arm != "federated":
        raise SettingsError(f"train.personalise = {mode!r} needs federation.arm = federated")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Accept ints for floats and reject the rest, naming the key."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise SettingsError(f"setting {key} = {value!r} should be of type {kind.__name__}")
    return value


def _type_text(f: Field) -> str:
    """The reference's type column: the allowed values, or the type and its range."""
    values = allowed(hint_of(f))
    if values:
        return " \\| ".join(f"`{v}`" for v in values)
    if f.name == "data_frame_policy":
        return " \\| ".join(f"`{v}`" for v in allowed(FramePolicy)) + " \\| `every-K` (K >= 1)"
    bounds = f.metadata.get("bounds")
    return kind_of(f).__name__ + (f", {bounds.text()}" if bounds else "")


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value!r}`"


def reference_markdown() -> str:
    """docs/settings.md: every setting's key, allowed values or type and range, default and
    meaning, read from the Settings declarations (regenerate: `python -m fedir.config`)."""
    lines = [
        "# Settings reference",
        "",
        "Generated from `fedir.config.Settings` by `python -m fedir.config > docs/settings.md`;",
        "do not edit by hand. Each key is written `section.key` in a `--set` override and in",
        "pyproject's `[tool.flwr.app.config]`, and as `key = value` under `[section]` in a",
        "scenario file. Every value is checked when the settings are read (the scenario file,",
        "`--set`, or Flower's run config at the coordinator and at each site): a value outside",
        "the allowed ones ends with one line naming the key, and the run does not start.",
        "",
        "| key | allowed values / type | default | meaning |",
        "|---|---|---|---|",
    ]
    for f in fields(Settings):
        doc = f.metadata["doc"].replace("|", "\\|")
        lines.append(f"| `{Settings.key_of(f.name)}` | {_type_text(f)} | {_default_text(f.default)} | {doc} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
