"""Sample data: simulated 2-D and 3-D FDG brain scans with their ground truth.

The first call simulates (projector build + Poisson noise) and keeps the result in memory, so
opening a sample again in the same session is immediate.
"""
from __future__ import annotations

from functools import lru_cache

from ._widgets.layers import acquisition_layer_data


@lru_cache(maxsize=4)
def _scan(name: str, counts: float, seed: int):
    from .engine.samples import make_scan

    return make_scan(name, counts=counts, background_fraction=0.3, seed=seed)


def scan_layers(name: str, counts: float = 1e5, seed: int = 0) -> list[tuple]:
    acq, images = _scan(name, float(counts), int(seed))
    return acquisition_layer_data(acq, images, name=name)


def brain2d() -> list[tuple]:
    """2-D brain FDG slice, 1e5 expected trues, 30 % background."""
    return scan_layers("brain2d", 1e5)


def brain3d() -> list[tuple]:
    """3-D brain FDG volume, 64 slices; 6.4e6 expected trues (1e5 per slice)."""
    return scan_layers("brain3d", 6.4e6)


@lru_cache(maxsize=1)
def _dynamic_scan(name: str, counts: float, seed: int):
    from .engine.kinetics.simulate import make_dynamic_scan

    return make_dynamic_scan(name, counts=counts, seed=seed)


def brain2d_dynamic() -> list[tuple]:
    """Dynamic 2-D FDG brain scan (35 frames over 60 min, 1e6 trues) with true Ki and intercept images."""
    acq, images = _dynamic_scan("brain2d", 1e6, 0)
    return acquisition_layer_data(acq, images, name="brain2d-dynamic")
