"""Image grid: shape, voxel size and origin, with the NIfTI and napari mappings.

Conventions (docs/conventions.md): arrays are indexed (z, y, x); every coordinate
triple in the engine is in that same axis order and in mm; ``origin`` is the world
position of the centre of voxel (0, 0, 0), as in parallelproj.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ImageGrid:
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float] = (2.0, 2.0, 2.0)
    origin: tuple[float, float, float] | None = None

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(
                f"ImageGrid.shape must be three positive sizes (z, y, x); got {self.shape}. "
                "Use nz=1 for a 2-D slice."
            )
        vs = tuple(float(v) for v in self.voxel_size)
        if len(vs) != 3 or not all(np.isfinite(vs)) or min(vs) <= 0:
            raise ValueError(f"ImageGrid.voxel_size must be three positive mm values; got {self.voxel_size}")
        if self.origin is None:
            origin = tuple(-(n - 1) / 2.0 * v for n, v in zip(shape, vs))
        else:
            origin = tuple(float(o) for o in self.origin)
            if len(origin) != 3 or not all(np.isfinite(origin)):
                raise ValueError(f"ImageGrid.origin must be three finite mm values; got {self.origin}")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "voxel_size", vs)
        object.__setattr__(self, "origin", origin)

    @property
    def is_2d(self) -> bool:
        return self.shape[0] == 1

    @property
    def n_voxels(self) -> int:
        return int(np.prod(self.shape))

    def matches(self, other: "ImageGrid", atol: float = 1e-3) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.voxel_size, other.voxel_size, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
        )

    def contains(self, other: "ImageGrid", atol: float = 1e-3) -> bool:
        """Whether every voxel of ``other`` is a voxel of this grid: same in-plane grid and voxel size,
        slices on this grid's slice positions (a 2-D slice only needs its z on one of them)."""
        if other.shape[1:] != self.shape[1:] or not np.allclose(self.voxel_size[1:], other.voxel_size[1:], atol=atol) \
                or not np.allclose(self.origin[1:], other.origin[1:], atol=atol):
            return False
        if not other.is_2d and abs(other.voxel_size[0] - self.voxel_size[0]) > atol:
            return False
        k0 = (other.origin[0] - self.origin[0]) / self.voxel_size[0]
        if abs(k0 - round(k0)) * self.voxel_size[0] > atol:
            return False
        return 0 <= round(k0) and round(k0) + other.shape[0] <= self.shape[0]

    def describe(self) -> str:
        return (f"shape {self.shape} (z, y, x), voxel {tuple(round(v, 3) for v in self.voxel_size)} mm, "
                f"origin {tuple(round(o, 3) for o in self.origin)} mm")

    # --- NIfTI: array axes (x, y, z), affine maps (i, j, k) -> (x, y, z) world mm.
    def nifti_affine(self) -> np.ndarray:
        dz, dy, dx = self.voxel_size
        oz, oy, ox = self.origin
        aff = np.diag([dx, dy, dz, 1.0])
        aff[:3, 3] = [ox, oy, oz]
        return aff

    @classmethod
    def from_nifti_affine(cls, shape_xyz, affine) -> "ImageGrid":
        aff = np.asarray(affine, dtype=float)
        lin = aff[:3, :3]
        if not np.allclose(lin, np.diag(np.diag(lin)), atol=1e-4 * np.abs(lin).max()):
            raise ValueError(
                "This NIfTI image is rotated or sheared relative to the scanner axes; napari-petdiff needs an "
                "axis-aligned image. Resample it first (e.g. with nibabel.processing.resample_to_output)."
            )
        d = np.diag(lin)
        if np.any(d <= 0):
            raise ValueError(
                f"NIfTI voxel sizes must be positive along x, y, z (RAS-like orientation); got {tuple(d)}. "
                "Reorient the image (nibabel.as_closest_canonical) first."
            )
        nx, ny, nz = (list(shape_xyz) + [1, 1, 1])[:3]
        return cls((nz, ny, nx), (d[2], d[1], d[0]), (aff[2, 3], aff[1, 3], aff[0, 3]))

    # --- napari: layers use the array's own axis order (z, y, x).
    def napari_scale(self) -> tuple[float, ...]:
        return self.voxel_size

    def napari_translate(self) -> tuple[float, ...]:
        return self.origin

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "voxel_size": list(self.voxel_size), "origin": list(self.origin)}

    @classmethod
    def from_dict(cls, d: dict) -> "ImageGrid":
        try:
            return cls(tuple(d["shape"]), tuple(d["voxel_size"]), tuple(d["origin"]))
        except KeyError as exc:
            raise ValueError(f"image grid description lacks the key {exc}") from None

    def voxel_centres(self, axis: int) -> np.ndarray:
        return self.origin[axis] + self.voxel_size[axis] * np.arange(self.shape[axis])
