"""The user-error contract: every error a user can fix ends `fedir` with one line on stderr
and exit status 2, and a study no site could take part in stops with the sites' reasons,
recorded as failed (summary.json status "failed", bias verdict "not computed", never "no
alarm"). Most cases run without Ray (the command line stops before Flower starts, or the
in-process grid serves the real ClientApp); the two marked slow check the same through
Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Message

from fedir.cli import main
from fedir.client.client_app import build_client_app
from fedir.config import Settings, SettingsError
from fedir.errors import StudyFailed, UserError
from fedir.server.checkpoint import CHECKPOINT_NAME, Checkpoint, save_checkpoint
from fedir.server.runstore import RunStore
from fedir.server.server_app import run_study
from fedir.simulations.inprocess import InProcessGrid, run_inprocess
from fedir.simulations.uci_heart import CENTRES, default_source, import_heart

SOURCE = default_source()
needs_heart = pytest.mark.skipif(not SOURCE.is_dir(), reason=f"UCI heart data not at {SOURCE}")
BAD_HEADER = "pid,file,label\n"


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedir: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _bad_sites(root: Path, n: int = 2) -> list[Path]:
    """Site folders whose manifest names its columns pid,file (an export's own names)."""
    sites = []
    for i in range(n):
        site = root / f"site-{i}"
        site.mkdir(parents=True)
        (site / "manifest.csv").write_text(BAD_HEADER + f"P{i},img{i}.dcm,1\n")
        sites.append(site)
    return sites


def _scenario(path: Path, sites: list[Path], extra: str = "") -> Path:
    listed = ", ".join(f'"{s}"' for s in sites)
    path.write_text(f"[federation]\nsites = [{listed}]\n[train]\nrounds = 1\n{extra}")
    return path


@pytest.fixture(scope="module")
def heart(tmp_path_factory):
    out = tmp_path_factory.mktemp("heart")
    import_heart(out, SOURCE)
    return out


def _heart_settings(heart: Path, **kw) -> Settings:
    base = dict(federation_sites=";".join(str(heart / c) for c in CENTRES), train_rounds=2,
                train_local_steps=10, train_batch_size=8, train_optimizer="sgd", train_lr=0.05,
                eval_bootstrap=10, bias_bootstrap=0)
    return Settings(**{**base, **kw})


# ---- the command line: one line, exit 2 -------------------------------------------------


def test_a_bad_scenario_and_a_typo_in_an_override_are_one_line(tmp_path, capsys):
    sites = _bad_sites(tmp_path / "fed")
    bad = _scenario(tmp_path / "bad.toml", sites, "rouns = 3\n")
    assert main(["simulate", str(bad), "--out", str(tmp_path / "run")]) == 2
    assert "train.rouns" in _one_error_line(capsys)
    good = _scenario(tmp_path / "s.toml", sites)
    assert main(["simulate", str(good), "--out", str(tmp_path / "run"), "--set", "train.optimizer=adam"]) == 2
    assert "train.optimizer = 'adam' is not allowed; choose one of adamw, sgd" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_site_whose_manifest_has_columns_pid_file_is_one_line(tmp_path, capsys):
    fed = tmp_path / "fed"
    assert main(["data", "synth", str(fed), "--sites", "2", "--patients", "4", "--image-size", "16"]) == 0
    manifest = fed / "site-1" / "manifest.csv"
    header, _, rows = manifest.read_text().partition("\n")
    manifest.write_text(header.replace("patient_id", "pid").replace("path", "file") + "\n" + rows)
    scenario = _scenario(tmp_path / "s.toml", [fed / "site-0", fed / "site-1"])
    capsys.readouterr()
    assert main(["simulate", str(scenario), "--out", str(tmp_path / "run")]) == 2
    line = _one_error_line(capsys)
    # clin_* columns and no `path`: read as a table, which needs patient_id first
    assert f"{manifest}: missing required column patient_id (found: pid, file, label," in line
    assert line.endswith("an imaging site also needs path)")


def test_a_missing_data_folder_and_an_output_that_holds_other_sites_are_one_line(tmp_path, capsys):
    assert main(["data", "import", "heart", "--out", str(tmp_path / "h"), "--source", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in _one_error_line(capsys)
    (tmp_path / "fed" / "site-0").mkdir(parents=True)  # someone else's site folder
    assert main(["data", "synth", str(tmp_path / "fed"), "--sites", "1", "--patients", "2"]) == 2
    assert "not overwriting" in _one_error_line(capsys)


# ---- the study: every site failing stops it with their reasons --------------------------


def _failed_summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and (out / "report.html").is_file()
    assert summary["bias"]["alarm"] is None and summary["bias"]["reasons"][0].startswith("not computed")
    assert any(n["kind"] == "failed" for n in summary["notes"])
    return summary


def test_no_site_answering_the_feature_query_stops_the_study_with_their_reason(tmp_path):
    sites = _bad_sites(tmp_path / "fed", 3)
    settings = Settings(federation_sites=";".join(map(str, sites)), train_rounds=3)
    with pytest.raises(StudyFailed) as info:
        run_inprocess(settings, tmp_path / "run")
    assert str(info.value) == (
        "no site could answer the feature-statistics query before round 1 (node 100, node 101, "
        "node 102: manifest.csv: missing required column(s) patient_id, path; run `fedir data "
        "check` at the site)")
    assert _failed_summary(tmp_path / "run")["rounds"] == 0


@needs_heart
def test_tabular_sites_get_logistic_regression_and_an_image_model_is_refused_before_round_1(heart, tmp_path):
    summary = run_inprocess(_heart_settings(heart, train_rounds=1), tmp_path / "auto")
    assert summary["status"] == "finished" and summary["global"]["accuracy"] > 0.6
    assert summary["bias"]["alarm"] is True  # Switzerland: 30 of 30 training patients positive
    with pytest.raises(SettingsError, match="model.name = 'resnet_small' is an image model"):
        run_inprocess(_heart_settings(heart, model_name="resnet_small"), tmp_path / "image")
    assert _failed_summary(tmp_path / "image")["rounds"] == 0


def _failing(message_type: str):
    """A client mod: the site's ClientApp raises on every message of this type."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type == message_type:
            raise RuntimeError(f"out of memory during {message_type} (test)")
        return call_next(msg, context)

    return mod


def _run_with(settings: Settings, out: Path, message_type: str) -> dict:
    grid = InProcessGrid(build_client_app(settings, mods=[_failing(message_type)]), len(settings.sites),
                         settings.to_run_config())
    with pytest.raises(StudyFailed) as info:
        run_study(grid, settings, out, scenario="test")
    return {"error": str(info.value), **_failed_summary(out)}


@needs_heart
def test_every_site_failing_round_1_training_stops_the_study(heart, tmp_path):
    failed = _run_with(_heart_settings(heart, train_rounds=5), tmp_path / "run", "train")
    assert failed["error"].startswith("no site could train in round 1 (node 100, node 101, node 102, node 103: ")
    assert failed["error"].endswith("out of memory during train (test))")
    assert failed["rounds"] == 0 and failed["bias"]["tests"] == {}


@needs_heart
def test_a_study_never_evaluated_fails_and_still_reports_the_site_label_association(heart, tmp_path):
    failed = _run_with(_heart_settings(heart), tmp_path / "run", "evaluate")
    assert failed["error"].startswith("no site could be evaluated in 2 round(s) (")
    assert all(centre in failed["error"] for centre in CENTRES)  # named: they trained before
    association = failed["bias"]["tests"]["site_label_association"]
    assert association["alarm"] is True and "switzerland" in association["sites"]
    assert all(failed["per_site"][c]["auc"] is None for c in CENTRES)


# ---- the same through Flower's simulation engine (Ray) ----------------------------------


@pytest.mark.slow
def test_on_flowers_engine_the_sites_reason_comes_back_without_rays_traceback(tmp_path):
    from fedir.simulations.simulate import simulate

    sites = _bad_sites(tmp_path / "fed")
    settings = Settings(federation_sites=";".join(map(str, sites)), train_rounds=2)
    with pytest.raises(StudyFailed) as info:
        simulate(settings, tmp_path / "run", scenario="bad manifests")
    message = str(info.value)
    assert message.endswith("manifest.csv: missing required column(s) patient_id, path; "
                            "run `fedir data check` at the site)"), message
    assert "ray" not in message.lower() and "Traceback" not in message and "\n" not in message
    _failed_summary(tmp_path / "run")


@pytest.mark.slow
def test_a_run_folder_that_cannot_be_resumed_is_one_line(tmp_path, capsys):
    fed = tmp_path / "fed"
    assert main(["data", "synth", str(fed), "--sites", "2", "--patients", "4", "--image-size", "16"]) == 0
    out = tmp_path / "run"
    out.mkdir()
    with RunStore(out / "runs.sqlite") as store:
        store.start_run("r1", "earlier", {}, ["site-0", "site-1"])  # unfinished
    save_checkpoint(out / CHECKPOINT_NAME, Checkpoint("r1", {"train.rounds": 9}, 1, {}))
    scenario = _scenario(tmp_path / "s.toml", [fed / "site-0", fed / "site-1"])
    capsys.readouterr()
    assert main(["simulate", str(scenario), "--out", str(out)]) == 2
    assert "holds the unfinished run r1" in _one_error_line(capsys)


def test_every_error_a_user_can_fix_is_a_user_error():
    from fedir.certs import CertsError
    from fedir.client.manifest import ManifestError
    from fedir.errors import MissingData, OutputExists
    from fedir.server.checkpoint import ResumeError
    from fedir.simulations.medmnist import MedMNISTError
    from fedir.simulations.scenario import ScenarioError

    for kind in (CertsError, ManifestError, MedMNISTError, MissingData, OutputExists, ResumeError,
                 ScenarioError, SettingsError, StudyFailed):
        assert issubclass(kind, UserError), kind
