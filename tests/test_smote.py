"""train.smote: synthetic minority rows balance a tabular site's training, and stay there."""

import csv
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedir.client.client_app import build_client_app
from fedir.client.smote import oversampled
from fedir.config import Settings
from fedir.models import build_model
from fedir.protocol import ARRAYS_KEY


def test_smote_balances_the_labelled_rows_and_keeps_the_real_ones_first():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen)
    y = torch.tensor([1] * 30 + [0] * 8 + [-1] * 2)
    x[30:38] += 5.0  # the minority class lives apart
    bx, by, added = oversampled(x, y, seed=1)
    assert added == 22 and len(bx) == 62
    assert torch.equal(bx[:40], x) and torch.equal(by[:40], y)  # real rows untouched, unlabelled kept
    assert (by == 0).sum() == (by == 1).sum() == 30
    synthetic, minority = bx[40:], x[30:38]
    assert (by[40:] == 0).all()
    # each synthetic row lies between minority rows: inside their bounding box
    assert (synthetic >= minority.min(0).values - 1e-6).all() and (synthetic <= minority.max(0).values + 1e-6).all()
    again = oversampled(x, y, seed=1)[0]
    assert torch.equal(again, bx)  # seeded


@pytest.mark.parametrize("labels", [[1] * 10, [1] * 9 + [0], [1] * 5 + [0] * 5])
def test_nothing_is_added_without_two_minority_rows_or_an_imbalance(labels):
    x, y = torch.randn(len(labels), 2), torch.tensor(labels)
    bx, by, added = oversampled(x, y, seed=0)
    assert added == 0 and bx is x and by is y


def _site(root):
    rng = np.random.default_rng(0)
    rows = [{"patient_id": f"p{i}", "label": int(i % 6 == 0), "split": "test" if i >= 48 else "train",
             "clin_a": rng.normal(float(i % 6 == 0), 1.0), "clin_b": rng.normal()} for i in range(60)]
    root.mkdir(parents=True)
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _train_message(arrays):
    content = RecordDict({ARRAYS_KEY: ArrayRecord(arrays), "config": ConfigRecord({"server-round": 1})})
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600.0, message_type="train")
    return Message(content=content, metadata=metadata)


def test_only_the_model_update_leaves_a_site_that_uses_smote(tmp_path):
    site = _site(tmp_path / "site")
    start = build_model("logreg", n_features=2).state_dict()
    replies, states = {}, {}
    for smote in (False, True):
        settings = Settings(model_name="logreg", data_standardise="site", train_local_epochs=3,
                            train_batch_size=4, train_optimizer="sgd", train_lr=0.1, train_smote=smote)
        context = Context(run_id=1, node_id=1, node_config={"site-dir": str(site)}, state=RecordDict(),
                          run_config=settings.to_run_config())
        replies[smote] = build_client_app(settings)(_train_message(start), context)
        states[smote] = context.state
    off, on = replies[False].content, replies[True].content
    # the same records, the same counts (the 8 real positives of 48, not the balanced 80)
    assert set(on.keys()) == set(off.keys())
    m_off, m_on = dict(off.metric_records["metrics"]), dict(on.metric_records["metrics"])
    assert m_on["n-labelled"] == m_off["n-labelled"] == 48 and m_on["num-examples"] == 48
    assert m_on["label-counts"] == m_off["label-counts"] == [40, 8]
    assert dict(on.config_records["site"]) == dict(off.config_records["site"])
    # the arrays are the model's, same names and shapes; trained on more rows, they differ
    a_on, a_off = (r.array_records[ARRAYS_KEY].to_torch_state_dict() for r in (on, off))
    assert {k: v.shape for k, v in a_on.items()} == {k: v.shape for k, v in start.items()}
    assert m_on["steps"] > m_off["steps"] and not torch.equal(a_on["weight"], a_off["weight"])
    # and nothing synthetic is kept in the node's state for later
    assert set(states[True].keys()) == set(states[False].keys())


def test_smote_on_an_imaging_site_is_refused(tmp_path):
    from fedir.client.inputs import SiteView
    from fedir.client.local_training import local_rows

    view = SiteView(name="s", tabular=False, train_x=torch.zeros(4, 1, 8, 8), train_y=torch.tensor([0, 1, 1, 1]),
                    test_x=torch.zeros(0), test_y=torch.zeros(0), test_patients=[], val_x=torch.zeros(0), val_y=torch.zeros(0),
                    val_patients=[], label_counts={})
    context = Context(run_id=1, node_id=1, node_config={"site-dir": "x"}, state=RecordDict(), run_config={})
    with pytest.raises(ValueError, match="tabular"):
        local_rows(Settings(train_smote=True), view, ConfigRecord({}), context)
