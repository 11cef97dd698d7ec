"""The ``medflow`` command line (typer + rich). Exit codes: see medflow/errors.py and README."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from medflow import __version__
from medflow.errors import InputError, MedflowError, ModelError

if TYPE_CHECKING:
    from medflow.side import SideSpec

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="MRI-to-PET synthesis with a 3D conditional normalizing flow (Dual-Glow). "
                       "Research software: not for clinical decisions.")
console = Console(stderr=True)
out = Console()


def fail(exc: MedflowError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    return typer.Exit(exc.exit_code)


KEPT_TO_CONTINUE = "what was finished is kept; run the same command again to continue"


def guarded(body, interrupted: str = "nothing partial was left behind"):
    """Run a command body: user errors become one line and their exit code, Ctrl-C exits 130
    after saying ``interrupted`` (what the command leaves behind)."""
    try:
        return body()
    except MedflowError as exc:
        raise fail(exc) from None
    except KeyboardInterrupt:
        console.print(f"[bold red]interrupted[/]: {interrupted}", highlight=False)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as exc:
        cause = _medflow_cause(exc)
        if cause is not None:
            raise fail(cause) from None
        if os.environ.get("MEDFLOW_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {first} (set MEDFLOW_DEBUG=1 for details)",
                      highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _medflow_cause(exc: BaseException) -> MedflowError | None:
    """The user error behind ``exc``, which a library may have wrapped (MONAI's datasets re-raise
    a transform's error as RuntimeError ``from`` it), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedflowError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def version_callback(value: bool):
    if value:
        out.print(f"medflow {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: bool = typer.Option(False, "--version", callback=version_callback, is_eager=True,
                                              help="Print the version and exit.")):
    """medflow: synthesize FDG-PET from MRI with Dual-Glow."""


def parse_seconds(text: str | None) -> float | None:
    """'600', '90s', '10m', '2h' -> seconds."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smh]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise InputError(f"--time-limit {text!r}: use a positive number of seconds, or one with s, m or h "
                         "(e.g. 10m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def parse_grid(text: str | None):
    if not text:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"--grid {text!r}: give three integers, e.g. 48,56,48")
    return tuple(int(p) for p in parts)


def parse_overrides(items: list[str]) -> dict:
    """--set key=value (YAML values) -> model option overrides."""
    import yaml

    overrides = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--set {item!r}: use key=value, e.g. --set hidden=64")
        key, value = item.split("=", 1)
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise InputError(f"--set {item!r}: {value!r} is not a YAML value ({reason})") from None
    return overrides


def check_seed(seed: int | None) -> None:
    """InputError unless numpy and torch can both take ``seed`` (None: the command's default)."""
    if seed is not None and not 0 <= seed < 2**63:
        raise InputError(f"--seed must be an integer from 0 to 2^63 - 1, got {seed}")


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
                    transient=False)


@app.command()
def train(
    data: Path = typer.Argument(..., help="CSV manifest (columns mri, pet[, mask, subject, split, side info]) "
                                          "or a folder with mri/ and pet/ sub-folders of same-named files."),
    out: Path = typer.Option(..., "--out", "-o", help="Run folder for config, checkpoints and logs."),
    preset: str = typer.Option(None, help="Model preset (tiny, small, dualglow3d) or a YAML file [default: small]."),
    val: Path = typer.Option(None, help="Validation CSV/folder (default: --val-fraction of DATA)."),
    val_fraction: float = typer.Option(None, help="Fraction of training rows held out for validation "
                                                  "[default: 0.1]."),
    mri_columns: str = typer.Option(None, help="Comma-separated CSV columns stacked as MRI channels, e.g. mri,t2 "
                                               "[default: mri]."),
    side_columns: str = typer.Option("", help="Comma-separated CSV columns of side information (e.g. age,sex,dx) "
                                             "that condition the top-level PET prior; categorical ones also "
                                             "scale the PET through a learned map of relative change "
                                             "of uptake per category, the most frequent one excepted "
                                             "(the reference)."),
    spacing: float = typer.Option(None, help="Model voxel size in mm (default: the preset's)."),
    pet_normalization: str = typer.Option(None, help="global_mean: learn each PET divided by its SPM-style global "
                                          "mean and write synthetic PETs at the training median level; none: "
                                          "learn PET units as given (default: the preset's)."),
    grid: str = typer.Option(None, help="Model grid in voxels, e.g. 48,56,48 (default: fits the training data)."),
    steps: int = typer.Option(None, help="Stop after this many optimiser steps."),
    epochs: int = typer.Option(None, help="Stop after this many passes over the training set."),
    time_limit: str = typer.Option(None, help="Stop after this much training time (counted across --resume), "
                                   "e.g. 600, 10m, 12h; the learning rate then decays over it."),
    batch_size: int = typer.Option(None, help="Volumes per step per GPU (default: the preset's)."),
    lr: float = typer.Option(None, help="Peak learning rate of AdamW (default: the preset's)."),
    warmup: int = typer.Option(None, help="Linear warm-up steps (default: the preset's)."),
    ema: float = typer.Option(None, help="Keep an exponential moving average of the weights with this decay."),
    seed: int = typer.Option(None, help="Seed (default 0): the same seed on CPU gives the same weights; a "
                                        "resumed run keeps its own."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (an explicit cuda without a GPU is an error)."),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 coupling subnets on GPU (invertible maths "
                                                             "stays fp32) [default: off]."),
    memory_saving: bool = typer.Option(None, "--memory-saving/--no-memory-saving",
                                       help="Recompute activations in the backward pass (flow steps by inversion) "
                                            "instead of storing them [default: off]."),
    checkpoint_every: int = typer.Option(None, help="Write a checkpoint every N steps [default: 100]."),
    val_every: int = typer.Option(None, help="Validate every N steps [default: 200]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest intact checkpoint, "
                                "with the run's own settings for the options not given."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths",
                                             help="Accept CSV paths that are absolute or leave the CSV's folder."),
    set_: list[str] = typer.Option([], "--set", help="Override a model option, e.g. --set hidden=64 (repeatable)."),
):
    """Train a Dual-Glow model on paired MRI/PET volumes.

    Example: medflow train demo/data/manifest.csv --out runs/small --preset small --time-limit 10m
    """
    from medflow.train import Trainer, TrainOptions

    def body():
        check_seed(seed)
        opts = TrainOptions(
            data=data, out=out, preset=preset, val=val, val_fraction=val_fraction,
            mri_columns=[c.strip() for c in mri_columns.split(",") if c.strip()] if mri_columns is not None else None,
            side_columns=[c.strip() for c in side_columns.split(",") if c.strip()], spacing=spacing,
            pet_normalization=pet_normalization, grid=parse_grid(grid), steps=steps, epochs=epochs,
            time_limit=parse_seconds(time_limit),
            batch_size=batch_size, lr=lr, warmup=warmup, ema=ema, seed=seed, device=device, bf16=bf16,
            recompute=memory_saving, checkpoint_every=checkpoint_every, val_every=val_every, resume=resume,
            allow_outside_paths=allow_outside_paths, model_overrides=parse_overrides(set_))
        trainer = Trainer(opts, reporter=lambda msg: console.print(msg, highlight=False))
        console.print(f"model: {trainer.model.num_parameters():,} parameters, grid {tuple(trainer.prep.grid)} "
                      f"at {trainer.prep.spacing[0]:g} mm, device {trainer.device}", highlight=False)
        with progress_bar() as progress:
            summary = trainer.run(progress)
        console.print(f"run folder: {out}  (step {summary['step']}, {summary['stopped_by']})", highlight=False)
        if summary["stopped_by"] == "signal":
            console.print(f"stopped by signal after saving a checkpoint; continue with --resume, or finish the run "
                          f"now (final weights, quality-control statistics, calibrated temperature) with --resume "
                          f"--steps {summary['step']}", highlight=False)
            raise typer.Exit(130)

    guarded(body, "the checkpoints written so far are kept and --resume continues the run (one stopped "
                  "before its first step wrote nothing)")


def _batch_jobs(input_: Path, output: Path, mri_columns: list[str], allow_outside: bool,
                side_spec: SideSpec | None, side: dict[str, str]):
    """(subject, [mri paths], output path, side information) for a file, a folder or a CSV input.

    Side information: a CSV row's own columns, then ``side`` (from --side) for the rest."""
    from medflow.imageio import image_stem, is_image_path
    from medflow.manifest import read_csv_manifest

    if input_.suffix.lower() == ".csv":
        subjects = read_csv_manifest(input_, mri_columns, need_pet=False, allow_outside=allow_outside)
        for s in subjects:
            if s.subject in ("", ".", "..") or Path(s.subject).name != s.subject or "\\" in s.subject:
                raise InputError(f"{input_}: subject {s.subject!r} is not a plain file name; outputs are named "
                                 "after the subject inside the output folder")
        jobs = [(s.subject, s.mri, output / f"{s.subject}.nii.gz",
                 {**side, **(side_spec.pick(s.side) if side_spec else {})}) for s in subjects]
    elif input_.is_dir() and not is_image_path(input_):
        if len(mri_columns) > 1:
            raise InputError(f"{input_}: the model needs {len(mri_columns)} MRI modalities; give a CSV with "
                             f"columns {', '.join(mri_columns)}")
        files = sorted(p for p in input_.iterdir() if is_image_path(p))
        if not files:
            raise InputError(f"{input_}: no images in folder")
        jobs = [(image_stem(p), [p], output / f"{image_stem(p)}.nii.gz", side) for p in files]
    else:
        return [(image_stem(input_), [input_], output, side)], False
    first: dict[str, list[Path]] = {}
    for _, mri_paths, out_path, _ in jobs:
        if out_path.name in first:
            raise InputError(f"{mri_paths[0]}: its output {out_path.name} is also that of {first[out_path.name][0]}; "
                             "give the inputs distinct names")
        first[out_path.name] = mri_paths
    return jobs, True


@app.command()
def synthesize(
    input_: Path = typer.Argument(..., metavar="INPUT", help="MRI file (NIfTI, .mgz, .nrrd, .mha, DICOM folder), "
                                                               "a folder of MRIs, or a CSV with the model's MRI columns."),
    output: Path = typer.Argument(..., help="Output .nii.gz for one input; a folder for a batch."),
    model: Path = typer.Option(..., "--model", "-m", help="Run folder written by medflow train."),
    temperature: float = typer.Option(None, help="Prior temperature T: 0 = prior mean, 1 = the learnt spread; "
                                                 "default: the model's, calibrated on its validation subjects "
                                                 "(config.json 'calibration'), else 0.5."),
    samples: int = typer.Option(4, help="Number of PET samples N, 1 or even (drawn in antithetic pairs); "
                                        "the output is their mean."),
    std: Path = typer.Option(None, help="Write the uncertainty map here (file; folder in batch mode): the voxel-wise "
                                        "std of the N samples, widened by the training PETs' spread of global level."),
    level_spread: bool = typer.Option(True, "--level-spread/--no-level-spread",
                                      help="--no-level-spread: the --std map is the samples' std alone (the uptake "
                                           "pattern's uncertainty, for PET read relative to its global mean)."),
    qc: Path = typer.Option(None, help="Write a PNG of orthogonal slices here (file; folder in batch mode)."),
    seed: int = typer.Option(0, help="Seed: identical seeds give identical outputs."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Batch: skip inputs whose output exists."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs."),
    strict_qc: bool = typer.Option(False, "--strict-qc", help="Fail inputs whose MRI likelihood is out of the "
                                                               "training range instead of warning."),
    side: str = typer.Option(None, help="Side information for a model trained with it, e.g. age=74,sex=F,dx=AD "
                                        "(a CSV input's own columns come first; omitted ones take the training "
                                        "default: mean age, most frequent category)."),
    allow_outside_paths: bool = typer.Option(False, "--allow-outside-paths",
                                             help="Accept CSV paths that are absolute or leave the CSV's folder."),
):
    """Synthesize PET from MRI on the input's own grid (float32 NIfTI, training PET units).

    Example: medflow synthesize sub-01_t1.nii.gz sub-01_pet.nii.gz --model runs/small --std sub-01_std.nii.gz
    """
    from medflow.device import resolve_device
    from medflow.model import valid_sample_count
    from medflow.side import parse_side
    from medflow.synthesize import SynthesisOptions, synthesize_file
    from medflow.trained import load_trained

    def body():
        if not valid_sample_count(samples):
            raise InputError(f"--samples must be 1 or even (samples are drawn in antithetic pairs), got {samples}")
        if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
            raise InputError(f"--temperature must be a number >= 0, got {temperature:g}")
        check_seed(seed)
        dev = resolve_device(device)
        tm = load_trained(model, dev)
        if tm.qc is None:
            unfinished = (f"{model}: no statistics of the training MRIs' likelihood (its training was stopped "
                          "before its end; `medflow train DATA --out RUN --resume --steps N`, N its last step, "
                          "finishes it)")
            if strict_qc:
                raise ModelError(f"{unfinished}, so --strict-qc cannot check the inputs")
            _warn(f"{unfinished}; the inputs are not checked")
        side_values = parse_side(side)
        if side_values and tm.side is None:
            raise InputError(f"{model}: this model was trained without side information; drop --side")
        if side_values:
            tm.side.encode(side_values, "--side")
        jobs, batch = _batch_jobs(input_, output, tm.mri_columns, allow_outside_paths,
                                  tm.side, side_values)
        opts = SynthesisOptions(temperature, samples, seed, overwrite, strict_qc, level_spread)
        if not batch:
            _, mri_paths, out_path, job_side = jobs[0]
            result = synthesize_file(tm, mri_paths, out_path, opts, dev, std, qc, warn=_warn, side=job_side)
            out.print(f"wrote {out_path}  (T = {result.temperature:g}, MRI likelihood {result.mri_bpv:.3f} bit/voxel, "
                      f"{result.seconds:.1f} s)", highlight=False)
            return
        _run_batch(tm, jobs, output, opts, dev, std, qc, skip_existing)

    guarded(body)


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _run_batch(tm, jobs, output, opts, dev, std_dir, qc_dir, skip_existing):
    from medflow.imageio import make_folder
    from medflow.synthesize import synthesize_file

    if std_dir is not None and os.path.realpath(std_dir) == os.path.realpath(output):
        raise InputError(f"--std {std_dir}: is the output folder, where the uncertainty maps would take the "
                         "synthetic PETs' names; give another folder")
    for folder in (output, std_dir, qc_dir):
        if folder is not None:
            make_folder(folder)
    rows, failures = [], 0
    with progress_bar() as progress:
        task = progress.add_task("synthesizing", total=len(jobs), info="")
        for subject, mri_paths, out_path, job_side in jobs:
            progress.update(task, info=subject)
            if skip_existing and out_path.exists():
                rows.append((subject, "skipped", "output exists", ""))
                progress.advance(task)
                continue
            std_path = std_dir / out_path.name if std_dir else None
            qc_path = qc_dir / (out_path.name.removesuffix(".nii.gz") + ".png") if qc_dir else None
            try:
                result = synthesize_file(tm, mri_paths, out_path, opts, dev, std_path, qc_path,
                                         warn=lambda m: progress.console.print(f"[yellow]warning:[/] {m}"),
                                         side=job_side)
                note = "; ".join(f"QC warning: {message}" for message in result.qc_warnings)
                rows.append((subject, "ok", note, f"{result.mri_bpv:.3f}"))
            except MedflowError as exc:
                failures += 1
                rows.append((subject, "failed", str(exc), ""))
                progress.console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            progress.advance(task)
    table = Table(title="medflow synthesize")
    for column in ("subject", "status", "MRI bit/voxel", "message"):
        table.add_column(column, overflow="fold")
    for subject, status, message, bpv in rows:
        style = {"ok": "green", "failed": "red", "skipped": "yellow"}[status]
        table.add_row(subject, f"[{style}]{status}[/]", bpv, message)
    out.print(table)
    provenance = output / f"medflow-synthesize-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{os.getpid()}.json"
    provenance.write_text(json.dumps({
        "medflow_version": __version__, "argv": sys.argv, "device": str(dev), "model": str(tm.weights),
        "options": {**vars(opts), "temperature": opts.temperature_for(tm)},
        "results": [dict(zip(("subject", "status", "message", "mri_bpv"), r)) for r in rows],
    }, indent=2) + "\n")
    out.print(f"{len(rows) - failures} of {len(rows)} done, {failures} failed; provenance: {provenance}")
    if failures:
        raise typer.Exit(1)


@app.command()
def evaluate(
    pred: Path = typer.Argument(..., help="Predicted PET file or folder, or a CSV with columns pred, ref[, mask]."),
    ref: Path = typer.Argument(None, help="Reference PET file or folder (not needed with a CSV)."),
    mask: Path = typer.Option(None, help="Brain mask file or folder (same names); default: the reference foreground."),
    data_range: float = typer.Option(None, help="Fixed data range for PSNR/SSIM; default: max-min of the "
                                                "reference inside the mask."),
    json_out: Path = typer.Option(None, "--json", help="Write per-subject rows and the summary as JSON."),
    csv_out: Path = typer.Option(None, "--csv", help="Write per-subject rows as CSV."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing --json/--csv files."),
):
    """PSNR, SSIM (3D), NMSE and MAE inside a mask, per subject and as mean and std.

    Conventions: metrics inside --mask (else the reference foreground: > 1 % of its 99.5th percentile, closed
    with a 3x3x3 cross twice, holes filled);
    data range = max - min of the reference inside the mask unless --data-range; PSNR = 10 log10(range^2/MSE),
    capped at 999 dB for identical images; SSIM = scikit-image 3D SSIM (Gaussian sigma 1.5) of both volumes set
    to 0 outside the mask, averaged over the mask voxels at least 5 voxels from the volume's edge (so it depends
    only on the voxels inside the mask); NMSE = sum (pred-ref)^2 / sum ref^2; MAE in the reference's units.
    Different grids are an error.

    Example: medflow evaluate out/ demo/data/pet/ --mask demo/data/mask/ --json metrics.json
    """
    from medflow.evaluation import (
        csv_report, evaluate_cases, is_single_pair, json_report, pair_cases, render_table, summarize, write_reports,
    )
    from medflow.imageio import check_output_paths

    def body():
        if data_range is not None and not (math.isfinite(data_range) and data_range > 0):
            raise InputError(f"--data-range must be a positive number, got {data_range:g}")
        cases, unmatched = pair_cases(pred, ref, mask)
        reports = [p for p in (json_out, csv_out) if p is not None]
        inputs = [pred, *([ref] if ref else [])] + [p for c in cases for p in (c.pred, c.ref, c.mask) if p]
        check_output_paths(reports, inputs, overwrite)
        for name in unmatched:
            _warn(f"{name}: no counterpart, not evaluated")
        rows = evaluate_cases(cases, data_range, stop_on_error=is_single_pair(pred, ref))
        summary = summarize(rows)
        out.print(render_table(rows, summary))
        texts = {}
        if json_out:
            texts[json_out] = json_report(rows, summary)
        if csv_out:
            texts[csv_out] = csv_report(rows)
        write_reports(texts, overwrite, inputs)
        if any(r["error"] for r in rows) or unmatched:
            raise typer.Exit(1)

    guarded(body)


@app.command("demo-data")
def demo_data(
    out_dir: Path = typer.Argument(..., help="Folder for the NIfTI files and manifest.csv."),
    subjects: int = typer.Option(32, min=1, help="Number of subjects."),
    heldout: int = typer.Option(8, min=0, help="The last N subjects get split=test in the manifest."),
    spacing: float = typer.Option(2.0, min=0.5, max=16.0, help="Voxel size of the written volumes in mm."),
    seed: int = typer.Option(0, help="Seed of the recipe."),
    metabolic_variation: float = typer.Option(
        1.0, min=0.0, help="Multiple of the recipe's 4-8 % grey-matter uptake variation, which only the PET "
        "and the ASL show (0: none, at most 5; 4 makes the ASL worth several times more to a model)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different existing demo dataset."),
):
    """Generate realistic paired T1/FLAIR/ASL/FDG-PET demo volumes from the MNI ICBM152 template (offline).

    Example: medflow demo-data demo/data --subjects 32 --heldout 8
    """
    from medflow.demo_data import MAX_METABOLIC_VARIATION, make_demo_dataset

    def body():
        check_seed(seed)
        if heldout >= subjects:
            raise InputError(f"--heldout {heldout} must be smaller than --subjects {subjects}")
        if metabolic_variation > MAX_METABOLIC_VARIATION:
            raise InputError(f"--metabolic-variation {metabolic_variation:g} must be at most {MAX_METABOLIC_VARIATION:g}")
        csv_path = make_demo_dataset(out_dir, subjects, seed=seed, spacing=spacing, heldout=heldout,
                                     metabolic_variation=metabolic_variation, overwrite=overwrite)
        out.print(f"demo data: {csv_path}")

    guarded(body, KEPT_TO_CONTINUE)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("demo"), "--out", help="Demo folder (data, run, synth, std, qc, baseline)."),
    time_limit: str = typer.Option("8m", help="Training budget, e.g. 8m; the demo reuses a finished run."),
    subjects: int = typer.Option(32, help="Demo subjects (the last --heldout are test subjects)."),
    heldout: int = typer.Option(8, help="Held-out test subjects."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start again in a folder that a demo with other "
                                   "settings or an older data recipe made: its data, run and outputs are replaced."),
):
    """The newcomer path in one command: demo data, training, synthesis with uncertainty and QC, evaluation.

    Example: medflow demo --out demo --time-limit 8m
    """
    from medflow.demo import DemoOptions, run_demo

    def body():
        opts = DemoOptions(out_dir, parse_seconds(time_limit), subjects, heldout, device=device, overwrite=overwrite)
        results = run_demo(opts, console, progress_bar)
        table = Table(title=f"held-out demo subjects (n={heldout}), inside the brain mask")
        table.add_column("method")
        for metric in ("psnr", "ssim", "nmse", "mae"):
            table.add_column(metric.upper(), justify="right")
        for method, values in results.items():
            table.add_row(method, *(f"{values[m]:.4f}" for m in ("psnr", "ssim", "nmse", "mae")))
        out.print(table)
        (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        out.print(f"synthetic PET: {out_dir / 'synth'}  uncertainty: {out_dir / 'std'}  QC images: "
                  f"{out_dir / 'qc'}\nbaseline: {out_dir / 'baseline'}  model: {out_dir / 'run'}  "
                  f"metrics: {out_dir / 'metrics.json'}", highlight=False)

    guarded(body, KEPT_TO_CONTINUE)


@app.command()
def presets():
    """List the model presets shipped in models/."""
    from medflow.presets import available_presets, load_preset

    def body():
        table = Table(title="medflow presets")
        for column in ("name", "levels x steps", "width", "spacing (mm)", "description"):
            table.add_column(column)
        for name in available_presets():
            p = load_preset(name)
            m = p["model"]
            table.add_row(name, " + ".join(str(k) for k in m["steps"]), str(m["hidden"]),
                          str(p["data"].get("spacing", "")), p.get("description", ""))
        out.print(table)

    guarded(body)


def main():
    app()


if __name__ == "__main__":
    main()
