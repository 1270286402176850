"""Built-in scans: a phantom on the preset brain scanner, simulated at a chosen count level."""
from __future__ import annotations

import numpy as np
import torch

from .geometry import brain_scanner
from .simulate import simulate

PHANTOMS = ("brain2d", "brain3d", "shepp2d")


def make_phantom(name: str, tracer: str = "fdg", lesions: bool = False, deformation_seed=None):
    from . import phantoms as ph

    if name == "brain2d":
        return ph.brain_phantom(dims=2, tracer=tracer, lesions=ph.default_lesions(2) if lesions else None,
                                deformation_seed=deformation_seed)
    if name == "brain3d":
        return ph.brain_phantom(dims=3, tracer=tracer, lesions=ph.default_lesions(3) if lesions else None,
                                deformation_seed=deformation_seed)
    if name == "shepp2d":
        return ph.shepp_logan(dims=2)
    raise ValueError(f"unknown phantom '{name}'; choose one of {', '.join(PHANTOMS)}")


def geometry_for(grid):
    nz = grid.shape[0]
    return brain_scanner(n_rings=nz, max_ring_difference=0)


def make_scan(name: str = "brain2d", counts: float = 1e5, background_fraction: float = 0.3,
              psf_fwhm_mm: float = 0.0, tracer: str = "fdg", lesions: bool = False, seed: int = 0,
              deformation_seed=None):
    """Return (Acquisition, reference images {truth, mu, mr, ...}) for a built-in phantom.

    The phantom's MR is also attached to the acquisition (``acq.mr``, the same tensor as ``images["mr"]``)
    for MR-conditioned methods."""
    ph = make_phantom(name, tracer, lesions, deformation_seed)
    geom = geometry_for(ph.grid)
    sim = simulate(ph.activity, ph.grid, geom, ph.mu, counts=counts, background_fraction=background_fraction,
                   psf_fwhm_mm=psf_fwhm_mm, seed=seed,
                   metadata={"phantom": name, "tracer": tracer, "lesions": lesions, **ph.info})
    images = {"truth": sim.truth.cpu(), "mu": torch.as_tensor(np.asarray(ph.mu, np.float32))}
    if getattr(ph, "mr", None) is not None:
        images["mr"] = torch.as_tensor(np.asarray(ph.mr, np.float32))
    images["brain_mask"] = torch.as_tensor(np.asarray(ph.brain_mask, np.float32))
    for i, m in enumerate(getattr(ph, "lesion_masks", []) or []):
        images[f"lesion{i}"] = torch.as_tensor(np.asarray(m, np.float32))
    acq = sim.acquisition if "mr" not in images else sim.acquisition.with_mr(images["mr"])
    return acq, images
