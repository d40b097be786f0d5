"""The sensitivity analysis of a fused model, at the site: how much each input carries.

A model that reads both the image and clinical covariates (`data.inputs = "image+clinical"`,
fedir.models.FusionNet) can score well on the covariates alone. The review the project
follows asks, for such a model, for each input to be changed in turn and the drop in
performance reported. On the site's test patients, against the unchanged model:

- each clinical variable is permuted across the test patients (a patient's images keep one
  value: the permutation is of patients), `repeats` times with seeded permutations; its
  drop is the mean over the repeats;
- the image is replaced by a blank one (zeros: the mean of a normalised image) and by a
  blurred one (MONAI's GaussianSmooth, sigma `blur` pixels: the vessel tree's outline
  stays, a focal stenosis does not).

The drop is the per-patient AUC of the unchanged model minus that of the changed input
(fedir.metrics.paired_auc_difference, a patient's score the mean over its images), with a
paired patient-bootstrap 95% CI and standard error: the same resampled patients score both.
What leaves the site is these aggregates per input (fedir.protocol.check_sensitivity): no
score, no permutation, no patient. Fewer than k test patients (the data card's k) or one
class only: nothing but the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedir.client.datacard import DEFAULT_K
from fedir.metrics import paired_auc_difference, patient_scores

BLANK, BLURRED, PERMUTED = "blank", "blurred", "permuted"
IMAGE_INPUT = "image"


def input_sensitivity(
    score: Callable[[torch.Tensor], np.ndarray],
    x: torch.Tensor,
    labels: np.ndarray,
    patients: Sequence[str],
    features: Sequence[str],
    image_shape: tuple[int, ...],
    *,
    repeats: int = 5,
    blur: float = 4.0,
    n_boot: int = 500,
    seed: int = 0,
    k: int = DEFAULT_K,
) -> dict:
    """The per-input AUC drops of a fused model on one site's test images.

    Args:
        score: fused rows -> each row's score (the positive-class probability), host (N,).
        x: the test images' fused rows, (N, P + F), clinical columns as the model sees them.
        labels, patients: per image (N,); the labels are per patient.
        features: the F clin_* names, in column order.
        image_shape: (1, S, S) or (1, S, S, S), how the P pixels unflatten.
        repeats: permutations per clinical variable (eval.sensitivity-repeats).
        blur: the Gaussian sigma of the blurred image, in pixels (eval.sensitivity-blur).
        n_boot, seed: the patient bootstrap (eval.bootstrap; the round's seed).
        k: the fewest test patients the analysis is reported for.

    Returns ``{"n_patients", "positives", "auc", "repeats", "blur", "inputs", "reason"}``,
    ``inputs`` one entry per change: ``{"input", "change", "auc", "drop", "drop_ci", "drop_se"}``.
    """
    y = np.asarray(labels).reshape(-1)
    ids = [str(p) for p in patients]
    out: dict = {"n_patients": len(set(ids)), "positives": 0, "auc": None, "repeats": int(repeats),
                 "blur": float(blur), "inputs": [], "reason": None}
    if out["n_patients"] < k:
        out["reason"] = f"fewer than {k} test patients"
        return out
    _, patient_y, base = patient_scores(y, score(x), ids)
    out["positives"] = int(patient_y.sum())
    if out["positives"] in (0, out["n_patients"]):
        out["reason"] = "one class only among the test patients"
        return out
    pixels = int(np.prod(image_shape))
    rng = np.random.default_rng(seed)
    changes: list[tuple[str, str, np.ndarray]] = []
    for j, name in enumerate(features):
        column = pixels + j
        runs = [patient_scores(y, score(_permuted(x, column, ids, rng)), ids)[2] for _ in range(repeats)]
        changes.append((name, PERMUTED, np.stack(runs)))
    blank = x.clone()
    blank[:, :pixels] = 0.0
    changes.append((IMAGE_INPUT, BLANK, patient_scores(y, score(blank), ids)[2]))
    changes.append((IMAGE_INPUT, BLURRED, patient_scores(y, score(_blurred(x, pixels, image_shape, blur)), ids)[2]))
    for name, change, scores in changes:
        d = paired_auc_difference(patient_y, base, scores, n_boot=n_boot, seed=seed)
        out["auc"] = d["auc_a"]
        out["inputs"].append({"input": name, "change": change, "auc": d["auc_b"], "drop": d["difference"],
                              "drop_ci": d["difference_ci"], "drop_se": d["difference_se"]})
    return out


def _permuted(x: torch.Tensor, column: int, patients: Sequence[str], rng: np.random.Generator) -> torch.Tensor:
    """`x` with column `column` permuted across patients: every image of patient i takes the
    value of the patient the permutation gives i (a patient's images share their covariates)."""
    names = sorted(set(patients))
    first = {p: i for i, p in reversed(list(enumerate(patients)))}
    values = x[[first[p] for p in names], column]
    given = dict(zip(names, values[torch.from_numpy(rng.permutation(len(names)))].tolist()))
    out = x.clone()
    out[:, column] = torch.tensor([given[p] for p in patients], dtype=x.dtype)
    return out


def _blurred(x: torch.Tensor, pixels: int, image_shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    """`x` with every image smoothed by MONAI's GaussianSmooth (each image one channel)."""
    from monai.transforms import GaussianSmooth  # an imaging site has MONAI; importing it costs seconds

    images = x[:, :pixels].reshape(x.shape[0], *image_shape[1:])  # (N, *spatial): N channels
    smooth = torch.as_tensor(GaussianSmooth(sigma=sigma)(images)).reshape(x.shape[0], pixels)
    out = x.clone()
    out[:, :pixels] = smooth.to(x.dtype)
    return out
