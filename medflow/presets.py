"""Model presets: YAML files in the repository's ``models/`` folder (each with a model card)."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from medflow.errors import ModelError

SEARCH_DIRS = (
    Path(__file__).resolve().parent.parent / "models",
    Path(sys.prefix) / "share" / "medflow" / "models",
)


def available_presets() -> list[str]:
    """Names of the presets that ship with medflow."""
    names = set()
    for folder in SEARCH_DIRS:
        names.update(p.stem for p in folder.glob("*.yaml"))
    return sorted(names)


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``small``) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ModelError(f"{candidate}: preset file not found")
        return candidate
    for folder in SEARCH_DIRS:
        path = folder / f"{name_or_path}.yaml"
        if path.is_file():
            return path
    raise ModelError(f"{name_or_path}: unknown preset (available: {', '.join(available_presets())})")


def load_preset(name_or_path: str | Path) -> dict:
    """The preset as a dict with sections ``model``, ``data`` and ``train``."""
    path = preset_path(name_or_path)
    try:
        preset = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read preset ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ModelError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ModelError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(preset, dict) or not isinstance(preset.get("model"), dict):
        raise ModelError(f"{path}: a preset needs a 'model' section of settings")
    for section in ("data", "train"):
        if preset.get(section) is None:
            preset[section] = {}
        if not isinstance(preset[section], dict):
            raise ModelError(f"{path}: the '{section}' section must hold settings (name: value), not "
                             f"{type(preset[section]).__name__}")
    preset.setdefault("name", path.stem)
    return preset
