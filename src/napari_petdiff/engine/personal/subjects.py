"""Source subjects of a personalised prior: (PET, MR) pairs, built-in phantoms or a NIfTI folder."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np

from ..grid import ImageGrid

PHANTOM_PREFIX = "phantom:"
# deformation seeds of built-in sources start here: far from the seeds benchmarks use for targets
SOURCE_SEED_BASE = 50_000


@dataclass
class Subject:
    name: str
    pet: np.ndarray   # (z, y, x) activity on ``grid``
    mr: np.ndarray    # (z, y, x) T1-like MR aligned with ``pet``
    grid: ImageGrid
    info: dict


def _check_pair(name: str, pet: np.ndarray, mr: np.ndarray) -> None:
    for what, a in (("PET", pet), ("MR", mr)):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"source subject {name!r}: its {what} contains NaN or infinite voxels")
        if not np.any(a > 0):
            raise ValueError(f"source subject {name!r}: its {what} is empty (no positive voxel)")
    if np.any(pet < 0):
        raise ValueError(f"source subject {name!r}: its PET has negative voxels; source PETs must be activity "
                         "images (>= 0), e.g. OSEM or MAP reconstructions")


def phantom_subjects(grid: ImageGrid, n: int, seed: int = 0, gm_wm_range=(2.5, 5.0), lesion_prob: float = 0.5,
                     strength_mm: float = 4.0) -> list[Subject]:
    """``n`` built-in sources on ``grid``: MNI phantoms, each with its own random deformation, GM:WM
    ratio and (with probability ``lesion_prob``) its own lesions, which the target does not share."""
    from ..phantoms import brain_phantom
    from ..phantoms.phantom import paint_lesions
    from ..phantoms.training import random_lesions

    if n < 1:
        raise ValueError(f"the number of built-in source subjects must be >= 1; got {n}")
    if not np.allclose(grid.voxel_size, grid.voxel_size[1]):
        raise ValueError(f"built-in phantom sources need isotropic voxels; the target grid is {grid.describe()}")
    dims = 2 if grid.is_2d else 3
    zc = grid.origin[0] + 0.5 * (grid.shape[0] - 1) * grid.voxel_size[0]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 7]))
    out = []
    for i in range(int(n)):
        ratio = float(rng.uniform(*gm_wm_range))
        dseed = SOURCE_SEED_BASE + 1000 * int(seed) + i
        ph = brain_phantom(dims=dims, shape=grid.shape, voxel_size_mm=grid.voxel_size[1], slice_z_mm=zc,
                           gm_wm_ratio=ratio, deformation_seed=dseed, deformation_strength_mm=strength_mm)
        if not ph.grid.matches(grid):
            raise ValueError(f"built-in phantom sources live on grids centred on the head; the target grid "
                             f"{grid.describe()} is not (phantoms come out as {ph.grid.describe()}). Give a "
                             "folder of source subjects instead.")
        act, lesions = ph.activity, []
        if rng.random() < lesion_prob:
            wm_val = ph.info["tissue_activity"]["wm"]
            lesions = random_lesions(rng, grid, ph.brain_mask & (act > 0.8 * wm_val), min(grid.voxel_size))
            act, _ = paint_lesions(act, ph.brain_mask, lesions, grid, ratio * wm_val, wm_val, require_inside=False)
        out.append(Subject(f"phantom-{i:02d}", np.asarray(act, np.float32), np.asarray(ph.mr, np.float32), grid,
                           {"deformation_seed": dseed, "gm_wm_ratio": ratio,
                            "lesions": [les.to_dict() for les in lesions]}))
    return out


def _pairs(folder: str) -> list[tuple[str, str, str]]:
    pets = sorted(glob.glob(os.path.join(folder, "*_pet.nii")) + glob.glob(os.path.join(folder, "*_pet.nii.gz")))
    out = []
    for p in pets:
        stem = os.path.basename(p).split("_pet.nii")[0]
        mrs = [m for m in (os.path.join(folder, f"{stem}_mr.nii"), os.path.join(folder, f"{stem}_mr.nii.gz"))
               if os.path.exists(m)]
        if not mrs:
            raise ValueError(f"source subject {stem!r} in {folder} has a PET ({os.path.basename(p)}) but no MR: "
                             f"add {stem}_mr.nii.gz (its T1 aligned with the PET)")
        out.append((stem, p, mrs[0]))
    return out


def folder_subjects(folder: str) -> list[Subject]:
    """Pairs ``<name>_pet.nii[.gz]`` + ``<name>_mr.nii[.gz]`` (each pair on one grid) from ``folder``."""
    from ..io import read_nifti

    if not os.path.isdir(folder):
        raise ValueError(f"source folder {folder!r} does not exist")
    pairs = _pairs(folder)
    if not pairs:
        raise ValueError(f"the source set is empty: {folder!r} holds no <name>_pet.nii[.gz] / <name>_mr.nii[.gz] "
                         "pairs. A personalised prior needs at least one other subject's PET and MR.")
    out = []
    for name, pet_path, mr_path in pairs:
        pet, pg = read_nifti(pet_path)
        mr, mg = read_nifti(mr_path)
        if pet.ndim != 3 or mr.ndim != 3:
            raise ValueError(f"source subject {name!r}: PET and MR must be static 3-D images")
        if not pg.matches(mg):
            raise ValueError(f"source subject {name!r}: PET grid {pg.describe()} and MR grid {mg.describe()} "
                             "differ; resample the MR to the PET grid first")
        _check_pair(name, pet, mr)
        out.append(Subject(name, pet, mr, pg, {"pet": pet_path, "mr": mr_path}))
    return out


def load_subjects(spec: str, grid: ImageGrid, seed: int = 0) -> list[Subject]:
    """``phantom:N`` (built-in sources on the target ``grid``) or a folder of NIfTI pairs."""
    spec = str(spec)
    if spec.startswith(PHANTOM_PREFIX):
        try:
            n = int(spec[len(PHANTOM_PREFIX):])
        except ValueError:
            raise ValueError(f"built-in sources are given as 'phantom:N' with N >= 1; got {spec!r}") from None
        if n < 1:
            raise ValueError(f"the source set is empty ({spec!r}): use phantom:N with N >= 1")
        return phantom_subjects(grid, n, seed)
    return folder_subjects(spec)
