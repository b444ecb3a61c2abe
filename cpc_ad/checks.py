"""Parameter checks shared by every config: a wrong type or range is a ParameterError naming
the parameter, before any data is read or any file is touched."""
from __future__ import annotations

import numbers
from typing import Iterable


def check_param(name: str, value, kind: str, low: float | None = None, high: float | None = None,
                choices: Iterable | None = None, optional: bool = False, open_low: bool = False) -> None:
    """Raise ParameterError naming the parameter, its value and what is allowed.

    kind: "int", "float" (an int is fine), "bool" or "str". Every config dataclass runs its
    fields through this when built, so a bad value (`epochs="5"`, `temperature=-1`) stops a
    run before any data is loaded, in the API and the notebooks alike, instead of deep in torch.
    """
    if optional and value is None:
        return
    types = {"int": numbers.Integral, "float": numbers.Real, "bool": bool, "str": str}[kind]
    if not isinstance(value, types) or (kind in ("int", "float") and isinstance(value, bool)):
        raise ParameterError(f"{name}={value!r}: expected {'None or ' if optional else ''}{kind}, "
                             f"got {type(value).__name__}")
    if choices is not None and value not in tuple(choices):
        raise ParameterError(f"{name}={value!r}: choose one of {', '.join(map(str, choices))}")
    if low is not None and (value <= low if open_low else value < low):
        raise ParameterError(f"{name}={value!r}: must be {'>' if open_low else '>='} {low}")
    if high is not None and value > high:
        raise ParameterError(f"{name}={value!r}: must be <= {high}")


class ParameterError(ValueError):
    """A parameter with a wrong type or value (raised before anything runs)."""


def make_config(cls: type, **overrides):
    """Config dataclass `cls` with `overrides`, where None keeps the default: how a notebook's
    parameters (None = "the module's default") reach CPCConfig, CPCADConfig and TrainConfig."""
    return cls(**{k: v for k, v in overrides.items() if v is not None})
