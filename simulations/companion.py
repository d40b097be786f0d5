"""The companion studies of an imaging federation: clinical-only (`baseline.clinical = true`)
and radiomics (`baseline.radiomics = true`).

The same sites, federation, strategy, rounds, seed and split fractions as the scenario,
so each site tests both models on the same patients; only what is learnt from differs:
the manifests' clin_* columns, one row per patient (`data.inputs = "clinical"`), with a
logistic regression trained by local SGD (`baseline.clinical-steps`,
`baseline.clinical-lr`). Image-only settings (semi-supervised objectives, FedBN,
personalisation, the imaging checkpoint of `model.init` and its freezing, monitoring
exports) are switched off: they have no meaning for the
clinical model, or would write into the imaging run's folders. The companion runs first,
into OUT/clinical-baseline/, so that the imaging run's summary and report, written at its
end, can show both (fedir.server.report.baseline).

The radiomics companion is the same study on each image's handcrafted features
(`data.inputs = "radiomics"`, fedir.client.radiomics: one row per image, a patient's score
the mean over their images), with `baseline.radiomics-steps` and `baseline.radiomics-lr`,
into OUT/radiomics-baseline/. Its features are extracted once per image and cached at the
site.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from fedir.client.manifest import manifest_columns
from fedir.client.tabular import CLINICAL_PREFIX
from fedir.config import Settings, SettingsError
from fedir.server.report.baseline import COMPANIONS


def clinical_settings(settings: Settings) -> Settings:
    """The companion study's settings, derived from the imaging scenario's."""
    return replace(
        settings,
        data_inputs="clinical",
        model_name="logreg",
        train_objective="supervised",
        train_optimizer="sgd",
        train_local_steps=settings.baseline_clinical_steps,
        train_lr=settings.baseline_clinical_lr,
        train_weight_decay=0.0,
        train_mixup_alpha=0.0,
        train_fedbn=False,
        train_personalise="none",
        model_init="",
        train_freeze="none",
        train_freeze_rounds=0,
        monitor_tensorboard="",
        monitor_mlflow="",
        baseline_clinical=False,
        baseline_radiomics=False,
    )


def radiomics_settings(settings: Settings) -> Settings:
    """The radiomics companion's settings: the clinical companion's, on the images' features."""
    return replace(clinical_settings(settings), data_inputs="radiomics",
                   train_local_steps=settings.baseline_radiomics_steps, train_lr=settings.baseline_radiomics_lr)


def check_clinical_columns(settings: Settings) -> None:
    """Every site's manifest must carry clin_* columns, or the companion has nothing to learn."""
    for site in settings.sites:
        if not any(col.startswith(CLINICAL_PREFIX) for col in manifest_columns(site)):
            raise SettingsError(f"baseline.clinical = true, but site {Path(site).name} has no clin_* columns")


def run_companion(settings: Settings, out_dir: Path, runner: Callable[[Settings, Path], object]) -> list[Path]:
    """Run each companion the settings ask for with `runner`, into OUT/clinical-baseline/ and
    OUT/radiomics-baseline/; returns their folders."""
    targets = []
    if settings.baseline_clinical:
        check_clinical_columns(settings)
        targets.append(Path(out_dir) / COMPANIONS["clinical"].folder)
        runner(clinical_settings(settings), targets[-1])
    if settings.baseline_radiomics:
        targets.append(Path(out_dir) / COMPANIONS["radiomics"].folder)
        runner(radiomics_settings(settings), targets[-1])
    return targets
