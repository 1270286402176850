"""Smooth random deformations (low-frequency field + small affine) applied with ``grid_sample``.

A field is defined in world mm: output voxel centre ``p`` samples the source image at
``p + displacement_mm[p]``. The smooth part is Gaussian noise on a coarse node lattice in a fixed
world box, smoothed and interpolated, so one seed gives the same physical deformation on any grid
inside that box (a 2-D slice of a seed's field is the plane of the 3-D field). Everything scales
with ``strength_mm``: 0 is the identity.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from ..grid import ImageGrid

NODE_SPACING_MM = 16.0
SMOOTHING_NODES = 1.5  # Gaussian sigma of the node noise (24 mm): deformations vary on ~5 cm scales
BOX_HALF_MM = 208.0  # holds any grid up to ~320 mm across (e.g. 128 x 2.5 mm); larger grids enlarge it
# affine ranges per mm of strength (at the default 4 mm: +-5 deg in-plane, +-2 deg tilt,
# +-5 % global and +-2 % per-axis scale, +-4 mm shift)
_YAW_DEG, _TILT_DEG, _SCALE, _ANISO, _SHIFT = 1.25, 0.5, 0.0125, 0.005, 1.0


@dataclass(frozen=True)
class DeformationField:
    """Dense sampling offsets on ``grid``: output voxel p samples the source at p + displacement."""

    displacement_mm: np.ndarray  # float32 (nz, ny, nx, 3), components (dz, dy, dx) in mm
    grid: ImageGrid
    params: dict  # JSON-able description (seed, strength, affine parameters)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    @property
    def is_identity(self) -> bool:
        return not np.any(self.displacement_mm)


def _rotation_zyx(yaw, pitch, roll) -> np.ndarray:
    """Rotation matrix acting on (z, y, x) vectors: yaw about z, pitch about y, roll about x (rad)."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cy, sy = np.cos(pitch), np.sin(pitch)
    cx, sx = np.cos(roll), np.sin(roll)
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])      # rotates (y, x)
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])      # rotates (z, x)
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])      # rotates (z, y)
    return rz @ ry @ rx


def _world_points(grid: ImageGrid, device=None) -> torch.Tensor:
    axes = [torch.as_tensor(grid.voxel_centres(a), dtype=torch.float32, device=device) for a in range(3)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (nz, ny, nx, 3) mm


def random_deformation_field(shape, strength_mm: float = 4.0, voxel_size=2.0, seed=None, *,
                             affine_jitter: bool = True, origin=None) -> DeformationField:
    """A reproducible random smooth deformation (+ small affine) for a grid of ``shape``.

    ``strength_mm`` is the RMS of each component of the smooth displacement; the affine ranges
    scale with it too (see module constants), so 0 gives the identity. ``seed`` is an int, a
    ``numpy.random.Generator`` (drawn from) or None (fresh entropy). ``origin`` is the world mm of
    voxel 0 (default: grid centred on the world origin, the head centre).
    """
    strength = float(strength_mm)
    if not np.isfinite(strength) or strength < 0:
        raise ValueError(f"strength_mm must be a finite value >= 0 (mm); got {strength_mm}")
    shp = tuple(int(s) for s in shape)
    if len(shp) == 2:
        shp = (1,) + shp
    grid = ImageGrid(shp, tuple(np.broadcast_to(np.asarray(voxel_size, float), (3,))), origin)
    rng = np.random.default_rng(seed)
    seed_desc = int(seed) if isinstance(seed, (int, np.integer)) else None

    # draw everything in a fixed order whatever the options, so a seed always means the same field
    u = rng.uniform(-1.0, 1.0, size=10)
    extent = max(np.max(np.abs(grid.voxel_centres(a))) for a in range(3))
    half = max(BOX_HALF_MM, float(np.ceil((extent + 3 * NODE_SPACING_MM) / NODE_SPACING_MM)) * NODE_SPACING_MM)
    n_nodes = 2 * int(round(half / NODE_SPACING_MM)) + 1
    noise = rng.standard_normal((3, n_nodes, n_nodes, n_nodes)).astype(np.float32)

    yaw, pitch, roll = np.deg2rad(strength * np.array([_YAW_DEG * u[0], _TILT_DEG * u[1], _TILT_DEG * u[2]]))
    scale = np.exp(strength * (_SCALE * u[3] + _ANISO * u[4:7]))
    shift = strength * _SHIFT * u[7:10]
    if not affine_jitter:
        yaw = pitch = roll = 0.0
        scale, shift = np.ones(3), np.zeros(3)
    params = {"seed": seed_desc, "strength_mm": strength, "affine_jitter": bool(affine_jitter),
              "rotation_deg_zyx": [float(np.rad2deg(a)) for a in (yaw, pitch, roll)],
              "scale_zyx": [float(s) for s in scale], "shift_mm_zyx": [float(s) for s in shift],
              "node_spacing_mm": NODE_SPACING_MM}
    if strength == 0.0:
        return DeformationField(np.zeros(grid.shape + (3,), np.float32), grid, params)

    field = np.stack([ndi.gaussian_filter(c, SMOOTHING_NODES, mode="wrap") for c in noise])
    field *= strength / np.sqrt(np.mean(field**2, axis=(1, 2, 3), keepdims=True))
    # trilinear interpolation of the node field at the (axis-aligned) voxel centres, done as one
    # small matrix product per axis (3x faster than grid_sample over every voxel)
    wz, wy, wx = (_linear_weights(grid.voxel_centres(a) / NODE_SPACING_MM + (n_nodes - 1) / 2.0, n_nodes)
                  for a in range(3))
    t = torch.from_numpy(field) @ wx.T                                   # (3, N, N, nx)
    t = torch.matmul(wy, t)                                              # (3, N, ny, nx)
    smooth = (wz @ t.reshape(3, n_nodes, -1)).reshape(3, *grid.shape)    # (3, nz, ny, nx)
    p = _world_points(grid)
    mat = torch.as_tensor(_rotation_zyx(yaw, pitch, roll) * scale[None, :], dtype=torch.float32)
    affine = p @ mat.T + torch.as_tensor(shift, dtype=torch.float32) - p
    disp = affine + smooth.permute(1, 2, 3, 0)
    return DeformationField(disp.contiguous().numpy(), grid, params)


def _linear_weights(pos: np.ndarray, n: int) -> torch.Tensor:
    """(len(pos), n) linear-interpolation weights at index positions ``pos`` (clamped to the nodes)."""
    pos = np.clip(pos, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(pos).astype(int), n - 2)
    frac = pos - i0
    w = np.zeros((len(pos), n), np.float32)
    rows = np.arange(len(pos))
    w[rows, i0] = 1.0 - frac
    w[rows, i0 + 1] = frac
    return torch.from_numpy(w)


def _as_stack(vol, shape, name):
    is_torch = isinstance(vol, torch.Tensor)
    if is_torch:
        t = vol
    else:
        with warnings.catch_warnings():
            # read-only (cached) arrays are fine: grid_sample never writes to its input
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(vol))
    if tuple(t.shape[-3:]) != tuple(shape) or t.ndim not in (3, 4):
        raise ValueError(f"deform: {name} has shape {tuple(t.shape)}, but the source grid is {tuple(shape)}; "
                         "pass (z, y, x) or (channels, z, y, x) volumes on the source grid "
                         "(give source_grid= when it differs from the field's grid)")
    return t, is_torch


def deform(volumes, field: DeformationField, source_grid: ImageGrid | None = None, *, mode: str = "bilinear",
           padding: str = "zeros"):
    """Resample ``volumes`` (on ``source_grid``, default the field's grid) through ``field``.

    ``volumes``: a numpy array or torch tensor (z, y, x) or (C, z, y, x), or a dict / list / tuple of
    them; returns the same structure on ``field.grid`` (numpy in, numpy out; torch keeps its
    device). Bool volumes are interpolated as fractions and thresholded at 0.5. Outside the source
    the value is 0. A single-slice source (nz = 1) can only be deformed in-plane.
    """
    if not isinstance(field, DeformationField):
        raise ValueError(f"deform needs a DeformationField (from random_deformation_field); got {type(field).__name__}")
    src = field.grid if source_grid is None else source_grid
    if isinstance(volumes, dict):
        keys = list(volumes)
        out = deform([volumes[k] for k in keys], field, src, mode=mode, padding=padding)
        return dict(zip(keys, out))
    if isinstance(volumes, (list, tuple)):
        items = [_as_stack(v, src.shape, f"volume {i}") for i, v in enumerate(volumes)]
        single = False
    else:
        items = [_as_stack(volumes, src.shape, "volume")]
        single = True
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"deform: mode must be 'bilinear' or 'nearest'; got {mode!r}")
    if padding not in ("zeros", "border"):
        raise ValueError(f"deform: padding must be 'zeros' or 'border'; got {padding!r}")

    if field.is_identity and src.matches(field.grid):
        res = [t.clone() if is_t else t.numpy().copy() for t, is_t in items]
        return res[0] if single else type(volumes)(res)

    device = next((t.device for t, is_t in items if is_t), torch.device("cpu"))
    chans, splits = [], []
    for t, _ in items:
        c = t.to(device=device, dtype=torch.float32)
        c = c[None] if c.ndim == 3 else c
        chans.append(c)
        splits.append(c.shape[0])
    stack = torch.cat(chans, 0)[None]  # (1, C, z, y, x)

    q = _world_points(field.grid, device) + torch.as_tensor(field.displacement_mm, device=device)
    org = torch.as_tensor(src.origin, dtype=torch.float32, device=device)
    vs = torch.as_tensor(src.voxel_size, dtype=torch.float32, device=device)
    span = torch.as_tensor([max(n - 1, 1) for n in src.shape], dtype=torch.float32, device=device)
    norm = 2.0 * (q - org) / (vs * span) - 1.0
    if src.shape[0] == 1:
        out = F.grid_sample(stack[:, :, 0], norm[..., 1:].flip(-1).reshape(1, -1, field.shape[2], 2),
                            mode=mode, padding_mode=padding, align_corners=True)
        out = out.reshape(1, stack.shape[1], *field.shape)
    else:
        out = F.grid_sample(stack, norm.flip(-1)[None], mode=mode, padding_mode=padding, align_corners=True)
    res = []
    for (t, is_t), part in zip(items, torch.split(out[0], splits, 0)):
        part = part[0] if t.ndim == 3 else part
        part = part > 0.5 if t.dtype == torch.bool else part.to(t.dtype if t.is_floating_point() else torch.float32)
        res.append(part if is_t else part.cpu().numpy())
    return res[0] if single else type(volumes)(res)
