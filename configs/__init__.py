"""Job configurations: dataclasses that validate themselves, loadable from TOML files here.

`load(cls, path)` reads a TOML table into ``cls``; unknown keys are an error, so a typo in a
config file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from configs.demo import DemoConfig
from configs.train import TrainConfig

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parent


def load(cls: type[T], path: str | Path, **overrides: Any) -> T:
    """An instance of the dataclass ``cls`` from a TOML file, with keyword overrides on top."""
    with open(path, "rb") as fh:
        fields = tomllib.load(fh)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{path}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**fields)


__all__ = ["CONFIG_DIR", "DemoConfig", "TrainConfig", "load"]
