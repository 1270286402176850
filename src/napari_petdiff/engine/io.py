"""Files: acquisitions (one safetensors container) and images (NIfTI).

Acquisition file (``.petacq``): a safetensors container. Why: it stores named tensors with a
JSON header and cannot execute code on load (no pickle), it is memory-mappable, and
safetensors itself rejects headers that do not cover the file (truncation). We add a
format tag, a version, the geometry / grid / frame timing as JSON, and a SHA-256 over all
tensor bytes so silent corruption is caught too. Tensor names and the header keys are listed in
docs/conventions.md ("Acquisition files"); the optional ``mr`` tensor (the acquisition's MR
image) was added without a version bump: older files simply lack it, older readers ignore it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .acquisition import Acquisition, FrameTiming, ListmodeEvents
from .grid import ImageGrid

FORMAT = "napari-petdiff-acquisition"
VERSION = 1
ACQ_SUFFIX = ".petacq"


class FileFormatError(ValueError):
    """A file is corrupt, truncated or not of the expected kind."""


def _digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous().cpu()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_acquisition(path, acq: Acquisition, images: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    if acq.prompts is not None:
        tensors["prompts"] = acq.prompts.float()
    if acq.multiplicative is not None:
        tensors["multiplicative"] = acq.multiplicative.float()
    if acq.additive is not None:
        tensors["additive"] = acq.additive.float()
    if acq.mr is not None:
        tensors["mr"] = acq.mr.float()
    if acq.listmode is not None:
        lm = acq.listmode
        tensors["listmode_xstart"] = lm.xstart.double()
        tensors["listmode_xend"] = lm.xend.double()
        if lm.multiplicative is not None:
            tensors["listmode_multiplicative"] = lm.multiplicative.float()
        if lm.additive is not None:
            tensors["listmode_additive"] = lm.additive.float()
    for name, img in (images or {}).items():
        img = torch.as_tensor(img).float()
        if name == "mr" and acq.mr is not None and img.shape == acq.mr.shape \
                and torch.equal(img.cpu(), acq.mr.detach().cpu().float()):
            continue  # the acquisition's own MR, stored once as "mr" (the reader shows it as the mr layer)
        tensors[f"image:{name}"] = img
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": FORMAT, "version": str(VERSION),
        "geometry": json.dumps(acq.geometry.to_dict()),
        "grid": json.dumps(acq.grid.to_dict()),
        "psf_fwhm_mm": json.dumps(list(acq.psf_fwhm_mm)),
        "frames": json.dumps(acq.frames.to_dict() if acq.frames is not None else None),
        "input_function": json.dumps(acq.input_function),
        "metadata": json.dumps(acq.metadata, default=str),
        "sha256": _digest(tensors),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)  # never leave a half-written file under the real name
    return path


def _read_container(path):
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise FileFormatError(f"{path} is not a readable napari-petdiff acquisition (corrupt or truncated?): "
                              f"{exc}") from None
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{path} is a safetensors file but not a napari-petdiff acquisition")
    if int(meta.get("version", 0)) > VERSION:
        raise FileFormatError(f"{path} was written by a newer napari-petdiff (format version {meta['version']}); "
                              "upgrade napari-petdiff to read it")
    if meta.get("sha256") != _digest(tensors):
        raise FileFormatError(f"{path} is corrupt: its checksum does not match its contents")
    return meta, tensors


def load_acquisition(path) -> Acquisition:
    from .geometry import Geometry

    meta, t = _read_container(path)
    try:
        geometry = Geometry.from_dict(json.loads(meta["geometry"]))
        grid = ImageGrid.from_dict(json.loads(meta["grid"]))
        frames = json.loads(meta.get("frames", "null"))
        lm = None
        if "listmode_xstart" in t:
            lm = ListmodeEvents(t["listmode_xstart"], t["listmode_xend"], t.get("listmode_multiplicative"),
                                t.get("listmode_additive"))
        return Acquisition(
            t.get("prompts"), geometry, grid, t.get("multiplicative"), t.get("additive"),
            tuple(json.loads(meta.get("psf_fwhm_mm", "[0, 0, 0]"))),
            FrameTiming.from_dict(frames) if frames else None, lm,
            json.loads(meta.get("input_function", "null")), json.loads(meta.get("metadata", "{}")),
            mr=t.get("mr"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise FileFormatError(f"{path}: damaged header ({exc})") from None


def load_acquisition_images(path) -> dict:
    """Reference images stored beside the data (e.g. the ground truth of a simulation)."""
    _, t = _read_container(path)
    return {k.split(":", 1)[1]: v for k, v in t.items() if k.startswith("image:")}


# ----------------------------------------------------------------------- NIfTI
def write_nifti(path, image, grid: ImageGrid) -> Path:
    import nibabel as nib

    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.shape[-3:] != grid.shape:
        raise ValueError(f"image shape {arr.shape} does not match the grid {grid.shape}")
    # (…, z, y, x) -> (x, y, z, …): NIfTI's first three axes are spatial i, j, k.
    data = np.moveaxis(arr.astype(np.float32), (-1, -2, -3), (0, 1, 2))
    img = nib.Nifti1Image(data, grid.nifti_affine())
    img.header.set_xyzt_units("mm", "sec")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def read_nifti(path):
    """Return (array (…, z, y, x) float32, ImageGrid)."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001
        raise FileFormatError(f"{path} is not a readable NIfTI image (corrupt or truncated?): {exc}") from None
    if data.ndim < 2 or data.ndim > 4:
        raise FileFormatError(f"{path}: expected a 2-D, 3-D or 4-D image, got {data.ndim}-D")
    if data.ndim == 2:
        data = data[:, :, None]
    grid = ImageGrid.from_nifti_affine(data.shape[:3], img.affine)
    arr = np.moveaxis(data, (0, 1, 2), (-1, -2, -3))
    if not np.all(np.isfinite(arr)):
        raise FileFormatError(f"{path} contains NaN or infinite voxels")
    return np.ascontiguousarray(arr), grid
