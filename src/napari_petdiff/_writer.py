"""napari writer: an Image layer -> NIfTI, its affine taken from the layer's scale and translate.

napari's world axes are the array's (…, z, y, x) in mm; the NIfTI affine maps (i, j, k) = (x, y, z)
indices to world mm (see engine/grid.py), so a layer read by our reader is written back unchanged.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .engine.grid import ImageGrid
from ._widgets.layers import KEY_GRID, KEY_ROLE


def _identity(value, n) -> bool:
    if value is None:
        return True
    a = np.asarray(value, dtype=float)
    if a.size == 0:
        return True
    if a.ndim == 2 and a.shape[0] == a.shape[1]:
        return np.allclose(a, np.eye(a.shape[0]))
    return np.allclose(a, 0)  # rotate given as angle(s), shear as coefficients


def layer_grid(data_shape, meta: dict) -> ImageGrid:
    """ImageGrid of the last three axes of a layer from its scale/translate (2-D layers get nz = 1)."""
    shape = tuple(int(s) for s in data_shape)
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"a NIfTI image needs at least 2 dimensions; this layer has shape {shape}")
    for key in ("rotate", "shear"):
        if not _identity(meta.get(key), ndim):
            raise ValueError(f"this layer has a {key}; NIfTI export here keeps only axis-aligned scale and "
                             "translate. Remove the transform (or resample the data) before saving.")
    aff = meta.get("affine")
    if aff is not None and not _identity(getattr(aff, "affine_matrix", aff), ndim + 1):
        raise ValueError("this layer has an extra affine transform; NIfTI export keeps only scale and translate. "
                         "Reset layer.affine before saving.")
    scale = list(meta.get("scale") if meta.get("scale") is not None else [1.0] * ndim)
    translate = list(meta.get("translate") if meta.get("translate") is not None else [0.0] * ndim)
    if ndim == 2:
        # A plain 2-D layer: one slice; take the slice thickness from our grid tag if present.
        dz = 1.0
        if isinstance(meta.get("metadata"), dict) and KEY_GRID in meta["metadata"]:
            dz = float(meta["metadata"][KEY_GRID]["voxel_size"][0])
        return ImageGrid((1, *shape), (dz, *scale), (0.0, *translate))
    return ImageGrid(shape[-3:], tuple(scale[-3:]), tuple(translate[-3:]))


def write_nifti_layer(path: str, data: Any, meta: dict) -> list[str]:
    from .engine.io import write_nifti

    md = meta.get("metadata") or {}
    if md.get(KEY_ROLE) == "prompts":
        raise ValueError("this layer is a sinogram (the prompts of an acquisition), not an image; save the "
                         "acquisition as .petacq from the Data widget instead.")
    lower = str(path).lower()
    if not lower.endswith((".nii", ".nii.gz")):
        path = str(path) + ".nii.gz"
    arr = np.asarray(data, dtype=np.float32)
    grid = layer_grid(arr.shape, meta)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim > 4:
        raise ValueError(f"NIfTI export supports up to one extra axis (…, z, y, x); this layer has shape {arr.shape}")
    write_nifti(path, arr, grid)
    return [str(path)]
