"""``medflow demo``: demo data -> train ``small`` -> synthesize held-out subjects -> evaluate.

Every stage reuses what an earlier run left in the demo folder: data with the same
parameters, a finished training run (an unfinished one is resumed), and the outputs that run
made (a demo that trains anew synthesizes anew).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medflow.baseline import IntensityMapping
from medflow.checkpoint import read_config
from medflow.device import resolve_device
from medflow.errors import InputError, OutputError
from medflow.imageio import make_folder, read_mask, read_volume, write_volume
from medflow.manifest import read_csv_manifest
from medflow.metrics import compute_metrics


@dataclass
class DemoOptions:
    """out: demo folder; time_limit: training budget in seconds; subjects/heldout: demo cohort."""

    out: Path
    time_limit: float = 480.0
    subjects: int = 32
    heldout: int = 8
    preset: str = "small"
    device: str = "auto"
    temperature: float | None = None  # None: the temperature training calibrated (``TrainedModel.temperature``)
    samples: int = 8
    seed: int = 0
    overwrite: bool = False  # replace a demo folder made with other parameters or an older data recipe

    def check(self) -> None:
        """InputError unless the cohort has a test subject and a training subject."""
        if not 1 <= self.heldout < self.subjects:
            raise InputError(f"--heldout {self.heldout} must be at least 1 and smaller than --subjects {self.subjects}")


RUN_FOLDER = "run"
OUTPUT_FOLDERS = ("synth", "std", "qc", "baseline")
DATA_SPACING = 2.0  # mm


def prepare_demo_data(opts: DemoOptions) -> Path:
    """The demo cohort in ``out/data``; returns its manifest. A folder holding another demo's data
    (other parameters or recipe) is an OutputError unless ``opts.overwrite``: then that data, the run
    trained on it and the outputs made from it are replaced."""
    from medflow.demo_data import dataset_parameters, make_demo_dataset, recorded_parameters

    opts.check()
    out = Path(opts.out)
    recorded = recorded_parameters(out / "data")
    wanted = dataset_parameters(opts.subjects, seed=opts.seed, spacing=DATA_SPACING, heldout=opts.heldout)
    if opts.overwrite and recorded is not None and recorded != wanted:
        for name in (RUN_FOLDER, *OUTPUT_FOLDERS):
            try:
                shutil.rmtree(out / name)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise OutputError(f"{out / name}: cannot remove ({exc.strerror or exc})") from None
    return make_demo_dataset(out / "data", opts.subjects, seed=opts.seed, spacing=DATA_SPACING, heldout=opts.heldout,
                             overwrite=opts.overwrite)


def _zooms(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(0))


def _mapping_example(subject) -> tuple:
    """(T1, PET, mask, PET voxel size in mm) of one training subject, for ``IntensityMapping.fit``."""
    pet = read_volume(subject.pet)
    return read_volume(subject.mri[0]).data, pet.data, read_mask(subject.mask, like=pet), _zooms(pet.affine)


def run_demo(opts: DemoOptions, console, progress_factory) -> dict:
    """Run the whole newcomer path; returns {method: {metric: mean}} for the held-out subjects."""
    from medflow.synthesize import SynthesisOptions, synthesize_file
    from medflow.train import Trainer, TrainOptions
    from medflow.trained import load_trained

    out = Path(opts.out)
    data_csv = prepare_demo_data(opts)
    console.print(f"demo data: {data_csv}")
    subjects = read_csv_manifest(data_csv, ["mri"])
    train_rows = [s for s in subjects if s.split != "test"]
    test_rows = [s for s in subjects if s.split == "test"]

    run = out / RUN_FOLDER
    # Finished: final weights and the quality-control statistics written after them.
    trains = not ((run / "final.pt").exists() and "qc" in read_config(run))
    if trains:
        resume = (run / "config.json").exists()
        trainer = Trainer(TrainOptions(data=data_csv, out=run, preset=opts.preset, time_limit=opts.time_limit,
                                       seed=opts.seed, device=opts.device, resume=resume, val_every=100,
                                       checkpoint_every=50), reporter=console.print)
        console.print(f"training '{opts.preset}' for at most {opts.time_limit:.0f} s on {trainer.device}")
        with progress_factory() as progress:
            stopped_by = trainer.run(progress)["stopped_by"]
        if stopped_by == "signal":
            raise KeyboardInterrupt  # the checkpoint is saved; running the demo again resumes the training
    device = resolve_device(opts.device)
    model = load_trained(run, device)

    mapping = IntensityMapping().fit(_mapping_example(s) for s in train_rows)
    synth_opts = SynthesisOptions(opts.temperature, opts.samples, opts.seed, overwrite=True)
    folders = {name: out / name for name in OUTPUT_FOLDERS}
    for folder in folders.values():
        make_folder(folder)
    scores: dict[str, list[dict]] = {"medflow": [], "intensity mapping": []}
    for s in test_rows:
        target = folders["synth"] / f"{s.subject}.nii.gz"
        if trains or not target.exists():
            synthesize_file(model, s.mri, target, synth_opts, device, folders["std"] / f"{s.subject}.nii.gz",
                            folders["qc"] / f"{s.subject}.png")
        ref = read_volume(s.pet)
        mask = read_mask(s.mask, like=ref)
        t1 = read_volume(s.mri[0])
        base_path = folders["baseline"] / f"{s.subject}.nii.gz"
        baseline = mapping.predict(t1.data, mask, _zooms(t1.affine))
        write_volume(base_path, baseline, t1.affine, overwrite=True)
        scores["medflow"].append(compute_metrics(read_volume(target).data, ref.data, mask))
        scores["intensity mapping"].append(compute_metrics(baseline, ref.data, mask))
    return {method: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} for method, rows in scores.items()}
