"""Summary statistics of a model's embedding at a site: the input to the site-identifiability check.

The server wants to know whether the model's penultimate-layer features (a segmentation
network's: its encoder bottleneck, global-average-pooled) separate the hospitals better
than they separate the classes (a segmentation image's class: whether its reference mask
holds a stenosis, `embedding_groups`). No embedding of any patient may leave a
site, so each site sends, per class and overall, only the count, the mean and the
covariance of its test images' features: a few summary matrices. A group with fewer than
`min_count` images sends nothing (count 0 and zeros), as the data card suppresses small
cells.

Wide embeddings (DenseNet121: 1,024 features) are first projected onto a fixed random
orthonormal basis of `MAX_DIM` directions (Johnson-Lindenstrauss: distances are kept up
to a small distortion). Every site draws the same basis from the same seed, so the
server can compare their moments, and a 64 x 64 covariance is what a site sends instead
of a 1,024 x 1,024 one.

Shapes: features (N, D) -> counts (C + 1,), means (C + 1, d), covs (C + 1, d, d) with
d = min(D, MAX_DIM); row c is class c, the last row is all labelled images together.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fedir.client.training import autocast, positive_probability, to_device
from fedir.models import head_name
from fedir.protocol import EmbeddingMoments
from fedir.tasks.segmentation_metrics import FOREGROUND

MAX_DIM = 64
PROJECTION_SEED = 20_240_101  # fixed: every site must draw the same basis
MIN_COUNT = 5


def last_linear(model: nn.Module) -> nn.Linear:
    """The classifier head (fedir.models.head_name: the last `nn.Linear` outside a SimCLR
    projection head); its input is the embedding."""
    try:
        head = dict(model.named_modules())[head_name(model)]
    except ValueError:
        raise ValueError(f"{type(model).__name__} has no linear layer whose input could be the embedding") from None
    assert isinstance(head, nn.Linear)
    return head


def _capture(model: nn.Module, captured: list[torch.Tensor]):
    """Hook where the embedding is read: a MONAI BasicUNet's bottleneck (the output of
    `down_4`, the encoder's deepest level, averaged over space: (B, C, H, W) -> (B, C)), else
    the input of the last linear layer. Returns the hook's handle and the embedding's width."""
    from monai.networks.nets import BasicUNet

    if isinstance(model, BasicUNet):
        width = int(model.down_4.convs.conv_1.conv.out_channels)
        return model.down_4.register_forward_hook(
            lambda _m, _args, out: captured.append(out.float().flatten(2).mean(dim=2))), width
    head = last_linear(model)
    return head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float())), head.in_features


def embedding_groups(kind: str, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, int]:
    """The class of each scored image for the moments, and the number of classes: a
    classification's labels; for segmentation ((N, 1, H, W) reference label maps) 1 where
    the reference outlines a stenosis (fedir.tasks.segmentation_metrics.FOREGROUND's last
    class) and 0 where it does not, so that sites are compared among images of the same kind."""
    if kind == "segmentation":
        stenosis = max(FOREGROUND)
        return (np.asarray(labels).reshape(len(labels), -1) == stenosis).any(axis=1).astype(np.int64), 2
    return np.asarray(labels), num_classes


@torch.no_grad()
def predict_with_embedding(
    model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 128,
    score: Callable[[torch.Tensor], torch.Tensor] = positive_probability,
) -> tuple[np.ndarray, np.ndarray]:
    """`score` of the outputs (the positive-class probability; a task's own, fedir.tasks: the
    (N, K) probabilities for K > 2) and penultimate features of every input, in one pass.

    The features are what the last linear layer receives (a forward pre-hook), so this
    works for MONAI's ResNet and DenseNet, an MLP, and logistic regression (whose
    "embedding" is its standardised input); for a BasicUNet, its pooled bottleneck
    (`_capture`). Returns host arrays: the scores ((N,), or the task's shape) and (N, D).
    """
    captured: list[torch.Tensor] = []
    hook, width = _capture(model, captured)
    model.to(device).eval()
    scores = []
    try:
        for start in range(0, x.shape[0], batch_size):
            batch = to_device(x[start : start + batch_size], device)
            with autocast(device):
                logits = model(batch)
            scores.append(score(logits))
    finally:
        hook.remove()
    if not scores:
        return np.zeros(0, dtype=np.float32), np.zeros((0, width), dtype=np.float32)
    return torch.cat(scores).cpu().numpy(), torch.cat(captured).flatten(1).cpu().numpy()


def projection(width: int, max_dim: int = MAX_DIM) -> np.ndarray | None:
    """The shared (width, max_dim) orthonormal basis, or None when no projection is needed."""
    if width <= max_dim:
        return None
    rng = np.random.default_rng(PROJECTION_SEED + width)
    q, _ = np.linalg.qr(rng.standard_normal((width, max_dim)))
    return q


def embedding_moments(
    features: np.ndarray, labels: np.ndarray, num_classes: int, min_count: int = MIN_COUNT
) -> EmbeddingMoments:
    """Per-class and overall count / mean / covariance (ddof 1) of the projected features.

    Groups with fewer than `min_count` images are suppressed: count 0, zero mean and
    covariance. `min_count` is at least 2 (a covariance needs two images).
    """
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features {features.shape} and labels {labels.shape} do not match")
    min_count = max(int(min_count), 2)
    basis = projection(features.shape[1])
    z = features.astype(np.float64) if basis is None else features.astype(np.float64) @ basis
    d = z.shape[1]
    groups = [labels == c for c in range(num_classes)] + [np.ones(len(labels), dtype=bool)]
    counts = np.zeros(len(groups), dtype=np.int64)
    means = np.zeros((len(groups), d))
    covs = np.zeros((len(groups), d, d))
    for g, mask in enumerate(groups):
        n = int(mask.sum())
        if n < min_count:
            continue
        counts[g] = n
        means[g] = z[mask].mean(axis=0)
        covs[g] = np.cov(z[mask], rowvar=False, ddof=1).reshape(d, d)
    return EmbeddingMoments(counts, means, covs)
