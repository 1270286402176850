"""Random noise-free FDG-like activity volumes for training the diffusion prior (fast, on the fly)."""
from __future__ import annotations

import numpy as np
import torch

from .brain import TRACERS, tissue_maps
from .deformation import deform, random_deformation_field
from .phantom import Lesion, paint_lesions
from .templates import centred_grid, source_grid, source_volumes

# world z range (mm) of random axial training slices: from the temporal lobes / upper cerebellum
# to near the vertex (the brain spans world z -90..64 with HEAD_CENTRE_MNI)
SLICE_Z_RANGE_MM = (-45.0, 56.0)
HOT_CONTRAST, COLD_CONTRAST = (1.3, 2.0), (0.2, 0.7)
LESION_RADIUS_MM = (3.0, 10.0)
MAX_LESIONS = 3

# per source grid: (gm, wm + csf-weighted base, brain fraction, T1-like MR) as torch tensors
_prepared: dict[str, tuple[torch.Tensor, ...]] = {}


def _prepared_source(src) -> tuple[torch.Tensor, ...]:
    key = repr(src)
    if key not in _prepared:
        v = source_volumes(src)
        t = tissue_maps(v, min(src.voxel_size))
        fdg = TRACERS["fdg"]
        base = fdg["wm"] * t["wm"] + fdg["csf"] * t["csf"]
        while len(_prepared) >= 2:  # a trainer uses one or two grids; keeps memory bounded
            _prepared.pop(next(iter(_prepared)))
        _prepared[key] = (torch.from_numpy(np.array(v["gm"])), torch.from_numpy(base.astype(np.float32)),
                          torch.from_numpy(np.array(v["brain"])), torch.from_numpy(t["mr"]))
    return _prepared[key]


def random_lesions(rng: np.random.Generator, grid, parenchyma: np.ndarray, voxel: float) -> list[Lesion]:
    idx = np.flatnonzero(parenchyma)
    if idx.size == 0:
        return []
    out = []
    for _ in range(int(rng.integers(1, MAX_LESIONS + 1))):
        k, j, i = np.unravel_index(idx[rng.integers(idx.size)], grid.shape)
        centre = tuple(grid.voxel_centres(a)[n] + rng.uniform(-0.5, 0.5) * grid.voxel_size[a]
                       for a, n in enumerate((k, j, i)))
        if grid.shape[0] == 1:
            centre = (grid.origin[0],) + centre[1:]
        radius = max(float(rng.uniform(*LESION_RADIUS_MM)), 0.75 * voxel)
        hot = rng.random() < 0.5
        contrast = float(rng.uniform(*(HOT_CONTRAST if hot else COLD_CONTRAST)))
        out.append(Lesion(centre, radius, contrast, "gm" if hot else "wm"))
    return out


def random_training_volume(rng: np.random.Generator, shape=(64, 128, 128), voxel_size_mm=2.0,
                           gm_wm_range=(2.5, 5.0), lesion_prob: float = 0.5, *,
                           deformation_strength_mm: float = 4.0, with_mr: bool = False) -> np.ndarray:
    """A randomly deformed FDG-like brain activity (z, y, x) float32 without noise (WM = 1).

    ``with_mr``: return (2, z, y, x), the activity and its T1-like MR deformed alike (the MR has
    no lesions: they are PET-only), the paired data of an MR-conditioned prior.

    Random per call: the smooth deformation and affine, the GM:WM ratio (uniform in
    ``gm_wm_range``) and, with probability ``lesion_prob``, 1-3 hot (1.3-2 x GM) or cold
    (0.2-0.7 x WM) spherical lesions of radius 3-10 mm in brain parenchyma. With ``shape[0] == 1``
    the slice is axial at a random world z in ``SLICE_Z_RANGE_MM``.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng must be a numpy.random.Generator (np.random.default_rng(seed)); "
                         f"got {type(rng).__name__}")
    lo, hi = (float(g) for g in gm_wm_range)
    if not (0 < lo <= hi):
        raise ValueError(f"gm_wm_range must be (low, high) with 0 < low <= high; got {gm_wm_range}")
    if not 0.0 <= lesion_prob <= 1.0:
        raise ValueError(f"lesion_prob must be a probability in [0, 1]; got {lesion_prob}")
    shp = tuple(int(s) for s in shape)
    if len(shp) != 3 or min(shp) < 1:
        raise ValueError(f"shape must be (nz, ny, nx) (nz = 1 for a 2-D slice); got {shape}")

    if shp[0] == 1:
        # one whole-brain source for every slice position, so slices never need a new resampling
        zlo, zhi = SLICE_Z_RANGE_MM
        vs = np.broadcast_to(np.asarray(voxel_size_mm, float), (3,))
        nz = int(np.ceil((zhi - zlo) / vs[0])) + 1
        src = source_grid(centred_grid((nz, shp[1], shp[2]), vs, ((zlo + zhi) / 2.0, 0.0, 0.0)))
        grid = centred_grid(shp, vs, (float(rng.uniform(zlo, zhi)), 0.0, 0.0))
    else:
        grid = centred_grid(shp, voxel_size_mm)
        src = source_grid(grid)
    gm, base, brain, mr_src = _prepared_source(src)
    ratio = float(rng.uniform(lo, hi))
    activity_src = gm.mul(ratio * TRACERS["fdg"]["wm"]).add_(base)

    field = random_deformation_field(grid.shape, deformation_strength_mm, grid.voxel_size, rng, origin=grid.origin)
    out = deform([activity_src, brain] + ([mr_src] if with_mr else []), field, src)
    act, bfrac = out[0].numpy(), out[1].numpy()
    if rng.random() < lesion_prob:
        brain_mask = bfrac > 0.5
        # lesion centres in GM or WM, not in ventricles
        lesions = random_lesions(rng, grid, brain_mask & (act > 0.8 * TRACERS["fdg"]["wm"]), min(grid.voxel_size))
        act, _ = paint_lesions(act, brain_mask, lesions, grid, ratio * TRACERS["fdg"]["wm"], TRACERS["fdg"]["wm"],
                               require_inside=False)
    if with_mr:
        return np.ascontiguousarray(np.stack([act, out[2].numpy()]), dtype=np.float32)
    return np.ascontiguousarray(act, dtype=np.float32)
