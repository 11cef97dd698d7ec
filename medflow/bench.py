"""``python -m medflow.bench``: training speed and memory, synthesis latency and quality -> BENCHMARKS.md.

Sections (``--sections``): ``speed`` (training step of ``small`` and ``dualglow3d``, plain
autograd vs the memory-saving backward, and the FrEIA-built peer of ``medflow.peer_flow``),
``synthesis`` (latency of ``DualGlow.sample`` for 1 and 8 samples), ``tuning`` (bf16 subnets and
``torch.compile``), ``batch`` (the largest training batch; both meant for a GPU) and ``quality`` (medflow
``small`` trained for ``--quality-steps`` steps and a MONAI U-Net for as many seconds and as many
steps on the demo data, scored on its held-out subjects; ``--quality-seeds`` repeats it over seeds).
``--quick`` runs small sizes only and skips quality. Every section runs on ``--device``; the report keeps
one part per device (cpu, cuda) and one per device for runs over several seeds (cpu_seeds).

Every speed and latency number comes from a fresh worker process (``medflow.measure``), so
peak memories do not mix. Times are in seconds, memories in MiB."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from medflow.calibration import (
    CALIBRATION_SAMPLES,
    COVERAGE_Z,
    coverage,
    ideal_coverage,
    prediction_z,
    with_level_spread,
)
from medflow.imageio import write_bytes_atomic
from medflow.measure import MIB, Case, usable_cores, volume_text
from medflow.optimizer import adamw

QUALITY_STEPS = 300  # medflow training steps in the quality section
QUALITY_TRAIN_SUBJECTS = 24  # demo subjects medflow and the U-Net train on (validation included)
QUALITY_TEST_SUBJECTS = 56  # held-out demo subjects they are scored on: raw PSNR's medflow - U-Net difference
                            # has an SD of about 1 dB over subjects (their own levels; EXPERIMENTS.md), SE 0.13 dB
UNET_WARMUP_STEPS = 10  # U-Net steps before the timed ones (their times include one-off costs)
UNET_TIMED_STEPS = 40  # U-Net steps timed to turn medflow's training time into U-Net steps
GPU_VOLUME = (96, 112, 96)
MAX_BATCH = 256  # the largest training batch the batch-size search tries

console = Console(width=None if sys.stdout.isatty() else 160)


# ----- machine and versions ----------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def total_ram_gib() -> float:
    """Installed memory in GiB (MemTotal of /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def machine_info() -> dict:
    return {"cpu": cpu_model(), "cores": usable_cores(), "ram_gib": total_ram_gib(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def versions() -> dict:
    import monai

    import medflow

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "FrEIA": metadata.version("FrEIA"), "medflow": medflow.__version__}


def run_case(case: Case, timeout_s: float) -> dict:
    """Measure ``case`` in a fresh ``python -m medflow.measure`` process."""
    command = [sys.executable, "-m", "medflow.measure", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if proc.returncode == -9 else f"exit code {proc.returncode}"
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"error": f"{reason} {tail[0]}".strip()}
    return json.loads(lines[-1])


def result_text(r: dict) -> str:
    """One measurement in a line of the console log."""
    if "error" in r:
        return "failed: " + r["error"]
    if "max_batch" in r:
        return f"largest batch {r['max_batch']} ({r['limit']})"
    return f"median {r['median_s']:.3f} s, first {r['first_s']:.2f} s, peak {r['peak_mib']:.0f} MiB"


def run_cases(cases: list[Case], timeout_s: float) -> list[dict]:
    """Run each case in its own worker, with a rich progress display."""
    results = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("measuring", total=len(cases))
        for case in cases:
            progress.update(task, description=case.label)
            results.append(run_case(case, timeout_s))
            progress.console.print(f"{case.label}: {result_text(results[-1])}")
            progress.advance(task)
    return results


# ----- what runs where --------------------------------------------------------------------
@dataclass
class SpeedConfig:
    """A preset on a volume (voxels) with optional model overrides and timed-step count;
    ``why``: the reason when this is not what a GPU user would run."""

    preset: str
    shape: tuple[int, int, int]
    overrides: dict = field(default_factory=dict)
    timed: int = 3
    why: str = ""


def speed_configs(quick: bool, device: str) -> list[SpeedConfig]:
    """GPU: both presets on the 2 mm brain volume. CPU: ``small`` there, ``dualglow3d`` (501 M
    parameters) on 32^3 voxels. Quick: 32^3 for ``small``, 16^3 and 2 steps per level for ``dualglow3d``."""
    if quick:
        return [SpeedConfig("small", (32, 32, 32), why="--quick"),
                SpeedConfig("dualglow3d", (16, 16, 16), {"steps": [2, 2, 2, 2]}, why="--quick")]
    if device == "cuda":
        return [SpeedConfig("small", GPU_VOLUME, timed=10), SpeedConfig("dualglow3d", GPU_VOLUME, timed=5)]
    return [SpeedConfig("small", GPU_VOLUME, timed=3),
            SpeedConfig("dualglow3d", (32, 32, 32), timed=2,
                        why="the 2 mm volume is too slow for a CPU benchmark with width-512 subnets at every level")]


def train_case(config: SpeedConfig, device: str, **options) -> Case:
    """A training-step case of ``config`` on ``device``; ``options``: other ``Case`` fields."""
    return Case(**{"task": "train", "preset": config.preset, "shape": config.shape, "overrides": config.overrides,
                   "timed": config.timed, "device": device, **options})


def speed_cases(config: SpeedConfig, device: str) -> list[Case]:
    """medflow with plain autograd, medflow with the memory-saving backward, the FrEIA peer in
    PyTorch's default layout and, on a CPU, in medflow's channels-last one (``speed_names``)."""
    peers = [train_case(config, device, impl="peer")]
    if device == "cpu":
        peers.append(train_case(config, device, impl="peer", channels_last=True))
    return [train_case(config, device), train_case(config, device, recompute=True), *peers]


def speed_names(device: str) -> list[str]:
    """Row names of ``speed_cases``, in their order."""
    names = ["medflow, plain autograd", "medflow, memory-saving backward", "FrEIA peer, PyTorch's default layout"]
    return names + (["FrEIA peer, channels-last weights"] if device == "cpu" else [])


def speed_rounds(device: str) -> int:
    """How often each speed case runs: twice on a CPU, whose speed drifts with other load and
    memory reclaim (the medflow/peer ratio of one run moved by 0.1-0.2 between runs), once on a GPU."""
    return 2 if device == "cpu" else 1


def times_text(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from repeated runs of a case: step time the median of all their timed steps,
    CPU time and memories the median over the runs; the first failure if any run failed."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    times = [t for r in rounds for t in r["times_s"]]
    medians = {key: statistics.median(r[key] for r in rounds)
               for key in ("median_cpu_s", "baseline_mib", "peak_mib", "above_baseline_mib")}
    return {**rounds[0], **medians, "times_s": times, "median_s": statistics.median(times)}


def run_rounds(cases: list[Case], rounds: int, timeout_s: float) -> list[dict]:
    """``run_cases`` ``rounds`` times, every other round in reverse order, so that a drift in the
    machine's speed falls on all implementations alike; ``merge_rounds`` per case."""
    runs = []
    for i in range(rounds):
        order = cases if i % 2 == 0 else cases[::-1]
        results = run_cases(order, timeout_s)
        runs.append(results if i % 2 == 0 else results[::-1])
    return [merge_rounds(list(per_case)) for per_case in zip(*runs)]


def synthesis_cases(quick: bool, device: str) -> list[Case]:
    """``small`` on the 2 mm brain volume (quick: 48x56x48), 1 and 8 samples at T = 0.5."""
    shape = (48, 56, 48) if quick else GPU_VOLUME
    return [Case("sample", "small", shape, samples=n, timed=3 if n > 1 else 5, device=device) for n in (1, 8)]


PRECISIONS = ({}, {"bf16": True})  # fp32 and bf16 coupling subnets


def tuning_cases(quick: bool, device: str) -> list[Case]:
    """Per preset of ``speed_configs``: medflow's training step in fp32 and with bf16 subnets, then
    the fp32 step with ``torch.compile`` (two warm-up steps: the first compiles)."""
    configs = speed_configs(quick, device)
    eager = [train_case(c, device, **v) for c in configs for v in PRECISIONS]
    return eager + [train_case(c, device, compiled=True, warmup=2) for c in configs]


def batch_cases(quick: bool, device: str) -> tuple[list[Case], list[Case]]:
    """Per preset of ``speed_configs``: the plain fp32 step at batch 1 (the base of per-volume
    ratios) and the searches for the largest batch that fits in each precision (timed then with 2 steps)."""
    search = {"task": "max_batch", "timed": 2, "batch": 2 if quick else MAX_BATCH}
    configs = speed_configs(quick, device)
    return ([train_case(c, device) for c in configs],
            [train_case(c, device, **search, **v) for c in configs for v in PRECISIONS])


def at_largest_batch(searches: list[Case], found: list[dict]) -> list[Case]:
    """A training-step case at the largest batch of each search that found one."""
    return [replace(case, task="train", batch=r["max_batch"]) for case, r in zip(searches, found) if "max_batch" in r]


# ----- quality ------------------------------------------------------------------------------
def training_progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), console=console)


def train_unet(trainer, progress: Progress, budget_s: float | None = None, steps: int | None = None):
    """MONAI BasicUNet, L1 loss from scaled MRI to scaled PET, on the flow's own training batches
    (``trainer.train_batch``: same cache, augmentation and batch size) for ``budget_s`` seconds or
    for ``steps`` steps (one of the two). It runs with the layers of medflow's U-Net injector
    (``unet_with_medflow_layers``), so that the same network trains at the same speed in both models.

    A time becomes a number of steps once the ``UNET_TIMED_STEPS`` after the first
    ``UNET_WARMUP_STEPS`` are timed (so at least their sum, whatever the budget); until then the
    learning rate stays at its peak, and it then decays by cosine to 10 % at the last step, as
    medflow's does over its own, so the result depends on the clock only through that number.
    """
    if (budget_s is None) == (steps is None):
        raise ValueError("train_unet needs exactly one of a time budget and a number of steps")
    from monai.networks.nets import BasicUNet

    from medflow.device import place_model
    from medflow.flows.injector import unet_with_medflow_layers
    from medflow.train import lr_factor

    torch.manual_seed(trainer.opts.seed)
    net = unet_with_medflow_layers(BasicUNet(spatial_dims=3, in_channels=len(trainer.settings["mri_columns"]),
                                             out_channels=1, features=(16, 16, 32, 64, 128, 16)))
    net = place_model(net, trainer.device)
    optimizer = adamw(net.parameters(), lr=1e-3)
    total = steps  # with a time budget, known once timed
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, 0, s / max(1, total - 1) if total else None))
    task = progress.add_task("U-Net", total=total, info="")
    start, step = time.monotonic(), 0
    while total is None or step < total:
        if step == UNET_WARMUP_STEPS:
            timed_from = time.monotonic()
        if total is None and step == UNET_WARMUP_STEPS + UNET_TIMED_STEPS:
            now = time.monotonic()
            total = step + max(0, int((budget_s - (now - start)) / ((now - timed_from) / UNET_TIMED_STEPS)))
            progress.update(task, total=total)
            if step == total:
                break
        mri, pet, _ = trainer.train_batch(step)
        loss = torch.nn.functional.l1_loss(net(mri), pet)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        progress.update(task, completed=step, info=f"L1 {loss.item():.4f}")
    return net.eval(), step


@torch.no_grad()
def unet_predict(net, tm, mri_paths, device: torch.device):
    """U-Net prediction in PET units on the MRI's own grid (medflow's synthesis preprocessing)."""
    from medflow.imageio import read_volume
    from medflow.preprocess import pet_to_units, plain_tensor, volume_to_metatensor
    from medflow.synthesize import preprocessing_for, to_native_grid

    transform = preprocessing_for(tm)
    data = transform({"mri": volume_to_metatensor([read_volume(p, what="MRI") for p in mri_paths])})
    mri = plain_tensor(data["mri"])[None].to(device)
    return to_native_grid(pet_to_units(net(mri)[0, 0], tm.prep), data, transform)


def coverage_zs(n: int) -> tuple[float, float]:
    """The intervals reported for n samples: the issue's 1.645 std and the finite-sample 90 % one."""
    return COVERAGE_Z, prediction_z(n)


def level_matched(ref, pred, mask):
    """The reference rescaled so that its mean inside the brain ``mask`` (bool, same shape) is the
    prediction's: the uptake pattern without the subject's global level, which the MRI does not
    show. Within the mask, because a prediction's background (a regression net's small
    non-zero values outside the head) moves a whole-volume global mean but not the brain's level."""
    ref, pred = np.asarray(ref, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    return ref * (pred[mask].mean() / ref[mask].mean())


def level_redrawn_psnr(pred, ref, mask, levels) -> float:
    """Raw PSNR (dB) of ``pred`` against ``ref`` inside the brain ``mask`` (bool, same shape), expected
    over the subject's global level: the mean, over ``levels`` (other subjects' global means,
    ``preprocess.global_mean``), of the PSNR against ``ref`` rescaled to each of them (data range
    and error as ``metrics.compute_metrics`` takes them). The demo recipe draws each subject's brain
    mean uptake independently of its MRI, so this is raw PSNR largely without the luck of the test
    subjects' own draws (a global mean also holds the brain's share of it, which varies a little
    with the uptake pattern)."""
    from medflow.metrics import data_range_of, psnr_from_mse
    from medflow.preprocess import global_mean

    ref, pred = np.asarray(ref, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    own, levels = global_mean(torch.from_numpy(ref)), np.asarray(levels, dtype=np.float64)
    if not (own > 0 and levels.size and (levels > 0).all()):
        raise ValueError(f"levels must be positive, got the reference's {own:g} and {levels.tolist()}")
    ratios = levels / own
    p, r, data_range = pred[mask], ref[mask], data_range_of(ref, mask)
    return float(np.mean([psnr_from_mse(float(np.mean((p - a * r) ** 2)), a * data_range) for a in ratios]))


CALIBRATION_TRUTHS = ("true PET; std with the level's spread",
                      "true PET at the synthesis's brain mean; std of the samples")


def medflow_variants(tm) -> dict[str, tuple[float, int]]:
    """name: (temperature, samples), at the temperature ``medflow synthesize`` uses by default
    (``TrainedModel.temperature``: calibrated on the validation subjects, else 0.5) and, when that
    is another, at 0.5; each mean and std from as many samples as the temperature was calibrated for."""
    default = f"T={tm.temperature:.2f} ({'calibrated' if tm.calibration else 'default'})"
    n = CALIBRATION_SAMPLES
    variants = {f"medflow, mean of {n} samples, {default}": (tm.temperature, n)}
    if tm.temperature != 0.5:
        variants[f"medflow, mean of {n} samples, T=0.5"] = (0.5, n)
    variants["medflow, T=0 (prior mean)"] = (0.0, 1)
    variants[f"medflow, single sample, {default}"] = (tm.temperature, 1)
    return variants


def score_test_subjects(tm, unets: dict, subjects, folder: Path, device: torch.device, levels) -> dict:
    """Per-method lists of metric dicts (PSNR dB, SSIM, NMSE, MAE in PET units) against the true PET
    (``scores``) and against it rescaled to each prediction's brain mean (``level_matched``: the
    uptake pattern alone), of ``{"psnr": level_redrawn_psnr}`` over ``levels`` (``level_redrawn``),
    and the coverage per temperature, over the test subjects, all on each subject's native grid
    inside its brain mask; ``unets``: name -> trained U-Net."""
    from medflow.imageio import read_mask, read_volume
    from medflow.metrics import compute_metrics
    from medflow.synthesize import SynthesisOptions, synthesize_file

    variants = medflow_variants(tm)
    scores = {**{name: [] for name in unets}, **{name: [] for name in variants}}
    matched = {name: [] for name in scores}
    redrawn = {name: [] for name in scores}

    def score(name, pred, ref, mask):
        """Score ``pred`` the three ways; returns the level-matched reference."""
        ref_at_level = level_matched(ref, pred, mask)
        scores[name].append(compute_metrics(pred, ref, mask))
        matched[name].append(compute_metrics(pred, ref_at_level, mask))
        redrawn[name].append({"psnr": level_redrawn_psnr(pred, ref, mask, levels)})
        return ref_at_level

    calibration = {(truth, t, z): [] for t, n in variants.values() if n > 1
                   for truth in CALIBRATION_TRUTHS for z in coverage_zs(n)}
    for s in subjects:
        ref = read_volume(s.pet)
        mask = read_mask(s.mask, like=ref)
        for name, net in unets.items():
            score(name, unet_predict(net, tm, s.mri, device), ref.data, mask)
        for name, (temperature, samples) in variants.items():
            mean_path, std_path = folder / f"{s.subject}_mean.nii.gz", folder / f"{s.subject}_std.nii.gz"
            synthesize_file(tm, s.mri, mean_path, SynthesisOptions(temperature, samples, overwrite=True,
                                                                   level_spread=False),
                            device, std_out=std_path if samples > 1 else None)
            mean = read_volume(mean_path).data
            ref_at_level = score(name, mean, ref.data, mask)
            if samples > 1:
                std = read_volume(std_path).data
                with_level = with_level_spread(mean, std, tm.prep.pet_level_moments)
                for truth, values, spread in zip(CALIBRATION_TRUTHS, (ref.data, ref_at_level), (with_level, std)):
                    for z in coverage_zs(samples):
                        calibration[(truth, temperature, z)].append(coverage(mean, spread, values, mask, z))
    return {"scores": scores, "level_matched": matched, "level_redrawn": redrawn, "coverage": calibration,
            "samples": CALIBRATION_SAMPLES, "calibration": tm.calibration, "temperature": tm.temperature}


def quality_run(data_csv: Path, work: Path, steps: int, seed: int, device: torch.device) -> dict:
    """medflow ``small`` trained for ``steps`` steps, and the U-Net for the seconds that took
    (``Trainer.clock``: the training loop with its validations and checkpoints before the last
    step) and for as many steps, all
    with ``seed`` (which also picks the validation subjects and the batch order) -> test scores."""
    from medflow.imageio import read_volume
    from medflow.manifest import read_manifest
    from medflow.preprocess import global_mean
    from medflow.train import Trainer, TrainOptions
    from medflow.trained import load_trained

    start = time.monotonic()
    console.print(f"seed {seed}: {steps} medflow steps, then the U-Net for as long and for as many steps")
    trainer = Trainer(TrainOptions(data=data_csv, out=work / "run", preset="small", steps=steps,
                                   device=device.type, seed=seed), reporter=console.print)
    with training_progress() as progress:
        summary = trainer.run(progress)
    budget_s = trainer.clock
    with training_progress() as progress:
        net, unet_steps = train_unet(trainer, progress, budget_s=budget_s)
        same_steps, _ = train_unet(trainer, progress, steps=summary["step"])
    tm = load_trained(work / "run", device)
    test = [s for s in read_manifest(data_csv, ["mri"]) if s.split == "test"]
    levels = [global_mean(torch.from_numpy(np.asarray(read_volume(s.pet).data)))
              for s in trainer.train_subjects + trainer.val_subjects]
    (work / "synth").mkdir()
    console.print(f"scoring {len(test)} held-out subjects")
    result = score_test_subjects(tm, {UNET: net, UNET_SAME_STEPS: same_steps}, test, work / "synth", device, levels)
    result.update(seed=seed, budget_s=budget_s, flow_steps=summary["step"], served_step=tm.step,
                  unet_steps=unet_steps, n_levels=len(levels),
                  n_train=len(trainer.train_cache), n_val=len(trainer.val_cache), n_test=len(test),
                  grid=list(trainer.prep.grid), spacing=list(trainer.prep.spacing),
                  batch_size=trainer.batch_size, device=str(device), seconds=time.monotonic() - start)
    return result


def run_quality(steps: int, device: torch.device, seeds: int, subjects: int, heldout: int) -> list[dict]:
    """Demo data (``subjects``, the last ``heldout`` for testing) -> ``quality_run`` for seeds
    0 .. ``seeds`` - 1, each on the same data and number of medflow steps."""
    from medflow.demo_data import make_demo_dataset

    with tempfile.TemporaryDirectory(prefix="medflow-bench-") as tmp:
        work = Path(tmp)
        console.print(f"generating demo data ({subjects} subjects, {heldout} held out, 2 mm)")
        data_csv = make_demo_dataset(work / "data", subjects=subjects, heldout=heldout, spacing=2.0)
        return [quality_run(data_csv, work / f"seed{seed}", steps, seed, device) for seed in range(seeds)]


# ----- report -------------------------------------------------------------------------------
def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def show(title: str, headers: list[str], rows: list[list[str]]) -> None:
    """Print a table on the console."""
    table = Table(title=title)
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def load_text() -> str:
    """The 1-minute load average, a hint of other processes competing for the cores."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def cpu_use_text(r: dict) -> str:
    """Process CPU time over (wall time x threads) of the median step, in percent."""
    return f"{100 * r['median_cpu_s'] / (r['median_s'] * r['threads']):.0f} %"


def ratio_text(a: dict, b: dict, key: str) -> str:
    if "error" in a or "error" in b:
        return "n/a"
    return f"{a[key] / b[key]:.2f}"


def steps_text(config: SpeedConfig) -> str:
    """Steps per level and coupling width of the model that ran."""
    from medflow.presets import load_preset

    model = {**load_preset(config.preset)["model"], **config.overrides}
    return f"{model['steps']}, width {model['hidden']}"


SPEED_HEADERS = ["preset", "volume (voxels)", "steps per level, width", "implementation", "trainable params",
                 "step time (s)", "CPU use", "peak memory above baseline (MiB)", "baseline (MiB)",
                 "grads + AdamW moments (MiB)"]
RATIO_HEADERS = ["preset", "volume", "time: memory-saving / plain", "memory: memory-saving / plain",
                 "peer (its faster layout)", "time: medflow plain / peer", "memory: medflow plain / peer",
                 "memory: medflow memory-saving / peer"]


def speed_rows(configs: list[SpeedConfig], results: list[list[dict]], device: str) -> list[list[str]]:
    rows = []
    for config, runs in zip(configs, results):
        for name, r in zip(speed_names(device), runs):
            head = [config.preset, volume_text(config.shape), steps_text(config), name]
            if "error" in r:
                rows.append(failed_row(head, r["error"], SPEED_HEADERS))
                continue
            rows.append(head + [f"{r['params'] / 1e6:.1f} M", f"{r['median_s']:.2f}", cpu_use_text(r),
                                f"{r['above_baseline_mib']:.0f}", f"{r['baseline_mib']:.0f}",
                                f"{12 * r['params'] / MIB:.0f}"])
    return rows


def faster_peer(names: list[str], peers: list[dict]) -> tuple[str, dict]:
    """The name and result of the peer run with the shorter step time (the first when all failed)."""
    ran = [(r["median_s"], index) for index, r in enumerate(peers) if "error" not in r]
    index = min(ran)[1] if ran else 0
    return names[index], peers[index]


def ratio_rows(configs: list[SpeedConfig], results: list[list[dict]], device: str) -> list[list[str]]:
    rows = []
    for config, (plain, saving, *peers) in zip(configs, results):
        name, peer = faster_peer(speed_names(device)[2:], peers)
        rows.append([config.preset, volume_text(config.shape),
                     ratio_text(saving, plain, "median_s"), ratio_text(saving, plain, "above_baseline_mib"),
                     name.removeprefix("FrEIA peer, "),
                     ratio_text(plain, peer, "median_s"), ratio_text(plain, peer, "above_baseline_mib"),
                     ratio_text(saving, peer, "above_baseline_mib")])
    return rows


PEER_DIFFERENCES = """\
What differs between medflow and the FrEIA peer (`medflow/peer_flow.py`). Shared code: the
shape of the coupling subnets (`coupling_subnet`: 3x3x3 -> 1x1x1 -> 3x3x3 convolutions of the
same widths, last layer zero), the Gaussian priors (`GaussianPrior`, conditioned on the kept
half and on the MRI latent of the same level), the levels and splits, the MRI-feature
conditioning of the PET couplings and the affine injector on the PET input
(`ConditionalAffine`; each where the preset has it) and the loss. Different:

- Convolutions in the coupling subnets. medflow: `medflow.flows.conv.Conv3d`, which runs the
  batch-1 CPU convolutions PyTorch would send to its im2col path on oneDNN (forward and
  backward), or, where the weight has more output channels than the input has voxels (the top
  levels), as one product of the input's patches with the channels-last weight read in place
  (PyTorch's im2col copies that weight to the contiguous layout three times per step). Peer:
  plain `torch.nn.Conv3d`, as a FrEIA user writes them. The priors and the injector are
  medflow's modules in both, so they use medflow's convolution in both. On a GPU, and for
  batches above 1, the two convolutions are the same code.
- Memory layout. On a CPU medflow stores its 5-D weights channels-last (`device.place_model`).
  The peer runs twice: in PyTorch's default, contiguous layout, as a FrEIA user's model has it,
  and in medflow's channels-last one (where PyTorch copies its top-level weights to the
  contiguous layout at every call); the ratios take the faster. On a GPU both keep the default.

- Flow step. medflow: ActNorm -> invertible 1x1x1 convolution with a learned LU-parametrised
  matrix (applied factor by factor where a batch has fewer voxels than channels) -> affine
  coupling. Peer: `Fm.ActNorm` -> `Fm.AllInOneBlock`, i.e. affine coupling -> learned
  per-channel affine (softplus-parametrised) -> fixed random channel permutation, applied as a
  1x1x1 convolution with a permutation matrix. Both evaluate one subnet and one
  dense CxC channel mix per step; the peer's mix is not learned, hence its fewer trainable
  parameters.
- Coupling clamp: medflow `(2c/pi) atan(s/c)`, `AllInOneBlock` `c tanh(0.1 s)`.
- Squeeze: both move each 2x2x2 block into channels; the peer's is an `Fm.InvertibleModule`
  written for it, since FrEIA's downsampling modules are 2D only.
- Backward: the peer keeps every activation (FrEIA has no memory-saving backward); medflow's
  memory-saving backward (`set_recompute(True)`) rebuilds each step's input from its output,
  the coupling's from one evaluation of its subnet, and recomputes the U-Net injector (in
  `small`) one convolution unit at a time.
- Graph: the peer runs one FrEIA `SequenceINN` per level, built for one fixed volume size."""


def volume_note(configs: list[SpeedConfig]) -> str:
    """Which runs differ from what a GPU user would run, and why."""
    notes = [f"`{c.preset}` ran on {volume_text(c.shape)} voxels with steps per level {steps_text(c)} ({c.why})"
             for c in configs if c.why]
    if not notes:
        return ""
    return (f"A GPU user trains both presets on the 2 mm brain volume, {volume_text(GPU_VOLUME)} voxels. "
            "Here " + "; ".join(notes) + ".\n")


def memory_method(device: str) -> str:
    if device == "cuda":
        return ("Baseline = `torch.cuda.memory_allocated` after imports, model build and ActNorm "
                "initialisation; peak = `torch.cuda.max_memory_allocated` after that.")
    return ("Baseline = resident set size (RSS, VmRSS) after imports, model build and ActNorm "
            "initialisation; peak = the RSS high-water mark (VmHWM) after that, reset through "
            "`/proc/self/clear_refs` (`getrusage` ru_maxrss cannot be reset, and in a spawned process "
            "it starts at the parent's RSS).")


def speed_markdown(configs: list[SpeedConfig], results: list[list[dict]], device: str, load: str) -> str:
    timed = ", ".join(f"{c.timed} for {c.preset}" for c in configs)
    return f"""## 1. Training speed and memory ({device})

One training step = forward, backward and one AdamW step on batch 1 (random volumes; for medflow
and the peer alike, PyTorch's fused AdamW kernel, `medflow.optimizer.adamw`), after
ActNorm was initialised by one training-mode forward without gradients. Every case ran
{times_text(speed_rounds(device))}, each in a fresh process; on a CPU all cases in one order and then in the
reverse order, so that a drift in the machine's speed falls on every implementation alike.
Step time = median over the timed steps of all runs ({timed} per run, each after one untimed
warm-up step), {usable_cores()} torch threads; CPU use = process CPU time / (step time x
threads); memories: median over the runs. {memory_method(device)}
The peak above baseline covers gradients, AdamW moments (last column: 12 bytes per parameter)
and activations. 1-minute load average when the section started: {load}.

{volume_note(configs)}
{md_table(SPEED_HEADERS, speed_rows(configs, results, device))}

Ratios (below 1: the first is faster or smaller), against the peer in whichever layout made its
step faster{" (PyTorch's default or medflow's channels-last, both timed on a CPU)" if device == "cpu" else ""}:

{md_table(RATIO_HEADERS, ratio_rows(configs, results, device))}

{PEER_DIFFERENCES}
"""


SYNTH_HEADERS = ["device", "preset", "model grid (voxels)", "samples", "latency (s)", "CPU use",
                 "peak memory above baseline (MiB)"]


def synthesis_rows(cases: list[Case], results: list[dict]) -> list[list[str]]:
    rows = []
    for case, r in zip(cases, results):
        head = [case.device, case.preset, volume_text(case.shape), str(case.samples)]
        if "error" in r:
            rows.append(failed_row(head, r["error"], SYNTH_HEADERS))
        else:
            rows.append(head + [f"{r['median_s']:.2f}", cpu_use_text(r), f"{r['above_baseline_mib']:.0f}"])
    return rows


def synthesis_markdown(cases: list[Case], results: list[dict], load: str) -> str:
    return f"""## 2. Synthesis latency

`DualGlow.sample(mri, temperature=0.5, n)` for one volume: one MRI encoding and n inverse
passes of the PET flow, with untrained weights whose ActNorm was initialised by one
training-mode forward. Latency = median over {cases[0].timed} (n = 1) or {cases[-1].timed} (n = 8)
calls after one untimed warm-up call; file reading, preprocessing and writing are not
included. Memory and CPU use as in section 1. 1-minute load average when the section
started: {load}.

{md_table(SYNTH_HEADERS, synthesis_rows(cases, results))}
"""


TUNING_HEADERS = ["preset", "volume (voxels)", "variant", "step time (s)", "initialisation + first step (s)",
                  "peak memory above baseline (MiB)", "time / fp32 eager"]
BATCH_HEADERS = ["preset", "volume (voxels)", "variant", "largest batch", "step time at it (s)",
                 "time per volume (s)", "per volume / fp32 batch 1", "peak memory above baseline (MiB)",
                 "first failure above it"]


@dataclass
class BatchResults:
    """The batch section's measurements: each preset's plain fp32 step at batch 1, the batch-size
    searches, and the steps timed at each search's largest batch (in search order, for the
    searches that found one)."""

    references: list[tuple[Case, dict]]
    searches: list[tuple[Case, dict]]
    at_largest: list[dict]


def fp32_eager(steps: list[tuple[Case, dict]]) -> dict[str, dict]:
    """preset: its plain fp32 eager step at batch 1 among ``steps``, the base of the ratios."""
    return {c.preset: r for c, r in steps if not (c.bf16 or c.compiled or c.recompute)}


def failed_row(head: list[str], error: str, headers: list[str]) -> list[str]:
    return head + ["failed: " + error] + [""] * (len(headers) - len(head) - 1)


def step_rows(steps: list[tuple[Case, dict]]) -> list[list[str]]:
    """The step-time table; ratios to the same preset's plain fp32 eager step."""
    reference = fp32_eager(steps)
    rows = []
    for case, r in steps:
        head = [case.preset, volume_text(case.shape), case.variant]
        if "error" in r:
            rows.append(failed_row(head, r["error"], TUNING_HEADERS))
            continue
        rows.append(head + [f"{r['median_s']:.3f}", f"{r['init_s'] + r['first_s']:.1f}",
                            f"{r['above_baseline_mib']:.0f}", ratio_text(r, reference[case.preset], "median_s")])
    return rows


def batch_rows(results: BatchResults) -> list[list[str]]:
    """The largest-batch table; per-volume times against the preset's plain fp32 step at batch 1."""
    reference = fp32_eager(results.references)
    timed = iter(results.at_largest)
    rows = []
    for case, found in results.searches:
        head = [case.preset, volume_text(case.shape), case.variant]
        if "error" in found:
            rows.append(failed_row(head, found["error"], BATCH_HEADERS))
            continue
        r, batch = next(timed), found["max_batch"]
        if "error" in r:
            rows.append(failed_row(head + [str(batch)], f"{r['error']} (fresh process)", BATCH_HEADERS))
            continue
        per_volume = {"median_s": r["median_s"] / batch}
        rows.append(head + [str(batch), f"{r['median_s']:.3f}", f"{per_volume['median_s']:.3f}",
                            ratio_text(per_volume, reference[case.preset], "median_s"),
                            f"{r['above_baseline_mib']:.0f}", found["limit"]])
    return rows


def tuning_markdown(steps: list[tuple[Case, dict]], device: str, load: str) -> str:
    return f"""## 4. Precision and torch.compile ({device})

medflow's training step as in section 1 (batch 1, median over the timed steps after the
untimed warm-up; "initialisation + first step" is the ActNorm-initialising forward without
gradients and the first training step, so compilation is included) with: the coupling subnets in
bfloat16 (`medflow train --bf16`: autocast inside the subnets, invertible arithmetic and
log-determinants in float32); `torch.compile` of every coupling and injector subnet
(`DualGlow.compile_subnets`, default inductor mode, two warm-up steps). 1-minute load average
when the section started: {load}.

{md_table(TUNING_HEADERS, step_rows(steps))}
"""


def batch_markdown(results: BatchResults, device: str, load: str) -> str:
    return f"""## 5. Largest training batch ({device})

Training steps as in section 1 on growing batches (doubling from 1, then bisection to within an
eighth, at most {MAX_BATCH}), all in one process, until the device runs out of memory; then, in a
fresh process, 2 steps timed at the largest batch that fitted, with their peak memory. "Per
volume / fp32 batch 1" divides the time per volume by the plain fp32 step at batch 1, timed in
this section; below 1, larger batches use the device better. 1-minute load average when the
section started: {load}.

{md_table(BATCH_HEADERS, batch_rows(results))}
"""


def mean_sd(values: list[float], digits: int, sign: str = "") -> str:
    """``mean ± SD`` at ``digits`` decimals; ``sign="+"`` prints a positive mean with its sign."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.{digits}f} ± {sd:.{digits}f}"


QUALITY_HEADERS = ["method", "PSNR (dB)", "SSIM", "NMSE", "MAE (PET units)"]


def quality_rows(result: dict, key: str = "scores") -> list[list[str]]:
    """Mean ± SD over the test subjects per method, of ``result[key]``: ``scores`` (against the
    true PET) or ``level_matched``."""
    rows = []
    for method, per_subject in result[key].items():
        rows.append([method] + [mean_sd([m[k] for m in per_subject], d)
                                for k, d in (("psnr", 2), ("ssim", 3), ("nmse", 4), ("mae", 4))])
    return rows


def level_redrawn_rows(result: dict) -> list[list[str]]:
    """Per method: mean ± SD over the test subjects of the level-redrawn PSNR and of the raw PSNR."""
    return [[method, mean_sd([m["psnr"] for m in per_subject], 2),
             mean_sd([m["psnr"] for m in result["scores"][method]], 2)]
            for method, per_subject in result["level_redrawn"].items()]


UNET = "U-Net (MONAI BasicUNet, L1)"
UNET_SAME_STEPS = "U-Net, medflow's number of steps"
SEED_COLUMNS = (("scores", "psnr", "PSNR (dB)", 2), ("scores", "ssim", "SSIM", 3),
                ("level_matched", "psnr", "PSNR, level matched", 2),
                ("level_redrawn", "psnr", "PSNR, level redrawn", 2))
SEED_HEADERS = ["seed", "steps: medflow / U-Net", "T"] + [
    h for _, _, title, _ in SEED_COLUMNS for h in (f"{title}: U-Net", "medflow", "difference")]


def seed_rows(results: list[dict], unet_name: str = UNET) -> list[list[str]]:
    """Per seed: the U-Net ``unet_name`` against medflow's mean of samples at the calibrated
    temperature (the first row of ``medflow_variants``), means over the test subjects
    (``SEED_COLUMNS``); then the mean ± SD of the differences over seeds."""
    rows, diffs = [], [[] for _ in SEED_COLUMNS]
    for r in results:
        name = next(k for k in r["scores"] if k not in (UNET, UNET_SAME_STEPS))
        unet_steps = r["unet_steps"] if unet_name == UNET else r["flow_steps"]
        cells = [str(r["seed"]), f"{r['flow_steps']} / {unet_steps}", f"{r['calibration']['temperature']:.2f}"
                 if r["calibration"] else "n/a"]
        for (scores, key, _, digits), diff in zip(SEED_COLUMNS, diffs):
            unet, flow = (statistics.mean(m[key] for m in r[scores][k]) for k in (unet_name, name))
            diff.append(flow - unet)
            cells += [f"{unet:.{digits}f}", f"{flow:.{digits}f}", f"{flow - unet:+.{digits}f}"]
        rows.append(cells)
    last = ["all", "", ""]
    for (_, _, _, digits), diff in zip(SEED_COLUMNS, diffs):
        last += ["", "", mean_sd(diff, digits, sign="+")]
    rows.append(last)
    return rows


def seed_coverage_rows(results: list[dict]) -> list[list[str]]:
    """Per seed: the calibrated temperature and the coverage (%) of mean ± 1.645 std at it for
    each of ``CALIBRATION_TRUTHS``, means over the test subjects; then mean ± SD over seeds."""
    rows, columns = [], [[] for _ in CALIBRATION_TRUTHS]
    for r in results:
        temperature = r["temperature"]
        cells = [str(r["seed"]), f"{temperature:.2f}"]
        for truth, column in zip(CALIBRATION_TRUTHS, columns):
            column.append(100 * statistics.mean(r["coverage"][(truth, temperature, COVERAGE_Z)]))
            cells.append(f"{column[-1]:.1f}")
        rows.append(cells)
    return rows + [["all", ""] + [mean_sd(column, 1) for column in columns]]


def seeds_markdown(results: list[dict]) -> str:
    return f"""### Over {len(results)} seeds

The same comparison repeated with seeds 0 to {len(results) - 1} (`--quality-seeds`) on the same data and
number of medflow steps: the seed sets both models' initialisation and batch order and medflow's validation
subjects (so also its training subjects and calibrated temperature). medflow is its mean of
{results[0]['samples']} samples at the calibrated temperature; "difference" is medflow minus the U-Net,
its last row the mean ± SD over seeds; "level matched" scores against the truth rescaled to each
prediction's own mean inside the brain mask, as in the second table of section 3, "level redrawn"
is the PSNR expected over the subject's level, as in its third.

{md_table(SEED_HEADERS, seed_rows(results))}

The same seeds against the U-Net trained for medflow's number of steps instead of its time (the
same batches; its learning rate decays from the first step): which model learns more per update, apart from the
cost of an update.

{md_table(SEED_HEADERS, seed_rows(results, UNET_SAME_STEPS))}

Calibration per seed: percentage of brain-mask voxels within mean ± {COVERAGE_Z} std of the
{results[0]['samples']} samples at the calibrated temperature, as in section 3 (ideal
{100 * ideal_coverage(COVERAGE_Z, results[0]['samples']):.1f} %).

{md_table(["seed", "T"] + [f"coverage (%): {truth}" for truth in CALIBRATION_TRUTHS], seed_coverage_rows(results))}
"""


def calibration_text(cal: dict | None) -> str:
    from medflow.trained import DEFAULT_TEMPERATURE

    if cal is None:
        return (f"`medflow train` had no validation subjects to calibrate the temperature on: "
                f"T = {DEFAULT_TEMPERATURE:g}, the default.")
    return f"""The calibrated temperature T = {cal['temperature']:g} is the one `medflow train` found on its
{cal['subjects']} validation subject(s) and recorded in the run's config.json (`medflow.calibration`:
bisection on T until the truth, in the model's global-mean-normalised units on the model grid,
lies within mean ± {cal['z']} std of {cal['samples']} samples as often as for a perfectly calibrated
model, in {100 * cal['target']:.1f} % of the voxels of the PET's global-mean region (SPM's voxels above
1/8 of the mean uptake; the table scores the brain mask on the native grid);
reached {100 * cal['coverage']:.1f} %); `medflow synthesize` samples at it
unless `--temperature` is given. The test subjects play no part in choosing it."""


def quality_markdown(result: dict) -> str:
    from medflow.demo_data import RECIPE_VERSION

    samples, cal = result["samples"], result["calibration"]
    n_subjects = result["n_train"] + result["n_val"] + result["n_test"]
    coverage_rows = [[truth, f"{t:g}", f"mean ± {z:.3f} std", f"{100 * ideal_coverage(z, samples):.1f}",
                      mean_sd([100 * c for c in values], 1)]
                     for (truth, t, z), values in result["coverage"].items()]
    return f"""## 3. Synthesis quality on the demo data

Demo data from `medflow.demo_data.make_demo_dataset` (recipe version {RECIPE_VERSION}, {n_subjects} subjects at 2 mm, {result['n_test']} held out):
{result['n_train']} training, {result['n_val']} validation and {result['n_test']} test subjects, on {result['device']}. medflow
`small` (`medflow.train.Trainer`: {result['spacing'][0]:g} mm spacing of the preset, model grid
{volume_text(result['grid'])}, batch {result['batch_size']}) and a MONAI `BasicUNet` (features 16, 16, 32,
64, 128, 16, with the layers medflow's injector runs it with, `flows.injector.unet_with_medflow_layers`;
L1 loss from scaled MRI to scaled PET; AdamW as medflow's, lr 1e-3) each trained for
{result['budget_s']:.0f} s of wall-clock time on the same batches (same preprocessing, augmentation
and batch size; seed {result['seed']}): {result['flow_steps']} medflow steps (`--quality-steps`; the time is what they took
with the validations and checkpoints on the way, not the final validation and the temperature calibration), then
{result['unet_steps']} U-Net steps (that time over the U-Net's own step time,
measured over its steps {UNET_WARMUP_STEPS} to {UNET_WARMUP_STEPS + UNET_TIMED_STEPS - 1}). Both learning rates decay by cosine to 10 % at
their last steps (the U-Net's from the end of that timing, at its peak until then), so a re-run on the same machine repeats medflow's training exactly and the
U-Net's up to its number of steps. The row "{UNET_SAME_STEPS}" is the same U-Net trained for
{result['flow_steps']} steps instead (the first {result['flow_steps']} batches): what each model learns per update. medflow is
scored with the weights `medflow synthesize` loads, those of the validation with the lowest PET bits per voxel
(`best.pt`): here those of step {result['served_step']}. Predictions on the
test subjects are mapped back to each subject's own grid (`medflow.synthesize.to_native_grid`)
and scored inside its brain mask by `medflow.metrics.compute_metrics`; mean ± SD over the
{result['n_test']} test subjects. Training, synthesis and scoring took {result['seconds'] / 60:.1f} min.

{md_table(QUALITY_HEADERS, quality_rows(result))}

The same predictions scored against the truth rescaled to each prediction's own mean inside the brain mask
(`bench.level_matched`), which leaves the uptake pattern alone. Both models learn
global-mean-normalised PET and write it at the training set's median global mean, while each
subject's own level follows dose and uptake time, which the MRI does not show, so the table
above scores that level error too. README tells users to compare patterns or ratios (SUVR-style).

{md_table(QUALITY_HEADERS, quality_rows(result, "level_matched"))}

The first table's PSNR expected over the subject's level (`bench.level_redrawn_psnr`): for each
test subject, the mean over the {result['n_levels']} training and validation subjects' global means of the PSNR
against its PET rescaled to each of them. The demo recipe draws each subject's brain mean uptake
independently of its MRI, so this is raw PSNR largely without the luck of the {result['n_test']} test subjects'
own levels, and it keeps what level matching removes: each prediction's own error of level in the
global-mean-normalised units both models learn.

{md_table(["method", "PSNR (dB), level redrawn", "PSNR (dB), own level"], level_redrawn_rows(result))}

{calibration_text(cal)}

Calibration of the uncertainty: percentage of brain-mask voxels whose truth lies within
mean ± z std of the {samples} samples, mean ± SD over the test subjects. "Ideal" is what a perfectly
calibrated Gaussian model scores (`calibration.ideal_coverage`): with mean and std estimated from {samples}
samples in antithetic pairs, z = 1.645 reaches {100 * ideal_coverage(COVERAGE_Z, samples):.1f} %, not 90 %; z = {prediction_z(samples):.3f} is the
finite-sample 90 % prediction interval (`calibration.prediction_z`). `small` learns
global-mean-normalised PET (`--pet-normalization`), so its samples share the training median
level and their spread covers the uptake pattern, not the subject's own level, which the MRI
does not show. Truth is the test subject's PET as it is, against the std map `medflow
synthesize --std` writes (the samples' std widened by the training subjects' spread of global
level, `calibration.with_level_spread`), and the PET rescaled to the synthesis's mean inside
the brain mask (`bench.level_matched`), against the samples' std alone (`--no-level-spread`).

{md_table(["truth", "T", "interval", "ideal (%)", "coverage (%)"], coverage_rows)}
"""


def header_markdown(command: str, machine: dict, vers: dict, started: datetime, title: str = "medflow benchmarks",
                    rerun: str = "`make bench`", units: str = "Times in seconds, memory in MiB.") -> str:
    return f"""# {title}

Written by `{command}`, started {started:%Y-%m-%d %H:%M} UTC; every number below comes from
that run (re-run {rerun} to refresh). {units}

- Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']:.1f} GiB RAM, GPU: {machine['gpu'] or 'none'}.
- Versions: Python {vers['python']}, torch {vers['torch']}, MONAI {vers['monai']}, FrEIA {vers['FrEIA']}, medflow {vers['medflow']}.
"""


DEFAULT_SECTIONS = {"cpu": ("speed", "synthesis", "quality"), "cuda": ("speed", "synthesis", "tuning", "batch")}
PART_MARK = "<!-- medflow bench: {} -->"
PART_PATTERN = re.compile(r"^<!-- medflow bench: (\w+) -->\n", re.M)


def report_part(args: argparse.Namespace) -> str:
    """The part of the report a run (``parse_args``) writes: its device (``cpu``, ``cuda``), then
    ``_quick`` for ``--quick``, ``_seeds`` for ``--quality-seeds`` above 1, the names of its sections
    where they are not the device's default ones, and ``_stepsN`` / ``_testN`` for a quality section
    with other ``--quality-steps`` / ``--quality-test-subjects``: such runs do not replace a
    standard run's numbers."""
    part = args.device + ("_quick" if args.quick else "") + ("_seeds" if args.quality_seeds > 1 else "")
    default = set(DEFAULT_SECTIONS[args.device]) - ({"quality"} if args.quick else set())
    if args.quality_seeds == 1 and set(args.sections) != default:
        part += "_" + "_".join(args.sections)
    if "quality" in args.sections:
        part += f"_steps{args.quality_steps}" if args.quality_steps != QUALITY_STEPS else ""
        part += f"_test{args.quality_test_subjects}" if args.quality_test_subjects != QUALITY_TEST_SUBJECTS else ""
    return part


def write_report(path: Path, part: str, text: str) -> None:
    """Write ``text`` as the ``part`` (``report_part``) of the report at ``path``, keeping the other
    parts (a GPU run does not erase the CPU numbers, nor the reverse) and any text before the first."""
    preamble, parts = "", {}
    if path.exists():
        pieces = PART_PATTERN.split(path.read_text())
        preamble, parts = pieces[0].strip("\n"), dict(zip(pieces[1::2], pieces[2::2]))
    parts[part] = text
    body = "\n\n".join(PART_MARK.format(key) + "\n" + parts[key].strip("\n") for key in sorted(parts))
    write_bytes_atomic(path, ((preamble + "\n\n" if preamble else "") + body + "\n").encode(), overwrite=True)


def check_report_path(path: Path) -> str | None:
    """Why ``path`` cannot take a report (None when it can): a folder, a missing folder, or a file
    without the part markers ``write_report`` keeps its parts by, which it would not write over."""
    if path.is_dir():
        return f"--out {path} is a folder; give a file name"
    if not path.parent.is_dir():
        return f"--out {path}: no folder {path.parent}"
    if path.exists() and not PART_PATTERN.search(path.read_text(errors="replace")):
        return f"--out {path} exists and is not a medflow bench report; give another file name"
    return None


# ----- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m medflow.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only, no quality section (< 3 min)")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report file")
    parser.add_argument("--sections", default=None,
                        help="comma-separated sections, run in the order given, each written to the report "
                             "as it ends: speed, synthesis, tuning (bf16 and torch.compile), batch (the "
                             "largest training batch), quality. Default: "
                             f"{','.join(DEFAULT_SECTIONS['cpu'])} on CPU, {','.join(DEFAULT_SECTIONS['cuda'])} "
                             "on a GPU")
    parser.add_argument("--quality-steps", type=int, default=QUALITY_STEPS,
                        help="medflow training steps in the quality section; the U-Net trains for the "
                             f"seconds they took and for as many steps (default {QUALITY_STEPS}; BENCHMARKS.md gives the time)")
    parser.add_argument("--quality-test-subjects", type=int, default=QUALITY_TEST_SUBJECTS,
                        help=f"held-out demo subjects the quality section scores, beside its "
                             f"{QUALITY_TRAIN_SUBJECTS} training and validation ones (default "
                             f"{QUALITY_TEST_SUBJECTS}; fewer run faster, and raw PSNR, which follows each "
                             "subject's own level, then decides less)")
    parser.add_argument("--quality-seeds", type=int, default=1,
                        help="repeat the quality section with seeds 0 .. N-1 and add tables over seeds "
                             "(BENCHMARKS.md gives the time such a run took)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="device of every section; the report keeps one part per device (cpu, cuda), and "
                             "one beside it for each other kind of run (--quick, over seeds, other sections, "
                             "other quality settings)")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA GPU here")
    if args.sections is None:
        args.sections = ",".join(DEFAULT_SECTIONS[args.device])
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(args.sections) - {"speed", "synthesis", "tuning", "batch", "quality"}
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    problem = check_report_path(args.out)
    if problem:
        parser.error(problem)
    if args.quality_seeds < 1:
        parser.error("--quality-seeds must be at least 1")
    if args.quality_steps < 1:
        parser.error("--quality-steps must be at least 1")
    if args.quality_test_subjects < 1:
        parser.error("--quality-test-subjects must be at least 1")
    if args.quick and "quality" in args.sections:
        args.sections.remove("quality")
    if not args.sections:
        parser.error("no section to run" + (" (--quick leaves out quality)" if args.quick else ""))
    if args.quality_seeds > 1 and "quality" not in args.sections:
        parser.error("--quality-seeds above 1 needs the quality section (and no --quick)")
    return args


def speed_section(quick: bool, device: str, timeout_s: float) -> str:
    """Run the training-step measurements; returns the markdown section."""
    load = load_text()
    configs = speed_configs(quick, device)
    flat = run_rounds([case for config in configs for case in speed_cases(config, device)], speed_rounds(device),
                      timeout_s)
    per_config = len(speed_names(device))
    results = [flat[i:i + per_config] for i in range(0, len(flat), per_config)]
    show("training step", SPEED_HEADERS, speed_rows(configs, results, device))
    show("ratios", RATIO_HEADERS, ratio_rows(configs, results, device))
    return speed_markdown(configs, results, device, load)


def synthesis_section(quick: bool, device: str, timeout_s: float) -> str:
    """Run the sampling measurements on ``device``; returns the markdown section."""
    load = load_text()
    cases = synthesis_cases(quick, device)
    results = run_cases(cases, timeout_s)
    show("synthesis", SYNTH_HEADERS, synthesis_rows(cases, results))
    return synthesis_markdown(cases, results, load)


def tuning_section(quick: bool, device: str, timeout_s: float) -> str:
    """Run the precision and compilation measurements; returns the markdown section."""
    load = load_text()
    cases = tuning_cases(quick, device)
    steps = list(zip(cases, run_cases(cases, timeout_s)))
    show("precision and torch.compile", TUNING_HEADERS, step_rows(steps))
    return tuning_markdown(steps, device, load)


def batch_section(quick: bool, device: str, timeout_s: float) -> str:
    """Run the batch-size searches and the steps at the largest batches; returns the markdown section."""
    load = load_text()
    references, searches = batch_cases(quick, device)
    reference_results = run_cases(references, timeout_s)
    found = run_cases(searches, timeout_s)
    results = BatchResults(list(zip(references, reference_results)), list(zip(searches, found)),
                           run_cases(at_largest_batch(searches, found), timeout_s))
    show("largest batch", BATCH_HEADERS, batch_rows(results))
    return batch_markdown(results, device, load)


def quality_section(steps: int, device: str, seeds: int, test_subjects: int) -> str:
    """Train, synthesize and score on the demo data; returns the markdown section."""
    results = run_quality(steps, torch.device(device), seeds, QUALITY_TRAIN_SUBJECTS + test_subjects, test_subjects)
    show("quality", QUALITY_HEADERS, quality_rows(results[0]))
    if len(results) == 1:
        return quality_markdown(results[0])
    show("over seeds", SEED_HEADERS, seed_rows(results))
    return quality_markdown(results[0]) + "\n" + seeds_markdown(results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, clock = datetime.now(timezone.utc), time.monotonic()
    device = args.device
    torch.set_num_threads(usable_cores())
    command = shlex.join(["python", "-m", "medflow.bench", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info()
    title = f"medflow benchmarks on {machine['gpu']}" if device == "cuda" else "medflow benchmarks on CPU"
    part = report_part(args)
    rerun = "`make bench`" if part == device else "that command"
    if args.quality_seeds > 1:
        title = f"{title}: quality over {args.quality_seeds} seeds"
    parts = [header_markdown(command, machine, versions(), started, title=title, rerun=rerun)]
    timeout = 180.0 if args.quick else 300.0 if device == "cuda" else 900.0
    sections = {"speed": lambda: speed_section(args.quick, device, timeout),
                "synthesis": lambda: synthesis_section(args.quick, device, timeout),
                "tuning": lambda: tuning_section(args.quick, device, timeout),
                "batch": lambda: batch_section(args.quick, device, timeout),
                "quality": lambda: quality_section(args.quality_steps, device, args.quality_seeds,
                                                   args.quality_test_subjects)}
    for name in args.sections:
        parts.append(sections[name]())
        write_report(args.out, part, "\n".join(parts))
    parts.append(f"Total time of this run: {(time.monotonic() - clock) / 60:.1f} min.\n")
    write_report(args.out, part, "\n".join(parts))
    console.print(f"wrote {args.out} in {(time.monotonic() - clock) / 60:.1f} min")


if __name__ == "__main__":
    main()
