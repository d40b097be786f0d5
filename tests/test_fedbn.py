"""FedBN: normalisation layers never leave a site and persist in the node's context.state."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from torch import nn

from fedir.client.client_app import build_client_app
from fedir.client.kept_state import STATE_KEY, load_global, reply_arrays
from fedir.client.manifest import write_manifest
from fedir.config import Settings
from fedir.models import build_model, norm_keys
from fedir.protocol import ARRAYS_KEY
from tests.dicom_factory import write_dicom


def test_norm_keys_are_every_batchnorm_entry():
    model = build_model("resnet_small")
    keys = norm_keys(model)
    assert "bn1.running_mean" in keys and "bn1.num_batches_tracked" in keys and "bn1.weight" in keys
    assert "conv1.weight" not in keys and "fc.weight" not in keys
    bns = [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    entries = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert keys == {f"{name}.{e}" for name in bns for e in entries}


def test_reply_keeps_norm_layers_in_state_and_load_restores_them():
    model, state = build_model("resnet_small"), RecordDict()
    with torch.no_grad():
        model.bn1.running_mean.fill_(3.0)
    kept = norm_keys(model)
    sent = reply_arrays(model, state, kept).to_torch_state_dict()
    assert not set(sent) & kept
    fresh = build_model("resnet_small")
    load_global(fresh, sent, state, kept)
    assert torch.equal(fresh.bn1.running_mean, torch.full_like(fresh.bn1.running_mean, 3.0))
    with pytest.raises(RuntimeError):  # with nothing kept a missing entry stays an error
        load_global(build_model("resnet_small"), sent, RecordDict())
    del sent["conv1.weight"]
    with pytest.raises(ValueError, match="conv1.weight"):  # only kept entries may be missing
        load_global(build_model("resnet_small"), sent, state, kept)


def _site(root: Path, patients: int = 12) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(patients):
        write_dicom(root / f"p{i}.dcm", rng.integers(0, 4000, (12, 12)))
        rows.append({"patient_id": f"P{i:03d}", "path": f"p{i}.dcm", "label": i % 2})
    write_manifest(root, rows)
    return root


def _message(kind: str, arrays: dict[str, torch.Tensor], server_round: int) -> Message:
    content = RecordDict({ARRAYS_KEY: ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})})
    metadata = Metadata(run_id=1, message_id=f"m{server_round}{kind}", src_node_id=0, dst_node_id=1,
                        reply_to_message_id="", group_id=str(server_round), created_at=time.time(),
                        ttl=3600.0, message_type=kind)
    return Message(content=content, metadata=metadata)


def test_clientapp_under_fedbn_sends_no_norm_entry_and_keeps_its_own_across_rounds(tmp_path, monkeypatch):
    settings = Settings(model_image_size=16, train_local_epochs=1, train_batch_size=4,
                        train_fedbn=True, eval_bootstrap=10, data_val_fraction=0.0, data_test_fraction=0.3)
    app = build_client_app(settings)
    context = Context(run_id=1, node_id=1, node_config={"site-dir": str(_site(tmp_path / "site"))},
                      state=RecordDict(), run_config=settings.to_run_config())
    model = build_model("resnet_small")
    bn_keys = norm_keys(model)

    reply1 = app(_message("train", model.state_dict(), 1), context)
    sent1 = reply1.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    assert sent1 and not set(sent1) & bn_keys
    steps1 = int(reply1.content.metric_records["metrics"]["steps"])
    kept1 = context.state.array_records[STATE_KEY].to_torch_state_dict()
    assert set(kept1) == bn_keys and int(kept1["bn1.num_batches_tracked"]) == steps1

    # round 2: the server can only send what it received, the shared weights
    reply2 = app(_message("train", sent1, 2), context)
    assert not set(reply2.content.array_records[ARRAYS_KEY].to_torch_state_dict()) & bn_keys
    kept2 = context.state.array_records[STATE_KEY].to_torch_state_dict()
    steps2 = int(reply2.content.metric_records["metrics"]["steps"])
    assert int(kept2["bn1.num_batches_tracked"]) == steps1 + steps2  # continued from round 1's
    assert not torch.equal(kept1["bn1.running_mean"], kept2["bn1.running_mean"])

    # evaluation gets no BN from the server: the site's own learnt BN weights are used, so a
    # node without stored BN scores with the model's initial ones (its statistics are
    # re-estimated either way: fedir.client.adapt_bn)
    import fedir.client.client_app as client_app

    scored = []
    real = client_app.predict_with_embedding
    monkeypatch.setattr(client_app, "predict_with_embedding",
                        lambda model, x, device, **kw: scored.append(model) or real(model, x, device, **kw))

    def bn_weight(ctx: Context) -> torch.Tensor:
        reply = app(_message("evaluate", sent1, 2), ctx)
        assert not reply.has_error() and reply.content.metric_records["metrics"]["n"] > 0
        return scored[-1].bn1.weight.detach().clone()

    stateless = Context(run_id=1, node_id=2, node_config=context.node_config, state=RecordDict(),
                        run_config=context.run_config)
    assert torch.equal(bn_weight(context), kept2["bn1.weight"])
    assert torch.equal(bn_weight(stateless), torch.ones_like(kept2["bn1.weight"]))


@pytest.mark.slow
def test_fedbn_federation_runs_end_to_end_and_no_update_is_rejected(tmp_path):
    """Through Flower's simulation engine: the server's update validation expects FedBN's
    replies (no normalisation entries), so every site's update is averaged, and the global
    model it writes has no normalisation layer."""
    import sqlite3

    from fedir.simulations.scenario import load_scenario
    from fedir.simulations.simulate import simulate
    from fedir.simulations.synthetic import generate_federation

    generate_federation(tmp_path / "fed", sites=2, patients=16, seed=0, unlabelled_fraction=0.5,
                        image_size=32, progress=False)
    toml = tmp_path / "s.toml"
    toml.write_text(
        '[federation]\nsites = ["fed/site-0", "fed/site-1"]\n'
        '[train]\nrounds = 2\nlocal-epochs = 1\nbatch-size = 4\nobjective = "fixmatch"\n'
        "threshold = 0.5\nmixup-alpha = 0.4\nfedbn = true\n"
        "[model]\nimage-size = 32\n[eval]\nbootstrap = 20\n"
    )
    simulate(load_scenario(toml), tmp_path / "run", scenario=str(toml))
    with sqlite3.connect(tmp_path / "run" / "runs.sqlite") as db:
        kinds = [k for (k,) in db.execute("SELECT kind FROM notes")]
        trained = db.execute("SELECT COUNT(DISTINCT site) FROM metrics WHERE split = 'train'").fetchone()
    assert "rejected" not in kinds and "missing" not in kinds
    model = torch.load(tmp_path / "run" / "model.pt")
    assert model and not set(model) & norm_keys(build_model("resnet_small"))
    assert trained == (2,)


def test_fedbn_site_scores_with_statistics_of_the_weights_it_received(tmp_path, monkeypatch):
    """The per-site offsets of FedBN: a site kept BatchNorm statistics accumulated under its
    local weights and scored with them after the server had changed every other weight.
    The model a FedBN site scores must normalise with its own training images' statistics
    under the weights it received, while its learnt BN weights stay its own."""
    import fedir.client.client_app as client_app
    from fedir.client.inputs import view_of

    settings = Settings(model_image_size=16, train_local_epochs=1, train_batch_size=4,
                        train_fedbn=True, eval_bootstrap=10, data_val_fraction=0.0, data_test_fraction=0.3)
    app = build_client_app(settings)
    site_dir = _site(tmp_path / "site")
    context = Context(run_id=1, node_id=1, node_config={"site-dir": str(site_dir)},
                      state=RecordDict(), run_config=settings.to_run_config())
    sent = app(_message("train", build_model("resnet_small").state_dict(), 1), context)
    shared = sent.content.array_records[ARRAYS_KEY].to_torch_state_dict()
    aggregated = {k: (2.0 * v if k == "conv1.weight" else v) for k, v in shared.items()}  # the server moved it

    scored = []
    real = client_app.predict_with_embedding
    monkeypatch.setattr(client_app, "predict_with_embedding",
                        lambda model, x, device, **kw: scored.append(model) or real(model, x, device, **kw))
    assert not app(_message("evaluate", aggregated, 1), context).has_error()
    model = scored[0]
    train_x = view_of(str(site_dir), settings).train_x
    assert torch.equal(model.conv1.weight, aggregated["conv1.weight"])
    with torch.no_grad():  # the cumulative average of the batches' means (fedir.client.adapt_bn)
        means = torch.stack([model.conv1(b).mean(dim=(0, 2, 3)) for b in train_x.split(settings.train_batch_size)])
    kept = context.state.array_records[STATE_KEY].to_torch_state_dict()
    assert torch.allclose(model.bn1.running_mean, means.mean(0), atol=1e-5)
    assert not torch.allclose(model.bn1.running_mean, kept["bn1.running_mean"], atol=1e-2)
    assert torch.equal(model.bn1.weight, kept["bn1.weight"])  # the learnt affine stays the site's
