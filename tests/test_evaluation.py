"""Batch evaluation: pairing, per-case failures, summaries and report files."""

import csv
import errno
import json

import nibabel as nib
import numpy as np
import pytest
from rich.console import Console
from scipy import ndimage

from medflow import imageio
from medflow.errors import InputError, OutputError
from medflow.evaluation import (
    CSV_COLUMNS, EvalCase, csv_report, evaluate_cases, json_report, pair_cases, render_table, summarize,
    write_reports,
)
from medflow.metrics import METRIC_NAMES, compute_metrics

SHAPE = (24, 28, 20)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def head(seed: int) -> np.ndarray:
    """A smooth positive 'head' in a zero background, float32 (X, Y, Z)."""
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.random(SHAPE), 2.0) * 10.0
    data[:3], data[-3:], data[:, :3], data[:, -3:] = 0, 0, 0, 0
    return data.astype(np.float32)


def save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


@pytest.fixture
def batch(tmp_path):
    """pred/ and ref/ folders with sub01..sub03 in common, sub04 only predicted, sub05 only referenced."""
    for index, name in enumerate(("sub01", "sub02", "sub03", "sub05")):
        ref = head(index)
        save(tmp_path / "ref" / f"{name}.nii.gz", ref)
        if name != "sub05":
            save(tmp_path / "pred" / f"{name}.nii.gz", ref + 0.1 * (index + 1) * head(10 + index))
    save(tmp_path / "pred" / "sub04.nii.gz", head(4))
    (tmp_path / "pred" / "notes.txt").write_text("not an image")
    return tmp_path


def test_folders_pair_by_name(batch):
    cases, unmatched = pair_cases(batch / "pred", batch / "ref")
    assert [c.subject for c in cases] == ["sub01", "sub02", "sub03"]
    assert all(c.pred.name == c.ref.name and c.mask is None for c in cases)
    assert sorted(unmatched) == sorted([str(batch / "pred" / "sub04.nii.gz"), str(batch / "ref" / "sub05.nii.gz")])


def test_folders_pair_nii_with_nii_gz_and_masks_by_name(tmp_path):
    save(tmp_path / "pred" / "a.nii.gz", head(0))
    save(tmp_path / "ref" / "a.nii", head(0))
    save(tmp_path / "mask" / "a.nii.gz", (head(0) > 1).astype(np.uint8))
    cases, unmatched = pair_cases(tmp_path / "pred", tmp_path / "ref", tmp_path / "mask")
    assert unmatched == []
    assert cases == [EvalCase("a", tmp_path / "pred" / "a.nii.gz", tmp_path / "ref" / "a.nii",
                              tmp_path / "mask" / "a.nii.gz")]


def test_folders_with_no_common_name_are_an_error(tmp_path):
    save(tmp_path / "pred" / "a.nii.gz", head(0))
    save(tmp_path / "ref" / "b.nii.gz", head(0))
    with pytest.raises(InputError, match="no image names in common"):
        pair_cases(tmp_path / "pred", tmp_path / "ref")


def test_two_files_make_one_case(batch):
    cases, unmatched = pair_cases(batch / "pred" / "sub02.nii.gz", batch / "ref" / "sub01.nii.gz")
    assert unmatched == [] and len(cases) == 1 and cases[0].subject == "sub02"


@pytest.mark.parametrize("ref", [None, "ref", "missing"])
def test_bad_pairings_are_input_errors(batch, ref):
    with pytest.raises(InputError):
        pair_cases(batch / "pred" / "sub01.nii.gz", None if ref is None else batch / ref)


def test_csv_with_relative_paths(batch):
    save(batch / "masks" / "m1.nii.gz", np.pad(np.ones((10, 10, 10), np.uint8), ((7, 7), (9, 9), (5, 5))))
    listing = batch / "lists" / "eval.csv"
    listing.parent.mkdir()
    listing.write_text("subject,pred,ref,mask\n"
                       "first,../pred/sub01.nii.gz,../ref/sub01.nii.gz,../masks/m1.nii.gz\n"
                       ",../pred/sub02.nii.gz,../ref/sub02.nii.gz,\n")
    cases, unmatched = pair_cases(listing, None)
    assert unmatched == []
    assert [c.subject for c in cases] == ["first", "sub02"]
    assert cases[1].mask is None
    rows = evaluate_cases(cases)
    assert [r["error"] for r in rows] == [None, None]
    assert rows[0]["mask_voxels"] == 1000
    mask = np.asarray(nib.load(batch / "masks" / "m1.nii.gz").dataobj).astype(bool)
    pred, ref = (np.asarray(nib.load(batch / d / "sub01.nii.gz").dataobj) for d in ("pred", "ref"))
    assert {m: rows[0][m] for m in METRIC_NAMES} == pytest.approx(compute_metrics(pred, ref, mask))


def test_csv_missing_column_is_an_error(tmp_path):
    listing = tmp_path / "eval.csv"
    listing.write_text("pred,pet\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="missing column"):
        pair_cases(listing, None)


def test_broken_file_does_not_stop_the_batch(batch):
    (batch / "pred" / "sub02.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    cases, _ = pair_cases(batch / "pred", batch / "ref")
    seen = []
    rows = evaluate_cases(cases, on_result=seen.append)
    assert seen == rows and len(rows) == 3
    assert rows[0]["error"] is None and rows[2]["error"] is None
    assert "sub02" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert all(rows[1][m] is None for m in METRIC_NAMES)
    assert all(isinstance(rows[i][m], float) for i in (0, 2) for m in METRIC_NAMES)


@pytest.mark.parametrize("pred_shape, pred_affine",
                         [((24, 28, 21), AFFINE), (SHAPE, np.diag([2.0, 2.0, 2.5, 1.0]))])
def test_grid_mismatch_is_an_error(tmp_path, pred_shape, pred_affine):
    save(tmp_path / "ref.nii.gz", head(0))
    save(tmp_path / "pred.nii.gz", np.random.default_rng(0).random(pred_shape).astype(np.float32), pred_affine)
    rows = evaluate_cases([EvalCase("s", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz")])
    assert "grid differs from reference" in rows[0]["error"]
    assert rows[0]["psnr"] is None


def test_fixed_data_range_is_recorded(batch):
    cases, _ = pair_cases(batch / "pred", batch / "ref")
    rows = evaluate_cases(cases[:1], data_range=100.0)
    assert rows[0]["data_range"] == 100.0


def test_summary_mean_and_std(batch):
    (batch / "pred" / "sub03.nii.gz").write_bytes(b"garbage")
    rows = evaluate_cases(pair_cases(batch / "pred", batch / "ref")[0])
    summary = summarize(rows)
    good = [r for r in rows if r["error"] is None]
    assert len(good) == 2
    for name in METRIC_NAMES:
        values = [r[name] for r in good]
        assert summary[name]["mean"] == pytest.approx(np.mean(values))
        assert summary[name]["std"] == pytest.approx(np.std(values, ddof=1))
        assert summary[name]["n"] == 2
    assert summarize([r for r in rows if r["error"]]) == {}


def test_reports_are_valid_json_and_csv(batch, monkeypatch):
    (batch / "pred" / "sub02.nii.gz").write_bytes(b"garbage")
    rows = evaluate_cases(pair_cases(batch / "pred", batch / "ref")[0])
    summary = summarize(rows)
    out = batch / "reports"
    out.mkdir()
    write_reports({out / "metrics.json": json_report(rows, summary)})
    before = (out / "metrics.json").read_bytes()
    reports = {out / "metrics.json": json_report(rows, summary), out / "metrics.csv": csv_report(rows)}
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        write_reports(reports)
    assert [p.name for p in out.iterdir()] == ["metrics.json"], "neither report published"
    with pytest.raises(OutputError, match="does not exist"):
        write_reports({out / "metrics.json": "{}", out / "missing" / "metrics.csv": ""}, overwrite=True)
    assert (out / "metrics.json").read_bytes() == before, "the JSON waits for the CSV"
    (out / "metrics.json").unlink()
    publish = imageio._publish

    def csv_fails(tmp, path, overwrite):
        if path.suffix == ".csv":
            raise OSError(errno.EIO, "input/output error")
        publish(tmp, path, overwrite)

    monkeypatch.setattr(imageio, "_publish", csv_fails)
    with pytest.raises(OutputError, match="metrics.csv"):
        write_reports(reports)
    assert list(out.iterdir()) == [], "the JSON placed first is removed again, no temp files"
    monkeypatch.undo()
    write_reports(reports, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"], "replaced, no temp files"

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    report = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert report["failed"] == 1 and len(report["cases"]) == 3
    assert report["summary"]["psnr"]["mean"] == pytest.approx(summary["psnr"]["mean"])
    assert set(report["conventions"]) >= {"mask", "data_range", *METRIC_NAMES}

    with open(out / "metrics.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        table = list(reader)
    assert tuple(reader.fieldnames) == CSV_COLUMNS
    assert [r["subject"] for r in table] == ["sub01", "sub02", "sub03"]
    assert table[1]["error"] and table[1]["psnr"] == ""
    assert float(table[0]["ssim"]) == pytest.approx(rows[0]["ssim"])


def test_table_shows_subjects_errors_and_summary(batch):
    (batch / "pred" / "sub02.nii.gz").write_bytes(b"garbage")
    rows = evaluate_cases(pair_cases(batch / "pred", batch / "ref")[0])
    console = Console(record=True, width=250)
    console.print(render_table(rows, summarize(rows)))
    text = console.export_text()
    for word in ("sub01", "sub02", "sub03", "mean", "std", "2 of 3 ok", "PSNR", "failed"):
        assert word in text
    assert "sub02: " in text and "not a gzip file" in text


def test_cli_reports_never_replace_inputs_or_existing_files_silently(batch):
    from typer.testing import CliRunner

    from medflow.cli import app

    def cli(*args):
        return CliRunner().invoke(app, ["evaluate", *map(str, args)])

    listing = batch / "pairs.csv"
    listing.write_text("subject,pred,ref\na,pred/sub01.nii.gz,ref/sub01.nii.gz\n")
    before = listing.read_bytes()
    result = cli(listing, "--csv", listing, "--overwrite")
    assert result.exit_code == 4 and "is an input" in result.stderr and listing.read_bytes() == before
    reference = batch / "ref" / "sub01.nii.gz"
    result = cli(batch / "pred" / "sub01.nii.gz", reference, "--json", reference, "--overwrite")
    assert result.exit_code == 4 and "is an input" in result.stderr
    report = batch / "metrics.json"
    report.write_text("precious")
    result = cli(listing, "--json", report)
    assert result.exit_code == 4 and "--overwrite" in result.stderr and report.read_text() == "precious"
    assert cli(listing, "--json", report, "--overwrite").exit_code == 0
    assert json.loads(report.read_text())["cases"][0]["subject"] == "a"
    for value in ("0", "-1", "nan"):
        result = cli(listing, "--data-range", value)
        assert result.exit_code == 3 and "--data-range must be a positive number" in result.stderr, value


def test_cli_one_bad_pair_is_a_one_line_input_error_without_reports(batch):
    """Two files are one pair, not a batch: a broken one exits 3 with one line naming it and
    writes no report; in a batch (folders) it is a failed row and exit 1."""
    from typer.testing import CliRunner

    from medflow.cli import app

    broken = batch / "pred" / "sub02.nii.gz"
    broken.write_bytes(broken.read_bytes()[:100])
    report = batch / "one.json"
    result = CliRunner().invoke(app, ["evaluate", str(broken), str(batch / "ref" / "sub02.nii.gz"),
                                      "--json", str(report)])
    assert result.exit_code == 3 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(broken) in result.stderr.replace("\n", "") and not report.exists()
    result = CliRunner().invoke(app, ["evaluate", str(batch / "pred"), str(batch / "ref"), "--json", str(report)])
    assert result.exit_code == 1 and json.loads(report.read_text())["cases"][1]["error"]
