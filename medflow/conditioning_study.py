"""Does side information and a second MRI contrast help? ``python -m medflow.conditioning_study``.

On demo data, the same preset is trained for the same number of steps and seeds with
(a) T1 only, (b) T1 given twice (the two-contrast variants' control), (c) T1 + side information
(age, sex, dx), (d) T1 + FLAIR, (e) T1 + ASL, and each run's conditional
PET bits per voxel is measured on the held-out (split=test) subjects with its final weights; the
side model is scored again with default covariates, the FLAIR model with each held-out FLAIR
made without its lesions and the ASL model with each held-out ASL made without the metabolic
information, so that the same weights show how much they rely on what was changed. Then
the side-information model synthesizes every held-out subject twice at temperature 0, with dx=CN
and with dx=AD (all else equal), and the difference CN - AD is compared inside the recipe's
hypometabolism pattern against the rest of the grey matter. Writes CONDITIONING.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from scipy import ndimage

from medflow.bench import header_markdown, machine_info, md_table, show, training_progress, versions
from medflow.measure import usable_cores

console = Console()

VARIANTS = {  # name: (MRI columns, side columns)
    "T1": (["mri"], []),
    "T1 twice": (["mri", "mri"], []),  # control of the two-contrast variants: their initial weights and data order
    "T1 + side (age, sex, dx)": (["mri"], ["age", "sex", "dx"]),
    "T1 + FLAIR": (["mri", "t2"], []),
    "T1 + ASL": (["mri", "asl"], []),
}
SIDE_VARIANT, FLAIR_VARIANT, ASL_VARIANT = "T1 + side (age, sex, dx)", "T1 + FLAIR", "T1 + ASL"
CONTROL_VARIANT = "T1 twice"
PAIRED_ROWS = [  # (variant, result key, what changed): the same weights scored on changed held-out inputs
    (SIDE_VARIANT, "default_side_bpv", "every covariate at its default"),
    (FLAIR_VARIANT, "lesion_free_bpv", "each FLAIR without its lesions"),
    (ASL_VARIANT, "metabolism_free_bpv", "each ASL without the metabolic information"),
]
# Held-out contrasts made again without what they add: result key -> (CSV column and DemoSubject
# field, folder, ``make_demo_subject`` keywords; every draw of the recipe is the same).
CHANGED_CONTRASTS = {
    "lesion_free_bpv": ("t2", "lesion-free", {"flair_lesions": False}),
    "metabolism_free_bpv": ("asl", "metabolism-free", {"asl_metabolism": False}),
}
# Regions on each subject's grid: the hypometabolism core and grey matter away from it.
CORE, OUTSIDE, GREY = 0.5, 0.05, 0.5


def heldout_rows(data_csv: Path) -> list[dict]:
    """The split=test rows of ``data_csv``."""
    with open(data_csv, newline="") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "test"]


def write_test_csv(data_csv: Path, name: str = "test.csv", column: str = "t2",
                   paths: dict[str, str] | None = None) -> Path:
    """The split=test rows of ``data_csv`` as their own manifest ``name`` beside it, with ``column``
    replaced by ``paths`` (subject: path relative to the CSV) where given."""
    rows = [{**r, column: (paths or {}).get(r["subject"], r[column])} for r in heldout_rows(data_csv)]
    path = data_csv.with_name(name)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def recipe(data_csv: Path) -> dict:
    """The ``make_demo_subject`` keywords (seed, spacing, metabolic_variation) of the demo dataset
    ``data_csv``, from its ``demo.json``."""
    from medflow.demo_data import recorded_parameters

    params = recorded_parameters(data_csv.parent)
    return {"seed": params["seed"], "spacing": params["spacing"],
            "metabolic_variation": params.get("metabolic_variation", 1.0)}


def _subject(name: str, data_csv: Path, **changes):
    """The ``DemoSubject`` ``name`` of the demo dataset ``data_csv`` made again by the recipe,
    with ``make_demo_subject`` ``changes``."""
    from medflow.demo_data import make_demo_subject

    return make_demo_subject(int(name.split("-")[1]) - 1, **{**recipe(data_csv), **changes})


def write_changed_contrasts(data_csv: Path) -> dict[str, Path]:
    """For each ``CHANGED_CONTRASTS`` entry, each held-out subject's contrast made again by the recipe
    with the change (the PET keeps what was taken out, every other draw is the same) in a folder
    beside ``data_csv``, and a test manifest that uses them; returns {result key: manifest}."""
    import nibabel as nib

    manifests = {}
    for key, (column, folder_name, changes) in CHANGED_CONTRASTS.items():
        folder = data_csv.parent / folder_name
        folder.mkdir()
        paths = {}
        for row in heldout_rows(data_csv):
            original = nib.load(data_csv.parent / row[column])
            name = Path(row[column]).name
            changed = getattr(_subject(row["subject"], data_csv, **changes), column)
            nib.save(nib.Nifti1Image(changed, original.affine, original.header), folder / name)
            paths[row["subject"]] = f"{folder_name}/{name}"
        manifests[key] = write_test_csv(data_csv, f"test-{folder_name}.csv", column, paths)
    return manifests


def heldout_lesion_fraction(data_csv: Path) -> float:
    """Fraction of held-out brain voxels where the lesions lower PET uptake by 3 % or more
    (``lesion_uptake_loss``: with the smallest drops the recipe draws)."""
    from medflow.demo_data import lesion_uptake_loss

    fractions = []
    for row in heldout_rows(data_csv):
        subject = _subject(row["subject"], data_csv)
        loss = lesion_uptake_loss(subject.lesions, recipe(data_csv)["spacing"])
        fractions.append(float(np.mean(loss[subject.mask > 0] >= 0.03)))
    return float(np.mean(fractions))


def train_variant(data_csv: Path, test_csv: Path, changed: dict[str, Path], out: Path, variant: str, seed: int,
                  args) -> dict:
    """Train one variant; returns steps, seconds and held-out PET bits per voxel of the final weights
    (NaN, with the reason, for a run that stopped on non-finite losses), and for the side, FLAIR and
    ASL variants the same weights' score with default covariates or with the ``changed`` contrasts
    (``write_changed_contrasts``)."""
    from medflow.errors import TrainingError
    from medflow.manifest import read_manifest
    from medflow.train import Trainer, TrainOptions

    mri_columns, side_columns = VARIANTS[variant]
    opts = TrainOptions(data=data_csv, out=out, preset=args.preset, val=test_csv, mri_columns=mri_columns,
                        side_columns=side_columns, steps=args.steps, batch_size=args.batch_size, seed=seed,
                        device=args.device, val_every=10**9, val_samples=0, checkpoint_every=10**9)
    start = time.monotonic()
    trainer = Trainer(opts, reporter=lambda *_: None)
    result = {"variant": variant, "seed": seed}
    try:
        with training_progress() as progress:
            result["heldout_pet_bpv"] = trainer.run(progress)["val_pet_bpv"]
        result["voxels"] = float(np.mean([trainer.eval_item(item)[1][0].numel() for item in trainer.val_cache]))
        if side_columns:
            default = trainer.side_spec.encode({}, "default side information").tolist()
            result["default_side_bpv"] = heldout_bpv(trainer, [{**item, "side": default} for item in trainer.val_cache])
        for key, (column, _, _) in CHANGED_CONTRASTS.items():
            if column in mri_columns:
                subjects = read_manifest(changed[key], mri_columns)
                result[key] = heldout_bpv(trainer, trainer.load_cache(subjects, str(changed[key])))
    except TrainingError as exc:
        console.print(f"  [red]{exc}[/red]")
        result.update(heldout_pet_bpv=float("nan"), failure=str(exc))
    return {**result, "steps": trainer.step, "seconds": time.monotonic() - start}


def heldout_bpv(trainer, items) -> float:
    """Mean PET bits per voxel of a trained model over dataset ``items`` (stage-1 records, see
    ``Trainer.load_cache``), as validation computes it: with the training's own model and data, items
    whose covariates or FLAIR were changed measure how much the model uses them."""
    model = trainer.ema.module if trainer.ema else trainer.model
    model.eval()
    bpv = []
    with torch.no_grad():
        for item in items:
            mri, pet, side = trainer.eval_item(item)
            bpv.append(model.log_prob(pet, mri, side)["pet_bpv"].item())
    return float(np.mean(bpv))


def side_information_bits() -> float:
    """Upper bound on the entropy of the demo recipe's (age, sex, dx), bits per subject: log2 of
    the number of values they can take (ages in ``AGE_RANGE`` written to 0.1 year, 2 sexes, 3
    diagnoses). For exact models, conditioning on them gains I(PET; side | MRI) <= this, per subject."""
    from medflow.demo_data import AGE_RANGE, DIAGNOSES

    ages = round(10 * (AGE_RANGE[1] - AGE_RANGE[0])) + 1
    return math.log2(ages * 2 * len(DIAGNOSES))


def gaussian_channel_bits(signals: list[np.ndarray], noises: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Gaussian-channel estimate of the information, in bits per volume, that signal + noise carries
    about the signal: voxels x the mean over frequencies of 0.5 log2(1 + S(f) / N(f)), with S and N the
    signals' and noises' periodograms (volumes of one shape) averaged over the volumes and over 3x3x3
    neighbouring frequencies, N scaled to the noise's mean square inside ``masks`` (where the signal
    is). Exact for stationary Gaussian signal and noise; of all signals with that spectrum, a Gaussian
    one carries the most through Gaussian noise."""
    def spectrum(volumes):
        power = np.mean([np.abs(np.fft.fftn(v)) ** 2 for v in volumes], axis=0) / volumes[0].size
        return ndimage.uniform_filter(power, 3, mode="wrap")

    inside = np.mean([np.mean(n[m] ** 2) for n, m in zip(noises, masks)]) / np.mean([np.mean(n**2) for n in noises])
    return float(np.sum(0.5 * np.log2(1.0 + spectrum(signals) / (inside * spectrum(noises)))))


def metabolic_variation_bits(data_csv: Path) -> float:
    """Estimated bits per held-out subject that the recipe's metabolic variation (the smooth variation
    of grey-matter uptake, 4-8 % times the dataset's multiple, which the ASL shows and no other input
    does) adds to a PET:
    ``gaussian_channel_bits`` of the noiseless PET with minus without it, against the PET's scanner
    noise, in units of the PET's global mean, at the data's voxel size (a model at a coarser one can
    use no more). A model given the ASL can beat T1 alone by about this much, plus the few bits of
    the hypometabolism's strength that the T1's atrophy does not show."""
    signals, noises, masks = [], [], []
    for row in heldout_rows(data_csv):
        subject = _subject(row["subject"], data_csv)
        quiet = _subject(row["subject"], data_csv, pet_noise=False).pet
        flat = _subject(row["subject"], data_csv, pet_noise=False, metabolic_variation=0.0).pet
        level = subject.pet[subject.mask > 0].mean()
        signals.append((quiet - flat) / level)
        noises.append((subject.pet - quiet) / level)
        masks.append(subject.mask > 0)
    return gaussian_channel_bits(signals, noises, masks)


def dx_contrast(run: Path, data_csv: Path, work: Path, device: str) -> list[dict]:
    """Per held-out subject: mean CN - AD synthesis difference (PET units) in the hypometabolism
    core and in the other grey matter, both at temperature 0 with the subject's own age and sex."""
    from medflow.device import resolve_device
    from medflow.imageio import read_volume
    from medflow.manifest import read_csv_manifest
    from medflow.synthesize import SynthesisOptions, synthesize_file
    from medflow.trained import load_trained

    dev = resolve_device(device)
    tm = load_trained(run, dev)
    rows = []
    for s in [s for s in read_csv_manifest(data_csv, ["mri"]) if s.split == "test"]:
        truth = _subject(s.subject, data_csv)
        pet = {}
        for dx in ("CN", "AD"):
            path = work / f"{s.subject}_dx-{dx}.nii.gz"
            synthesize_file(tm, s.mri, path, SynthesisOptions(0.0, 1, overwrite=True), dev,
                            side={**tm.side.pick(s.side), "dx": dx})
            pet[dx] = read_volume(path).data
        diff = pet["CN"] - pet["AD"]
        grey = (truth.gm > GREY) & (truth.mask > 0)
        core, rest = grey & (truth.hypometabolism > CORE), grey & (truth.hypometabolism < OUTSIDE)
        rows.append({"subject": s.subject, "dx": truth.dx,
                     "core": float(diff[core].mean()), "rest": float(diff[rest].mean()),
                     "core_relative": float(diff[core].mean() / pet["CN"][core].mean()),
                     "rest_relative": float(diff[rest].mean() / pet["CN"][rest].mean())})
    return rows


def study_markdown(command: str, started: datetime, runs: list[dict], contrast: list[dict], lesion_fraction: float,
                   asl_bits: float, args) -> str:
    from medflow.demo_data import METABOLIC_VARIATION, RECIPE_VERSION

    by_variant = {v: [r for r in runs if r["variant"] == v] for v in VARIANTS}
    t1_alone, control = ({r["seed"]: r["heldout_pet_bpv"] for r in by_variant[v]} for v in ("T1", CONTROL_VARIANT))

    def against(rs, key, baseline):
        return f"{np.mean([r[key] - baseline[r['seed']] for r in rs]):+.4f}"

    def row(variant, label, rs, key):
        two_contrasts = len(VARIANTS[variant][0]) == 2 and variant != CONTROL_VARIANT
        return [label, ", ".join(f"{r[key]:.4f}" for r in rs), f"{np.mean([r[key] for r in rs]):.4f}",
                "" if variant == "T1" else against(rs, key, t1_alone),
                against(rs, key, control) if two_contrasts else ""]

    rows = [row(v, v, rs, "heldout_pet_bpv") + [f"{np.mean([r['seconds'] for r in rs]):.0f}"]
            for v, rs in by_variant.items()]
    for variant, key, label in reversed(PAIRED_ROWS):
        paired = [r for r in by_variant[variant] if key in r]
        rows.insert(list(VARIANTS).index(variant) + 1, row(variant, f"{variant}, same weights, {label}", paired, key)
                    + [""])
    contrast_rows = [[c["subject"], c["dx"], f"{c['core']:.4f}", f"{100 * c['core_relative']:.1f}",
                      f"{c['rest']:.4f}", f"{100 * c['rest_relative']:.1f}"] for c in contrast]
    failures = "".join(f"\n\nRun {r['variant']}, seed {r['seed']} failed: {r['failure']}"
                       for r in runs if "failure" in r)
    core = [c["core_relative"] for c in contrast]
    rest = [c["rest_relative"] for c in contrast]
    bits = side_information_bits()
    voxels = np.mean([r["voxels"] for r in runs if "voxels" in r])
    t1 = [r["heldout_pet_bpv"] for r in by_variant["T1"]]
    low, high = (100 * args.metabolic_variation * v for v in METABOLIC_VARIATION)
    variation = f"{low:g}-{high:g} % ({args.metabolic_variation:g} times the recipe's)"
    spread = (f" The T1 runs' held-out scores span {max(t1) - min(t1):.4f} bit/voxel over the seeds, "
              f"{(max(t1) - min(t1)) * voxels / bits:.0f} times that bound." if len(t1) > 1 else "")
    header = header_markdown(command, machine_info(), versions(), started, "medflow conditioning study",
                             "the command", "Times in seconds.")
    return f"""{header}
Demo data (recipe version {RECIPE_VERSION}): {args.subjects} subjects (the last {args.heldout} held out, split=test),
{args.data_spacing:g} mm, data seed {args.data_seed}, metabolic variation {variation}. Each variant trains preset `{args.preset}` for {args.steps} steps of batch {args.batch_size} with seeds
{', '.join(map(str, args.seeds))}; the held-out conditional PET bits per voxel (lower is better)
come from each run's final weights on the held-out subjects, which no run trains or selects on.
The difference columns are paired by seed. "T1 twice" gives the T1 in both input channels: the
architecture of the two-contrast variants, and with the same seed their initial weights and data
order, without a second contrast's information; so "vs T1 twice" compares T1 + FLAIR and T1 + ASL
with that twin, and part of the training noise between separately trained runs cancels.
The row "every covariate at its default" evaluates the side-information model's final weights with
each held-out subject's age, sex and dx replaced by the defaults: the gap to its own row shows how
much the model relies on the covariates. Likewise the row "each FLAIR without its lesions" evaluates
the FLAIR model's final weights with each held-out FLAIR made again by the recipe without its
white-matter lesions (the PET keeps them, every other draw is the same): the gap shows how much it
relies on what the FLAIR shows and the T1 does not. The lesions lower PET uptake by 3 % or
more in {100 * lesion_fraction:.1f} % of the held-out subjects' brain voxels
(`demo_data.lesion_uptake_loss`, with the smallest drops the recipe draws): there the PET follows
what only the FLAIR shows. The ASL perfusion map follows the PET's grey-matter uptake
(flow-metabolism coupling), so it shows the hypometabolism, which the T1's atrophy only partly
shows, and the metabolic variation, which no other MRI shows, at low resolution and SNR
(data/README.md): a second contrast that carries more of the PET than the FLAIR does. The row "each
ASL without the metabolic information" evaluates the ASL model's final weights with each held-out
ASL made again from a uniform grey-matter uptake (no hypometabolism, no metabolic variation; lesions
and every draw the same): the gap shows how much it relies on what the ASL shows of the PET's
metabolism. These gaps are not the bits an input saves: given a misleading input a model pays more
than a model trained without that input (for an exact model the expected gap is the information
the input carries plus a divergence), so what an input gains is measured against T1 alone or the
T1-twice control.{failures}

{md_table(["variant", "held-out PET bit/voxel per seed", "mean", "vs T1", "vs T1 twice", "train s"], rows)}

How large a gain side information can bring: for exact models, conditioning on (age, sex, dx)
lowers the expected held-out code length by the conditional mutual information
I(PET; side | MRI), which is at most the covariates' entropy, at most {bits:.1f} bits per subject
(`side_information_bits`: ages written to 0.1 year over the recipe's range, 2 sexes, 3 diagnoses),
that is at most {bits / voxels:.1e} bit/voxel over the {voxels:.0f} voxels of a held-out model grid.{spread}
Separately trained runs therefore cannot resolve that gain at this number of seeds. Real models
can gain more, where the covariates make up for what a model has not learned from the MRI (the
hypometabolism that the T1's atrophy only partly shows); the paired row (same weights, covariates
at their defaults) shows that the model relies on them, without training noise between its two
numbers.

How large a gain the ASL can bring: what it shows of the PET and no other input does is the
recipe's metabolic variation (the smooth variation of grey-matter uptake, {variation}), worth about
{asl_bits:.0f} bits per held-out subject, {asl_bits / voxels:.4f} bit/voxel of a model grid
(`metabolic_variation_bits`: a Gaussian-channel estimate from each held-out PET made again by the
recipe without scanner noise, with and without the variation, against its scanner noise, at the
data's voxel size). The strength of the hypometabolism, which the T1's atrophy shows only in part,
adds a few bits per subject. So T1 + ASL can beat its control by about that much and no more.

Diagnosis control: the side-information model (seed {args.seeds[0]}) synthesizes each held-out
subject at temperature 0 with dx=CN and with dx=AD, age and sex its own. CN - AD in PET units and
as % of the CN synthesis, inside the recipe's hypometabolism core (pattern > {CORE}, GM > {GREY})
and in the other grey matter (pattern < {OUTSIDE}, GM > {GREY}). The recipe lowers grey-matter
uptake in the core by 15-35 % for AD and 0-3 % for CN, and nowhere else, in absolute units. Training
divides each PET by its global mean (`pet_normalization: global_mean`) and synthesis writes every PET
at the same level, so a lower core also lifts the rest of an AD brain by a few % in these units:
the regional effect is the core's % minus the other grey matter's.

{md_table(["subject", "true dx", "core CN-AD", "core %", "other GM CN-AD", "other GM %"], contrast_rows)}

Mean over subjects: {100 * np.mean(core):.1f} % in the core against {100 * np.mean(rest):.1f} % in the other grey
matter, a regional effect of {100 * (np.mean(core) - np.mean(rest)):.1f} points.

Total time of this run: {(time.monotonic() - args.clock) / 60:.1f} min.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medflow.conditioning_study", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("CONDITIONING.md"), help="report file")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=400, help="training steps of every run")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="subjects per step (2: the batch of the recorded study, whatever the preset says)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--subjects", type=int, default=32)
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-spacing", type=float, default=2.0, help="voxel size of the demo data in mm")
    parser.add_argument("--metabolic-variation", type=float, default=1.0,
                        help="multiple of the recipe's grey-matter uptake variation that only the PET and ASL show")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.clock, started = time.monotonic(), datetime.now(timezone.utc)
    torch.set_num_threads(usable_cores())
    command = shlex.join(["python", "-m", "medflow.conditioning_study", *(sys.argv[1:] if argv is None else argv)])
    from medflow.demo_data import make_demo_dataset

    with tempfile.TemporaryDirectory(prefix="medflow-conditioning-") as tmp:
        work = Path(tmp)
        console.print(f"generating demo data ({args.subjects} subjects, {args.heldout} held out)")
        data_csv = make_demo_dataset(work / "data", args.subjects, seed=args.data_seed, spacing=args.data_spacing,
                                     heldout=args.heldout, metabolic_variation=args.metabolic_variation)
        test_csv = write_test_csv(data_csv)
        changed = write_changed_contrasts(data_csv)
        lesion_fraction = heldout_lesion_fraction(data_csv)
        asl_bits = metabolic_variation_bits(data_csv)
        runs = []
        for seed in args.seeds:
            for variant in VARIANTS:
                console.print(f"training {variant}, seed {seed}")
                runs.append(train_variant(data_csv, test_csv, changed, work / f"run-{len(runs)}", variant, seed, args))
                console.print(f"  held-out PET {runs[-1]['heldout_pet_bpv']:.4f} bit/voxel")
        side_run = work / f"run-{list(VARIANTS).index(SIDE_VARIANT)}"
        (work / "synth").mkdir()
        contrast = dx_contrast(side_run, data_csv, work / "synth", args.device)
    show("held-out PET bit/voxel", ["variant", "seed", "bit/voxel"],
         [[r["variant"], str(r["seed"]), f"{r['heldout_pet_bpv']:.4f}"] for r in runs])
    args.out.write_text(study_markdown(command, started, runs, contrast, lesion_fraction, asl_bits, args))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
