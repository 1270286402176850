"""Analytic (modified, Toft) Shepp-Logan phantom in 2-D and its 3-D ellipsoid extension."""
from __future__ import annotations

import numpy as np

from .brain import MU_SOFT_TISSUE
from .templates import centred_grid
from .phantom import Phantom

# value, semi-axes (x, y, z), centre (x, y, z), rotation about z (deg); normalised [-1, 1] units,
# y pointing up as in the literature. z data from Kak & Slaney's 3-D extension.
_ELLIPSES = np.array([
    #  A     a       b      c      x0     y0      z0     phi
    [1.0, 0.6900, 0.920, 0.810, 0.00, 0.0000, 0.00, 0.0],
    [-0.8, 0.6624, 0.874, 0.780, 0.00, -0.0184, 0.00, 0.0],
    [-0.2, 0.1100, 0.310, 0.220, 0.22, 0.0000, 0.00, -18.0],
    [-0.2, 0.1600, 0.410, 0.280, -0.22, 0.0000, 0.00, 18.0],
    [0.1, 0.2100, 0.250, 0.410, 0.00, 0.3500, -0.15, 0.0],
    [0.1, 0.0460, 0.046, 0.050, 0.00, 0.1000, 0.25, 0.0],
    [0.1, 0.0460, 0.046, 0.050, 0.00, -0.1000, 0.25, 0.0],
    [0.1, 0.0460, 0.023, 0.050, -0.08, -0.6050, 0.00, 0.0],
    [0.1, 0.0230, 0.023, 0.020, 0.00, -0.6060, 0.00, 0.0],
    [0.1, 0.0230, 0.046, 0.020, 0.06, -0.6050, 0.00, 0.0],
])
_SUPERSAMPLE = 3  # per axis, for partial-volume edges


def _paint(plane: np.ndarray, i: int, z: float, y: np.ndarray, x: np.ndarray, add: bool = True) -> None:
    """Add ellipsoid ``i``'s value (its indicator if not ``add``) to ``plane`` (ny*s, nx*s) at height z."""
    A, a, b, c, x0, y0, z0, phi = _ELLIPSES[i]
    f = 1.0 - ((z - z0) / c) ** 2
    if f <= 0.0:
        return
    a, b = a * np.sqrt(f), b * np.sqrt(f)  # the cross-section at this z
    r = max(a, b)
    # only the ellipse's bounding box: the small ellipses then cost almost nothing
    jy = np.flatnonzero(np.abs(y - y0) <= r)
    ix = np.flatnonzero(np.abs(x - x0) <= r)
    if jy.size == 0 or ix.size == 0:
        return
    yy, xx = y[jy, None] - y0, x[None, ix] - x0
    cp, sp = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
    inside = ((xx * cp + yy * sp) / a) ** 2 + ((-xx * sp + yy * cp) / b) ** 2 <= 1.0
    plane[jy[0]:jy[-1] + 1, ix[0]:ix[-1] + 1] += (A if add else 1.0) * inside


def shepp_logan(dims: int = 2, shape=None, voxel_size_mm=2.0) -> Phantom:
    """Shepp-Logan phantom for quick tests; the outer ellipse fills the field of view.

    dims=2: the central plane (z = 0), default shape (1, 128, 128); dims=3: default (64, 128, 128).
    ``activity`` is the modified Shepp-Logan intensity (skull 1, brain 0.2, ventricles 0, ...),
    ``mu`` is water (0.0096 /mm) inside the head, ``mr`` equals the activity. Tissue labels by
    intensity: ``csf`` = the ventricles (< 0.1), ``gm`` = the small bright ellipses (> 0.25),
    ``wm`` = the rest of the brain; ``brain_mask`` = inside the skull.
    """
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3; got {dims!r}")
    shp = {2: (1, 128, 128), 3: (64, 128, 128)}[dims] if shape is None else tuple(int(s) for s in shape)
    if dims == 2 and len(shp) == 2:
        shp = (1,) + shp
    if len(shp) != 3 or min(shp) < 1 or (dims == 2 and shp[0] != 1) or (dims == 3 and shp[0] < 2):
        raise ValueError(f"shape {shape} does not fit dims={dims}: (1, ny, nx) for 2-D, (nz, ny, nx) for 3-D")
    grid = centred_grid(shp, voxel_size_mm)
    s = _SUPERSAMPLE
    # sub-voxel sample positions in normalised units: the field of view spans [-1, 1] on every axis
    # (in 2-D the plane z = 0); image y points down the rows, the ellipse table's y points up.
    def axis(n, flip):
        u = ((np.arange(n * s) + 0.5) / (n * s)) * 2.0 - 1.0
        return -u if flip else u

    zs = np.zeros((1, 1)) if shp[0] == 1 else axis(shp[0], False).reshape(shp[0], s)
    y, x = axis(shp[1], True), axis(shp[2], False)
    out = {k: np.zeros(shp, np.float32) for k in ("activity", "head", "brain", "csf", "gm", "wm")}
    for k, zplane in enumerate(zs):  # one output plane at a time keeps memory small in 3-D
        acc = {name: np.zeros((shp[1], shp[2]), np.float64) for name in out}
        for z in zplane:
            value = np.zeros((len(y), len(x)))
            head, brain = np.zeros_like(value), np.zeros_like(value)
            for i in range(len(_ELLIPSES)):
                _paint(value, i, z, y, x)
            _paint(head, 0, z, y, x, add=False)
            _paint(brain, 1, z, y, x, add=False)
            brain = brain > 0
            csf = brain & (value < 0.1)
            gm = brain & (value > 0.25)
            planes = {"activity": value, "head": head, "brain": brain, "csf": csf, "gm": gm,
                      "wm": brain & ~csf & ~gm}
            for name, a in planes.items():  # mean over the sub-samples of each voxel
                acc[name] += a.reshape(shp[1], s, shp[2], s).mean(axis=(1, 3)) / len(zplane)
        for name in out:
            out[name][k] = acc[name]
    activity = np.clip(out["activity"], 0.0, None)  # float round-off of 1 - 0.8 - 0.2
    info = {"phantom": "shepp_logan", "dims": dims, "variant": "modified (Toft), 3-D ellipsoids (Kak-Slaney)",
            "grid": grid.to_dict(), "tracer": None, "gm_wm_ratio": None, "lesions": [], "deformation_seed": None}
    return Phantom(activity=activity, mu=MU_SOFT_TISSUE * out["head"], mr=activity.copy(), gm=out["gm"],
                   wm=out["wm"], csf=out["csf"], brain_mask=out["brain"] > 0.5, lesion_masks=[], grid=grid, info=info)
