"""Side information (age, sex, diagnosis...): encoding tabular covariates as a vector.

Fitted on the rows ``SideSpec.fit`` is given (``medflow train`` gives its training and
validation subjects): numeric columns are standardised with their mean and standard
deviation; categorical columns are one-hot encoded over the categories seen. A covariate
that is missing (left out, blank, or a missing-value marker such as NA or NaN) takes its
default: the mean for numbers, the most frequent category otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from medflow.errors import InputError


MISSING_MARKERS = {"", "na", "n/a", "#n/a", "<na>", "nan", "null"}


def _is_missing(text: str) -> bool:
    """Blank, or a spreadsheet's or R's or pandas' marker of a missing value (any case)."""
    return text.strip().lower() in MISSING_MARKERS


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _finite_number(text: str, column: str, source: str) -> float:
    """``text`` as a finite number; InputError naming the column for inf."""
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"{source}: side information {column}={text!r} is not a finite number")
    return value


@dataclass
class SideSpec:
    """How to turn ``{column: text}`` into the model's side vector of length ``width``."""

    columns: list[str]
    numeric: dict[str, list[float]] = field(default_factory=dict)
    categorical: dict[str, list[str]] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)

    @classmethod
    def fit(cls, columns: list[str], rows: list[dict[str, str]], source: str) -> "SideSpec":
        """Learn encodings from training rows (each a dict of column -> text), missing values left out."""
        repeated = sorted(c for c, n in Counter(columns).items() if n > 1)
        if repeated:
            raise InputError(f"{source}: side-information column(s) {', '.join(repeated)} given twice")
        spec = cls(list(columns))
        for column in columns:
            values = [r.get(column, "").strip() for r in rows if not _is_missing(r.get(column, ""))]
            if not values:
                raise InputError(f"{source}: side-information column {column!r} is missing or empty")
            if all(_is_number(v) for v in values):
                numbers = torch.tensor([_finite_number(v, column, source) for v in values], dtype=torch.float64)
                std = float(numbers.std()) if len(values) > 1 else 1.0
                spec.numeric[column] = [float(numbers.mean()), std if std > 0 else 1.0]
                spec.defaults[column] = f"{float(numbers.mean()):g}"
            else:
                counts = Counter(values)
                spec.categorical[column] = sorted(counts)
                spec.defaults[column] = counts.most_common(1)[0][0]
        return spec

    @property
    def width(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categorical.values())

    def categorical_channels(self) -> list[int]:
        """Indices of the one-hot channels in the side vector (a number takes one channel), less
        each column's default category: reference coding, so effects are differences from the default."""
        channels, index = [], 0
        for column in self.columns:
            for category in self.categorical.get(column, [None]):
                if column in self.categorical and category != self.defaults[column]:
                    channels.append(index)
                index += 1
        return channels

    def pick(self, row: dict[str, str]) -> dict[str, str]:
        """This model's covariates from a manifest row that may hold other columns too."""
        return {column: row[column] for column in self.columns if column in row}

    def encode(self, values: dict[str, str], source: str) -> torch.Tensor:
        """Side vector [width]; missing columns take their defaults, unknown ones are an error."""
        unknown = sorted(set(values) - set(self.columns))
        if unknown:
            raise InputError(f"{source}: unknown side information {', '.join(unknown)} "
                             f"(the model knows {', '.join(self.columns)})")
        parts = []
        for column in self.columns:
            text = values.get(column) or ""
            text = self.defaults[column] if _is_missing(text) else text.strip()
            if column in self.numeric:
                if not _is_number(text):
                    raise InputError(f"{source}: side information {column}={text!r} is not a number")
                mean, std = self.numeric[column]
                parts.append(torch.tensor([(_finite_number(text, column, source) - mean) / std]))
            else:
                categories = self.categorical[column]
                if text not in categories:
                    raise InputError(f"{source}: side information {column}={text!r} is not one of "
                                     f"{', '.join(categories)}")
                parts.append(torch.nn.functional.one_hot(torch.tensor(categories.index(text)), len(categories)).float())
        return torch.cat(parts).float()

    def to_dict(self) -> dict:
        return {"columns": self.columns, "numeric": self.numeric, "categorical": self.categorical,
                "defaults": self.defaults}

    @classmethod
    def from_dict(cls, values: dict) -> "SideSpec":
        return cls(list(values["columns"]), dict(values["numeric"]), dict(values["categorical"]),
                   dict(values["defaults"]))


def parse_side(text: str | None) -> dict[str, str]:
    """'age=74,sex=F,dx=AD' -> {'age': '74', 'sex': 'F', 'dx': 'AD'}."""
    if not text:
        return {}
    values = {}
    for item in text.split(","):
        if "=" not in item:
            raise InputError(f"--side {text!r}: use name=value pairs separated by commas, e.g. age=74,sex=F")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values
