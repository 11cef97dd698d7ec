"""Loading a trained model folder (written by ``medflow train``) for synthesis."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medflow.checkpoint import latest_valid_step, load_state, read_config, step_checkpoints, step_of
from medflow.device import place_model
from medflow.errors import ModelError
from medflow.model import DualGlow, DualGlowConfig
from medflow.preprocess import Preprocessing
from medflow.side import SideSpec

DEFAULT_TEMPERATURE = 0.5  # models trained without validation subjects, or before calibration existed


@dataclass
class TrainedModel:
    """A ready-to-sample model with the preprocessing and QC statistics it was trained with."""

    model: DualGlow
    prep: Preprocessing
    mri_columns: list[str]
    qc: dict | None
    weights: Path
    side: SideSpec | None = None
    calibration: dict | None = None
    step: int | None = None  # the training step of the weights

    @property
    def temperature(self) -> float:
        """The sampling temperature calibrated on the validation subjects when the model was
        trained (``medflow.calibration``), else DEFAULT_TEMPERATURE."""
        return float(self.calibration["temperature"]) if self.calibration else DEFAULT_TEMPERATURE


def weights_file(run_dir: Path) -> tuple[Path, dict]:
    """best.pt; else final.pt unless an intact step checkpoint is newer (a finished run that was
    resumed and stopped again has trained past it); else the newest intact step checkpoint."""
    if (run_dir / "best.pt").exists():
        return run_dir / "best.pt", load_state(run_dir / "best.pt")
    final = load_state(run_dir / "final.pt") if (run_dir / "final.pt").exists() else None
    newer = final is None or any(step_of(path) > final["step"] for path in step_checkpoints(run_dir))
    found = latest_valid_step(run_dir) if newer else None
    if final is not None and (found is None or found[1]["step"] <= final["step"]):
        return run_dir / "final.pt", final
    if found is None:
        raise ModelError(f"{run_dir}: no weights (best.pt, final.pt or checkpoints/step-*.pt)")
    return found


def load_trained(run_dir: str | Path, device: torch.device) -> TrainedModel:
    """Load a model folder onto ``device`` in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"{run_dir}: model folder not found")
    config = read_config(run_dir)
    try:
        model = DualGlow(DualGlowConfig.from_dict(config["model"]))
        prep = Preprocessing.from_dict(config["preprocessing"])
        mri_columns = list(config["mri_columns"])
        side = SideSpec.from_dict(config["side"]) if config.get("side") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{run_dir / 'config.json'}: incomplete or invalid ({exc})") from None
    path, state = weights_file(run_dir)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: weights do not match config.json ({str(exc).splitlines()[0][:160]})") from None
    return TrainedModel(place_model(model, device).eval(), prep, mri_columns, config.get("qc"), path, side,
                        config.get("calibration"), state.get("step"))
