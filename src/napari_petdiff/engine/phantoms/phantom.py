"""The Phantom and Lesion records and lesion painting (shared by every phantom generator)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ..grid import ImageGrid

LESION_REFERENCES = ("auto", "gm", "wm", "local", "absolute")


@dataclass
class Lesion:
    """A spherical PET-only lesion.

    ``centre_mm``: (z, y, x) world mm (origin = head centre = centre of the default grids).
    ``contrast``: activity multiplier. ``reference`` says of what: 'auto' (default) = the tracer's
    GM value for hot lesions (contrast >= 1) and its WM value for cold ones; 'gm' / 'wm' force one;
    'local' multiplies the lesion-free activity voxel by voxel; 'absolute' makes ``contrast`` the
    activity itself.
    """

    centre_mm: tuple[float, float, float]
    radius_mm: float
    contrast: float
    reference: str = "auto"

    def __post_init__(self):
        c = tuple(float(v) for v in self.centre_mm)
        if len(c) != 3 or not all(np.isfinite(c)):
            raise ValueError(f"Lesion.centre_mm must be three finite world mm values (z, y, x); got {self.centre_mm}")
        self.centre_mm = c
        self.radius_mm = float(self.radius_mm)
        self.contrast = float(self.contrast)
        if not self.radius_mm > 0:
            raise ValueError(f"Lesion.radius_mm must be > 0 mm; got {self.radius_mm}")
        if not (np.isfinite(self.contrast) and self.contrast >= 0):
            raise ValueError("Lesion.contrast must be a finite value >= 0 (1.5 = hot, 0.5 = cold); "
                             f"got {self.contrast}")
        if self.reference not in LESION_REFERENCES:
            raise ValueError(f"Lesion.reference must be one of {LESION_REFERENCES}; got {self.reference!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["centre_mm"] = list(self.centre_mm)
        return d


@dataclass
class Phantom:
    """A PET phantom on ``grid``: every array is (z, y, x); float32 unless noted."""

    activity: np.ndarray  # relative activity (FDG: GM 4, WM 1, CSF 0.05)
    mu: np.ndarray        # linear attenuation coefficient at 511 keV, 1/mm
    mr: np.ndarray        # T1-like MR image in ~[0, 1], aligned with activity (no lesions)
    gm: np.ndarray        # tissue fractions in [0, 1]
    wm: np.ndarray
    csf: np.ndarray
    brain_mask: np.ndarray  # bool
    lesion_masks: list[np.ndarray]  # bool, one per lesion
    grid: ImageGrid
    info: dict = field(default_factory=dict)  # JSON-able description


def lesion_value(lesion: Lesion, gm_value: float, wm_value: float) -> float | None:
    """The uniform activity of ``lesion``, or None for the voxel-wise 'local' reference."""
    ref = lesion.reference
    if ref == "auto":
        ref = "gm" if lesion.contrast >= 1.0 else "wm"
    if ref == "local":
        return None
    if ref == "absolute":
        return lesion.contrast
    return lesion.contrast * (gm_value if ref == "gm" else wm_value)


def sphere_mask(grid: ImageGrid, centre_mm, radius_mm) -> np.ndarray:
    """Voxels of ``grid`` whose centres lie within ``radius_mm`` of ``centre_mm``."""
    d2 = [(grid.voxel_centres(a) - centre_mm[a]) ** 2 for a in range(3)]
    return (d2[0][:, None, None] + d2[1][None, :, None] + d2[2][None, None, :]) <= radius_mm**2


def paint_lesions(activity: np.ndarray, brain_mask: np.ndarray, lesions, grid: ImageGrid,
                  gm_value: float, wm_value: float, *, require_inside: bool = True):
    """Paint ``lesions`` into a copy of ``activity``; returns (activity, masks).

    Each mask is the lesion sphere within the brain. Later lesions overwrite earlier ones.
    """
    out = activity.copy()
    masks = []
    for i, les in enumerate(lesions):
        if not isinstance(les, Lesion):
            raise ValueError(f"lesions[{i}] is a {type(les).__name__}; pass Lesion(centre_mm, radius_mm, contrast)")
        m = sphere_mask(grid, les.centre_mm, les.radius_mm) & brain_mask
        if require_inside and not m.any():
            raise ValueError(
                f"lesion {i} at {les.centre_mm} mm (radius {les.radius_mm} mm) has no brain voxel on this grid "
                f"({grid.describe()}); move it into the brain, enlarge it, or choose a slice_z_mm it crosses")
        val = lesion_value(les, gm_value, wm_value)
        out[m] = activity[m] * les.contrast if val is None else val
        masks.append(m)
    return out, masks
