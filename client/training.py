"""Local training and scoring at a site: the device, the training loop, predictions.

Data never enters this module as files: it receives tensors that the site reader already
decoded, so everything here is the same for every data source.

GPU when there is one: the site's tensors go to the device once per round (pinned,
non-blocking), batches are indexed on the device, autocast runs in bfloat16, and the
loss is accumulated on the device so the loop never waits for the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedir.client.objectives import Objective
from fedir.models import encoder_names, encoder_norm_layers


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaler needed); a no-op on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to the device through pinned memory, without blocking."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass(frozen=True)
class TrainConfig:
    """Local training knobs, sent by the server each round."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    optimizer: str = "adamw"  # adamw | sgd
    steps: int = 0  # > 0: exactly this many steps (cycling over the data), epochs ignored
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 added to every step's loss
    unlabelled_ratio: int = 1  # unlabelled images per labelled image in a step (FixMatch's mu)
    freeze_encoder: bool = False  # train.freeze: only the head trains; the encoder is left as received


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean objective value over the steps
    steps: int
    n_labelled: int
    n_unlabelled: int
    n_trained: int = -1  # the rows the steps drew from: the update's weight (-1: n_labelled)

    @property
    def weight(self) -> int:
        """The update's weight in the federation's average: the rows it was trained on."""
        return self.n_labelled if self.n_trained < 0 else self.n_trained


def _batches(n: int, batch_size: int, generator: torch.Generator,
             groups: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """One pass over n rows in shuffled batches; with `groups` ((n,) int), every batch
    holds rows of one group (a pooled node's site: fedir.client.arms.row_sites), each
    group cut into batches on its own and the batches of every group shuffled together."""
    if groups is None:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]
        return
    batches: list[torch.Tensor] = []
    for group in torch.unique(groups):
        members = torch.nonzero(groups == group).flatten()
        batches.extend(members[torch.randperm(len(members), generator=generator)].split(batch_size))
    for i in torch.randperm(len(batches), generator=generator):
        yield batches[int(i)]


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    objective: Objective,
    config: TrainConfig,
    device: torch.device,
    unlabelled: torch.Tensor | None = None,
    sites: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> TrainResult:
    """Train in place on a site's training split; labels of -1 are unlabelled images. A
    target with columns, (N, 2) [time, event] for survival or (N, 1, S, S) label maps for
    segmentation (fedir.tasks), labels every row; a segmentation site's unlabelled frames
    come as `unlabelled` (fedir.client.arms.unlabelled_rows), images only.

    One epoch is one pass over the labelled images; each step also draws
    `unlabelled_ratio` x the batch size of unlabelled images for an objective that uses
    them, and calls the objective's `after_step` after the optimiser step. A site
    with no labelled image does not step and reports zero steps. A `label_free`
    objective (SimCLR) reads no label: an epoch is one pass over every image, labelled or
    not, and the result's `n_trained` counts them all.

    With `freeze_encoder` (train.freeze, fedir.client.local_training.round_recipe) the
    encoder's parameters (fedir.models.encoder_names) get no gradient and are not in the
    optimiser, and its normalisation layers run in eval mode: weights and BatchNorm
    statistics both stay as received, so the encoder a site returns is the one it was sent.

    `sites` (fedir.client.arms.row_sites: the site of every row of `images` and of
    `unlabelled`) makes every step one site's: its labelled batch and its unlabelled draw.
    """
    if objective.uses_unlabelled and images.dim() == 5:
        raise ValueError(f"objective {getattr(objective, 'name', objective)!r}: its augmentations are 2D; "
                         "train 3D volumes with objective = supervised")
    label_free = getattr(objective, "label_free", False)
    labelled = labels >= 0 if labels.dim() == 1 else torch.ones(labels.shape[0], dtype=torch.bool)
    # what the site reports, whatever trains (segmentation's unlabelled frames come apart)
    counted = int(labelled.sum()), int((~labelled).sum()) if unlabelled is None else int(unlabelled.shape[0])
    if label_free:
        labelled = torch.ones(labels.shape[0], dtype=torch.bool)
    x_lab = to_device(images[labelled], device)
    y_lab = to_device(labels[labelled], device)
    x_unl = to_device(images[~labelled] if unlabelled is None else unlabelled, device)
    n_lab, n_unl = int(x_lab.shape[0]), int(x_unl.shape[0])
    groups = _site_groups(sites, labelled, unlabelled is None)
    model.to(device).train()
    if n_lab == 0:
        return TrainResult(loss=float("nan"), steps=0, n_labelled=counted[0], n_unlabelled=counted[1], n_trained=0)
    if config.freeze_encoder:
        frozen = encoder_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
        for layer in encoder_norm_layers(model):
            layer.eval()
    opt = _optimizer(model, config)
    anchor = [p.detach().clone() for p in model.parameters()] if config.proximal_mu > 0 else []
    gen = torch.Generator().manual_seed(config.seed)
    total = torch.zeros((), device=device)
    steps = 0
    for idx in _schedule(n_lab, config, gen, None if groups is None else groups[0]):
        pool = None if groups is None else groups[1][int(groups[0][idx[0]])]
        idx = idx.to(device)
        unl = None
        if pool is not None:
            if len(pool) and objective.uses_unlabelled:
                draw = pool[torch.randint(len(pool), (config.unlabelled_ratio * len(idx),), generator=gen)]
                unl = x_unl[draw.to(device)]
        elif n_unl and objective.uses_unlabelled:
            draw = torch.randint(n_unl, (config.unlabelled_ratio * len(idx),), generator=gen)
            unl = x_unl[draw.to(device)]
        with autocast(device):
            loss = objective.loss(model, x_lab[idx], y_lab[idx], unl)
        if anchor:
            loss = loss + proximal_term(model, anchor, config.proximal_mu)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        objective.after_step(model)
        total += loss.detach().float()
        steps += 1
    return TrainResult(loss=float(total) / steps, steps=steps, n_labelled=counted[0], n_unlabelled=counted[1],
                       n_trained=n_lab)


# `train.optimizer` (fedir.config.Optimizer, checked when the settings are read) -> torch's class
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Over the trainable parameters only: weight decay must not shrink a frozen encoder."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return OPTIMIZERS[config.optimizer](trainable, lr=config.lr, weight_decay=config.weight_decay)


def _site_groups(sites: tuple[torch.Tensor, torch.Tensor | None] | None, labelled: torch.Tensor,
                 unlabelled_in_images: bool) -> tuple[torch.Tensor, dict[int, torch.Tensor]] | None:
    """(the site of each labelled row, each site's unlabelled row indices) from `sites`,
    the site of every row of train's `images` and `unlabelled`; None without."""
    if sites is None:
        return None
    row_sites, unlabelled_sites = sites
    unl = row_sites[~labelled] if unlabelled_in_images else unlabelled_sites
    if unl is None:
        raise ValueError("sites: separate unlabelled images need the site of each (its second tensor)")
    lab = row_sites[labelled]
    return lab, {int(s): torch.nonzero(unl == s).flatten() for s in torch.unique(lab)}


def _schedule(n: int, config: TrainConfig, generator: torch.Generator,
              groups: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Batches of indices: `epochs` passes, or exactly `steps` batches when steps > 0
    (a fresh shuffle each time the data runs out), FLamby's "local updates" budget;
    each batch within one of `groups` when given (_batches)."""
    if config.steps <= 0:
        for _ in range(config.epochs):
            yield from _batches(n, config.batch_size, generator, groups)
        return
    done = 0
    while True:
        for idx in _batches(n, config.batch_size, generator, groups):
            yield idx
            done += 1
            if done == config.steps:
                return


def proximal_term(model: nn.Module, anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020): mu/2 times the squared distance to the round's global weights."""
    return 0.5 * mu * sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits -> (B,) probability of class 1: the classification score."""
    return torch.softmax(logits.float(), dim=1)[:, 1]


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 128,
    score: Callable[[torch.Tensor], torch.Tensor] = positive_probability,
) -> np.ndarray:
    """Every input's score (`score` of the model's outputs: the positive-class probability,
    or a task's own, fedir.tasks: a survival model's risk), as a host numpy array."""
    model.to(device).eval()
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = to_device(images[start : start + batch_size], device)
        with autocast(device):
            logits = model(x)
        out.append(score(logits))
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).cpu().numpy()
