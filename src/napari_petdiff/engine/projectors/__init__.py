"""Projectors: images (z, y, x) -> sinograms (n_planes, n_views, n_radial) of line integrals in mm.

Backends:

* ``"sparse"`` - precomputed CSR Joseph plane matrix for 2-D / 2.5-D geometries (fast, cached on disk);
* ``"matrix-free"`` - Joseph on the fly for any LOR endpoints (oblique 3-D planes, list-mode);
* ``"parallelproj"`` - parallelproj's compiled Joseph, when ``import parallelproj`` works;
* ``"auto"`` - sparse for planar geometries, matrix-free otherwise.
"""
from __future__ import annotations

import torch

from ..geometry import Geometry
from ..grid import ImageGrid
from .base import Projector
from .matrix_cache import default_cache_dir
from .matrix_free import ListmodeProjector, MatrixFreeJosephProjector
from .parallelproj_backend import BackendUnavailableError, ParallelprojProjector, parallelproj_available
from .sparse_joseph import SparseJosephProjector

__all__ = [
    "make_projector", "Projector", "SparseJosephProjector", "MatrixFreeJosephProjector", "ParallelprojProjector",
    "ListmodeProjector", "BackendUnavailableError", "available_backends", "default_cache_dir", "BACKENDS",
]

BACKENDS = ("auto", "sparse", "matrix-free", "parallelproj")


def available_backends() -> list[str]:
    return ["sparse", "matrix-free"] + (["parallelproj"] if parallelproj_available() else [])


def make_projector(geometry: Geometry, grid: ImageGrid, backend: str = "auto", cache_dir=None, device=None,
                   dtype: torch.dtype = torch.float32) -> Projector:
    """Projector for ``geometry`` on ``grid``.

    ``cache_dir``: where the sparse backend caches matrices (default ``$NAPARI_PETDIFF_CACHE/projectors``
    or ``~/.cache/napari-petdiff/projectors``; ``False`` = no disk cache). ``dtype``: storage dtype of the
    sparse matrix values (inputs of another dtype still work; a converted copy is cached).
    """
    if not isinstance(geometry, Geometry):
        raise ValueError(f"geometry must be a Geometry (e.g. brain_scanner()); got {type(geometry).__name__}")
    if not isinstance(grid, ImageGrid):
        raise ValueError(f"grid must be an ImageGrid; got {type(grid).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown projector backend {backend!r}; choose one of {list(BACKENDS)}")
    geometry.check_grid(grid)
    if backend == "auto":
        backend = "sparse" if geometry.is_planar else "matrix-free"
    if backend == "sparse":
        return SparseJosephProjector(geometry, grid, dtype=dtype, device=device, cache_dir=cache_dir)
    if backend == "matrix-free":
        return MatrixFreeJosephProjector(geometry, grid, dtype=dtype, device=device)
    return ParallelprojProjector(geometry, grid, dtype=dtype, device=device)
