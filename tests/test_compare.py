"""`fedir compare`: the arms of a simulated study, scored on the same patients and paired."""

import json
from pathlib import Path

import pytest

from fedir.cli import main
from fedir.simulations.compare import ARMS, all_labels_federation, compare
from fedir.simulations.scenario import load_scenario
from fedir.simulations.synthetic import generate_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compare")
    generate_federation(root / "fed", sites=3, patients=14, seed=1, unlabelled_fraction=0.5, image_size=64,
                        progress=False)
    path = root / "scenario.toml"
    path.write_text(
        '[federation]\nsites = ["fed/site-0", "fed/site-1", "fed/site-2"]\n'
        '[train]\nrounds = 2\nlocal-epochs = 1\nobjective = "fixmatch"\n'
        '[model]\nname = "resnet_small"\nimage-size = 32\n[eval]\nbootstrap = 50\n'
    )
    return path


def test_all_labels_federation_is_the_same_patients_with_every_label(scenario: Path, tmp_path: Path) -> None:
    settings = load_scenario(scenario)
    sites = all_labels_federation(settings, tmp_path)
    assert sites is not None
    for original, labelled in zip(settings.sites, sites):
        before = (Path(original) / "manifest.csv").read_text().splitlines()
        after = (labelled / "manifest.csv").read_text().splitlines()
        assert len(before) == len(after)
        for old, new in zip(before[1:], after[1:]):
            old_cells, new_cells = old.split(","), new.split(",")
            # the same patient and image; a label removed before is present now
            assert old_cells[:2] == new_cells[:2]
            assert new_cells[2] != ""
        assert any(line.split(",")[2] == "" for line in before[1:])
        assert sorted(p.name for p in (Path(original) / "images").iterdir()) \
            == sorted(p.name for p in (labelled / "images").iterdir())


def test_compare_scores_each_arm_as_its_sites_did_and_pairs_them(scenario: Path, tmp_path: Path) -> None:
    settings = load_scenario(scenario)
    result = compare(settings, tmp_path, seeds=[0], arms=["federated", "local", "clinical"], progress=lambda _: None)
    questions = result["questions"]["0"]
    # the paired comparison re-scores the federated model on each site's test patients:
    # the AUC it finds is the one the site itself reported
    reported = json.loads((tmp_path / "seed-0" / "federated" / "summary.json").read_text())["per_site"]
    for site, pair in questions["federated_vs_local"].items():
        assert pair["auc_a"] == pytest.approx(reported[site]["per_patient"]["auc"])
        assert pair["n"] == reported[site]["per_patient"]["n_patients"]
    clinical = questions["imaging_vs_clinical"]
    assert clinical["difference"] == pytest.approx(clinical["auc_a"] - clinical["auc_b"])
    table = (tmp_path / "compare.md").read_text()
    assert "imaging - clinical" in table and "site-0 alone" in table


def test_compare_cli_refuses_an_unknown_arm(scenario: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(scenario), "--out", str(tmp_path), "--arms", "federated", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and ", ".join(ARMS) in err


@pytest.mark.parametrize("arm", ["local", "pooled"])
def test_local_and_pooled_arms_of_a_dp_scenario_run_without_aggregate_privacy(tmp_path: Path, arm: str) -> None:
    """A DP + budget scenario's local and pooled arms are valid settings (DP needs federation.arm =
    federated), without DP, its budget or secure aggregation; the federated arm keeps them."""
    from fedir.config import Settings
    from fedir.simulations.compare import arm_settings

    dp = Settings(federation_sites="a;b;c", privacy_dp="server-fixed", privacy_noise_multiplier=1.0,
                  privacy_max_epsilon=20.0)
    out = arm_settings(dp, arm, None)
    assert (out.federation_arm, out.privacy_dp, out.privacy_max_epsilon) == (arm, "off", 0.0)
    assert out.privacy_secure_aggregation == "off"
    kept = arm_settings(dp, "federated", None)
    assert (kept.privacy_dp, kept.privacy_max_epsilon) == ("server-fixed", 20.0)


@pytest.mark.parametrize("arm", ["local", "pooled"])
def test_a_personalised_scenarios_local_and_pooled_arms_have_nothing_to_personalise(arm: str) -> None:
    """train.personalise needs federation.arm = federated; the arms without a shared model run
    without it (a site alone is already personal), the federated arm keeps it."""
    from fedir.config import Settings
    from fedir.simulations.compare import arm_settings

    tuned = Settings(federation_sites="a;b;c", train_personalise="finetune")
    assert arm_settings(tuned, arm, None).train_personalise == "none"
    assert arm_settings(tuned, "federated", None).train_personalise == "finetune"


@pytest.mark.parametrize(("kind", "classes", "named"), [("survival", 2, "task.kind = 'survival'"),
                                                          ("classification", 3, "task.classes = 3")])
def test_compare_refuses_what_it_cannot_pair_before_any_run(tmp_path: Path, kind: str, classes: int,
                                                             named: str) -> None:
    """The paired per-patient AUC is a binary classification's: another task is one line, nothing run."""
    from fedir.config import Settings
    from fedir.errors import UserError

    settings = Settings(federation_sites="a;b", task_kind=kind, task_classes=classes,
                        model_name="logreg" if kind == "survival" else "auto")
    with pytest.raises(UserError, match=named):
        compare(settings, tmp_path / "out", [0], ["federated", "local"])
    assert not (tmp_path / "out").exists()
