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
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy import sparse

from ..grid import ImageGrid

# MNI (z, y, x) mm of the world origin. x: midline; y: middle of the brain's AP extent
# (-107..73); z: chosen so that a 128 mm (64 x 2 mm) axial field of view keeps the vertex
# (z = 82) and the default 2-D slice (world z = 0) shows caudate, thalamus and lateral ventricles.
HEAD_CENTRE_MNI = (18.0, -17.0, 0.0)
# Extra z slices (mm) resampled around a grid so that deformations can pull tissue in from
# beyond the grid's top and bottom (in-plane, the default grids already contain air around the head).
Z_MARGIN_MM = 24.0
CHANNELS = ("gm", "wm", "csf", "t1", "brain", "brain_distance_mm")
_CACHE_VERSION = "mni152-2009-v4"
_ENVELOPE_VOXEL_MM = 2.0  # the envelope distance is computed on this grid (1 mm EDT takes ~5 s)
# the envelope is computed on the templates cropped to the target +- this: keeps the crop faces
# (which the envelope sees as brain surface) far beyond the scalp
_CROP_MARGIN_MM = 40.0

_memory: "OrderedDict[str, dict[str, np.ndarray]]" = OrderedDict()
_MEMORY_ENTRIES = 4  # a 64x128x128 source (with z margins) holds ~35 MB
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


def _nilearn_images() -> dict:
    """The MNI152 2009a T1, GM and WM images that ship inside nilearn.

    Read with nibabel straight from nilearn's package data (``import nilearn.datasets`` alone
    costs ~3 s); falls back to nilearn's loaders if its file layout changes.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None:
        raise ImportError("The brain phantoms need nilearn (pip install nilearn); it ships the MNI152 "
                          "templates, so no download is needed.")
    data = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    paths = {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    if all(p.is_file() for p in paths.values()):
        return {k: nib.load(str(p)) for k, p in paths.items()}
    from nilearn import datasets

    return {"t1": datasets.load_mni152_template(resolution=1), "gm": datasets.load_mni152_gm_template(resolution=1),
            "wm": datasets.load_mni152_wm_template(resolution=1)}


class _Templates:
    """The 1 mm templates as (z, y, x) views in the files' own dtype; ``take`` crops and rescales."""

    def __init__(self):
        imgs = _nilearn_images()
        aff = imgs["gm"].affine
        if not np.allclose(aff[:3, :3], np.eye(3)):
            raise RuntimeError(f"unexpected MNI template affine (need 1 mm RAS):\n{aff}")
        self.origin = np.array([aff[2, 3], aff[1, 3], aff[0, 3]])  # MNI mm of voxel 0, (z, y, x)
        self._data = {k: np.asarray(img.dataobj).transpose(2, 1, 0) for k, img in imgs.items()}
        # the files hold 0..255; nilearn's loaders rescale each to a maximum of 1 (float32 division)
        self._max = {k: np.float32(max(float(v.max()), 1e-6)) for k, v in self._data.items()}
        self.shape = self._data["gm"].shape

    def take(self, name: str, crop) -> np.ndarray:
        if name == "mask":  # as nilearn's load_mni152_brain_mask: the T1 template above 0.2
            return (self.take("t1", crop) > 0.2).astype(np.float32)
        return self._data[name][crop].astype(np.float32) / self._max[name]  # in [0, 1]


def _tissues_1mm(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    gm, wm = raw["gm"], raw["wm"]
    # a few voxels have GM + WM slightly above 1: renormalise them
    inv = 1.0 / np.maximum(gm + wm, 1.0)
    gm *= inv
    wm *= inv
    # the probabilistic GM/WM maps reach a voxel beyond the binary mask: the brain is their union
    parenchyma = gm + wm
    brain = np.maximum(raw["mask"], parenchyma)
    csf = np.maximum(brain - parenchyma, 0.0)
    return {"gm": gm, "wm": wm, "csf": csf, "t1": raw["t1"], "brain": brain}


def _envelope_distance(raw: dict[str, np.ndarray], origin_1mm: np.ndarray):
    """Signed distance (mm, > 0 outside) to a smooth envelope of the brain, on a coarser grid.

    Returns (distance, origin_mni, spacing_mm) for that grid.
    """
    f = int(round(_ENVELOPE_VOXEL_MM))
    pad = 8  # coarse voxels (16 mm) of air beyond the crop, so that the outside distance is defined there
    nz, ny, nx = (n // f for n in raw["gm"].shape)

    def coarse(a):
        return a[: nz * f, : ny * f, : nx * f].reshape(nz, f, ny, f, nx, f).mean(axis=(1, 3, 5))

    brain = np.pad(np.maximum(coarse(raw["mask"]), coarse(raw["gm"]) + coarse(raw["wm"])), pad)
    # smoothing closes the sulci, so the skull follows the outer brain surface, not the gyri
    env = ndi.gaussian_filter(brain, 1.5) > 0.3
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


def _axis_matrix(pos: np.ndarray, n: int, sigma: float, clamp: bool) -> np.ndarray:
    """(len(pos), n) weights: Gaussian prefilter then linear interpolation at index positions ``pos``.

    Outside the source the value is 0, or the edge value with ``clamp``. The same kernel as
    scipy.ndimage.gaussian_filter (truncate 3) in 'constant' mode.
    """
    if clamp:
        pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.floor(pos).astype(int)
    frac = pos - i0
    lin = np.zeros((len(pos), n))
    for idx, w in ((i0, 1.0 - frac), (i0 + 1, frac)):
        ok = (idx >= 0) & (idx < n)
        np.add.at(lin, (np.flatnonzero(ok), idx[ok]), w[ok])
    if sigma <= 0:
        return lin
    r = int(3.0 * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    gauss = sum(np.eye(n, k=o) * w for o, w in zip(range(-r, r + 1), k))
    return lin @ gauss


def _separable(vol: np.ndarray, mats) -> np.ndarray:
    """Apply one (n_out, n_in) matrix per axis, as sparse products (each row has a few weights)."""
    out = vol
    for axis, m in enumerate(mats):
        moved = np.moveaxis(out, axis, 0)
        rest = moved.shape[1:]
        res = sparse.csr_matrix(m.astype(np.float32)) @ moved.reshape(moved.shape[0], -1)
        out = np.moveaxis(np.asarray(res, dtype=np.float32).reshape((m.shape[0],) + rest), 0, axis)
    return np.ascontiguousarray(out)


def _resample(grid: ImageGrid) -> dict[str, np.ndarray]:
    mni = _Templates()
    centre = np.asarray(HEAD_CENTRE_MNI)
    axes = [grid.voxel_centres(a) + centre[a] for a in range(3)]  # MNI mm of the target voxel centres
    # the envelope only needs the brain near the target: crop (faces far beyond the scalp)
    crop = _crop_slices(axes, mni.origin, mni.shape, _CROP_MARGIN_MM)
    dist, dist_origin, dist_step = _envelope_distance(
        {k: mni.take(k, crop) for k in ("mask", "gm", "wm")}, mni.origin + np.array([c.start for c in crop]))
    # the tissue maps only need the prefilter's reach
    sigma = _prefilter_sigma(grid.voxel_size)
    crop = _crop_slices(axes, mni.origin, mni.shape, 3.0 * max(sigma) + 2.0)
    origin_1mm = mni.origin + np.array([c.start for c in crop])
    tissues = _tissues_1mm({k: mni.take(k, crop) for k in ("t1", "gm", "wm", "mask")})
    del mni

    shape_1mm = tissues["gm"].shape
    mats = [_axis_matrix(ax - o, n, sg, clamp=False) for ax, o, n, sg in zip(axes, origin_1mm, shape_1mm, sigma)]
    # weights are non-negative and sum to <= 1, so the results stay in [0, 1] (up to round-off)
    out = {name: np.clip(_separable(tissues[name], mats), 0.0, 1.0) for name in ("gm", "wm", "csf", "t1", "brain")}
    # beyond the padded box the distance keeps its edge value (air far away, soft tissue below the
    # template's cut through the brainstem, which looks like a neck)
    dmats = [_axis_matrix((ax - o) / dist_step, n, 0.0, clamp=True)
             for ax, o, n in zip(axes, dist_origin, dist.shape)]
    out["brain_distance_mm"] = _separable(dist, dmats).astype(np.float32)
    return out


def _key(grid: ImageGrid) -> str:
    desc = json.dumps({"v": _CACHE_VERSION, "centre": HEAD_CENTRE_MNI, "grid": grid.to_dict()}, sort_keys=True)
    return hashlib.sha1(desc.encode()).hexdigest()[:16]


def cache_path(grid: ImageGrid) -> Path:
    return cache_dir() / f"{_CACHE_VERSION}_{_key(grid)}.npz"


def _prune_old_versions(folder: Path) -> None:
    """Files of other cache versions can never be read again: remove them."""
    for f in folder.glob("mni152-*_*.npz"):
        if not f.name.startswith(_CACHE_VERSION + "_"):
            try:
                f.unlink()
            except OSError:
                pass


def _load_npz(path: Path, grid: ImageGrid) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            vols = {k: np.asarray(f[k], dtype=np.float32) for k in CHANNELS}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
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
        # an npz is a zip of .npy files; deflate level 1 is ~4x faster than savez_compressed's default
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for name, arr in vols.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
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
    path = cache_path(grid)
    vols = _load_npz(path, grid)
    if vols is None:
        vols = _resample(grid)
        _save_npz(path, vols)
        _prune_old_versions(path.parent)
    for v in vols.values():
        v.flags.writeable = False
    with _lock:
        _memory[key] = vols
        while len(_memory) > _MEMORY_ENTRIES:
            _memory.popitem(last=False)
    return vols


def crop_to(vols: dict[str, np.ndarray], src: ImageGrid, grid: ImageGrid) -> dict[str, np.ndarray]:
    """Copies of the part of ``vols`` (on ``src``) that lies on the aligned sub-grid ``grid``."""
    offsets = [(g - s) / v for g, s, v in zip(grid.origin, src.origin, src.voxel_size)]
    start = [int(round(o)) for o in offsets]
    if not np.allclose(offsets, start, atol=1e-3) or not np.allclose(grid.voxel_size, src.voxel_size):
        raise ValueError(f"crop_to needs a sub-grid aligned with the source: {grid.describe()} vs {src.describe()}")
    sl = tuple(slice(a, a + n) for a, n in zip(start, grid.shape))
    return {k: np.array(v[sl]) for k, v in vols.items()}


def template_volumes(voxel_size_mm=2.0, shape=(64, 128, 128)) -> dict[str, np.ndarray]:
    """MNI152 2009 tissue maps on the grid of ``shape`` centred on the head (world origin).

    Returns float32 (z, y, x) arrays 'gm', 'wm', 'csf' (tissue fractions, sum <= 1), 't1'
    (T1 template, [0, 1], zero outside the brain), 'brain' (brain fraction), 'brain_distance_mm'
    (signed distance to the smoothed brain envelope, > 0 outside) and the bool 'brain_mask'
    (brain fraction > 0.5). The first call for a grid resamples (a few seconds); later calls in
    the process take milliseconds, a new process reads the disk cache (~0.2 s for 64x128x128).
    """
    grid = centred_grid(shape, voxel_size_mm)
    src = source_grid(grid)
    out = crop_to(source_volumes(src), src, grid)
    out["brain_mask"] = out["brain"] > 0.5
    return out
