"""Facade: ``reconstruct(acquisition, method, **params) -> Result``."""
from __future__ import annotations

from typing import Callable, Optional

from .methods import get_method
from .params import make_params
from .run import CancelToken, Result, drive


def reconstruct(acquisition, method: str, *, cancel: Optional[CancelToken] = None,
                on_event: Optional[Callable] = None, device=None, **params) -> Result:
    spec = get_method(method)
    p = make_params(spec.params, params)
    gen = spec.run(acquisition, p, cancel or CancelToken(), device=device)
    return drive(gen, on_event)
