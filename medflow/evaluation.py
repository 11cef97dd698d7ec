"""Batch evaluation of predicted PET volumes against references (``medflow evaluate``).

Inputs pair up in one of three forms: two files; two folders whose images share a name (the
same stem, so ``sub01.nii.gz`` matches ``sub01.nii``); or a CSV with columns ``pred``, ``ref``
and optional ``mask`` and ``subject`` (paths relative to the CSV's folder). A mask given as a
folder is looked up by the same name. Each case is evaluated independently: a failing case
(unreadable file, grids that differ) gets an error message and the batch carries on. Metric
conventions: see ``medflow.metrics``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from rich.table import Table
from rich.text import Text

from medflow.errors import InputError, MedflowError, ResourceError
from medflow.imageio import atomic_paths, image_stem, is_image_path, read_mask, read_volume
from medflow.manifest import read_csv_rows
from medflow.metrics import CONVENTIONS, METRIC_NAMES, compute_metrics, data_range_of, reference_mask

AFFINE_TOLERANCE = 1e-4
CSV_COLUMNS = ("subject", "pred", "ref", "mask", *METRIC_NAMES, "data_range", "mask_voxels", "error")


@dataclass
class EvalCase:
    """One prediction, its reference and an optional mask (None: the reference foreground)."""

    subject: str
    pred: Path
    ref: Path
    mask: Path | None = None


def _is_folder(path: Path) -> bool:
    """A folder of images, as opposed to a file or a single-image folder (DICOM series)."""
    return path.is_dir() and not is_image_path(path)


def _images_by_stem(folder: Path) -> dict[str, Path]:
    images: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if is_image_path(p)):
        stem = image_stem(path)
        if stem in images:
            raise InputError(f"{folder}: {images[stem].name} and {path.name} have the same name")
        images[stem] = path
    return images


def _mask_for(mask: Path | None, ref: Path, mask_images: dict[str, Path] | None) -> Path | None:
    """The mask of one reference: the mask file itself, or the same name in the mask folder."""
    if mask is None:
        return None
    if mask_images is None:
        return mask
    return mask_images.get(image_stem(ref), mask / ref.name)


def _cases_from_csv(csv_path: Path, mask: Path | None, mask_images: dict[str, Path] | None) -> list[EvalCase]:
    columns, rows = read_csv_rows(csv_path)
    missing = [c for c in ("pred", "ref") if c not in columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)} (columns: pred, ref[, mask, subject])")
    base = csv_path.parent

    def listed(value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else base / path

    cases = []
    for line, row in enumerate(rows, start=2):
        if not row.get("pred") or not row.get("ref"):
            raise InputError(f"{csv_path}: line {line} has an empty pred or ref path")
        pred, ref = listed(row["pred"]), listed(row["ref"])
        row_mask = listed(row["mask"]) if row.get("mask") else _mask_for(mask, ref, mask_images)
        cases.append(EvalCase(row.get("subject") or image_stem(pred), pred, ref, row_mask))
    if not cases:
        raise InputError(f"{csv_path}: no rows")
    seen: set[str] = set()
    for case in cases:
        if case.subject in seen:
            raise InputError(f"{csv_path}: subject {case.subject!r} listed twice; add a subject column")
        seen.add(case.subject)
    return cases


def is_single_pair(pred: Path, ref: Path | None) -> bool:
    """Whether ``pred`` and ``ref`` name one image each (files or DICOM series), not a batch."""
    return ref is not None and not _is_folder(Path(pred)) and not (Path(pred).suffix.lower() == ".csv"
                                                                  and Path(pred).is_file())


def pair_cases(pred: Path, ref: Path | None, mask: Path | None = None) -> tuple[list[EvalCase], list[str]]:
    """Cases to evaluate, and the images (as paths) that have no counterpart in the other folder.

    ``pred`` and ``ref`` are two files, two folders, or ``pred`` is a CSV and ``ref`` is None.
    ``mask`` is one mask for all cases, a folder of masks named like the references, or None.
    Raises InputError for a missing input, mixed file/folder inputs or folders with no common name.
    """
    pred, ref = Path(pred), None if ref is None else Path(ref)
    mask = None if mask is None else Path(mask)
    for path in (pred, ref, mask):
        if path is not None and not path.exists():
            raise InputError(f"{path}: no such file or folder")
    mask_images = _images_by_stem(mask) if mask is not None and _is_folder(mask) else None
    if pred.suffix.lower() == ".csv" and pred.is_file():
        if ref is not None:
            raise InputError(f"{pred}: a CSV lists the references itself; give no reference argument")
        return _cases_from_csv(pred, mask, mask_images), []
    if ref is None:
        raise InputError(f"{pred}: a reference file or folder is needed (or give a CSV with columns pred, ref)")
    if _is_folder(pred) != _is_folder(ref):
        raise InputError(f"{pred} and {ref}: give two files or two folders")
    if is_single_pair(pred, ref):
        return [EvalCase(image_stem(pred), pred, ref, _mask_for(mask, ref, mask_images))], []
    preds, refs = _images_by_stem(pred), _images_by_stem(ref)
    common = preds.keys() & refs.keys()
    if not common:
        raise InputError(f"{pred} ({len(preds)} images) and {ref} ({len(refs)} images): no image names in common")
    cases = [EvalCase(stem, preds[stem], refs[stem], _mask_for(mask, refs[stem], mask_images))
             for stem in sorted(common)]
    unmatched = [str(p) for stem, p in [*preds.items(), *refs.items()] if stem not in common]
    return cases, unmatched


def _check_same_grid(pred, ref) -> None:
    """InputError unless two volumes share shape and affine (no silent resampling)."""
    if pred.data.shape != ref.data.shape:
        raise InputError(f"{pred.path}: grid differs from reference {ref.path} "
                         f"(shape {pred.data.shape} vs {ref.data.shape}); resample first")
    worst = float(np.max(np.abs(np.asarray(pred.affine) - np.asarray(ref.affine))))
    if worst > AFFINE_TOLERANCE:
        raise InputError(f"{pred.path}: grid differs from reference {ref.path} "
                         f"(affines differ by up to {worst:.3g}); resample first")


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def score_case(case: EvalCase, data_range: float | None = None) -> dict:
    """Metrics, data range and mask voxel count of one case; MedflowError naming the file when it
    cannot be scored."""
    try:
        ref = read_volume(case.ref, what="reference")
        pred = read_volume(case.pred, what="prediction")
        _check_same_grid(pred, ref)
        mask = reference_mask(ref.data) if case.mask is None else read_mask(case.mask, like=ref)
        used_range = data_range_of(ref.data, mask) if data_range is None else float(data_range)
        return {**compute_metrics(pred.data, ref.data, mask, used_range), "data_range": used_range,
                "mask_voxels": int(mask.sum())}
    except MemoryError:
        raise ResourceError(f"{case.pred}: not enough memory to score it") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"{case.pred}: {_one_line(exc)}") from None


def evaluate_case(case: EvalCase, data_range: float | None = None, stop_on_error: bool = False) -> dict:
    """One result row: paths, metrics, data range, mask voxel count and error (None). A case that
    cannot be scored gets None metrics and its error, or with ``stop_on_error`` raises it."""
    row = {"subject": case.subject, "pred": str(case.pred), "ref": str(case.ref),
           "mask": None if case.mask is None else str(case.mask),
           **dict.fromkeys(METRIC_NAMES), "data_range": None, "mask_voxels": None, "error": None}
    try:
        row.update(score_case(case, data_range))
    except MedflowError as exc:
        if stop_on_error:
            raise
        row["error"] = _one_line(exc)
    return row


def evaluate_cases(cases: list[EvalCase], data_range: float | None = None,
                   on_result: Callable[[dict], None] | None = None, stop_on_error: bool = False) -> list[dict]:
    """One row per case (see ``evaluate_case``), in order; ``on_result(row)`` after each."""
    rows = []
    for case in cases:
        row = evaluate_case(case, data_range, stop_on_error)
        rows.append(row)
        if on_result is not None:
            on_result(row)
    return rows


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{metric: {"mean", "std", "n"}} over the rows without error; std is the sample std (ddof 1,
    0 for a single row). Empty when no row succeeded."""
    good = [r for r in rows if not r["error"]]
    if not good:
        return {}
    summary = {}
    for name in METRIC_NAMES:
        values = np.array([r[name] for r in good], dtype=np.float64)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[name] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return summary


def json_report(rows: list[dict], summary: dict) -> str:
    """{"conventions", "summary", "failed", "cases"} as strict JSON (no NaN/Infinity)."""
    failed = sum(1 for r in rows if r["error"])
    payload = {"conventions": CONVENTIONS, "summary": summary, "failed": failed, "cases": rows}
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def csv_report(rows: list[dict]) -> str:
    """A header (``CSV_COLUMNS``) and one line per case; empty cells for None."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if row.get(c) is None else row[c] for c in CSV_COLUMNS])
    return buffer.getvalue()


def write_reports(reports: dict[Path, str], overwrite: bool = False, inputs: list[Path] = ()) -> None:
    """Write each report's text to its path, all published together or none (``atomic_paths``:
    an existing file only with ``overwrite``, never one of ``inputs``)."""
    with atomic_paths(list(reports), overwrite=overwrite, inputs=inputs) as tmps:
        for tmp, text in zip(tmps, reports.values()):
            tmp.write_text(text, encoding="utf-8")


def _fmt(name: str, value) -> str:
    if value is None:
        return "-"
    return {"psnr": f"{value:.2f}", "ssim": f"{value:.4f}", "mask_voxels": str(value)}.get(name, f"{value:.4g}")


def render_table(rows: list[dict], summary: dict) -> Table:
    """Per-subject metrics and status, mean and std rows, and the failed cases' errors as caption."""
    table = Table(title="Evaluation inside the mask", caption_justify="left")
    longest = max((len(row["subject"]) for row in rows), default=7)
    table.add_column("subject", overflow="fold", min_width=min(24, max(7, longest)))
    for header in ("PSNR dB", "SSIM", "NMSE", "MAE", "range", "voxels"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("status", min_width=6)
    columns = (*METRIC_NAMES, "data_range", "mask_voxels")
    for row in rows:
        status = Text("failed", style="red") if row["error"] else Text("ok", style="green")
        table.add_row(Text(row["subject"]), *(_fmt(c, row[c]) for c in columns), status)
    if summary:
        table.add_section()
        n = next(iter(summary.values()))["n"]
        table.add_row(Text("mean", style="bold"), *(_fmt(m, summary[m]["mean"]) for m in METRIC_NAMES), "", "",
                      f"{n} of {len(rows)} ok")
        table.add_row(Text("std", style="bold"), *(_fmt(m, summary[m]["std"]) for m in METRIC_NAMES), "", "", "")
    errors = [f"{row['subject']}: {row['error']}" for row in rows if row["error"]]
    if errors:
        table.caption = Text("\n".join(errors), style="red")
    return table
