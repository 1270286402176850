"""Projector base class: a LinearOperator image (z, y, x) -> sinogram (n_planes, n_views, n_radial)."""
from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch

from ..geometry import Geometry, _as_view_index
from ..grid import ImageGrid
from ..operators import LinearOperator


class Projector(LinearOperator):
    """Line integrals (mm) of an image along the LORs of ``geometry`` (all views or a subset).

    ``views`` (None = all) lists the geometry's views this projector produces, in order; the output
    shape is (n_planes, len(views), n_radial). Subclasses implement ``_apply``/``_adjoint``,
    ``_subset(abs_views)`` and ``_to(device)``.
    """

    backend: str = ""

    def __init__(self, geometry: Geometry, grid: ImageGrid, views=None, dtype=torch.float32, device=None):
        if not isinstance(geometry, Geometry):
            raise ValueError(f"geometry must be a Geometry; got {type(geometry).__name__}")
        if not isinstance(grid, ImageGrid):
            raise ValueError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype (torch.float32 or torch.float64); got {dtype!r}")
        self.geometry = geometry
        self.grid = grid
        self.views = None if views is None else torch.as_tensor(
            _as_view_index(views, geometry.n_views), dtype=torch.long)
        n_sel = geometry.n_views if self.views is None else int(self.views.numel())
        super().__init__(grid.shape, (geometry.n_planes, n_sel, geometry.n_radial))
        self._dtype = dtype
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def view_indices(self) -> np.ndarray:
        """Absolute view numbers (in the geometry) produced by this projector."""
        if self.views is None:
            return np.arange(self.geometry.n_views, dtype=np.int64)
        return self.views.numpy()

    def subset(self, view_idx) -> "Projector":
        """Projector restricted to ``view_idx`` (indices into THIS projector's views, order kept)."""
        local = _as_view_index(view_idx, self.out_shape[1])
        return self._subset(self.view_indices[local])

    @abstractmethod
    def _subset(self, abs_views: np.ndarray) -> "Projector":
        """The same projector for the absolute views ``abs_views``."""

    def to(self, device) -> "Projector":
        """Move the stored data to ``device`` (in place); returns self."""
        self._device = torch.device(device)
        self._to(self._device)
        return self

    def _to(self, device: torch.device) -> None:
        """Hook for subclasses holding tensors."""

    def __repr__(self) -> str:
        sel = "" if self.views is None else f", {self.out_shape[1]} of {self.geometry.n_views} views"
        return (f"{type(self).__name__}(image {self.in_shape} -> sinogram {self.out_shape}{sel}, "
                f"{self._dtype}, {self._device})")
