"""fedir.client.site and the manifest checks it relies on."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fedir.client.site as site_module
from fedir.client.imaging import SkipReason
from fedir.client.manifest import ManifestError, write_manifest
from fedir.client.site import load_site
from fedir.client.split import split_of
from tests.dicom_factory import write_dicom

SIZE = 16


def _make_site(root: Path, patients: int = 12) -> Path:
    """A site with one 2-frame DICOM per patient, every third one unlabelled."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(patients):
        rel = f"img/p{i}.dcm"
        write_dicom(root / rel, rng.integers(0, 4000, (2, 10, 12)))
        rows.append({"patient_id": f"P{i:03d}", "path": rel, "label": None if i % 3 == 0 else i % 2, "clin_age": 50 + i})
    write_manifest(root, rows)
    return root


def _append_rows(root: Path, rows: list[dict]) -> None:
    """Rewrite the manifest with extra rows."""
    with (root / "manifest.csv").open(newline="") as fh:
        existing = list(csv.DictReader(fh))
    write_manifest(root, existing + rows)


def test_load_site_splits_by_patient(tmp_path: Path) -> None:
    site = load_site(_make_site(tmp_path / "site-a"), image_size=SIZE)
    assert site.name == "site-a" and site.clinical_columns == ["clin_age"] and site.skipped == []
    total = 0
    for name in ("train", "val", "test"):
        part = getattr(site, name)
        assert part.images.shape == (len(part.patients), 1, SIZE, SIZE)
        assert part.images.dtype == torch.float32 and part.labels.dtype == torch.int64
        assert all(split_of(p, 0.15, 0.25) == name for p in part.patients)
        total += len(part.patients)
        assert sum(site.label_counts(name).values()) == int((part.labels >= 0).sum())
    assert total == 12  # "mip": one image per file


def test_frame_policy_all_gives_one_item_per_frame(tmp_path: Path) -> None:
    site = load_site(_make_site(tmp_path / "s"), image_size=SIZE, frame_policy="all", cache_dir=None)
    patients = site.train.patients + site.val.patients + site.test.patients
    assert len(patients) == 24 and all(patients.count(p) == 2 for p in set(patients))


def test_unreadable_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _make_site(tmp_path / "s")
    (root / "empty.dcm").touch()
    (root / "random.dcm").write_bytes(np.random.default_rng(1).bytes(1000))
    write_dicom(root / "header.dcm", None)
    whole = write_dicom(root / "whole.dcm", np.ones((64, 64))).read_bytes()
    (root / "half.dcm").write_bytes(whole[: len(whole) // 2])
    (root / "whole.dcm").unlink()
    extra = ["empty.dcm", "random.dcm", "header.dcm", "half.dcm", "absent.dcm"]
    _append_rows(root, [{"patient_id": f"X{i}", "path": p, "label": 1} for i, p in enumerate(extra)])
    site = load_site(root, image_size=SIZE)
    reasons = {s.path: s.reason for s in site.skipped}
    assert reasons == {
        "empty.dcm": SkipReason.EMPTY.value,
        "random.dcm": SkipReason.NOT_DICOM.value,
        "header.dcm": SkipReason.NO_PIXEL_DATA.value,
        "half.dcm": SkipReason.TRUNCATED.value,
        "absent.dcm": SkipReason.MISSING.value,
    }
    assert len(site.train) + len(site.val) + len(site.test) == 12


def test_empty_site_gives_empty_tensors(tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    write_manifest(root, [{"patient_id": "P1", "path": "nothing.dcm", "label": 0}])
    site = load_site(root, image_size=SIZE)
    for name in ("train", "val", "test"):
        assert getattr(site, name).images.shape == (0, 1, SIZE, SIZE)
        assert getattr(site, name).labels.shape == (0,)
        assert site.label_counts(name) == {}
    assert [s.reason for s in site.skipped] == [SkipReason.MISSING.value]


def test_second_load_is_served_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_site(tmp_path / "s")
    first = load_site(root, image_size=SIZE)
    assert list((root / ".fedir-cache").glob("*.pt"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(site_module, "load_image", refuse)
    second = load_site(root, image_size=SIZE)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(first, name).images, getattr(second, name).images)
        assert torch.equal(getattr(first, name).labels, getattr(second, name).labels)
        assert getattr(first, name).patients == getattr(second, name).patients
    with pytest.raises(AssertionError, match="decoded again"):
        load_site(root, image_size=SIZE * 2)  # another setting is another cache file


def test_touching_an_image_invalidates_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_site(tmp_path / "s")
    load_site(root, image_size=SIZE)
    calls: list[Path] = []
    real = site_module.load_image
    monkeypatch.setattr(site_module, "load_image", lambda p, *a, **k: calls.append(p) or real(p, *a, **k))
    stat = (root / "img/p0.dcm").stat()
    os.utime(root / "img/p0.dcm", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    load_site(root, image_size=SIZE)
    assert len(calls) == 12


def test_unwritable_cache_folder_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _make_site(tmp_path / "s")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        site = load_site(root, image_size=SIZE, cache_dir=blocker / "cache")
    assert len(site.train) + len(site.val) + len(site.test) == 12
    assert "cannot write the cache" in caplog.text


def test_progress_bar_runs(tmp_path: Path) -> None:
    site = load_site(_make_site(tmp_path / "s", patients=2), image_size=SIZE, progress=True)
    assert len(site.train) + len(site.val) + len(site.test) == 2


# ---------------------------------------------------------------------------------------
# Manifest errors: the site's configuration, so they propagate


@pytest.mark.parametrize("missing", ["patient_id", "path"])
def test_manifest_missing_required_column(tmp_path: Path, missing: str) -> None:
    columns = [c for c in ("patient_id", "path", "label") if c != missing]
    (tmp_path / "manifest.csv").write_text(",".join(columns) + "\n" + ",".join(["x"] * len(columns)) + "\n")
    with pytest.raises(ManifestError) as info:
        load_site(tmp_path, image_size=SIZE)
    assert "manifest.csv" in str(info.value) and missing in str(info.value)


def test_manifest_path_outside_the_site(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    write_manifest(root, [{"patient_id": "P1", "path": "../x.dcm"}])
    with pytest.raises(ManifestError, match=r"row 2.*outside"):
        load_site(root, image_size=SIZE)


def test_manifest_symlink_outside_the_site(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    outside = write_dicom(tmp_path / "outside.dcm", np.ones((4, 4)))
    (root / "link.dcm").symlink_to(outside)
    write_manifest(root, [{"patient_id": "P1", "path": "ok.dcm"}, {"patient_id": "P2", "path": "link.dcm"}])
    with pytest.raises(ManifestError, match=r"row 3.*outside"):
        load_site(root, image_size=SIZE)


def test_manifest_error_names_the_spreadsheet_line_after_blank_lines(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text("patient_id,path,label\nP1,a.dcm,1\n\nP2,b.dcm,x\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv, row 4: label 'x'"):
        load_site(tmp_path, image_size=SIZE)


def test_a_read_only_site_folder_caches_in_the_nodes_cache_dir(tmp_path: Path) -> None:
    """Node config `cache-dir`: the decoded site goes there, and nothing into the site folder."""
    import stat
    import time

    from flwr.app import Context, Message, Metadata, RecordDict

    from fedir.client.client_app import build_client_app
    from fedir.config import Settings
    from fedir.protocol import encode_feature_query

    root = _make_site(tmp_path / "site")
    cache = tmp_path / "cache"
    for path in (root, root / "img"):
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        settings = Settings(model_image_size=SIZE)
        context = Context(run_id=1, node_id=1, node_config={"site-dir": str(root), "cache-dir": str(cache)},
                          state=RecordDict(), run_config=settings.to_run_config())
        metadata = Metadata(run_id=1, message_id="q", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                            group_id="0", created_at=time.time(), ttl=3600.0, message_type="query")
        reply = build_client_app(settings)(Message(content=encode_feature_query(), metadata=metadata), context)
        assert not reply.has_error()
        assert list(cache.glob("*.pt")) and not (root / ".fedir-cache").exists()
    finally:
        for path in (root, root / "img"):
            path.chmod(stat.S_IRWXU)


def test_a_patient_whose_rows_name_two_splits_is_refused(tmp_path: Path) -> None:
    """The split is by patient: a manifest that puts one patient's images in two splits is
    invalid (row named, public text without the patient id); one split cell on every row,
    or none, is fine."""
    root = _make_site(tmp_path / "s", patients=2)
    write_dicom(root / "img/p0b.dcm", np.ones((2, 10, 12)))
    with (root / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    write_manifest(root, [{**rows[0], "split": "train"}, {**rows[0], "path": "img/p0b.dcm", "split": "test"}, rows[1]])
    with pytest.raises(ManifestError, match="row 3: .*P000.* two splits .*test here, train at row 2") as err:
        load_site(root, image_size=SIZE, cache_dir=None)
    assert "P000" not in err.value.public and "row 3: a patient is in two splits" in err.value.public
    # a split cell on one image only, the other left to the hash: also two splits
    write_manifest(root, [{**rows[0], "split": "test"}, {**rows[0], "path": "img/p0b.dcm", "split": ""}, rows[1]])
    with pytest.raises(ManifestError, match="the patient-hash split here, test at row 2"):
        load_site(root, image_size=SIZE, cache_dir=None)
    write_manifest(root, [{**rows[0], "split": "test"}, {**rows[0], "path": "img/p0b.dcm", "split": "test"}, rows[1]])
    site = load_site(root, image_size=SIZE, cache_dir=None)
    assert site.test.patients.count("P000") == 2
