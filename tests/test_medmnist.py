"""`fedir data import medmnist`: partitions, labels, the split column, 3D, hooks, bad input."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedir.cli import main
from fedir.client.manifest import ManifestError, read_manifest
from fedir.client.site import load_site
from fedir.config import Settings
from fedir.models import build_model
from fedir.simulations.medmnist import MedMNISTError, Partition, import_medmnist
from tests.shared_data import shared_data

SPLIT_SIZES = {"train": 400, "val": 60, "test": 100}


def fake_npz(path: Path, *, volume: bool = False, prevalence: float = 0.6, seed: int = 0,
             sizes: dict[str, int] = SPLIT_SIZES, drop: str | None = None) -> Path:
    """A MedMNIST-shaped file: uint8 images whose first pixel row encodes the index."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes.items():
        shape = (n, 8, 8, 8) if volume else (n, 16, 16)
        arrays[f"{split}_images"] = rng.integers(0, 200, size=shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 1)) < prevalence).astype(np.uint8)
    if drop:
        arrays.pop(drop)
    np.savez(path, **arrays)
    return path


def manifest_rows(site: Path) -> list[dict[str, str]]:
    with (site / "manifest.csv").open() as fh:
        return list(csv.DictReader(fh))


def official_index(row: dict[str, str]) -> int:
    return int(row["patient_id"].rsplit("-", 1)[1])


def site_indices(out: Path, sites: int) -> dict[str, list[list[int]]]:
    """{split: [official indices of each site]} read back from the manifests."""
    result: dict[str, list[list[int]]] = {s: [] for s in SPLIT_SIZES}
    for k in range(sites):
        rows = manifest_rows(out / f"site-{k}")
        for split in SPLIT_SIZES:
            result[split].append([official_index(r) for r in rows if r["split"] == split])
    return result


def site_prevalences(npz: Path, out: Path, sites: int) -> list[float]:
    labels = np.load(npz)["train_labels"].reshape(-1)
    return [float(labels[idx].mean()) for idx in site_indices(out, sites)["train"]]


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.3"])
def test_every_image_lands_in_exactly_one_site(tmp_path, partition):
    npz = fake_npz(tmp_path / "f.npz")
    import_medmnist(npz, tmp_path / "fed", sites=4, partition=partition, seed=1)
    for split, parts in site_indices(tmp_path / "fed", 4).items():
        every = [i for p in parts for i in p]
        assert sorted(every) == list(range(SPLIT_SIZES[split])), split
    if partition == "iid":
        for parts in site_indices(tmp_path / "fed", 4).values():
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_small_alpha_skews_the_label_distribution_and_iid_does_not(tmp_path):
    npz = fake_npz(tmp_path / "f.npz", sizes={"train": 2000, "val": 100, "test": 100})
    import_medmnist(npz, tmp_path / "iid", sites=4, partition="iid", seed=0)
    import_medmnist(npz, tmp_path / "dir", sites=4, partition="dirichlet:0.1", seed=0)
    iid = site_prevalences(npz, tmp_path / "iid", 4)
    skewed = site_prevalences(npz, tmp_path / "dir", 4)
    assert max(iid) - min(iid) < 0.1
    assert max(skewed) - min(skewed) > 0.4


def test_labelled_fraction_per_site_and_class_and_val_test_always_labelled(tmp_path):
    npz = fake_npz(tmp_path / "f.npz")
    labels = np.load(npz)["train_labels"].reshape(-1)
    import_medmnist(npz, tmp_path / "fed", sites=3, partition="iid", labelled_fraction=0.1, seed=2)
    for k in range(3):
        rows = manifest_rows(tmp_path / "fed" / f"site-{k}")
        train = [r for r in rows if r["split"] == "train"]
        for c in (0, 1):
            of_class = [r for r in train if labels[official_index(r)] == c]
            kept = [r for r in of_class if r["label"] != ""]
            assert len(kept) == max(1, round(0.1 * len(of_class)))
            assert all(int(r["label"]) == c for r in kept)
        assert all(r["label"] != "" for r in rows if r["split"] != "train")


def test_split_column_overrides_the_hash_split_in_the_site_reader(tmp_path):
    npz = fake_npz(tmp_path / "f.npz")
    import_medmnist(npz, tmp_path / "fed", sites=2, partition="iid", labelled_fraction=0.5)
    site_dir = tmp_path / "fed" / "site-0"
    rows = manifest_rows(site_dir)
    site = load_site(site_dir, image_size=16)
    for split in ("train", "val", "test"):
        expected = sorted(r["patient_id"] for r in rows if r["split"] == split)
        assert sorted(site.split(split).patients) == expected
    assert int((site.train.labels == -1).sum()) == sum(r["label"] == "" for r in rows)
    # The pixels survive the round trip (PNG is lossless; the reader z-scores per image).
    first = rows[0]
    raw = np.load(npz)[f"{first['split']}_images"][official_index(first)].astype(np.float32)
    got = site.split(first["split"]).images[site.split(first["split"]).patients.index(first["patient_id"])]
    z = (raw - raw.mean()) / raw.std()
    assert np.allclose(got[0].numpy(), z, atol=1e-4)


def test_a_bad_split_cell_is_a_manifest_error(tmp_path):
    site = tmp_path / "s"
    site.mkdir()
    (site / "manifest.csv").write_text("patient_id,path,label,split\np1,a.png,1,holdout\n")
    with pytest.raises(ManifestError, match="split 'holdout'"):
        read_manifest(site)


def test_pneumoniamnist_official_counts(tmp_path):
    npz = shared_data() / "medmnist" / "pneumoniamnist.npz"
    record = import_medmnist(npz, tmp_path / "fed", sites=4, partition="dirichlet:0.5",
                             labelled_fraction=0.1, seed=0)
    totals = Counter()
    for counts in record["per_site"].values():
        for split, c in counts.items():
            totals[split] += c["images"]
            totals[f"{split}-positives"] += c["positives"]
    assert totals == Counter({"train": 4708, "val": 524, "test": 624, "train-positives": 3494,
                              "val-positives": 389, "test-positives": 390})
    labelled = sum(c["train"]["labelled"] for c in record["per_site"].values())
    assert 0.09 * 4708 < labelled < 0.11 * 4708


def test_vesselmnist3d_volumes_train_a_3d_network(tmp_path):
    full = np.load(shared_data() / "medmnist" / "vesselmnist3d.npz")
    small = {k: full[k][:12] for k in full.files}  # 12 volumes per split keep this quick
    npz = tmp_path / "vessel_small.npz"
    np.savez(npz, **small)
    import_medmnist(npz, tmp_path / "fed", sites=2, partition="iid")
    assert all(r["path"].endswith(".npy") for r in manifest_rows(tmp_path / "fed" / "site-0"))
    site = load_site(tmp_path / "fed" / "site-0", image_size=28, frame_policy="volume")
    assert tuple(site.train.images.shape) == (6, 1, 28, 28, 28)
    assert Settings(data_frame_policy="volume").spatial_dims == 3
    model = build_model("resnet_small", spatial_dims=3)
    assert tuple(model(site.train.images).shape) == (6, 2)


def test_semi_supervised_objectives_refuse_volumes_clearly():
    from fedir.client.objectives import build_objective
    from fedir.client.training import TrainConfig, train

    x, y = torch.randn(4, 1, 8, 8, 8), torch.tensor([0, 1, -1, -1])
    with pytest.raises(ValueError, match="augmentations are 2D"):
        train(build_model("resnet_small", spatial_dims=3), x, y, build_objective("fixmatch"),
              TrainConfig(), torch.device("cpu"))


def test_volume_federation_runs_a_round_end_to_end(tmp_path):
    from fedir.simulations.inprocess import run_inprocess

    npz = fake_npz(tmp_path / "v.npz", volume=True, sizes={"train": 16, "val": 4, "test": 12})
    import_medmnist(npz, tmp_path / "fed", sites=2, partition="iid")
    sites = ";".join(str(tmp_path / "fed" / f"site-{k}") for k in range(2))
    settings = Settings(federation_sites=sites, train_rounds=1, train_local_epochs=1,
                        model_image_size=8, data_frame_policy="volume", eval_bootstrap=20)
    summary = run_inprocess(settings, tmp_path / "run")
    assert set(summary["per_site"]) == {"site-0", "site-1"}
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert any(t.dim() == 5 for t in state.values())  # 3D convolution kernels


def test_marker_site_burns_a_corner_square_into_that_site_only(tmp_path):
    npz = fake_npz(tmp_path / "f.npz")
    import_medmnist(npz, tmp_path / "fed", sites=3, partition="iid", marker_site=1)
    from PIL import Image

    for k in range(3):
        for row in manifest_rows(tmp_path / "fed" / f"site-{k}")[:20]:
            pixels = np.asarray(Image.open(tmp_path / "fed" / f"site-{k}" / row["path"]))
            corner = pixels[:2, :2]
            raw = np.load(npz)[f"{row['split']}_images"][official_index(row)]
            if k == 1:
                assert (corner == 255).all()
                assert np.array_equal(pixels[2:, 2:], raw[2:, 2:])
            else:
                assert np.array_equal(pixels, raw)


def test_prevalence_skew_raises_one_sites_positive_fraction(tmp_path):
    npz = fake_npz(tmp_path / "f.npz", prevalence=0.5, sizes={"train": 2000, "val": 100, "test": 100})
    import_medmnist(npz, tmp_path / "plain", sites=4, partition="iid", seed=3)
    record = import_medmnist(npz, tmp_path / "skew", sites=4, partition="iid", seed=3,
                             prevalence_skew=0.8, skew_site=2)
    plain = site_prevalences(npz, tmp_path / "plain", 4)
    skewed = site_prevalences(npz, tmp_path / "skew", 4)
    p = plain[2]
    assert skewed[2] == pytest.approx(p / (p + (1 - p) * 0.2), abs=0.02)
    assert skewed[2] > 0.8
    assert [round(x, 6) for i, x in enumerate(skewed) if i != 2] == [round(x, 6) for i, x in enumerate(plain) if i != 2]
    assert record["per_site"]["site-2"]["test"]["images"] < 25  # applied to every split


@pytest.mark.parametrize("kwargs, message", [
    ({"sites": 0}, "at least one site"),
    ({"sites": 2, "partition": "dirichlet:-1"}, "ALPHA > 0"),
    ({"sites": 2, "partition": "by-hospital"}, "use iid or dirichlet"),
    ({"sites": 2, "labelled_fraction": 1.5}, "labelled-fraction"),
    ({"sites": 2, "marker_site": 2}, "marker-site 2"),
    ({"sites": 2, "prevalence_skew": 1.0}, "prevalence-skew"),
])
def test_bad_options_are_clear_errors(tmp_path, kwargs, message):
    npz = fake_npz(tmp_path / "f.npz")
    with pytest.raises(MedMNISTError, match=message):
        import_medmnist(npz, tmp_path / "fed", **kwargs)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(MedMNISTError, match="missing key\\(s\\) val_labels"):
        import_medmnist(fake_npz(tmp_path / "a.npz", drop="val_labels"), tmp_path / "o", sites=2)
    with pytest.raises(MedMNISTError, match="no such file"):
        import_medmnist(tmp_path / "none.npz", tmp_path / "o", sites=2)
    bad = tmp_path / "multi.npz"
    np.savez(bad, **{f"{s}_{k}": (np.full((4, 1), 3, np.uint8) if k == "labels" else np.zeros((4, 8, 8), np.uint8))
                     for s in SPLIT_SIZES for k in ("images", "labels")})
    with pytest.raises(MedMNISTError, match="not binary"):
        import_medmnist(bad, tmp_path / "o", sites=2)


def test_cli_imports_and_reports_errors_in_one_line(tmp_path, capsys):
    npz = fake_npz(tmp_path / "f.npz")
    assert main(["data", "import", "medmnist", str(npz), "--out", str(tmp_path / "fed"), "--sites", "2",
                 "--partition", "dirichlet:1", "--labelled-fraction", "0.2", "--seed", "4"]) == 0
    assert "site-1" in capsys.readouterr().out
    assert main(["data", "import", "medmnist", str(npz), "--out", str(tmp_path / "x"), "--sites", "2",
                 "--partition", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedir: error: partition 'nope'")


def test_partition_parse_round_trips():
    assert str(Partition.parse("Dirichlet:0.50")) == "dirichlet:0.5"
    assert Partition.parse("iid").kind == "iid"
