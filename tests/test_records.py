"""The records that cross the trust boundary: same keys for every site, lossless round-trip."""

from fedir.protocol import decode_evaluation, decode_training, encode_evaluation, encode_training, METRICS_KEY, SITE_KEY
from flwr.app import RecordDict


def _metrics(auc):
    return {
        "n": 12, "n_patients": 4, "positives": 5, "tp": 4, "tn": 6, "fp": 1, "fn": 1,
        "auc": auc, "auc_ci": None if auc is None else [0.6, 0.95],
        "accuracy": 10 / 12, "accuracy_ci": [0.6, 0.95],
        "sensitivity": 0.8, "sensitivity_ci": [0.4, 0.96],
        "specificity": 6 / 7, "specificity_ci": [0.5, 0.97],
        "hist_neg": [3, 2, 1, 1, 0], "hist_pos": [0, 0, 1, 1, 3],
        "reasons": {} if auc is not None else {"auc": "only one class"},
    }


def test_evaluation_round_trip_and_null_metrics():
    for auc in (0.8, None):
        site, decoded = decode_evaluation(encode_evaluation("site-a", _metrics(auc)))
        assert site == "site-a"
        expected = _metrics(auc)
        for key, value in expected.items():
            assert decoded[key] == value, key


def test_every_site_sends_the_same_metric_keys():
    a = encode_evaluation("a", _metrics(0.8)).metric_records[METRICS_KEY]
    b = encode_evaluation("b", _metrics(None)).metric_records[METRICS_KEY]
    assert set(a.keys()) == set(b.keys())


def test_training_round_trip():
    rec, site_rec = encode_training(
        "s", loss=None, steps=0, n_labelled=0, n_unlabelled=7,
        label_counts={1: 3}, num_classes=2, skipped={"truncated": 2},
    )
    site, out = decode_training(RecordDict({METRICS_KEY: rec, SITE_KEY: site_rec}))
    assert site == "s"
    assert out == {"train_loss": None, "steps": 0, "n_labelled": 0, "n_unlabelled": 7,
                   "label_counts": {0: 0, 1: 3}, "skipped": {"truncated": 2}}
