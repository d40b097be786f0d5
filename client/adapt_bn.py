"""AdaBN before scoring (`eval.adapt-bn`, always under FedBN): a site re-estimates the model's BatchNorm statistics.

A BatchNorm layer normalises with running statistics learnt in training. After FedAvg they
are an average over sites; a site whose scanner shifts the activations then sees its
scores shifted as a whole (both classes high, or both low).

Under FedBN (`train.fedbn`) the statistics a site keeps (fedir.client.kept_state) were
accumulated under its own local weights at the end of its last round, but it scores with
the aggregated weights it has just received: every convolution before a BatchNorm layer
has changed, so the kept mean and variance no longer describe the activations they
normalise. The error is each site's own (its local drift), and it grows as the sites'
local models drift apart, which is why FedBN showed larger per-site offsets than FedAvg
(site mean scores near 0 at some sites and near 1 at others, both classes alike;
benchmarks/README.md, "Site-specific normalisation"). Re-estimating them at the end of
local training does not help: they would still be the local weights' statistics. The
statistics that fit are those of the weights the site scores with, on the site's own
images, so under FedBN they are always re-estimated here; the learnt normalisation
weights and biases stay the site's own, as FedBN intends. AdaBN (Li et al. 2016, "Revisiting batch
normalization for practical domain adaptation") replaces every BatchNorm layer's running
mean and variance by those of the site's own training images under the weights it scores
with. It reads images only, never labels (unlabelled images count as much as labelled
ones), and it changes only the copy the site scores: nothing of it is sent.

The statistics are a cumulative average over batches of the training batch size
(`momentum = None`, PyTorch's cumulative moving average), in a fixed order, so the same
model and site always give the same statistics. Only the BatchNorm layers are put in
train mode; everything else (dropout included) stays in eval mode.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedir.client.inputs import SiteView
from fedir.client.training import pick_device, to_device
from fedir.config import Settings


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer (1d, 2d, 3d, sync) of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@torch.no_grad()
def recompute_bn(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> nn.Module:
    """Replace every BatchNorm layer's running statistics, in place, by the cumulative
    average of its batch statistics over `images` (in order, `batch_size` at a time).

    A model without BatchNorm, or no images, is returned unchanged. Each layer's momentum is
    put back afterwards, so a model that trains again keeps its usual update.
    """
    layers = batchnorm_layers(model)
    if not layers or images.shape[0] == 0:
        return model
    model.to(device).eval()
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
        m.train()
    try:
        for batch in _batches(images, batch_size):
            model(to_device(batch, device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.eval()
    return model


def _batches(images: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """`images` in order, `batch_size` at a time; a last batch of one image joins the one
    before, since a BatchNorm layer whose output is 1x1 cannot take a batch of one in train mode."""
    batches = list(images.split(batch_size))
    if len(batches) > 1 and batches[-1].shape[0] == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


def adapted(model: nn.Module, settings: Settings, site: SiteView) -> nn.Module:
    """The model this site scores: under `eval.adapt-bn` or `train.fedbn`, its BatchNorm
    statistics re-estimated on the site's own training images (labelled and unlabelled,
    labels unused); else as received. Tabular models have no BatchNorm: unchanged."""
    if not (settings.eval_adapt_bn or settings.train_fedbn):
        return model
    return recompute_bn(model, site.train_x, settings.train_batch_size, pick_device())
