"""Simulate PET data: activity + attenuation + geometry -> Acquisition with Poisson noise.

Count conventions (docs/conventions.md):
- ``counts``: total expected (noise-free) true coincidences in the sinogram;
- ``trues_per_mm3``: alternatively, trues per mm^3 of emission volume (voxels with activity > 0),
  Singh et al.'s "trues per emission volume" (their 2 mm voxel is 8 mm^3);
- ``background_fraction``: expected randoms + scatter counts as a fraction of the trues;
  half uniform over the bins (randoms), half a smooth, attenuated scatter-like term.
The returned ``truth`` is the activity in the reconstruction's units (``ybar = A truth + b``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .acquisition import Acquisition
from .grid import ImageGrid
from .operators import attenuation_factors
from .system import build_psf, cached_projector


@dataclass
class Simulation:
    acquisition: Acquisition
    truth: torch.Tensor          # activity in reconstruction units (same grid)
    expected: torch.Tensor       # noise-free prompts (trues + background)
    scale: float                 # truth = scale * input activity


def _scatter_like(trues: torch.Tensor) -> torch.Tensor:
    """A broad, smooth sinogram shaped like the trues (scatter is low-frequency)."""
    n_rad = trues.shape[-1]
    width = max(n_rad / 6.0, 1.0)
    r = torch.arange(n_rad, dtype=trues.dtype, device=trues.device)
    k = torch.exp(-0.5 * ((r - r.mean()) / width) ** 2)
    k = k / k.sum()
    flat = trues.reshape(-1, 1, n_rad)
    out = torch.nn.functional.conv1d(flat, k.view(1, 1, -1), padding=n_rad // 2)[..., :n_rad]
    return out.reshape(trues.shape)


def simulate(activity, grid: ImageGrid, geometry, mu=None, *, counts: Optional[float] = 1e5,
             trues_per_mm3: Optional[float] = None, background_fraction: float = 0.3,
             psf_fwhm_mm=0.0, normalisation=None, seed: Optional[int] = 0, noise: bool = True,
             device=None, metadata: Optional[dict] = None) -> Simulation:
    act = torch.as_tensor(np.asarray(activity, dtype=np.float32) if not isinstance(activity, torch.Tensor)
                          else activity.float())
    if tuple(act.shape) != grid.shape:
        raise ValueError(f"activity has shape {tuple(act.shape)} but the grid is {grid.shape}")
    if not torch.isfinite(act).all() or (act < 0).any():
        raise ValueError("activity must be finite and >= 0")
    if act.sum() <= 0:
        raise ValueError("activity is zero everywhere: nothing to simulate")
    if not 0 <= background_fraction < 100:
        raise ValueError(f"background_fraction must be in [0, 100); got {background_fraction}")
    if trues_per_mm3 is None and (counts is None or counts <= 0):
        raise ValueError("give a positive total count (counts) or trues_per_mm3")
    geometry.check_grid(grid)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    act = act.to(dev)
    proj = cached_projector(geometry, grid, "auto", dev)
    if mu is not None:
        mu_t = torch.as_tensor(np.asarray(mu, dtype=np.float32) if not isinstance(mu, torch.Tensor) else mu.float()).to(dev)
        if tuple(mu_t.shape) != grid.shape:
            raise ValueError(f"mu-map has shape {tuple(mu_t.shape)} but the grid is {grid.shape}")
        if (mu_t < 0).any() or not torch.isfinite(mu_t).all():
            raise ValueError("mu-map must be finite and >= 0 (1/mm)")
        mult = attenuation_factors(proj, mu_t)
    else:
        mult = torch.ones(proj.out_shape, device=dev)
    if normalisation is not None:
        mult = mult * torch.as_tensor(normalisation, dtype=torch.float32, device=dev)
    psf_t = (float(psf_fwhm_mm),) * 3 if np.isscalar(psf_fwhm_mm) else tuple(psf_fwhm_mm)
    psf = build_psf(grid, psf_t, dev)
    blurred = psf.apply(act) if psf is not None else act
    trues = mult * proj.apply(blurred)
    if trues_per_mm3 is not None:
        vol = float((act > 0).sum()) * float(np.prod(grid.voxel_size))
        counts = float(trues_per_mm3) * vol
    scale = float(counts) / float(trues.sum())
    trues = trues * scale
    truth = act * scale
    if background_fraction > 0:
        total_b = background_fraction * float(trues.sum())
        randoms = torch.ones_like(trues) * (0.5 * total_b / trues.numel())
        sc = _scatter_like(trues)
        scatter = sc * (0.5 * total_b / float(sc.sum()))
        background = randoms + scatter
    else:
        background = torch.zeros_like(trues)
    expected = trues + background
    if noise:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else int(seed))
        prompts = torch.poisson(expected.cpu(), generator=gen).to(dev)
    else:
        prompts = expected.clone()
    meta = dict(metadata or {})
    meta.update({"simulated": True, "counts_trues": float(counts), "background_fraction": background_fraction,
                 "seed": seed, "noise": noise, "truth_scale": scale})
    acq = Acquisition(prompts, geometry, grid, mult, background if background_fraction > 0 else None,
                      psf_t, metadata=meta)
    return Simulation(acq, truth, expected, scale)
