"""Checkpoints as data, never code: atomic, checksummed, loaded with ``weights_only=True``.

A run folder holds ``config.json`` (model config, preprocessing, training options, QC
statistics, versions) and ``checkpoints/step-NNNNNNN.pt`` files, each with a
``.sha256`` sidecar, plus ``best.pt`` (best validation NLL) and ``final.pt``. Only the
newest ``keep`` step checkpoints are kept. A file whose checksum does not match is
skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path

import torch

from medflow import __version__
from medflow.errors import ModelError
from medflow.imageio import write_bytes_atomic

CHECKPOINT_DIR = "checkpoints"
CONFIG_FORMAT = 2
"""Format of the config.json this medflow writes, and the newest it reads. Raised whenever a
config written from then on would be misread by a medflow that reads the formats before it: a new
key whose absence already means something (as ``preprocessing.mri_scaling``'s absence means the
padded grid), or a new model option an older medflow would ignore. Format 1: configs from before
the format was recorded."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_state(path: Path, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) atomically with a checksum sidecar.

    The old sidecar goes first and the new one comes last, so a process killed in between leaves
    an intact file without a sidecar (loaded unchecked), never a file beside another's checksum."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.unlink(missing_ok=True)
    write_bytes_atomic(path, data, overwrite=True)
    write_bytes_atomic(sidecar, (sha256_bytes(data) + "\n").encode(), overwrite=True)


def load_state(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_state``; refuses anything that is not plain data."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{path}: cannot read checkpoint ({exc.strerror or exc})") from None
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.exists() and sidecar.read_text().strip() != sha256_bytes(data):
        raise ModelError(f"{path}: checksum mismatch (file corrupted or truncated)")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise ModelError(f"{path}: refused to load: not plain data ({first[:160]})") from None
    except Exception as exc:  # torch raises many types for corrupt archives
        raise ModelError(f"{path}: corrupt checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: not a medflow checkpoint")
    return state


def step_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints of a run, newest first."""
    found = (Path(run_dir) / CHECKPOINT_DIR).glob("step-*.pt")
    return sorted((p for p in found if p.stem.removeprefix("step-").isdigit()), key=step_of, reverse=True)


def step_of(checkpoint: Path) -> int:
    """The training step in a step checkpoint's name (``step-0000696.pt``)."""
    return int(Path(checkpoint).stem.removeprefix("step-"))


def save_step(run_dir: Path, step: int, state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step-N.pt`` and keep it and the ``keep - 1`` newest of earlier steps.
    Checkpoints of later steps (ones a resume skipped as unloadable) are left alone and not
    counted, so they never push out the one just written or the intact ones before it."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.pt"
    save_state(path, state)
    for old in [p for p in step_checkpoints(run_dir) if step_of(p) < step][keep - 1:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def latest_valid_step(run_dir: Path, warn=None) -> tuple[Path, dict] | None:
    """The newest step checkpoint that verifies and loads; ``warn(msg)`` hears about skipped ones."""
    for path in step_checkpoints(run_dir):
        try:
            return path, load_state(path)
        except ModelError as exc:
            if warn:
                warn(f"skipping {exc}")
    return None


def write_config(run_dir: Path, config: dict) -> None:
    """``RUN/config.json``, atomically, recording ``CONFIG_FORMAT`` as ``config_format``."""
    text = json.dumps({**config, "config_format": CONFIG_FORMAT}, indent=2) + "\n"
    write_bytes_atomic(Path(run_dir) / "config.json", text.encode(), overwrite=True)


def read_config(run_dir: Path) -> dict:
    """``RUN/config.json``; a one-line ModelError when it is missing, unreadable, not a JSON
    object, or of a format newer than ``CONFIG_FORMAT`` (written by a newer medflow)."""
    path = Path(run_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{run_dir}: not a medflow model folder (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a medflow config (a JSON {type(config).__name__}, not an object)")
    found = config.get("config_format", 1)
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ModelError(f"{path}: config_format must be a positive whole number, got {found!r}")
    if found > CONFIG_FORMAT:
        raise ModelError(f"{path}: written by medflow {config.get('medflow_version', '(unknown)')} in config format "
                         f"{found}; this medflow {__version__} reads formats up to {CONFIG_FORMAT}: upgrade medflow")
    return config
