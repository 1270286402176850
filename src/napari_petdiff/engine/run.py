"""The run protocol shared by every method, the trainer and the CLI/napari front ends.

A method is a generator ``fn(acquisition, params, cancel)`` that yields events
(:class:`Progress`, :class:`Intermediate`, :class:`Sample`, :class:`RunWarning`) and
returns a :class:`Result`. Front ends only consume events; they never reach into methods.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Optional

import torch


class Cancelled(Exception):
    """Raised inside a method when its CancelToken was cancelled."""


class CancelToken:
    """Cooperative stop flag, checked inside every inner loop (thread-safe)."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("run cancelled")


@dataclass
class Progress:
    step: int
    total: int
    message: str = ""
    stage: str = ""


@dataclass
class Intermediate:
    """The current estimate in physical units, image shape (z, y, x)."""
    image: torch.Tensor
    step: int
    label: str = ""


@dataclass
class Sample:
    index: int
    image: torch.Tensor


@dataclass
class RunWarning:
    message: str


Event = Progress | Intermediate | Sample | RunWarning


@dataclass
class Result:
    mean: torch.Tensor
    std: Optional[torch.Tensor] = None
    samples: Optional[torch.Tensor] = None
    likelihood: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # further named images (e.g. Patlak intercept)


MethodGen = Generator[Event, None, Result]


def drive(gen: MethodGen, on_event: Optional[Callable[[Any], None]] = None) -> Result:
    """Run a method generator to completion; pass every event to ``on_event``."""
    warnings = []
    try:
        while True:
            ev = next(gen)
            if isinstance(ev, RunWarning):
                warnings.append(ev.message)
            if on_event is not None:
                on_event(ev)
    except StopIteration as stop:
        result = stop.value
    if result is None:
        raise RuntimeError("method generator returned no Result")
    for w in warnings:
        if w not in result.warnings:
            result.warnings.append(w)
    return result


class Throttle:
    """True at most ``rate`` times per second (and always for ``force``): keeps GUIs responsive."""

    def __init__(self, rate: float = 4.0):
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._last = -1e18

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            return True
        return False
