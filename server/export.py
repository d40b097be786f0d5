"""Per-round metrics copied to TensorBoard, so a research group's usual tool shows the run too.

runs.sqlite stays the source of truth; this is a one-way copy written as each round is
recorded. Tags group by metric so TensorBoard draws one chart per metric with a line per
site: ``auc/site-0`` ... ``auc/global``, their 95% CIs as ``auc_ci_low/<site>`` and
``auc_ci_high/<site>``, ``train_loss/<site>``, and ``bias/alarm`` (1 when the verdict
alarms). The step is the round. Each run writes into its own sub-folder (its run id), so
several runs logged to one folder appear as separate runs in TensorBoard.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from fedir.config import Settings, SettingsError
from fedir.server.runstore import GLOBAL_SITE
from fedir.server.summary import RATE_METRICS


class TensorBoardExport:
    """Writes one run's per-site and pooled metrics as TensorBoard scalars (see the module docstring)."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SettingsError("monitor.tensorboard needs the tensorboard package:"
                                " pip install 'fedir[monitor]'") from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def training(self, server_round: int, per_site: Mapping[str, dict]) -> None:
        for site, values in per_site.items():
            if isinstance(values.get("train_loss"), (int, float)):
                self._writer.add_scalar(f"train_loss/{site}", values["train_loss"], server_round)
        self._writer.flush()

    def evaluation(self, server_round: int, per_site: Mapping[str, dict], pooled: dict | None,
                   alarm: bool) -> None:
        entries = {**per_site, **({GLOBAL_SITE: pooled} if pooled else {})}
        for site, values in entries.items():
            for metric in RATE_METRICS:
                if values.get(metric) is None:  # not computable: the reason is in runs.sqlite
                    continue
                self._writer.add_scalar(f"{metric}/{site}", values[metric], server_round)
                ci = values.get(metric + "_ci")
                if ci and None not in ci:
                    self._writer.add_scalar(f"{metric}_ci_low/{site}", ci[0], server_round)
                    self._writer.add_scalar(f"{metric}_ci_high/{site}", ci[1], server_round)
        self._writer.add_scalar("bias/alarm", int(alarm), server_round)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_export(settings: Settings, run_dir: Path, run_id: str) -> TensorBoardExport | None:
    """The export the settings ask for (``monitor.tensorboard``), or None when none is set."""
    if not settings.monitor_tensorboard:
        return None
    log_dir = Path(settings.monitor_tensorboard)
    if not log_dir.is_absolute():
        log_dir = run_dir / log_dir
    return TensorBoardExport(log_dir / run_id)
