"""napari reader: napari-petdiff acquisitions (``.petacq``) and NIfTI images."""
from __future__ import annotations

from pathlib import Path

from ._widgets.layers import KEY_GRID, KEY_PATH, KEY_ROLE, acquisition_layer_data, grid_kwargs

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _suffix_kind(path: str):
    name = str(path).lower()
    if name.endswith(".petacq"):
        return "acquisition"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    return None


def get_reader(path):
    """Return a reader for one path we understand, else None (napari then asks other plugins)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    kind = _suffix_kind(path)
    if kind == "acquisition":
        return read_acquisition
    if kind == "nifti":
        return read_nifti_layer
    return None


def _one(path) -> str:
    return str(path[0] if isinstance(path, (list, tuple)) else path)


def _stem(path: str) -> str:
    name = Path(path).name
    for suf in (".nii.gz", ".nii", ".petacq"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def read_acquisition(path) -> list[tuple]:
    from .engine.io import load_acquisition, load_acquisition_images

    path = _one(path)
    acq = load_acquisition(path)
    images = load_acquisition_images(path)
    return acquisition_layer_data(acq, images, name=_stem(path), path=str(Path(path).resolve()))


def read_nifti_layer(path) -> list[tuple]:
    from .engine.io import read_nifti

    path = _one(path)
    arr, grid = read_nifti(path)
    meta = {KEY_GRID: grid.to_dict(), KEY_ROLE: "image", KEY_PATH: None, "source_path": str(Path(path).resolve())}
    return [(arr, {"name": _stem(path), "metadata": meta, "colormap": "magma", **grid_kwargs(grid, arr.ndim)},
             "image")]
