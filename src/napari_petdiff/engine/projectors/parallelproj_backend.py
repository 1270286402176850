"""Optional backend: parallelproj's compiled Joseph projector (OpenMP / CUDA).

parallelproj ships only through conda-forge (not PyPI), so it is used only when ``import parallelproj``
works. Its conventions match ours: LOR endpoints and image axes in the same order (here (z, y, x)),
``img_origin`` = centre of voxel 0, values are line integrals in the units of the voxel size (mm).
It computes in float32 on numpy arrays; results are returned in the input's dtype and device.
"""
from __future__ import annotations

import importlib

import numpy as np
import torch

from ..geometry import Geometry
from ..grid import ImageGrid
from .base import Projector


class BackendUnavailableError(ValueError):
    """The requested projector backend cannot be used in this environment."""


def load_parallelproj():
    """The parallelproj module, or BackendUnavailableError saying how to get it."""
    try:
        return importlib.import_module("parallelproj")
    except Exception as exc:  # ImportError, or its C library missing (it raises ImportError/OSError)
        raise BackendUnavailableError(
            f"the 'parallelproj' backend needs the parallelproj package, which is not importable here ({exc}). "
            "It is distributed through conda-forge only (conda install -c conda-forge parallelproj); "
            "use backend='sparse', 'matrix-free' or 'auto' instead."
        ) from None


def parallelproj_available() -> bool:
    try:
        load_parallelproj()
        return True
    except BackendUnavailableError:
        return False


class ParallelprojProjector(Projector):
    """Sinogram projector calling ``parallelproj.joseph3d_fwd`` / ``joseph3d_back``."""

    backend = "parallelproj"

    def __init__(self, geometry: Geometry, grid: ImageGrid, views=None, dtype=torch.float32, device=None):
        self._pp = load_parallelproj()
        super().__init__(geometry, grid, views=views, dtype=dtype, device=device)
        geometry.check_grid(grid)
        xs, xe = geometry.lor_endpoints(None if self.views is None else self.views.numpy())
        self._xs = np.ascontiguousarray(xs.reshape(-1, 3).numpy(), dtype=np.float32)
        self._xe = np.ascontiguousarray(xe.reshape(-1, 3).numpy(), dtype=np.float32)
        self._origin = np.asarray(grid.origin, dtype=np.float32)
        self._voxsize = np.asarray(grid.voxel_size, dtype=np.float32)

    def _apply(self, x):
        imgs = x.detach().to("cpu", torch.float32).numpy()
        out = np.stack([np.asarray(self._pp.joseph3d_fwd(self._xs, self._xe, np.ascontiguousarray(img),
                                                         self._origin, self._voxsize), dtype=np.float32)
                        for img in imgs])
        return torch.from_numpy(out.reshape((x.shape[0],) + self.out_shape)).to(device=x.device, dtype=x.dtype)

    def _adjoint(self, y):
        sinos = y.detach().to("cpu", torch.float32).reshape(y.shape[0], -1).numpy()
        out = np.stack([np.asarray(self._pp.joseph3d_back(self._xs, self._xe, self.in_shape, self._origin,
                                                          self._voxsize, np.ascontiguousarray(s)),
                                   dtype=np.float32)
                        for s in sinos])
        return torch.from_numpy(out.reshape((y.shape[0],) + self.in_shape)).to(device=y.device, dtype=y.dtype)

    def _subset(self, abs_views):
        return ParallelprojProjector(self.geometry, self.grid, views=abs_views, dtype=self._dtype,
                                     device=self._device)
