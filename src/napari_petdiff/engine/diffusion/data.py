"""Training-slice stream for the slice prior: 3-D volumes in, normalised 2-D slices out.

Volumes (random deformed MNI brains from ``engine.phantoms``, a NIfTI folder, or synthetic
ellipsoids for tests) are generated in a background DataLoader worker, in *groups* of
``volumes_per_group`` volumes; each group yields ``slices_per_volume`` slices per volume in a
shuffled order, so generation costs little per training step and batches mix several brains.

Everything is a pure function of (seed, rank, group index): the stream position (slices
consumed) is all a checkpoint needs to resume the stream exactly.
"""
from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

ORIENTATIONS = ("xy", "xz", "yz")  # axial (y, x), coronal (z, x), sagittal (z, y)


@dataclass
class DataConfig:
    source: str = "phantom"            # "phantom" | "synthetic" | "nifti:<folder>"
    image_size: int = 128
    volume_shape: tuple = (64, 128, 128)
    voxel_size_mm: float = 2.0
    gm_wm_range: tuple = (2.5, 5.0)
    lesion_prob: float = 0.5
    orientation_probs: tuple = (0.6, 0.2, 0.2)  # xy, xz, yz
    min_support: int = 1500            # keep slices with more brain voxels than this (at 2 mm, 128^2)
    scale_range: tuple = (0.5, 1.5)
    flip_lr: bool = True               # left-right flip (anatomically plausible)
    flip_ud: bool = False              # vertical flip (off: brains have an up and a down)
    slices_per_volume: int = 48
    volumes_per_group: int = 4
    workers: int = 1                   # background generation processes (0 = in the training process)
    with_mr: bool = False              # paired (PET, MR) slices for an MR-conditioned prior

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown data config keys {sorted(unknown)}; known: {sorted(known)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


# --- volume sources ---------------------------------------------------------------------------
def synthetic_volume(rng: np.random.Generator, shape=(16, 32, 32), gm_wm_range=(2.5, 5.0)) -> np.ndarray:
    """Ellipsoidal 'head' with a hot rim and a few blobs: quick, deterministic test data."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    a = rng.uniform(0.6, 0.85, 3)
    c = rng.uniform(-0.08, 0.08, 3)
    r = np.sqrt(((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2)
    ratio = rng.uniform(*gm_wm_range)
    vol = np.where(r < 1, 1.0, 0.0) + np.where((r > 0.8) & (r < 1), ratio - 1.0, 0.0)
    for _ in range(rng.integers(1, 4)):
        bc = rng.uniform(-0.4, 0.4, 3)
        br = rng.uniform(0.1, 0.25)
        d = np.sqrt((z - bc[0]) ** 2 + (y - bc[1]) ** 2 + (x - bc[2]) ** 2)
        vol = vol + np.where((d < br) & (r < 1), rng.uniform(0.5, 2.0), 0.0)
    return vol.astype(np.float32)


def _phantom_fn():
    try:
        from napari_petdiff.engine.phantoms import random_training_volume
    except ImportError as exc:
        raise ValueError(
            "the 'phantom' training source needs napari_petdiff.engine.phantoms.random_training_volume, "
            f"which could not be imported ({exc}). Use source 'synthetic' or 'nifti:<folder>' instead."
        ) from None
    return random_training_volume


def _nifti_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "*.nii")) + glob.glob(os.path.join(folder, "*.nii.gz")))
    if not files:
        raise ValueError(f"no .nii or .nii.gz files in {folder!r}: point 'nifti:<folder>' at a folder of PET volumes")
    return files


def load_nifti_volume(path: str, voxel_size_mm: float) -> np.ndarray:
    """A NIfTI volume as (z, y, x) float32 resampled to isotropic ``voxel_size_mm``, negatives -> 0."""
    import nibabel as nib
    from scipy.ndimage import zoom

    from napari_petdiff.engine.grid import ImageGrid

    img = nib.as_closest_canonical(nib.load(path))
    grid = ImageGrid.from_nifti_affine(img.shape[:3], img.affine)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4:
        data = data.mean(axis=3)  # a dynamic series: its time average is a static image
    vol = np.ascontiguousarray(data.transpose(2, 1, 0))  # (x, y, z) -> (z, y, x)
    factors = [v / voxel_size_mm for v in grid.voxel_size]
    if not np.allclose(factors, 1.0, atol=1e-3):
        vol = zoom(vol, factors, order=1)
    return np.clip(vol, 0, None).astype(np.float32)


class VolumeSource:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        if cfg.source == "phantom":
            self._fn = _phantom_fn()
        elif cfg.source == "synthetic":
            self._fn = None
        elif cfg.source.startswith("nifti:"):
            self.files = _nifti_files(cfg.source[len("nifti:"):])
        else:
            raise ValueError(f"unknown training source {cfg.source!r}: use 'phantom', 'synthetic' or 'nifti:<folder>'")

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """(z, y, x) activity, or (2, z, y, x) activity and MR with ``with_mr``."""
        c = self.cfg
        if c.source == "phantom":
            kw = {"with_mr": True} if c.with_mr else {}
            return np.asarray(self._fn(rng, shape=tuple(c.volume_shape), voxel_size_mm=c.voxel_size_mm,
                                       gm_wm_range=tuple(c.gm_wm_range), lesion_prob=c.lesion_prob, **kw), np.float32)
        if c.source == "synthetic":
            vol = synthetic_volume(rng, tuple(c.volume_shape), tuple(c.gm_wm_range))
            if c.with_mr:  # a stand-in anatomy for tests: the activity's support and rim, inverted
                return np.stack([vol, np.where(vol > 0, 1.0 - 0.5 * vol / vol.max(), 0.0).astype(np.float32)])
            return vol
        if c.with_mr:
            raise ValueError("MR-conditioned training needs paired MR images: use source 'phantom' "
                             "(NIfTI folders hold PET only)")
        return load_nifti_volume(self.files[int(rng.integers(len(self.files)))], c.voxel_size_mm)


# --- slices -----------------------------------------------------------------------------------
def take_slice(vol: np.ndarray, orientation: str, index: int) -> np.ndarray:
    if orientation == "xy":
        return vol[index]
    if orientation == "xz":
        return vol[:, index, :]
    if orientation == "yz":
        return vol[:, :, index]
    raise ValueError(f"orientation must be one of {ORIENTATIONS}; got {orientation!r}")


def fit_to_size(img: np.ndarray, size: int) -> np.ndarray:
    """Centre zero-pad (or centre-crop) a 2-D image to size x size."""
    out = np.zeros((size, size), dtype=np.float32)
    h, w = img.shape
    sh, sw = max(0, (h - size) // 2), max(0, (w - size) // 2)
    crop = img[sh:sh + size, sw:sw + size]
    ch, cw = crop.shape
    oh, ow = (size - ch) // 2, (size - cw) // 2
    out[oh:oh + ch, ow:ow + cw] = crop
    return out


def normalise_by_support_mean(img: np.ndarray) -> tuple[np.ndarray, float]:
    support = img > 0
    if not support.any():
        return img.astype(np.float32), 0.0
    c = float(img[support].mean())
    return (img / c).astype(np.float32), c


def slices_from_volume(vol: np.ndarray, cfg: DataConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """n normalised, augmented (C, S, S) slices drawn from one volume; (n, C, S, S) float32.

    ``vol`` is (z, y, x) PET (C = 1) or (2, z, y, x) PET and MR: both channels are sliced and
    flipped alike; only the PET channel is normalised and scaled (the MR keeps its [0, 1] range).
    """
    chans = vol if vol.ndim == 4 else vol[None]
    vol = chans[0]
    probs = np.asarray(cfg.orientation_probs, dtype=float)
    probs = probs / probs.sum()
    support = (vol > 0)
    counts = {"xy": support.sum(axis=(1, 2)), "xz": support.sum(axis=(0, 2)), "yz": support.sum(axis=(0, 1))}
    eligible = {o: np.flatnonzero(counts[o] > cfg.min_support) for o in ORIENTATIONS}
    usable = [i for i, o in enumerate(ORIENTATIONS) if len(eligible[o]) and probs[i] > 0]
    out = np.zeros((n, len(chans), cfg.image_size, cfg.image_size), dtype=np.float32)
    if not usable:
        # No slice has enough brain (tiny test volumes): fall back to the fullest slices.
        eligible = {o: np.array([int(np.argmax(counts[o]))]) for o in ORIENTATIONS}
        usable = [i for i in range(3) if probs[i] > 0]
    p = probs[usable] / probs[usable].sum()
    for k in range(n):
        o = ORIENTATIONS[usable[int(rng.choice(len(usable), p=p))]]
        idx = int(rng.choice(eligible[o]))
        img, _ = normalise_by_support_mean(take_slice(vol, o, idx))
        imgs = [img * rng.uniform(*cfg.scale_range)] + [take_slice(ch, o, idx) for ch in chans[1:]]
        if cfg.flip_lr and rng.random() < 0.5:
            imgs = [im[:, ::-1] for im in imgs]
        if cfg.flip_ud and rng.random() < 0.5:
            imgs = [im[::-1, :] for im in imgs]
        for ci, im in enumerate(imgs):
            out[k, ci] = fit_to_size(np.ascontiguousarray(im), cfg.image_size)
    return out


def group_rng(seed: int, rank: int, group: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), int(group)]))


def make_group(cfg: DataConfig, source: VolumeSource, seed: int, rank: int, group: int) -> np.ndarray:
    rng = group_rng(seed, rank, group)
    parts = [slices_from_volume(source(rng), cfg, rng, cfg.slices_per_volume) for _ in range(cfg.volumes_per_group)]
    allslices = np.concatenate(parts)
    return allslices[rng.permutation(len(allslices))]


class _GroupDataset(torch.utils.data.IterableDataset):
    def __init__(self, cfg: DataConfig, seed: int, rank: int, start_group: int):
        self.cfg, self.seed, self.rank, self.start_group = cfg, seed, rank, start_group

    def __iter__(self):
        torch.set_num_threads(1)  # the trainer owns the cores; generation is mostly numpy/scipy
        source = VolumeSource(self.cfg)
        g = self.start_group
        while True:
            yield torch.from_numpy(make_group(self.cfg, source, self.seed, self.rank, g))
            g += 1


@dataclass
class SliceStream:
    """Infinite, resumable stream of (B, 1, S, S) float32 batches.

    ``position`` counts the slices consumed; pass it back as ``start`` to continue exactly.
    """
    cfg: DataConfig
    batch_size: int
    seed: int = 0
    rank: int = 0
    start: int = 0
    position: int = field(init=False, default=0)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1; got {self.batch_size}")
        VolumeSource(self.cfg)  # fail early (missing phantoms module, empty folder) in the caller's process
        self.group_size = self.cfg.slices_per_volume * self.cfg.volumes_per_group
        self.position = int(self.start)

    def __iter__(self):
        g0, offset = divmod(self.position, self.group_size)
        ds = _GroupDataset(self.cfg, self.seed, self.rank, g0)
        if self.cfg.workers > 0:
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, prefetch_factor=2,
                                                 persistent_workers=False)
        else:
            loader = ds
        buf = None
        for group in loader:
            if offset:
                group, offset = group[offset:], 0
            buf = group if buf is None else torch.cat([buf, group])
            while len(buf) >= self.batch_size:
                batch, buf = buf[: self.batch_size], buf[self.batch_size:]
                self.position += self.batch_size
                yield batch
