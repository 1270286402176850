"""System model ``A = diag(mult) . P . PSF`` built from an Acquisition (projectors cached)."""
from __future__ import annotations

import json
from typing import Optional

import torch

from .grid import ImageGrid
from .operators import GaussianPSF
from .projectors import ListmodeProjector, make_projector

_PROJECTOR_CACHE: dict = {}


def cached_projector(geometry, grid: ImageGrid, backend: str = "auto", device=None):
    """Projectors are expensive to build (matrix construction); reuse them across runs."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (json.dumps(geometry.to_dict(), sort_keys=True), json.dumps(grid.to_dict()), backend, str(dev))
    proj = _PROJECTOR_CACHE.get(key)
    if proj is None:
        proj = make_projector(geometry, grid, backend=backend, device=dev)
        if len(_PROJECTOR_CACHE) > 8:
            _PROJECTOR_CACHE.pop(next(iter(_PROJECTOR_CACHE)))
        _PROJECTOR_CACHE[key] = proj
    return proj


class SystemModel:
    """Forward model restricted to a set of views (all views by default)."""

    def __init__(self, projector, mult: Optional[torch.Tensor], psf: Optional[GaussianPSF]):
        self.projector = projector
        self.mult = mult
        self.psf = psf

    @property
    def in_shape(self):
        return tuple(self.projector.in_shape)

    @property
    def out_shape(self):
        return tuple(self.projector.out_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.psf is not None:
            x = self.psf.apply(x)
        y = self.projector.apply(x)
        return y if self.mult is None else y * self.mult

    def forward_autograd(self, x: torch.Tensor) -> torch.Tensor:
        """A x inside autograd (backward = adjoint), for losses that differentiate through A."""
        if self.psf is not None:
            x = self.psf(x)
        y = self.projector(x)
        return y if self.mult is None else y * self.mult

    def back(self, y: torch.Tensor) -> torch.Tensor:
        if self.mult is not None:
            y = y * self.mult
        x = self.projector.adjoint(y)
        return x if self.psf is None else self.psf.adjoint(x)


def build_psf(grid: ImageGrid, fwhm_mm, device=None, dtype=torch.float32) -> Optional[GaussianPSF]:
    if not any(f > 0 for f in fwhm_mm):
        return None
    psf = GaussianPSF(grid, fwhm_mm)
    return psf.to(device) if hasattr(psf, "to") and device is not None else psf


def system_for(acq, views: Optional[torch.Tensor] = None, backend: str = "auto", device=None) -> SystemModel:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    proj = cached_projector(acq.geometry, acq.grid, backend, dev)
    mult = acq.multiplicative.to(dev) if acq.multiplicative is not None else None
    if views is not None:
        proj = proj.subset(views)
        if mult is not None:
            mult = mult.index_select(-2, views.to(dev))
    return SystemModel(proj, mult, build_psf(acq.grid, acq.psf_fwhm_mm, dev))


def listmode_system_for(acq, device=None) -> SystemModel:
    dev = torch.device(device) if device is not None else torch.device("cpu")
    lm = acq.listmode
    proj = ListmodeProjector(lm.xstart.to(dev), lm.xend.to(dev), acq.grid)
    mult = lm.multiplicative.to(dev) if lm.multiplicative is not None else None
    return SystemModel(proj, mult, build_psf(acq.grid, acq.psf_fwhm_mm, dev))
