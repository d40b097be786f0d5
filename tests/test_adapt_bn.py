"""AdaBN before scoring (fedir.client.adapt_bn): BatchNorm statistics from the site's own training images."""

import torch
from torch import nn

from fedir.client.adapt_bn import adapted, recompute_bn
from fedir.client.inputs import SiteView
from fedir.config import Settings
from fedir.models import build_model

CPU = torch.device("cpu")


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(n, 1, 8, 8, generator=g)


def _view(images: torch.Tensor, labels: torch.Tensor) -> SiteView:
    return SiteView(name="site-0", tabular=False, train_x=images, train_y=labels, test_x=images[:2],
                    test_y=labels[:2], test_patients=["a", "b"], val_x=images[:2], val_y=labels[:2],
                    val_patients=["a", "b"], label_counts={})


def test_one_batch_gives_the_batch_statistics_of_the_training_images():
    model, x = _tiny(), _images()
    with torch.no_grad():  # stale statistics that the adaptation must replace, not blend with
        model[0].running_mean.fill_(-7.0)
        model[0].running_var.fill_(50.0)
    recompute_bn(model, x, batch_size=len(x), device=CPU)
    assert torch.allclose(model[0].running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(model[0].running_var, x.var(dim=(0, 2, 3), unbiased=True), atol=1e-4)
    # the second layer's statistics are those of the first conv's outputs, normalised by the new first layer
    with torch.no_grad():
        h = model[1]((x - x.mean()) / torch.sqrt(x.var(unbiased=False) + model[0].eps) * model[0].weight + model[0].bias)
    assert torch.allclose(model[2].running_mean, h.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model[2].running_var, h.var(dim=(0, 2, 3), unbiased=True), atol=1e-3)
    assert model[0].momentum == 0.1 and not model.training  # momentum put back, ready to score


def test_several_batches_give_the_cumulative_average_of_their_statistics():
    model, x = _tiny(), _images(12)
    recompute_bn(model, x, batch_size=4, device=CPU)
    batches = x.split(4)
    mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches]).mean(0)
    assert torch.allclose(model[0].running_mean, mean, atol=1e-5)
    assert torch.allclose(model[0].running_var, var, atol=1e-4)
    assert int(model[0].num_batches_tracked) == 3


def test_labels_are_never_read_and_the_result_is_deterministic():
    x = _images(10)
    settings = Settings(eval_adapt_bn=True, train_batch_size=4)
    unlabelled = adapted(_tiny(), settings, _view(x, torch.full((10,), -1)))
    labelled = adapted(_tiny(), settings, _view(x, torch.arange(10) % 2))
    for a, b in zip(unlabelled.state_dict().values(), labelled.state_dict().values()):
        assert torch.equal(a, b)
    # the weights are untouched; only the statistics move
    assert torch.equal(unlabelled[1].weight, _tiny()[1].weight)
    assert not torch.equal(unlabelled[2].running_mean, _tiny()[2].running_mean)


def test_off_by_setting_and_a_no_op_without_batchnorm():
    x = _images(6)
    off = adapted(_tiny(), Settings(eval_adapt_bn=False), _view(x, torch.zeros(6, dtype=torch.long)))
    assert torch.equal(off[0].running_mean, torch.zeros(1))
    linear = build_model("logreg", n_features=3)
    before = {k: v.clone() for k, v in linear.state_dict().items()}
    rows = SiteView(name="t", tabular=True, train_x=torch.randn(5, 3), train_y=torch.zeros(5, dtype=torch.long),
                    test_x=torch.randn(2, 3), test_y=torch.zeros(2, dtype=torch.long), test_patients=["a", "b"],
                    val_x=torch.randn(2, 3), val_y=torch.zeros(2, dtype=torch.long), val_patients=["c", "d"],
                    label_counts={})
    after = adapted(linear, Settings(eval_adapt_bn=True), rows)
    assert all(torch.equal(before[k], v) for k, v in after.state_dict().items())


def test_resnet_stem_statistics_are_those_of_its_first_convolution():
    """On the real network (MONAI ResNet): bn1 ends with the statistics of conv1's outputs."""
    model = build_model("resnet_small")
    x = _images(8)
    recompute_bn(model, x, batch_size=8, device=CPU)
    with torch.no_grad():
        stem = model.conv1(x)
    assert torch.allclose(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-4)
    assert torch.allclose(model.bn1.running_var, stem.var(dim=(0, 2, 3), unbiased=True), atol=1e-3)


def test_the_cross_site_scores_are_adapted_too(tmp_path, monkeypatch):
    """Under eval.adapt-bn every model a site scores in the cross-site matrix normalises
    with this site's own training images' statistics, as its own evaluation does."""
    import time

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

    import fedir.client.client_app as client_app
    from fedir.client.inputs import view_of
    from fedir.protocol import encode_cross_site_models
    from tests.test_fedbn import _site

    settings = Settings(model_image_size=16, train_batch_size=64, eval_adapt_bn=True, eval_bootstrap=10,
                        data_val_fraction=0.0, data_test_fraction=0.3)
    site_dir = _site(tmp_path / "site")
    scored = []
    real = client_app.predict
    monkeypatch.setattr(client_app, "predict",
                        lambda model, x, device, **kw: scored.append(model) or real(model, x, device, **kw))
    models = {f"site-{i}": ArrayRecord(build_model("resnet_small", seed=i).state_dict()) for i in range(2)}
    content = encode_cross_site_models(models, ConfigRecord({"server-round": 1}))
    metadata = Metadata(run_id=1, message_id="x", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
                        created_at=time.time(), ttl=3600.0, message_type="evaluate.cross_site")
    context = Context(run_id=1, node_id=1, node_config={"site-dir": str(site_dir)}, state=RecordDict(),
                      run_config=settings.to_run_config())
    assert not client_app.build_client_app(settings)(Message(content=content, metadata=metadata), context).has_error()
    train_x = view_of(str(site_dir), settings).train_x
    assert len(scored) == 2
    for model in scored:  # one batch holds every training image: the statistics are theirs
        with torch.no_grad():
            stem = model.conv1(train_x)
        assert torch.allclose(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)


def test_a_last_batch_of_one_image_joins_the_one_before():
    """resnet_small at 16x16 ends in 1x1 BatchNorm layers: a batch of one would fail there."""
    model = build_model("resnet_small")
    x = torch.randn(9, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    recompute_bn(model, x, batch_size=4, device=CPU)
    assert int(model.bn1.num_batches_tracked) == 2  # 4 + 5 images
    batches = [x[:4], x[4:]]
    with torch.no_grad():
        mean = torch.stack([model.conv1(b).mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    assert torch.allclose(model.bn1.running_mean, mean, atol=1e-5)
