"""The model and the local training loop on CPU."""

import numpy as np
import pytest
import torch

from fedir.client.objectives import build_objective
from fedir.client.training import TrainConfig, pick_device, predict, train
from fedir.models import MODEL_NAMES, build_model


def _toy(n=64, size=32, seed=0):
    """A separable toy task: positives carry a bright square."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g) * 0.3
    y = torch.arange(n) % 2
    x[y == 1, :, 8:16, 8:16] += 2.0
    return x, y


def test_training_learns_a_separable_task_and_ignores_unlabelled():
    x, y = _toy()
    labels = y.clone()
    labels[::4] = -1  # a quarter unlabelled
    model = build_model("resnet_small")
    result = train(model, x, labels, build_objective("supervised"),
                   TrainConfig(epochs=8, batch_size=16, lr=3e-3), torch.device("cpu"))
    assert result.n_labelled == int((labels >= 0).sum()) and result.n_unlabelled == 16
    assert result.steps == 8 * 3
    scores = predict(model, x, torch.device("cpu"))
    assert scores.shape == (64,) and np.all((scores >= 0) & (scores <= 1))
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(y.numpy(), scores) > 0.9


def test_site_without_labels_does_not_step():
    x, _ = _toy(8)
    model = build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, x, torch.full((8,), -1), build_objective("supervised"), TrainConfig(), torch.device("cpu"))
    assert result.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_models_build_and_unknown_names_are_refused():
    for name in MODEL_NAMES[:2]:
        out = build_model(name)(torch.zeros(2, 1, 32, 32))
        assert out.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("vgg")
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("magic")


def test_device_is_cpu_here_or_cuda_when_present():
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_same_seed_same_initial_weights():
    a, b = build_model(seed=3).state_dict(), build_model(seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
