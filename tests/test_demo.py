"""``medflow demo`` on a folder an earlier demo made: reused when its data matches, refused or
replaced (with --overwrite) when it holds another demo's data or an older recipe's."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from medflow.cli import app
from medflow.demo import DATA_SPACING, DemoOptions, prepare_demo_data
from medflow.demo_data import dataset_parameters
from medflow.errors import InputError, OutputError


def older_demo(out, subjects=2, heldout=1):
    """A demo folder as an earlier recipe left it: its demo.json, a data file, a finished run, a synthesis."""
    (out / "data").mkdir(parents=True)
    old = {**dataset_parameters(subjects, spacing=DATA_SPACING, heldout=heldout), "recipe": 2}
    (out / "data" / "demo.json").write_text(json.dumps({"parameters": old, "complete": True}))
    (out / "data" / "sub-001_t1.nii.gz").write_bytes(b"old")
    for path in (out / "run" / "final.pt", out / "synth" / "sub-002.nii.gz"):
        path.parent.mkdir()
        path.write_bytes(b"old")


def test_another_demo_is_refused_and_left_as_it_was(tmp_path):
    older_demo(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="other parameters"):
        prepare_demo_data(DemoOptions(tmp_path, subjects=2, heldout=1))
    assert sorted(tmp_path.rglob("*")) == before
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--subjects", "2", "--heldout", "1"])
    assert result.exit_code == 4 and "--overwrite" in result.output and "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before


def test_overwrite_replaces_the_data_and_what_was_made_from_it(tmp_path):
    older_demo(tmp_path)
    csv_path = prepare_demo_data(DemoOptions(tmp_path, subjects=2, heldout=1, overwrite=True))
    assert csv_path == tmp_path / "data" / "manifest.csv" and csv_path.exists()
    assert (tmp_path / "data" / "sub-001_asl.nii.gz").exists()
    assert (tmp_path / "data" / "sub-001_t1.nii.gz").read_bytes() != b"old"
    assert not (tmp_path / "run").exists() and not (tmp_path / "synth").exists()


def test_same_data_keeps_the_run(tmp_path):
    opts = DemoOptions(tmp_path, subjects=2, heldout=1, overwrite=True)
    prepare_demo_data(opts)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final.pt").write_bytes(b"trained")
    prepare_demo_data(opts)
    assert (tmp_path / "run" / "final.pt").read_bytes() == b"trained"


@pytest.mark.parametrize("subjects, heldout", [(2, 0), (2, 2), (0, 0), (2, 5)])
def test_a_cohort_without_test_or_training_subjects_is_refused_before_anything_is_removed(tmp_path, subjects,
                                                                                       heldout):
    """The demo needs a held-out subject to score and one to train on; the check comes before
    --overwrite removes anything (before, --heldout 0 trained 8 minutes and then crashed)."""
    older_demo(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=f"--heldout {heldout} must be at least 1 and smaller than --subjects"):
        prepare_demo_data(DemoOptions(tmp_path, subjects=subjects, heldout=heldout, overwrite=True))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--subjects", str(subjects), "--heldout",
                                      str(heldout), "--overwrite"])
    assert result.exit_code == 3 and "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before


class Stopped:
    """A Trainer stopped by Ctrl-C after saving a checkpoint."""

    device = "cpu"

    def __init__(self, opts, reporter):
        pass

    def run(self, progress):
        return {"step": 3, "stopped_by": "signal"}


def test_a_demo_whose_training_is_stopped_stops_there(tmp_path, monkeypatch):
    """Ctrl-C during the demo's training saves a checkpoint and ends the demo (exit 130 from the
    CLI) instead of synthesizing with an unfinished model; running it again resumes."""
    import medflow.train
    from rich.console import Console
    from rich.progress import Progress

    from medflow.demo import run_demo

    monkeypatch.setattr(medflow.train, "Trainer", Stopped)
    with pytest.raises(KeyboardInterrupt):
        run_demo(DemoOptions(tmp_path, subjects=2, heldout=1), Console(quiet=True), lambda: Progress(disable=True))
    assert (tmp_path / "data" / "manifest.csv").exists() and not (tmp_path / "synth").exists()
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), "--subjects", "2", "--heldout", "1"])
    assert result.exit_code == 130 and "run the same command again to continue" in result.output
    assert "nothing partial" not in result.output


def test_a_demo_that_trains_anew_synthesizes_anew(tmp_path, monkeypatch):
    """Outputs an earlier model made are not scored as the new model's: after the run is removed
    and trained again, every held-out subject is synthesized again."""
    import medflow.synthesize
    import medflow.train
    import medflow.trained
    from rich.console import Console
    from rich.progress import Progress

    from medflow.demo import run_demo
    from medflow.imageio import read_volume, write_volume

    class Finished(Stopped):
        def run(self, progress):
            return {"step": 3, "stopped_by": "done"}

    synthesized = []

    def synthesize_file(model, mri, target, *args, **kwargs):
        synthesized.append(target.name)
        t1 = read_volume(mri[0])
        write_volume(target, t1.data, t1.affine, overwrite=True)

    monkeypatch.setattr(medflow.train, "Trainer", Finished)
    monkeypatch.setattr(medflow.trained, "load_trained", lambda run, device: "model")
    monkeypatch.setattr(medflow.synthesize, "synthesize_file", synthesize_file)
    opts = DemoOptions(tmp_path, subjects=2, heldout=1)
    prepare_demo_data(opts)
    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "sub-002.nii.gz").write_bytes(b"an older model's")
    run_demo(opts, Console(quiet=True), lambda: Progress(disable=True))
    assert synthesized == ["sub-002.nii.gz"]


def test_a_run_interrupted_while_finishing_is_finished_by_the_next_demo(tmp_path, monkeypatch):
    """final.pt without the quality-control statistics (Ctrl-C during the run's last minute) is
    not a finished run: the demo resumes it rather than synthesizing without QC or temperature."""
    import medflow.train
    from rich.console import Console
    from rich.progress import Progress

    from medflow.checkpoint import write_config
    from medflow.demo import run_demo

    resumed = []

    class Finishing(Stopped):
        def __init__(self, opts, reporter):
            resumed.append(opts.resume)

    monkeypatch.setattr(medflow.train, "Trainer", Finishing)
    opts = DemoOptions(tmp_path, subjects=2, heldout=1)
    prepare_demo_data(opts)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "final.pt").write_bytes(b"weights")
    write_config(tmp_path / "run", {"settings": {}})
    with pytest.raises(KeyboardInterrupt):
        run_demo(opts, Console(quiet=True), lambda: Progress(disable=True))
    assert resumed == [True]
