"""MNI152 2009 tissue templates (shipped inside nilearn) resampled onto phantom grids.

World frame of every phantom: mm, axes (z, y, x) = MNI (superior, anterior, right), shifted so
that ``HEAD_CENTRE_MNI`` is the world origin, i.e. the centre of the default grids. Axes follow
NIfTI RAS, so napari (row 0 at the top) shows anterior at the BOTTOM of an axial slice.

The templates are skull-stripped; a signed distance to a smoothed brain envelope
(``brain_distance_mm``, > 0 outside) is resampled with them so that the skull and scalp of
``brain_phantom`` can be built from it and deform together with the brain.

Resampled volumes are cached in memory and on disk (npz, loaded with ``allow_pickle=False``) in
``$NAPARI_PETDIFF_CACHE/phantoms`` or ``~/.cache/napari-petdiff/phantoms``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..grid import ImageGrid

# MNI (z, y, x) mm of the world origin. x: midline; y: middle of the brain's AP extent
# (-107..73); z: chosen so that a 128 mm (64 x 2 mm) axial field of view keeps the vertex
# (z = 82) and the default 2-D slice (world z = 0) passes through caudate, putamen and thalamus.
HEAD_CENTRE_MNI = (18.0, -17.0, 0.0)
# Extra z slices (mm) resampled around a grid so that deformations can pull tissue in from
# beyond the grid's top and bottom (in-plane, the default grids already contain air around the head).
Z_MARGIN_MM = 24.0
CHANNELS = ("gm", "wm", "csf", "t1", "brain", "brain_distance_mm")
_CACHE_VERSION = "mni152-2009-v2"
_ENVELOPE_VOXEL_MM = 2.0  # the envelope distance is computed on this grid (1 mm EDT takes ~5 s)
# templates are cropped to the target +- this before filtering: covers the prefilter kernel and
# keeps the crop faces (which the envelope sees as brain surface) far beyond the scalp
_CROP_MARGIN_MM = 40.0

_memory: "OrderedDict[str, dict[str, np.ndarray]]" = OrderedDict()
_MEMORY_ENTRIES = 6
_lock = threading.Lock()


def cache_dir() -> Path:
    base = os.environ.get("NAPARI_PETDIFF_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "napari-petdiff"
    return root / "phantoms"


def clear_memory_cache() -> None:
    """Forget the in-memory copies (the disk cache stays)."""
    with _lock:
        _memory.clear()


def _voxel_size3(voxel_size_mm) -> tuple[float, float, float]:
    vs = np.broadcast_to(np.asarray(voxel_size_mm, dtype=float), (3,))
    if not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise ValueError(f"voxel_size_mm must be positive (one value or (z, y, x)); got {voxel_size_mm}")
    return tuple(float(v) for v in vs)


def _shape3(shape) -> tuple[int, int, int]:
    try:
        shp = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"shape must be a sequence like (nz, ny, nx); got {shape!r}") from None
    if len(shp) == 2:
        shp = (1,) + shp
    if len(shp) != 3 or min(shp) < 1:
        raise ValueError(f"shape must be three positive sizes (nz, ny, nx) (nz=1 for 2-D); got {shape}")
    return shp


def centred_grid(shape, voxel_size_mm=2.0, centre_mm=(0.0, 0.0, 0.0)) -> ImageGrid:
    """The grid of ``shape`` whose centre is at world ``centre_mm``."""
    shp, vs = _shape3(shape), _voxel_size3(voxel_size_mm)
    origin = tuple(c - (n - 1) / 2.0 * v for c, n, v in zip(centre_mm, shp, vs))
    return ImageGrid(shp, vs, origin)


def source_grid(grid: ImageGrid) -> ImageGrid:
    """``grid`` extended by ``Z_MARGIN_MM`` above and below, voxel centres aligned with it."""
    mz = int(np.ceil(Z_MARGIN_MM / grid.voxel_size[0]))
    oz, oy, ox = grid.origin
    return ImageGrid((grid.shape[0] + 2 * mz, grid.shape[1], grid.shape[2]), grid.voxel_size,
                     (oz - mz * grid.voxel_size[0], oy, ox))


def _load_mni_1mm() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """1 mm templates as (z, y, x) float32 arrays and the MNI mm of voxel (0, 0, 0), (z, y, x)."""
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a runtime dependency
        raise ImportError("The brain phantoms need nilearn (pip install nilearn); it ships the MNI152 "
                          "templates, so no download is needed.") from exc
    imgs = {
        "t1": datasets.load_mni152_template(resolution=1),
        "gm": datasets.load_mni152_gm_template(resolution=1),
        "wm": datasets.load_mni152_wm_template(resolution=1),
        "mask": datasets.load_mni152_brain_mask(resolution=1),
    }
    aff = imgs["gm"].affine
    if not np.allclose(aff[:3, :3], np.eye(3)):
        raise RuntimeError(f"unexpected MNI template affine (need 1 mm RAS):\n{aff}")
    out = {k: np.ascontiguousarray(np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0))
           for k, img in imgs.items()}
    out["t1"] = np.clip(out["t1"], 0.0, None) / max(float(out["t1"].max()), 1e-6)
    origin = np.array([aff[2, 3], aff[1, 3], aff[0, 3]])
    return out, origin


def _tissues_1mm(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    gm = np.clip(raw["gm"], 0.0, 1.0)
    wm = np.clip(raw["wm"], 0.0, 1.0)
    s = gm + wm
    over = s > 1.0
    gm[over] /= s[over]
    wm[over] /= s[over]
    # the probabilistic GM/WM maps reach a voxel beyond the binary mask: the brain is their union
    brain = np.maximum(np.clip(raw["mask"], 0.0, 1.0), gm + wm)
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return {"gm": gm, "wm": wm, "csf": csf, "t1": raw["t1"], "brain": brain}


def _envelope_distance(brain: np.ndarray, origin_1mm: np.ndarray):
    """Signed distance (mm, > 0 outside) to a smooth envelope of the brain, on a coarser grid.

    Returns (distance, origin_mni, spacing_mm) for that grid.
    """
    f = int(round(_ENVELOPE_VOXEL_MM))
    pad = 12  # coarse voxels of air around the template box, so that the outside distance is defined
    nz, ny, nx = (n // f for n in brain.shape)
    coarse = brain[: nz * f, : ny * f, : nx * f].reshape(nz, f, ny, f, nx, f).mean(axis=(1, 3, 5))
    coarse = np.pad(coarse, pad)
    # smoothing closes the sulci, so the skull follows the outer brain surface, not the gyri
    env = ndi.gaussian_filter(coarse, 1.5) > 0.3
    dist = (ndi.distance_transform_edt(~env, sampling=f) - ndi.distance_transform_edt(env, sampling=f))
    dist = ndi.gaussian_filter(dist.astype(np.float32), 1.0)
    origin = origin_1mm + (f - 1) / 2.0 - pad * f
    return dist, origin, float(f)


def _prefilter_sigma(voxel_size: tuple[float, float, float]) -> tuple[float, ...]:
    # Gaussian with the variance of a box average over the target voxel (minus the 1 mm voxel's own)
    return tuple(float(np.sqrt(max(v * v - 1.0, 0.0) / 12.0)) for v in voxel_size)


def _crop_slices(axes, origin_1mm, shape, margin_mm) -> tuple[slice, ...]:
    """1 mm index ranges around the target (a thin 2-D slab then costs a fraction of the volume)."""
    out = []
    for ax, o, n in zip(axes, origin_1mm, shape):
        lo = int(np.floor(ax.min() - o - margin_mm))
        hi = int(np.ceil(ax.max() - o + margin_mm)) + 1
        lo = min(max(lo, 0), n - 2)
        out.append(slice(lo, min(max(hi, lo + 2), n)))
    return tuple(out)


def _resample(grid: ImageGrid) -> dict[str, np.ndarray]:
    raw, origin_1mm = _load_mni_1mm()
    centre = np.asarray(HEAD_CENTRE_MNI)
    axes = [grid.voxel_centres(a) + centre[a] for a in range(3)]  # MNI mm of the target voxel centres
    crop = _crop_slices(axes, origin_1mm, raw["gm"].shape, _CROP_MARGIN_MM)
    origin_1mm = origin_1mm + np.array([c.start for c in crop])
    tissues = _tissues_1mm({k: v[crop].copy() for k, v in raw.items()})
    del raw
    dist, dist_origin, dist_step = _envelope_distance(tissues["brain"], origin_1mm)
    sigma = _prefilter_sigma(grid.voxel_size)
    # the tissue maps only need the prefilter's reach around the target
    sub = _crop_slices(axes, origin_1mm, tissues["gm"].shape, 3.0 * max(sigma) + 2.0)
    tissues = {k: v[sub] for k, v in tissues.items()}
    origin_1mm = origin_1mm + np.array([c.start for c in sub])

    def sample(vol, org, step, mode):
        # axis-aligned trilinear sampling; grid_sample is ~10x faster than map_coordinates here
        idx = [torch.from_numpy((ax - o) / step) for ax, o in zip(axes, org)]
        if mode == "nearest":
            idx = [i.clamp(0, n - 1) for i, n in zip(idx, vol.shape)]
        norm = [2.0 * i / max(n - 1, 1) - 1.0 for i, n in zip(idx, vol.shape)]
        gz, gy, gx = torch.meshgrid(*norm, indexing="ij")
        pts = torch.stack((gx, gy, gz), dim=-1).float()[None]
        src = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[None, None]
        out = F.grid_sample(src, pts, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[0, 0].numpy()

    out = {}
    for name in ("gm", "wm", "csf", "t1", "brain"):
        vol = ndi.gaussian_filter(tissues[name], sigma, truncate=3.0) if max(sigma) > 0 else tissues[name]
        out[name] = np.clip(sample(vol, origin_1mm, 1.0, "constant"), 0.0, 1.0)
    # beyond the padded box the distance keeps its edge value (air far away, soft tissue below the
    # template's cut through the brainstem, which looks like a neck)
    out["brain_distance_mm"] = sample(dist, dist_origin, dist_step, "nearest")
    return out


def _key(grid: ImageGrid) -> str:
    desc = json.dumps({"v": _CACHE_VERSION, "centre": HEAD_CENTRE_MNI, "grid": grid.to_dict()}, sort_keys=True)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]


def _load_npz(path: Path, grid: ImageGrid) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            vols = {k: np.asarray(f[k], dtype=np.float32) for k in CHANNELS}
    except (OSError, KeyError, ValueError):
        return None  # missing or damaged: rebuild
    if any(v.shape != grid.shape for v in vols.values()):
        return None
    return vols


def _save_npz(path: Path, vols: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write then rename: a concurrent reader never sees a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
        os.close(fd)
        np.savez_compressed(tmp, **vols)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs speed


def source_volumes(grid: ImageGrid) -> dict[str, np.ndarray]:
    """All ``CHANNELS`` resampled onto ``grid`` (cached; treat the arrays as read-only)."""
    key = _key(grid)
    with _lock:
        if key in _memory:
            _memory.move_to_end(key)
            return _memory[key]
    path = cache_dir() / f"mni152_{key}.npz"
    vols = _load_npz(path, grid)
    if vols is None:
        vols = _resample(grid)
        _save_npz(path, vols)
    for v in vols.values():
        v.flags.writeable = False
    with _lock:
        _memory[key] = vols
        while len(_memory) > _MEMORY_ENTRIES:
            _memory.popitem(last=False)
    return vols


def crop_to(vols: dict[str, np.ndarray], src: ImageGrid, grid: ImageGrid) -> dict[str, np.ndarray]:
    """Copies of the part of ``vols`` (on ``src``) that lies on the aligned sub-grid ``grid``."""
    start = [int(round((g - s) / v)) for g, s, v in zip(grid.origin, src.origin, src.voxel_size)]
    sl = tuple(slice(a, a + n) for a, n in zip(start, grid.shape))
    return {k: np.array(v[sl]) for k, v in vols.items()}


def template_volumes(voxel_size_mm=2.0, shape=(64, 128, 128)) -> dict[str, np.ndarray]:
    """MNI152 2009 tissue maps on the grid of ``shape`` centred on the head (world origin).

    Returns float32 (z, y, x) arrays 'gm', 'wm', 'csf' (tissue fractions, sum <= 1), 't1'
    (T1 template, [0, 1], zero outside the brain), 'brain' (brain fraction), 'brain_distance_mm'
    (signed distance to the smoothed brain envelope, > 0 outside) and the bool 'brain_mask'
    (brain fraction > 0.5). The first call for a grid resamples (a few seconds); later calls
    read the cache (milliseconds).
    """
    grid = centred_grid(shape, voxel_size_mm)
    src = source_grid(grid)
    out = crop_to(source_volumes(src), src, grid)
    out["brain_mask"] = out["brain"] > 0.5
    return out
