"""What a site of a pretraining study (`train.objective = simclr`) reports at evaluation.

A pretraining study trains no classifier, so a site has nothing to score with labels: its
classification metric set is sent empty (no rows scored; each metric "not computed", with
NOT_SCORED as the reason). Instead each site reports, for its validation and its test
images (every image of the split, labelled or not), how well the global encoder solves the
pretraining task itself:

- `contrastive_loss`: the NT-Xent loss (MONAI's ContrastiveLoss, the training loss) of two
  seeded strong views of every image, in batches of EVAL_BATCH images, averaged over the
  images;
- `contrastive_chance`: the same loss for embeddings that tell nothing apart, log(2B - 1)
  averaged alike (every view equally similar to the 2B - 1 others), so a reader sees how
  far below chance the encoder is;
- `view_match`: the share of views whose most similar other view (cosine, among the
  batch's 2B - 1) is its partner: 1 / (2B - 1) by chance.

The views are drawn from a generator seeded by the round's seed, so every round scores the
same views and the numbers are comparable across rounds. Only these aggregates and the
embedding's moments (fedir.client.embedding, over the same test images) leave the site.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedir.client.objectives import SimCLR
from fedir.client.training import autocast, to_device

EVAL_BATCH = 64  # images per batch of the evaluation loss: its negatives are the batch's other views
NOT_SCORED = "a pretraining study (train.objective = simclr) trains no classifier: see pretraining"


@torch.no_grad()
def pretraining_metrics(model: nn.Module, images: torch.Tensor, device: torch.device,
                        objective: SimCLR, batch_size: int = EVAL_BATCH) -> dict[str, float | int | None]:
    """{"n_images", "contrastive_loss", "contrastive_chance", "view_match"} of the model on
    (N, 1, H, W) `images` (None for each value when N < 2: a pair needs a negative).
    `objective` supplies the views (its seeded generator) and the loss."""
    n = int(images.shape[0])
    out: dict[str, float | int | None] = {"n_images": n, "contrastive_loss": None, "contrastive_chance": None,
                                          "view_match": None}
    if n < 2:
        return out
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(objective.params.seed)
    loss = chance = matched = 0.0
    counted = 0
    for start in range(0, n, batch_size):
        batch = to_device(images[start:start + batch_size], device)
        b = int(batch.shape[0])
        if b < 2:  # a lone last image has no negative: it is not scored
            continue
        a, v = objective.views(batch, generator)
        with autocast(device):
            z_a, z_b = objective.pair_projections(model, a, v)
        loss += float(objective.criterion(z_a, z_b)) * b
        chance += math.log(2 * b - 1) * b
        matched += _matched(z_a, z_b)
        counted += b
    out.update(contrastive_loss=loss / counted, contrastive_chance=chance / counted,
               view_match=matched / (2 * counted))
    return out


def _matched(z_a: torch.Tensor, z_b: torch.Tensor) -> int:
    """How many of the 2B views have their partner as their most similar other view."""
    z = F.normalize(torch.cat([z_a, z_b]), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)
    b = z_a.shape[0]
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return int((sim.argmax(dim=1) == partner).sum())
