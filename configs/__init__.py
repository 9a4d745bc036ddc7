"""Job configurations: dataclasses that validate themselves, loadable from TOML files here.

`load(cls, path)` reads a TOML table into ``cls``; unknown keys and values of the wrong type are
errors naming the file and key, so a typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from vinekv.configs.demo import DemoConfig
from vinekv.configs.train import TrainConfig
from vinekv.trainer.field_types import check_fields

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent


def read_toml(path: str | Path) -> dict[str, Any]:
    """The table of a TOML file; errors name the file (and, for a syntax error, line and column)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None


def load(cls: type[T], path: str | Path, **overrides: Any) -> T:
    """An instance of the dataclass ``cls`` from a TOML file, with keyword overrides on top.

    Unknown keys (with the closest field) and values of the wrong type are refused, and every
    error of the file's values names the file: ``train.toml: trainer.vineppo_branches = 'four':
    expected int``."""
    fields = read_toml(path)
    try:
        check_fields(cls, fields)
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{path}: {err}") from None


__all__ = ["CONFIG_DIR", "DemoConfig", "TrainConfig", "load", "read_toml"]
