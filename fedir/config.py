"""Run settings: every knob of a study, as the flat `section.key` run config Flower carries.

A scenario TOML (`[train] rounds = 3`) and pyproject's `[tool.flwr.app.config]`
(`"train.rounds" = 3`) describe the same settings; both end up as one flat mapping that
Flower hands to the ServerApp and to every ClientApp in `context.run_config`. This module
is the one place that names the keys, their types and their defaults, so the two sides of
the trust boundary cannot disagree about them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

SITE_SEPARATOR = ";"


class SettingsError(ValueError):
    """A setting is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class Settings:
    """Typed view of the run config. Field names are the flat keys with '.'/'-' -> '_'."""

    federation_sites: str = ""  # site folders, separated by ';' (simulation only)
    federation_min_sites: int = 0  # 0 = every site must answer
    federation_arm: str = "federated"  # federated | local | pooled (fedir/arms.py)
    strategy_name: str = "fedavg"  # a Flower strategy (fedir.strategies.registry)
    strategy_fraction_train: float = 1.0  # share of available sites sampled to train each round
    strategy_fraction_evaluate: float = 1.0  # share sampled to evaluate each round
    strategy_proximal_mu: float = 0.01  # fedprox: weight of the proximal term in the local loss
    strategy_eta: float = 0.1  # fedadam/fedyogi/fedadagrad: server learning rate
    strategy_eta_l: float = 0.1  # fedadam/fedyogi/fedadagrad: client learning rate (Flower's record)
    strategy_beta_1: float = 0.9  # fedadam/fedyogi: first-moment decay
    strategy_beta_2: float = 0.99  # fedadam/fedyogi: second-moment decay
    strategy_tau: float = 0.001  # fedadam/fedyogi/fedadagrad: adaptivity
    strategy_server_learning_rate: float = 1.0  # fedavgm
    strategy_server_momentum: float = 0.0  # fedavgm
    strategy_beta: float = 0.2  # fedtrimmedavg: fraction cut from each end
    strategy_num_malicious_nodes: int = 0  # krum
    train_rounds: int = 3
    train_local_epochs: int = 2
    train_batch_size: int = 16
    train_lr: float = 1e-3
    train_weight_decay: float = 1e-4
    train_objective: str = "supervised"
    train_seed: int = 0
    train_optimizer: str = "adamw"  # adamw | sgd
    train_update_dtype: str = "float32"  # float32 | float16: precision of the weights a site sends
    train_local_steps: int = 0  # > 0: this many optimiser steps per round instead of local-epochs
    model_name: str = "resnet_small"
    model_image_size: int = 128
    data_frame_policy: str = "mip"
    data_val_fraction: float = 0.15
    data_test_fraction: float = 0.25
    data_inputs: str = "auto"  # auto (images, or the table of a tabular site) | clinical (clin_* only)
    data_standardise: str = "federated"  # tabular features: federated (n/sum/sum of squares) | site
    eval_bootstrap: int = 500
    eval_hist_bins: int = 20
    eval_threshold: float = 0.5
    bias_alpha: float = 0.01
    bias_min_cramers_v: float = 0.2
    bias_max_auc_gap: float = 0.05  # pooled minus within-site AUC (and its 95% CI above 0)
    bias_min_i2: float = 0.5  # Cochran's Q p < bias.alpha and I^2 at least this: heterogeneity
    bias_min_site_accuracy: float = 0.8  # embedding identifies a site at least this well...
    bias_min_separability_excess: float = 0.1  # ...and this much better than it separates classes
    bias_max_cross_site_gap: float = 0.1  # own-site minus other-site AUC of the sites' models
    bias_embedding: bool = True  # sites send their embedding's moments (fedir.client.embedding)
    bias_cross_site: bool = False  # after the last round, send every site's model to every site to score (opt-in)
    bias_cross_site_max_sites: int = 16  # above this many sites the cross-site matrix is skipped
    bias_bootstrap: int = 200  # resamples of the bias intervals (pooled-vs-within gap, separability)
    validation_max_norm_ratio: float = 10.0  # reject updates this far above the others' median norm
    validation_min_accepted: int = 1  # fewer acceptable updates: the round leaves the model unchanged
    output_dir: str = "runs/flwr-run"
    monitor_tensorboard: str = ""  # TensorBoard log folder (relative: inside the run folder); "" = off
    monitor_mlflow: str = ""  # MLflow tracking URI, or a folder for DIR/mlflow.db; "" = off
    train_threshold: float = 0.95  # fixmatch: confidence a pseudo-label needs
    train_unlabelled_weight: float = 1.0  # fixmatch / mean_teacher: weight of the unlabelled loss
    train_unlabelled_ratio: int = 1  # unlabelled images per labelled image in a step (mu)
    train_ema_decay: float = 0.99  # mean_teacher: EMA decay of the teacher
    train_mixup_alpha: float = 0.0  # MixUp of the labelled batch, Beta(alpha, alpha); 0 = off
    train_fedbn: bool = False  # FedBN: normalisation layers stay at each site (fedir.client.kept_state)
    train_personalise: str = "none"  # none | intercept | finetune (fedir.models)
    train_smote: bool = False  # SMOTE on a tabular site's labelled training rows, at the site (fedir.client.smote)
    baseline_clinical: bool = False  # also run a clinical-only companion study (fedir.simulations.companion)
    baseline_clinical_steps: int = 50  # its local SGD steps per round (logistic regression on clin_*)
    baseline_clinical_lr: float = 0.05  # its SGD learning rate
    privacy_dp: str = "off"  # off | server-fixed | server-adaptive | client-fixed | client-adaptive (fedir.config)
    privacy_noise_multiplier: float = 0.1  # Gaussian noise std = this x clipping norm / sampled sites
    privacy_clipping_norm: float = 1.0  # L2 bound of a site's update (adaptive: the initial bound)
    privacy_target_quantile: float = 0.5  # adaptive: share of updates left unclipped
    privacy_clip_norm_lr: float = 0.2  # adaptive: learning rate of the clipping bound
    privacy_clipped_count_stddev: float = 0.0  # adaptive: noise on the clipped count; 0 = Flower's default (sites/20)

    def __post_init__(self) -> None:
        # DP modes and the settings they cannot serve are refused when the settings are
        # read (a scenario file, the run config), before any run starts.
        check_dp(self.privacy_dp, fedbn=self.train_fedbn, update_dtype=self.train_update_dtype,
                 arm=self.federation_arm)
        check_personalise(self.train_personalise, self.federation_arm)
        check_cross_site(self.bias_cross_site, self.privacy_dp)

    @staticmethod
    def key_of(field_name: str) -> str:
        """`train_local_epochs` -> `train.local-epochs`."""
        section, _, rest = field_name.partition("_")
        return f"{section}.{rest.replace('_', '-')}"

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> "Settings":
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
            values[f.name] = _coerce(key, value, type(getattr(cls(), f.name)))
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
    def spatial_dims(self) -> int:
        """3 when the frame policy keeps volumes ("volume"), else 2: what build_model needs."""
        return 3 if self.data_frame_policy == "volume" else 2

    @property
    def sites(self) -> list[str]:
        return [s for s in self.federation_sites.split(SITE_SEPARATOR) if s]


DP_MODES = ("off", "server-fixed", "server-adaptive", "client-fixed", "client-adaptive")
PERSONALISE = ("none", "intercept", "finetune")


def check_dp(mode: str, *, fedbn: bool, update_dtype: str, arm: str) -> None:
    """Refuse combinations Flower's DP clipping cannot serve, naming the setting.

    FedBN: the site's reply lacks the normalisation layers it was sent, and Flower's
    client mods refuse a reply whose array names differ from the message's. float16
    uploads: the update would be clipped in half precision. Local and pooled arms average
    nothing a DP guarantee would apply to.
    """
    if mode not in DP_MODES:
        raise SettingsError(f"privacy.dp = {mode!r} is not one of {', '.join(DP_MODES)}")
    if mode == "off":
        return
    if fedbn:
        raise SettingsError(f"privacy.dp = {mode!r} cannot be combined with train.fedbn = true")
    if update_dtype != "float32":
        raise SettingsError(f"privacy.dp = {mode!r} needs train.update-dtype = \"float32\"")
    if arm != "federated":
        raise SettingsError(f"privacy.dp = {mode!r} needs federation.arm = \"federated\"")


def check_cross_site(cross_site: bool, dp_mode: str) -> None:
    """Cross-site evaluation sends each site's own last update to every other site; under
    differential privacy those updates are at most clipped, never noised, so the two are
    not combined."""
    if cross_site and dp_mode != "off":
        raise SettingsError(
            f"bias.cross-site = true sends each site's un-noised update to every other site: "
            f"it cannot be combined with privacy.dp = {dp_mode!r} (set bias.cross-site = false)"
        )


def check_personalise(mode: str, arm: str) -> None:
    """`train.personalise`: a known value, and only for the federated arm (the local arm is
    already fully personal; the pooled arm has one model by definition)."""
    if mode not in PERSONALISE:
        raise SettingsError(f"train.personalise = {mode!r}: choose one of {', '.join(PERSONALISE)}")
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
