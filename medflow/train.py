"""``medflow train``: data pipeline, crash-proof training loop, validation, DDP.

Randomness is a pure function of ``(seed, step)``: the batch order, the augmentation and
the dequantisation noise of step s are drawn from generators seeded with the seed and s.
A resumed run therefore repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import csv
import math
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.data import CacheDataset
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medflow import __version__
from medflow.calibration import calibrate_temperature
from medflow.checkpoint import latest_valid_step, read_config, save_state, save_step, write_config
from medflow.device import Distributed, check_fits, init_distributed, place_model, resolve_device
from medflow.errors import InputError, ModelError, OutputError, TrainingError
from medflow.imageio import check_folder_creatable, make_folder
from medflow.manifest import Subject, read_manifest
from medflow.metrics import compute_metrics
from medflow.model import DualGlow, DualGlowConfig, bits_per_voxel
from medflow.optimizer import adamw, with_kernel_of
from medflow.preprocess import (
    PET_NORMALIZATIONS,
    Preprocessing,
    grid_for,
    level_summary,
    pet_to_units,
    plain_tensor,
    robust_max,
    stage1,
    stage2,
)
from medflow.presets import load_preset
from medflow.side import SideSpec
from medflow.trained import weights_file


CALIBRATION_SUBJECTS = 8  # validation subjects the sampling temperature is calibrated on, at most


@dataclass
class TrainOptions:
    """Options of ``medflow train`` (see ``medflow train --help``). Times in seconds. None: not
    given, so ``DEFAULTS`` for a new run and the run's own for ``--resume``."""

    data: Path
    out: Path
    preset: str | None = None
    val: Path | None = None
    val_fraction: float | None = None
    mri_columns: list[str] | None = None
    side_columns: list[str] = field(default_factory=list)
    spacing: float | None = None
    pet_normalization: str | None = None
    grid: tuple[int, int, int] | None = None
    steps: int | None = None
    epochs: int | None = None
    time_limit: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.0
    clip: float = 50.0
    ema: float | None = None
    seed: int | None = None  # None: 0 for a new run, its own for --resume
    device: str = "auto"
    bf16: bool | None = None
    recompute: bool | None = None
    checkpoint_every: int | None = None
    val_every: int | None = None
    val_samples: int = 2
    resume: bool = False
    max_nonfinite: int = 5
    allow_outside_paths: bool = False
    model_overrides: dict = field(default_factory=dict)

    def check(self) -> None:
        """InputError naming the first option outside its range; OutputError for an --out that is a file."""
        at_least = {"--steps": (self.steps, 1), "--epochs": (self.epochs, 1), "--batch-size": (self.batch_size, 1),
                    "--warmup": (self.warmup, 0), "--checkpoint-every": (self.checkpoint_every, 1),
                    "--val-every": (self.val_every, 1)}
        for flag, (value, low) in at_least.items():
            if value is not None and value < low:
                raise InputError(f"{flag} must be at least {low}, got {value}")
        positive = {"--time-limit": self.time_limit, "--lr": self.lr, "--spacing": self.spacing}
        for flag, value in positive.items():
            if value is not None and not (math.isfinite(value) and value > 0):
                raise InputError(f"{flag} must be a positive number, got {value:g}")
        if self.val_fraction is not None and not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"--val-fraction must be at least 0 and below 1, got {self.val_fraction:g}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise InputError(f"--ema must lie between 0 and 1, got {self.ema:g}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise OutputError(f"{self.out}: is a file; --out needs a run folder")


DEFAULTS = {"preset": "small", "val_fraction": 0.1, "mri_columns": ["mri"], "bf16": False, "recompute": False,
            "checkpoint_every": 100, "val_every": 200, "ema": None}  # a new run's, for options not given
COURSE_KEPT = ("ema", "bf16", "recompute", "checkpoint_every", "val_every")  # a resumed run keeps these unless given


def given_or_default(opts: TrainOptions, name: str):
    """The option ``name`` as given, else its default for a new run."""
    value = getattr(opts, name)
    return DEFAULTS[name] if value is None else value


def _records(subjects: list[Subject], side: SideSpec | None, source: str) -> list[dict]:
    """Dataset rows: MRI paths, PET path, name and the encoded side vector (empty without side information)."""
    return [{"mri": [str(p) for p in s.mri], "pet": str(s.pet), "subject": s.subject,
             "side": side.encode(side.pick(s.side), f"{source} ({s.subject})").tolist() if side else []} for s in subjects]


def split_subjects(subjects: list[Subject], val_fraction: float, seed: int):
    """Rows marked split=test are held out entirely; a seeded ``val_fraction`` of the rest validates."""
    pool = [s for s in subjects if s.split not in ("test", "heldout")]
    if not pool:
        raise InputError("no training subjects (all rows have split=test)")
    order = np.random.default_rng(seed).permutation(len(pool))
    n_val = int(round(val_fraction * len(pool))) if len(pool) > 2 else 0
    if n_val == len(pool):
        raise InputError(f"--val-fraction {val_fraction:g} of {len(pool)} subjects leaves none for training")
    val = [pool[i] for i in sorted(order[:n_val])]
    train = [pool[i] for i in sorted(order[n_val:])]
    return train, val


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7_919 + salt) % (2**31 - 1)


def lr_factor(step: int, warmup: int, progress: float | None) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % as ``progress`` (the
    fraction of the run done, 0..1) grows; constant after warm-up when ``progress`` is None."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        return 1.0
    progress = min(1.0, max(0.0, progress))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def injector_lr_scale(train: dict, preset: str) -> float:
    """The ``train`` section's ``injector_lr_scale`` of preset ``preset``: the injector's learning
    rate over ``lr`` (1 when absent)."""
    value = train.get("injector_lr_scale", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ModelError(f"{preset}: injector_lr_scale must be a positive number, got {value!r}")
    return float(value)


def parameter_groups(model: DualGlow, lr: float, injector_scale: float) -> list[dict]:
    """AdamW's parameter groups: the injector's parameters at ``lr * injector_scale``, the rest at
    ``lr``; one group when the scale is 1 or the model has no injector, the layout of the
    optimizer state saved by runs from before the scale existed."""
    if model.injector is None or injector_scale == 1.0:
        return [{"params": list(model.parameters()), "lr": lr}]
    injector = list(model.injector.parameters())
    ids = {id(p) for p in injector}
    return [{"params": [p for p in model.parameters() if id(p) not in ids], "lr": lr},
            {"params": injector, "lr": lr * injector_scale}]


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Holds the data, model, optimiser and run folder of one training job."""

    def __init__(self, opts: TrainOptions, reporter):
        opts.check()
        self.opts = opts
        self.report = reporter
        self.dist: Distributed = init_distributed(opts.device)
        self.device = resolve_device(opts.device, self.dist.local_rank, self.dist.world_size)
        self.run_dir = Path(opts.out)
        self._prepare_run_dir()
        given, opts = opts, self._course(opts)
        self.opts = opts
        preset = load_preset(self.settings["preset"])
        train_cfg = {**preset["train"], **{k: v for k, v in self.settings["train"].items() if v is not None}}
        self.batch_size = int(train_cfg.get("batch_size", 1))
        if opts.resume:
            self._refuse_changes(given)
        self.lr = float(train_cfg.get("lr", 1e-3))
        self.warmup = int(train_cfg.get("warmup_steps", 100))
        # Recorded when the run starts; a run from before it resumes with one learning rate.
        self.injector_lr_scale = float(self.settings["train"].get("injector_lr_scale", 1.0))
        self._load_data()
        torch.manual_seed(opts.seed)
        self.model = place_model(DualGlow(DualGlowConfig.from_dict(self.settings["model"])), self.device)
        self.model.set_recompute(opts.recompute)
        self.model.set_subnet_bf16(opts.bf16 and self.device.type == "cuda")
        self.optimizer = adamw(parameter_groups(self.model, self.lr, self.injector_lr_scale),
                               lr=self.lr, weight_decay=opts.weight_decay)
        self.total_steps = self._total_steps()
        self.elapsed_before = self.clock = 0.0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.warmup, self.progress(s)))
        self.ema = self._averaged() if opts.ema else None
        self.step = 0
        self.best_val = float("inf")
        self.nonfinite_skipped = 0

    def _averaged(self) -> AveragedModel:
        """The exponential moving average (decay ``--ema``) of the weights, starting from the model's."""
        return AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(self.opts.ema), use_buffers=True)

    # ----- set-up -------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        opts = self.opts
        config_exists = (self.run_dir / "config.json").exists()
        if opts.resume:
            if not config_exists:
                raise OutputError(f"{self.run_dir}: nothing to resume (no config.json)")
            self.settings = read_config(self.run_dir)["settings"]
            return
        # Rank 0 alone: by the time a late rank looks, rank 0 may have written config.json.
        if self.dist.is_main and (config_exists or (self.run_dir.exists() and any(self.run_dir.iterdir()))):
            raise OutputError(f"{self.run_dir}: folder exists and is not empty; pass --resume to continue "
                              "that run or choose another --out")
        preset_name, mri_columns = given_or_default(opts, "preset"), given_or_default(opts, "mri_columns")
        preset = load_preset(preset_name)
        model = {**preset["model"], **opts.model_overrides, "mri_channels": len(mri_columns)}
        DualGlowConfig.from_dict(model)
        spacing = opts.spacing or float(preset["data"].get("spacing", 4.0))
        normalization = opts.pet_normalization or preset["data"].get("pet_normalization", "none")
        if normalization not in PET_NORMALIZATIONS:
            raise InputError(f"PET normalisation must be one of {', '.join(PET_NORMALIZATIONS)}, "
                             f"got {normalization!r}")
        self.settings = {
            "preset": preset_name,
            "model": model,
            "spacing": [spacing] * 3,
            "pet_normalization": normalization,
            "grid": list(opts.grid) if opts.grid else None,
            "mri_columns": list(mri_columns),
            "side_columns": list(opts.side_columns),
            "seed": opts.seed or 0,
            "train": {"batch_size": opts.batch_size, "lr": opts.lr, "warmup_steps": opts.warmup,
                      "injector_lr_scale": injector_lr_scale(preset["train"], preset_name)},
            "data": str(Path(opts.data).resolve()),
            "val": str(Path(opts.val).resolve()) if opts.val else None,
            "val_fraction": given_or_default(opts, "val_fraction"),
        }
        check_folder_creatable(self.run_dir)

    def _course(self, opts: TrainOptions) -> TrainOptions:
        """``opts`` with every option filled in: the run's seed, preset, MRI columns and validation
        fraction, and its stop rule (``--steps``, ``--epochs``, ``--time-limit``), EMA decay,
        precision, backward and checkpoint and validation intervals unless the command gives them,
        which then become the run's (recorded under ``course``): a plain ``--resume`` continues the
        run as it was started. A given ``--lr`` or ``--warmup`` replaces the run's."""
        course = self.settings.get("course") if opts.resume else None
        seed = self.settings.setdefault("seed", opts.seed or 0)
        if opts.seed is not None and opts.seed != seed:
            raise InputError(f"--seed {opts.seed}: the run in {self.run_dir} has seed {seed}, which a resumed "
                             "run keeps; drop --seed")
        stop = {"steps": opts.steps, "epochs": opts.epochs, "time_limit": opts.time_limit}
        if course and not any(value is not None for value in stop.values()):
            stop = {key: course[key] for key in stop}
        kept = {key: getattr(opts, key) for key in COURSE_KEPT}
        for key, value in kept.items():
            if value is None:
                kept[key] = course[key] if course and key in course else DEFAULTS[key]
        if opts.resume:
            for key, value in (("lr", opts.lr), ("warmup_steps", opts.warmup)):
                if value is not None:
                    self.settings["train"][key] = value
        self.settings["course"] = {**stop, **kept}
        s = self.settings
        return replace(opts, seed=seed, preset=s["preset"], mri_columns=list(s["mri_columns"]),
                       val_fraction=s["val_fraction"], **stop, **kept)

    def _refuse_changes(self, opts: TrainOptions) -> None:
        """InputError for an option a resumed run cannot change (its data, model, preprocessing,
        batch size), given with another value than the run's. The command's DATA and ``--val``
        replace a recorded path that is not found from here (a run's data that moved; runs before
        commit 782d175 recorded paths as typed, relative to where they started)."""
        s = self.settings
        changed = []
        for flag, given, recorded in (
                ("--preset", opts.preset, s["preset"]),
                ("--batch-size", opts.batch_size, self.batch_size),
                ("--spacing", opts.spacing, s["spacing"][0]),
                ("--grid", list(opts.grid) if opts.grid else None, s.get("preprocessing", {}).get("grid", s["grid"])),
                ("--pet-normalization", opts.pet_normalization, s.get("pet_normalization", "none")),
                ("--mri-columns", opts.mri_columns, s["mri_columns"]),
                ("--side-columns", opts.side_columns or None, s.get("side_columns", [])),
                ("--val-fraction", opts.val_fraction, s["val_fraction"] if not s["val"] else None),
                *((f"--set {key}", value, s["model"].get(key)) for key, value in opts.model_overrides.items())):
            if given is not None and given != recorded:
                changed.append(f"{flag} {given} (the run's: {recorded})")
        for name, given, key in (("DATA", opts.data, "data"), ("--val", opts.val, "val")):
            recorded = s.get(key)
            if given is None or (recorded and Path(given).resolve() == Path(recorded).resolve()):
                continue
            if not recorded or Path(recorded).exists():
                changed.append(f"{name} {given} (the run's: {recorded or 'none'})")
                continue
            if self.dist.is_main:
                self.report(f"the run's {name} {recorded} is not found from here; reading {given}")
            s[key] = str(Path(given).resolve())
        if changed:
            raise InputError(f"a resumed run keeps its data, model and batch size: {'; '.join(changed)}. Drop "
                             "these options, or start a new run with another --out")

    def load_cache(self, subjects: list[Subject], source: str) -> CacheDataset:
        """``subjects`` read, resampled and normalised (stage 1) as for training; ``eval_item`` takes its items."""
        s = self.settings
        pre = stage1(tuple(s["spacing"]), 2, pet_normalization=s.get("pet_normalization", "none"))
        return CacheDataset(_records(subjects, self.side_spec, source), pre, progress=False, num_workers=0)

    def _load_data(self) -> None:
        opts, s = self.opts, self.settings
        subjects = read_manifest(Path(s["data"]), s["mri_columns"], allow_outside=opts.allow_outside_paths)
        if s["val"]:
            train = [x for x in subjects if x.split not in ("test", "heldout")]
            val = read_manifest(Path(s["val"]), s["mri_columns"], allow_outside=opts.allow_outside_paths)
        else:
            train, val = split_subjects(subjects, s["val_fraction"], s["seed"])
        self.train_subjects, self.val_subjects = train, val
        if s.get("side_columns") and "side" not in s:
            spec = SideSpec.fit(s["side_columns"], [x.side for x in train + val], s["data"])
            s["side"] = spec.to_dict()
            s["model"]["side_channels"] = spec.width
            s["model"]["side_map_channels"] = spec.categorical_channels()
        self.side_spec = SideSpec.from_dict(s["side"]) if s.get("side") else None
        levels = len(s["model"]["steps"])
        normalization = s.get("pet_normalization", "none")
        self.report(f"loading {len(train)} training and {len(val)} validation subjects")
        self.train_cache = self.load_cache(train, s["data"])
        self.val_cache = self.load_cache(val, s["val"] or s["data"]) if val else []
        if "preprocessing" in s:
            self.prep = Preprocessing.from_dict(s["preprocessing"])
        else:
            shapes = [tuple(item["mri"].shape[1:]) for item in self.train_cache]
            minimum = DualGlowConfig.from_dict(s["model"]).min_axis
            grid = tuple(s["grid"]) if s["grid"] else grid_for(shapes, 2**levels, minimum)
            if any(g % 2**levels for g in grid):
                raise InputError(f"--grid {grid} must be divisible by {2**levels} for {levels} levels")
            if min(grid) < minimum:
                raise InputError(f"--grid {grid}: the U-Net injector needs at least {minimum} voxels per axis")
            pet_scale = float(np.median([robust_max(item["pet"]) for item in self.train_cache]))
            if not pet_scale > 0:
                raise InputError(f"{s['data']}: training PET has no positive signal")
            self.prep = Preprocessing(tuple(s["spacing"]), grid, pet_scale, pet_normalization=normalization)
            if normalization != "none":
                self.prep.pet_level, self.prep.pet_level_moments = level_summary(
                    [item["pet_global"] for item in self.train_cache])
        s["preprocessing"] = self.prep.to_dict()  # a resumed run's record, with the defaults it reads spelt out
        model = s["model"]
        per_voxel = 1 if self.opts.recompute else 2 * sum(model["steps"])
        check_fits(int(np.prod(self.prep.grid)) // 8 * self.batch_size, model["hidden"] * per_voxel, self.device,
                   f"training grid {tuple(self.prep.grid)} x batch {self.batch_size}")
        self.train_aug = stage2(self.prep, train=True)
        self.eval_tf = stage2(self.prep, train=False)

    def _total_steps(self) -> int | None:
        per_epoch = max(1, len(self.train_cache) // (self.batch_size * self.dist.world_size))
        if self.opts.steps:
            return self.opts.steps
        if self.opts.epochs:
            return self.opts.epochs * per_epoch
        return None

    def tick(self) -> float:
        """Update and return ``clock``: training seconds of this run, including those before a
        ``--resume``; the slowest rank's, so every rank decays its learning rate and stops at
        the same step (a collective call: every rank must call it)."""
        seconds = self.elapsed_before + time.monotonic() - self.started
        if self.dist.enabled:
            t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            seconds = float(t.item())
        self.clock = seconds
        return seconds

    def progress(self, step: int) -> float | None:
        """Fraction of the run done: steps after warm-up over the steps after warm-up when their
        number is known, else training seconds over ``time_limit``; None for a run that goes on
        until stopped."""
        if self.total_steps:
            return (step - self.warmup) / max(1, self.total_steps - self.warmup)
        if self.opts.time_limit:
            return self.clock / self.opts.time_limit
        return None

    # ----- batches ------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int]:
        """Indices of this rank's batch at ``step``: a seeded permutation per epoch."""
        n = len(self.train_cache)
        per_step = self.batch_size * self.dist.world_size
        per_epoch = max(1, n // per_step)
        epoch, position = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(self.opts.seed, epoch, 1)))
        start = position * per_step + self.dist.rank * self.batch_size
        return [int(perm[(start + j) % n]) for j in range(self.batch_size)]

    def train_batch(self, step: int):
        self.train_aug.set_random_state(seed=step_seed(self.opts.seed, step, 2 + self.dist.rank))
        items = [self.train_aug(self.train_cache[i]) for i in self.batch_indices(step)]
        mri = torch.stack([plain_tensor(it["mri"]) for it in items]).to(self.device)
        pet = torch.stack([plain_tensor(it["pet"]) for it in items]).to(self.device)
        g = torch.Generator().manual_seed(step_seed(self.opts.seed, step, 3 + self.dist.rank))
        n_bins = self.model.config.n_bins
        mri = mri + ((torch.rand(mri.shape, generator=g) - 0.5) / n_bins).to(self.device)
        pet = pet + ((torch.rand(pet.shape, generator=g) - 0.5) / n_bins).to(self.device)
        return mri, pet, self._side(items)

    def _side(self, items) -> torch.Tensor | None:
        """[B, side_channels] side vectors of a batch, or None without side information."""
        if self.side_spec is None:
            return None
        return torch.tensor([it["side"] for it in items], dtype=torch.float32, device=self.device)

    def eval_item(self, item):
        out = self.eval_tf(item)
        mri = plain_tensor(out["mri"])[None].to(self.device)
        pet = plain_tensor(out["pet"])[None].to(self.device)
        return mri, pet, self._side([out])

    # ----- checkpoints --------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "format": 1,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "best_val": self.best_val,
            "nonfinite_skipped": self.nonfinite_skipped,
            "elapsed": self.clock,
        }

    def _write_run_config(self, qc: dict | None = None, calibration: dict | None = None) -> None:
        """config.json; ``qc`` and ``calibration`` describe the weights synthesis loads, so they are
        written when the run finishes and dropped when it starts or resumes."""
        config = {
            "medflow_version": __version__,
            "torch_version": torch.__version__,
            "settings": self.settings,
            "model": self.settings["model"],
            "preprocessing": self.prep.to_dict(),
            "mri_columns": self.settings["mri_columns"],
            "side": self.settings.get("side"),
            "n_train": len(self.train_cache),
            "n_val": len(self.val_cache),
        }
        for key, value in (("qc", qc), ("calibration", calibration)):
            if value is not None:
                config[key] = value
        write_config(self.run_dir, config)

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            save_step(self.run_dir, self.step, self._state())

    def resume(self) -> None:
        found = latest_valid_step(self.run_dir, warn=self.report)
        if found is None:
            self.report("no intact checkpoint found; starting from step 0")
            return
        path, state = found
        peaks = [group["initial_lr"] for group in self.optimizer.param_groups]  # the run's --lr, maybe new
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(with_kernel_of(state["optimizer"], self.optimizer))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ModelError(f"{path}: cannot resume from it ({str(exc).splitlines()[0][:160]})") from None
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:  # a new --ema: the average starts from the resumed weights, not the initial ones
                self.ema = self._averaged()
        self.step = int(state["step"])
        self.best_val = float(state["best_val"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
        self.elapsed_before = self.clock = float(state.get("elapsed", 0.0))
        # A new --lr or --warmup, given now or recorded by a resumed run that saved no checkpoint.
        changed = peaks != [group["initial_lr"] for group in self.optimizer.param_groups]
        if changed or self.opts.lr is not None or self.opts.warmup is not None:
            self.scheduler.base_lrs = peaks
            for group, peak in zip(self.optimizer.param_groups, peaks):
                group["initial_lr"] = peak
                group["lr"] = peak * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        self.report(f"resumed from {path.name} (step {self.step})")

    # ----- validation ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Mean PET bits per voxel over the validation subjects, and mean PSNR and SSIM of the
        T = 0 syntheses of the first ``val_samples`` of them (those that can be scored). Under
        torchrun each rank takes every world_size-th subject and the sums are all-reduced, so every
        rank returns the same means."""
        model = self.ema.module if self.ema else self.model
        model.eval()
        scores = {"bpv": [], "psnr": [], "ssim": []}
        for index in range(self.dist.rank, len(self.val_cache), self.dist.world_size):
            mri, pet, side = self.eval_item(self.val_cache[index])
            scores["bpv"].append(model.log_prob(pet, mri, side)["pet_bpv"].item())
            if index < self.opts.val_samples:
                pred = pet_to_units(model.sample(mri, temperature=0.0, side=side)[0, 0, 0], self.prep).cpu().numpy()
                ref = pet_to_units(pet[0, 0], self.prep).cpu().numpy()
                try:
                    m = compute_metrics(pred, ref)
                except ValueError:
                    continue
                scores["psnr"].append(m["psnr"])
                scores["ssim"].append(m["ssim"])
        self.model.train()
        totals = torch.tensor([x for values in scores.values() for x in (sum(values), len(values))],
                              dtype=torch.float64, device=self.device)
        if self.dist.enabled:
            dist.all_reduce(totals)
        means = [total / count if count else float("nan") for total, count in totals.view(-1, 2).tolist()]
        return dict(zip(("val_pet_bpv", "val_psnr", "val_ssim"), means))

    # ----- the loop -----------------------------------------------------------------------
    def _all_agree(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank."""
        if not self.dist.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def _all_agree_on(self, value: int) -> bool:
        """True when ``value`` is the same on every rank."""
        if not self.dist.enabled:
            return True
        t = torch.tensor([value, -value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0].item() == -t[1].item())

    def run(self, progress) -> dict:
        opts = self.opts
        if opts.resume:
            self.resume()
            if not self._all_agree_on(self.step):
                raise OutputError(f"{self.run_dir}: the processes resumed from different steps; under torchrun --out "
                                  "must be a folder every node sees (shared storage)")
        if self.dist.is_main:
            make_folder(self.run_dir)
            self._write_run_config()
        if self.step == 0:
            self.model.train()
            mri, pet, side = self.train_batch(0)
            with torch.no_grad():
                self.model.loss(pet, mri, side)
        net = self.model
        if self.dist.enabled:
            net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[self.device.index]
                                                            if self.device.type == "cuda" else None)
        log = MetricsLog(self.run_dir / "metrics.csv", self.step, enabled=self.dist.is_main)
        consecutive_bad = 0
        self.started = time.monotonic()
        target = self.total_steps
        task = progress.add_task("training", total=target, completed=self.step, info="")
        stopped_by = None
        with StopFlag() as stop:
            self.model.train()
            while target is None or self.step < target:
                if self.tick() >= (opts.time_limit or math.inf):
                    stopped_by = "time limit"
                    break
                t0 = time.monotonic()
                mri, pet, side = self.train_batch(self.step)
                loss, terms = net(pet, mri, side)
                ok = self._all_agree(bool(torch.isfinite(loss)))
                grad_norm = float("nan")
                if ok:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), opts.clip))
                    ok = self._all_agree(math.isfinite(grad_norm))
                if ok:
                    self.optimizer.step()
                    if self.ema:
                        self.ema.update_parameters(self.model)
                    consecutive_bad = 0
                else:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.nonfinite_skipped += 1
                    consecutive_bad += 1
                    self.report(f"step {self.step}: non-finite loss or gradient, batch skipped")
                    if consecutive_bad >= opts.max_nonfinite:
                        raise TrainingError(
                            f"{consecutive_bad} non-finite losses in a row at step {self.step}; stopped. "
                            f"The last good checkpoint in {self.run_dir / 'checkpoints'} is intact; "
                            "--resume with a lower --lr")
                self.scheduler.step()
                self.step += 1
                row = {"step": self.step, "loss": loss.item(), "pet_bpv": terms["pet_bpv"].mean().item(),
                       "mri_bpv": terms["mri_bpv"].mean().item(), "lr": self.scheduler.get_last_lr()[0],
                       "grad_norm": grad_norm, "steps_per_s": 1.0 / max(1e-9, time.monotonic() - t0)}
                if "side_adversary" in terms:
                    row["side_adversary"] = terms["side_adversary"].item()
                if self.val_cache and self.step % opts.val_every == 0:
                    row.update(self._validate_and_keep_best())
                log.write(row)
                progress.update(task, completed=self.step,
                                info=f"loss {row['loss']:.3f}  PET {row['pet_bpv']:.3f} bit/vox  "
                                     f"{row['steps_per_s']:.2f} step/s")
                if self.step % opts.checkpoint_every == 0 and consecutive_bad == 0:
                    self.save_checkpoint()
                if not self._all_agree(stop.signum is None):
                    stopped_by = "signal"
                    break
            self.tick()
            self.save_checkpoint()  # under the stop flag: a second Ctrl-C or SIGTERM waits for it
        summary = {"step": self.step, "stopped_by": stopped_by or "done", "nonfinite_skipped": self.nonfinite_skipped}
        if stopped_by == "signal":
            return summary
        if self.val_cache and (self.step % opts.val_every != 0 or self.step == 0):
            summary.update(self._validate_and_keep_best())
        if self.dist.is_main:
            self._finish()
        return summary

    def _validate_and_keep_best(self) -> dict:
        metrics = self.validate()
        if self.dist.is_main and metrics["val_pet_bpv"] < self.best_val:
            self.best_val = metrics["val_pet_bpv"]
            model = self.ema.module if self.ema else self.model
            save_state(self.run_dir / "best.pt", {"format": 1, "step": self.step, "model": model.state_dict(),
                                                   "val_pet_bpv": self.best_val})
        return metrics

    @torch.no_grad()
    def _finish(self) -> None:
        """Write final weights; then, for the weights synthesis loads (best.pt, else final.pt), the
        MRI-likelihood statistics of quality control and the calibrated sampling temperature."""
        model = self.ema.module if self.ema else self.model
        save_state(self.run_dir / "final.pt", {"format": 1, "step": self.step, "model": model.state_dict()})
        served = copy.deepcopy(model)
        served.load_state_dict(weights_file(self.run_dir)[1]["model"])
        served.eval()
        self._write_run_config(self._qc_statistics(served), self._calibrate(served))

    def _qc_statistics(self, model: DualGlow) -> dict:
        """Mean, SD and maximum of the training MRIs' bits per voxel under ``model``'s MRI flow."""
        bits = []
        for item in self.train_cache:
            mri, _, _ = self.eval_item(item)
            bits.append(bits_per_voxel(model.encode_mri(mri)[0], mri, model.config.n_bins).item())
        return {"mri_bpv_mean": float(np.mean(bits)), "mri_bpv_std": float(np.std(bits)),
                "mri_bpv_max": float(np.max(bits)), "n": len(bits)}

    def _calibrate(self, model: DualGlow) -> dict | None:
        """Calibrate ``model``'s sampling temperature on up to CALIBRATION_SUBJECTS validation
        subjects; None without validation data."""
        if not self.val_cache:
            return None
        items = [self.eval_item(self.val_cache[i]) for i in range(min(len(self.val_cache), CALIBRATION_SUBJECTS))]
        calibration = calibrate_temperature(model, items)
        self.report(f"sampling temperature calibrated on {calibration.subjects} validation subject(s): "
                    f"T = {calibration.temperature:.2f} (truth within mean ± {calibration.z} std of "
                    f"{calibration.samples} samples in {100 * calibration.coverage:.1f} % of voxels, "
                    f"ideal {100 * calibration.target:.1f} %)")
        return calibration.to_dict()


class MetricsLog:
    """metrics.csv in the run folder; on resume, rows after the resumed step are dropped."""

    FIELDS = ["step", "loss", "pet_bpv", "mri_bpv", "lr", "grad_norm", "steps_per_s", "side_adversary",
              "val_pet_bpv", "val_psnr", "val_ssim"]

    def __init__(self, path: Path, from_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        self.tb = None
        if not enabled:
            return
        kept = []
        if path.exists():
            with open(path, newline="") as handle:
                kept = [r for r in csv.DictReader(handle) if int(r["step"]) <= from_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"))
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        if self.tb:
            for key, value in row.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    self.tb.add_scalar(key, value, row["step"])
