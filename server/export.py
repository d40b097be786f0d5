"""Per-round metrics copied to TensorBoard and/or MLflow, so a research group's usual tools show the run.

runs.sqlite stays the source of truth; this is a one-way copy written as each round is
recorded. Both exports use the same names, grouped by metric so each tool draws one chart
per metric with a line per site: ``auc/site-0`` ... ``auc/global``, their 95% CIs as
``auc_ci_low/<site>`` and ``auc_ci_high/<site>``, ``train_loss/<site>``, and ``bias/alarm``
(1 when the verdict alarms; left out when it is null, as when no round was analysed). A
survival or segmentation study exports its own metrics the same way (``c_index/<site>``,
``dice/<site>``, ``hd95/<site>``: fedir.tasks' SUMMARY_METRICS). The step is the round. A metric that could not be computed
is left out (its reason is in runs.sqlite), never exported as a number.

``[monitor] tensorboard = "DIR"`` writes event files under ``DIR/<run id>/``; ``[monitor]
mlflow = "URI or DIR"`` logs one MLflow run (named by the run id, in experiment "fedir") to
a tracking URI (``http://...``, ``sqlite:///...``) or, for a plain folder, to
``DIR/mlflow.db``. A relative DIR is inside the run folder.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fedir.config import Settings, SettingsError
from fedir.server.runstore import GLOBAL_SITE
from fedir.tasks import KINDS

MLFLOW_EXPERIMENT = "fedir"


class RoundExport(Protocol):
    """Where StudyRecorder copies each round's numbers."""

    def write(self, server_round: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def training_scalars(per_site: Mapping[str, dict]) -> dict[str, float]:
    """``{"train_loss/<site>": loss}`` of one round's training replies."""
    return {f"train_loss/{site}": float(values["train_loss"]) for site, values in per_site.items()
            if isinstance(values.get("train_loss"), (int, float))}


# every task kind's scalar metrics, in order: a site's entry holds only its own kind's
EXPORTED_METRICS = tuple(dict.fromkeys(m for task in KINDS.values() for m in task.SUMMARY_METRICS))


def evaluation_scalars(per_site: Mapping[str, dict], pooled: dict | None, alarm: bool | None) -> dict[str, float]:
    """Every site's and the pooled rate metrics with CI bounds, and the alarm (see the module docstring)."""
    scalars: dict[str, float] = {}
    entries = {**per_site, **({GLOBAL_SITE: pooled} if pooled else {})}
    for site, values in entries.items():
        for metric in EXPORTED_METRICS:
            if values.get(metric) is None:
                continue
            scalars[f"{metric}/{site}"] = float(values[metric])
            ci = values.get(metric + "_ci")
            if ci and None not in ci:
                scalars[f"{metric}_ci_low/{site}"] = float(ci[0])
                scalars[f"{metric}_ci_high/{site}"] = float(ci[1])
    if alarm is not None:
        scalars["bias/alarm"] = float(alarm)
    return scalars


class TensorBoardExport:
    """Event files for TensorBoard, one sub-folder per run."""

    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SettingsError("monitor.tensorboard needs the tensorboard package:"
                                " pip install 'fedir[monitor]'") from None
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, server_round: int, scalars: Mapping[str, float]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, server_round)
        self._writer.flush()  # a TensorBoard watching the run sees each round as it ends

    def close(self) -> None:
        self._writer.close()


class MlflowExport:
    """One MLflow run per fedir run, with the run's settings as parameters."""

    def __init__(self, tracking_uri: str, run_id: str, settings: Settings) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise SettingsError("monitor.mlflow needs MLflow: pip install 'fedir[monitor]'") from None
        from mlflow.entities import Param

        self._client = MlflowClient(tracking_uri=tracking_uri)
        experiment = self._client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(MLFLOW_EXPERIMENT)
        self.run_id = self._client.create_run(experiment_id, run_name=run_id).info.run_id
        params = [Param(key, str(value)[:500]) for key, value in settings.to_run_config().items()]
        self._client.log_batch(self.run_id, params=params)

    def write(self, server_round: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_name(tag), value, now, server_round) for tag, value in scalars.items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _mlflow_name(tag: str) -> str:
    """MLflow accepts letters, digits, ``_ - . / :`` and spaces in a metric name; a site folder may hold more."""
    return re.sub(r"[^\w\-./: ]", "_", tag)


def mlflow_uri(target: str, run_dir: Path) -> str:
    """A tracking URI as given, or ``sqlite:///FOLDER/mlflow.db`` for a folder (relative to the run folder)."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) and not re.match(r"^[A-Za-z]:[\\/]", target):
        return target
    folder = Path(target) if Path(target).is_absolute() else run_dir / target
    folder.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str((folder / "mlflow.db").resolve())


def open_exports(settings: Settings, run_dir: Path, run_id: str) -> list[RoundExport]:
    """The exports the settings ask for (``monitor.tensorboard``, ``monitor.mlflow``); none by default."""
    exports: list[RoundExport] = []
    if settings.monitor_tensorboard:
        log_dir = Path(settings.monitor_tensorboard)
        exports.append(TensorBoardExport((log_dir if log_dir.is_absolute() else run_dir / log_dir) / run_id))
    if settings.monitor_mlflow:
        exports.append(MlflowExport(mlflow_uri(settings.monitor_mlflow, run_dir), run_id, settings))
    return exports
