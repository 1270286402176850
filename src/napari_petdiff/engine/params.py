"""Typed method parameters: dataclass fields with help, unit, range and choices.

The CLI builds its options from these fields and the napari widget builds its form from
them; ``validate_params`` gives every method the same clear errors.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import field
from typing import Any


def param(default, help: str, *, min=None, max=None, unit: str = "", choices=None, advanced: bool = False):
    meta = {"help": help, "min": min, "max": max, "unit": unit, "choices": choices, "advanced": advanced}
    return field(default=default, metadata=meta)


def fields_of(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, type(f.default))


def validate_params(p) -> None:
    for f in fields_of(type(p)):
        v = getattr(p, f.name)
        m = f.metadata
        t = field_type(type(p), f)
        if t in (int, float) and not isinstance(v, bool):
            if not isinstance(v, (int, float)):
                raise ValueError(f"parameter '{f.name}' must be a number; got {v!r}")
            if t is int and int(v) != v:
                raise ValueError(f"parameter '{f.name}' must be a whole number; got {v!r}")
            if m.get("min") is not None and v < m["min"]:
                raise ValueError(f"parameter '{f.name}' = {v} is below its minimum {m['min']}: {m.get('help', '')}")
            if m.get("max") is not None and v > m["max"]:
                raise ValueError(f"parameter '{f.name}' = {v} is above its maximum {m['max']}: {m.get('help', '')}")
        if m.get("choices") and v not in m["choices"]:
            raise ValueError(f"parameter '{f.name}' = {v!r} is not one of {list(m['choices'])}")


def make_params(cls, overrides: dict[str, Any] | None = None):
    overrides = dict(overrides or {})
    names = {f.name for f in fields_of(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for this method; known: {sorted(names)}")
    p = cls(**overrides)
    validate_params(p)
    return p


def params_to_dict(p) -> dict:
    return {f.name: getattr(p, f.name) for f in fields_of(type(p))}
