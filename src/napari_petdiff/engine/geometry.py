"""PET acquisition geometries: where every line of response (LOR) of a sinogram lies.

Conventions (same as the rest of the engine): world coordinates in mm, axis order
(z, y, x); sinograms have shape ``(n_planes, n_views, n_radial)``; the scanner axis is z.

A geometry only describes LOR endpoints. Projectors (``engine/projectors``) turn a geometry
and an :class:`~napari_petdiff.engine.grid.ImageGrid` into a linear operator; they call
:meth:`Geometry.check_grid` first so that a grid that does not fit fails early and clearly.

Two geometries are provided:

* :class:`ParallelBeamGeometry` - ideal 2-D parallel-beam sinograms (one per plane), e.g. to
  import sinograms simulated with ``skimage.transform.radon``.
* :class:`RingScannerGeometry` - a stack of regular polygon detector rings (like parallelproj's
  ``RegularPolygonPETScannerGeometry`` + ``RegularPolygonPETLORDescriptor``), either with direct
  planes only (2.5-D) or with oblique planes up to a maximum ring difference (span 1).

A geometry is *planar* (``is_planar``) when every plane holds LORs perpendicular to z at the
plane's z position and all planes share the same in-plane LOR pattern; planar geometries can use
the fast precomputed sparse projector (one matrix for all planes).
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from .grid import ImageGrid

__all__ = ["Geometry", "ParallelBeamGeometry", "RingScannerGeometry", "brain_scanner"]

# Relative tolerance for "plane sits at a slice centre" (fraction of the slice thickness).
_Z_TOL = 1e-3


def _as_view_index(views, n_views: int) -> np.ndarray:
    """Validate a selection of view indices; returns int64 numpy indices (order kept)."""
    if views is None:
        return np.arange(n_views, dtype=np.int64)
    if isinstance(views, torch.Tensor):
        views = views.detach().cpu().numpy()
    elif isinstance(views, range):
        views = np.asarray(list(views))
    arr = np.asarray(views)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(
            f"views must be a 1-D sequence of integer view indices; got array of shape {arr.shape} "
            f"and dtype {arr.dtype}. Use e.g. torch.arange(0, n_views, 4)."
        )
    if arr.size == 0:
        raise ValueError("views is empty; select at least one view")
    if arr.min() < 0 or arr.max() >= n_views:
        raise ValueError(
            f"view indices must lie in [0, {n_views - 1}] (the geometry has {n_views} views); "
            f"got min {int(arr.min())}, max {int(arr.max())}"
        )
    if np.unique(arr).size != arr.size:
        raise ValueError("views contains duplicate indices; each view may be selected only once")
    return arr.astype(np.int64)


def _require_keys(d: dict, kind: str, required: Sequence[str], optional: Sequence[str]) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise ValueError(f"geometry description of kind {kind!r} lacks the key(s) {missing}")
    unknown = sorted(set(d) - set(required) - set(optional) - {"kind"})
    if unknown:
        raise ValueError(
            f"geometry description of kind {kind!r} has unknown key(s) {unknown}; "
            f"allowed keys: {sorted(set(required) | set(optional))}"
        )


class Geometry(ABC):
    """Base class of all acquisition geometries (see module docstring for conventions)."""

    kind: str = ""
    _registry: dict[str, type["Geometry"]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            Geometry._registry[cls.kind] = cls

    # --- shape -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def n_planes(self) -> int: ...

    @property
    @abstractmethod
    def n_views(self) -> int: ...

    @property
    @abstractmethod
    def n_radial(self) -> int: ...

    @property
    def sinogram_shape(self) -> tuple[int, int, int]:
        return (self.n_planes, self.n_views, self.n_radial)

    @property
    @abstractmethod
    def is_planar(self) -> bool:
        """True when all LORs are perpendicular to z and every plane has the same in-plane LORs."""

    # --- LORs --------------------------------------------------------------------------------
    @abstractmethod
    def inplane_endpoints(self, views=None) -> tuple[np.ndarray, np.ndarray]:
        """(y, x) endpoints in mm of the selected views, float64 arrays (n_sel_views, n_radial, 2).

        The in-plane pattern is shared by all planes; the z coordinates come from
        :meth:`plane_z_endpoints`."""

    @abstractmethod
    def plane_z_endpoints(self) -> tuple[np.ndarray, np.ndarray]:
        """z (mm) of the start and end point of the LORs of every plane, arrays (n_planes,)."""

    def lor_endpoints(self, views=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end points of the LORs as float64 tensors (n_planes, n_sel_views, n_radial, 3).

        Coordinates are mm in (z, y, x) order; ``views`` selects (and orders) views."""
        s_yx, e_yx = self.inplane_endpoints(views)
        zs, ze = self.plane_z_endpoints()
        shape = (self.n_planes,) + s_yx.shape[:2] + (3,)
        xstart = np.empty(shape, dtype=np.float64)
        xend = np.empty(shape, dtype=np.float64)
        xstart[..., 0] = zs[:, None, None]
        xend[..., 0] = ze[:, None, None]
        xstart[..., 1:] = s_yx[None]
        xend[..., 1:] = e_yx[None]
        return torch.from_numpy(xstart), torch.from_numpy(xend)

    def view_subsets(self, n_subsets: int) -> list[torch.Tensor]:
        """Interleaved view subsets for OSEM: subset m holds views m, m + M, m + 2M, ..."""
        if isinstance(n_subsets, bool) or not isinstance(n_subsets, (int, np.integer)):
            raise ValueError(f"n_subsets must be an integer; got {n_subsets!r}")
        if n_subsets < 1 or n_subsets > self.n_views:
            raise ValueError(
                f"n_subsets must lie between 1 and the number of views ({self.n_views}); got {n_subsets}"
            )
        return [torch.arange(m, self.n_views, int(n_subsets), dtype=torch.long) for m in range(int(n_subsets))]

    # --- fit with an image grid ----------------------------------------------------------------
    @property
    @abstractmethod
    def fov_radius_mm(self) -> float:
        """Radius of the transaxial disc that every view samples completely."""

    @property
    def fov_centre_yx_mm(self) -> tuple[float, float]:
        return (0.0, 0.0)

    @property
    @abstractmethod
    def radial_spacing_estimate_mm(self) -> float:
        """Typical distance between neighbouring radial bins near the centre."""

    @abstractmethod
    def _endpoint_clearance_mm(self) -> float:
        """Radius (about the FOV centre) inside which no LOR endpoint lies."""

    def check_grid(self, grid: ImageGrid) -> None:
        """Raise ValueError (saying how to fix it) when ``grid`` does not fit this geometry."""
        if not isinstance(grid, ImageGrid):
            raise ValueError(f"check_grid needs an ImageGrid; got {type(grid).__name__}")
        nz, ny, nx = grid.shape
        dz, dy, dx = grid.voxel_size
        oz, oy, ox = grid.origin
        cy, cx = self.fov_centre_yx_mm
        # transaxial box of the image (voxel edges), relative to the FOV centre
        y0, y1 = oy - dy / 2 - cy, oy + (ny - 0.5) * dy - cy
        x0, x1 = ox - dx / 2 - cx, ox + (nx - 0.5) * dx - cx
        half_extent = max(abs(y0), abs(y1), abs(x0), abs(x1))
        tol = self.radial_spacing_estimate_mm
        if half_extent > self.fov_radius_mm + tol:
            raise ValueError(
                f"the image ({grid.describe()}) is larger than the transaxial field of view of the geometry "
                f"(FOV radius {self.fov_radius_mm:.1f} mm about (y, x) = ({cy:g}, {cx:g}) mm; the image reaches "
                f"{half_extent:.1f} mm from it). Use fewer or smaller voxels, centre the image "
                f"(ImageGrid origin=None), or a geometry with more radial bins / a smaller radial trim."
            )
        corner = math.hypot(max(abs(y0), abs(y1)), max(abs(x0), abs(x1)))
        if corner >= self._endpoint_clearance_mm():
            raise ValueError(
                f"the image corners reach {corner:.1f} mm from the scanner axis, beyond the detector ring / "
                f"LOR endpoints ({self._endpoint_clearance_mm():.1f} mm); use a smaller image or a larger radius"
            )
        centres = grid.voxel_centres(0)
        tol_z = max(_Z_TOL * dz, 1e-6)
        if self.is_planar:
            zs, _ = self.plane_z_endpoints()
            if self.n_planes != nz:
                raise ValueError(
                    f"this 2-D/2.5-D geometry has {self.n_planes} plane(s) but the image has {nz} slice(s); "
                    f"they must match one to one (e.g. brain_scanner(n_rings={nz}) or "
                    f"ParallelBeamGeometry(..., n_planes={nz}, plane_spacing_mm={dz:g}))"
                )
            bad = np.abs(zs - centres) > tol_z
            if bad.any():
                p = int(np.argmax(bad))
                raise ValueError(
                    f"plane {p} of the geometry lies at z = {zs[p]:.4f} mm but slice {p} of the image is centred "
                    f"at z = {centres[p]:.4f} mm: planes must sit at the slice centres. Use a centred grid "
                    f"(ImageGrid(shape, voxel_size) with origin=None) and plane/ring spacing = slice thickness "
                    f"({dz:g} mm), or pass plane_z_mm=grid.voxel_centres(0) to ParallelBeamGeometry."
                )
        else:
            zs, ze = self.plane_z_endpoints()
            zmin = min(zs.min(), ze.min()) - self._axial_half_gap_mm()
            zmax = max(zs.max(), ze.max()) + self._axial_half_gap_mm()
            if centres.min() < zmin - tol_z or centres.max() > zmax + tol_z:
                raise ValueError(
                    f"image slices span z = {centres.min():.2f} .. {centres.max():.2f} mm but the scanner's axial "
                    f"field of view is z = {zmin:.2f} .. {zmax:.2f} mm; use a centred grid whose slices lie inside "
                    f"the rings (more rings, or fewer slices)"
                )

    def _axial_half_gap_mm(self) -> float:
        return 0.0

    # --- description / serialisation ---------------------------------------------------------
    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-able description with a ``kind`` key; inverse of :meth:`Geometry.from_dict`."""

    @staticmethod
    def from_dict(d: dict) -> "Geometry":
        if not isinstance(d, dict):
            raise ValueError(f"a geometry description must be a dict; got {type(d).__name__}")
        kind = d.get("kind")
        if kind is None:
            raise ValueError(f"geometry description lacks the key 'kind' (one of {sorted(Geometry._registry)})")
        cls = Geometry._registry.get(kind)
        if cls is None:
            raise ValueError(f"unknown geometry kind {kind!r}; known kinds: {sorted(Geometry._registry)}")
        return cls._from_dict(d)

    @classmethod
    @abstractmethod
    def _from_dict(cls, d: dict) -> "Geometry": ...

    @abstractmethod
    def describe(self) -> str: ...

    def cache_key(self) -> str:
        """Stable text identifying the geometry (used for projector caches)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def __eq__(self, other) -> bool:
        return isinstance(other, Geometry) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.cache_key())

    def __repr__(self) -> str:
        return self.describe()


class ParallelBeamGeometry(Geometry):
    """Ideal 2-D parallel-beam geometry, one identical sinogram per plane (2-D or 2.5-D).

    Convention (angles in radians, coordinates (y, x) in mm, ``centre_mm`` = (cy, cx)):

    * view ``v`` has angle ``theta_v = angles[v]`` (default ``v * pi / n_views``, uniform in [0, pi));
    * its rays run along the unit vector ``(dy, dx) = (cos theta, sin theta)``: at theta = 0 rays are
      parallel to y (summing image columns), at theta = pi/2 parallel to x;
    * the radial coordinate of a point is ``t = (x - cx) cos theta - (y - cy) sin theta``; radial bin
      ``k`` holds the ray at ``t_k = (k - (n_radial - 1) / 2) * radial_spacing_mm + radial_offset_mm``;
    * planes are perpendicular to z at ``plane_z_mm`` (default centred on 0 with ``plane_spacing_mm``).

    This matches ``skimage.transform.radon`` (angles in degrees there, sinogram (n_radial, n_views),
    values summed in pixel units): see :meth:`from_skimage`, which also sets the half-pixel offsets of
    its rotation centre.
    """

    kind = "parallel-beam"

    def __init__(self, n_views: int, n_radial: int, radial_spacing_mm: float, angles=None, n_planes: int = 1,
                 plane_z_mm=None, plane_spacing_mm: float = 2.0, *, centre_mm=(0.0, 0.0),
                 radial_offset_mm: float = 0.0):
        for name, val in (("n_views", n_views), ("n_radial", n_radial), ("n_planes", n_planes)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"{name} must be a positive integer; got {val!r}")
        if not (np.isfinite(radial_spacing_mm) and radial_spacing_mm > 0):
            raise ValueError(f"radial_spacing_mm must be a positive number of mm; got {radial_spacing_mm!r}")
        self._n_views, self._n_radial, self._n_planes = int(n_views), int(n_radial), int(n_planes)
        self.radial_spacing_mm = float(radial_spacing_mm)
        if angles is None:
            ang = np.arange(self._n_views, dtype=np.float64) * (np.pi / self._n_views)
        else:
            ang = np.asarray(angles.detach().cpu() if isinstance(angles, torch.Tensor) else angles, dtype=np.float64)
            if ang.shape != (self._n_views,) or not np.all(np.isfinite(ang)):
                raise ValueError(
                    f"angles must be {self._n_views} finite values in radians (one per view); got shape {ang.shape}"
                )
        self.angles = ang
        if plane_z_mm is None:
            if not (np.isfinite(plane_spacing_mm) and plane_spacing_mm > 0):
                raise ValueError(f"plane_spacing_mm must be positive; got {plane_spacing_mm!r}")
            pz = (np.arange(self._n_planes) - (self._n_planes - 1) / 2.0) * float(plane_spacing_mm)
        else:
            pz = np.asarray(plane_z_mm, dtype=np.float64).reshape(-1)
            if pz.shape != (self._n_planes,) or not np.all(np.isfinite(pz)):
                raise ValueError(f"plane_z_mm must hold {self._n_planes} finite z positions (mm); got {pz.shape}")
        self.plane_z_mm = pz
        self.plane_spacing_mm = float(plane_spacing_mm)
        c = tuple(float(v) for v in centre_mm)
        if len(c) != 2 or not all(np.isfinite(c)):
            raise ValueError(f"centre_mm must be two finite (y, x) values in mm; got {centre_mm!r}")
        self.centre_mm = c
        if not np.isfinite(radial_offset_mm):
            raise ValueError(f"radial_offset_mm must be finite; got {radial_offset_mm!r}")
        self.radial_offset_mm = float(radial_offset_mm)
        # rays start/end well outside any image that check_grid accepts
        self.half_length_mm = 2.0 * (self.fov_radius_mm + 2.0 * self.radial_spacing_mm) + 2.0 * abs(
            self.radial_offset_mm)

    @classmethod
    def from_skimage(cls, theta_deg, n_radial: int, image_shape_yx: tuple[int, int], pixel_mm: float,
                     n_planes: int = 1, plane_spacing_mm: float | None = None) -> "ParallelBeamGeometry":
        """Geometry of ``skimage.transform.radon(image, theta_deg)`` for an image on a centred grid.

        skimage rotates about pixel ``(ny // 2, nx // 2)`` and puts that axis at radial bin
        ``n_radial // 2`` (for both ``circle=True`` and ``circle=False``). Its sinogram maps to ours as
        ``sino[0] = radon(image, theta).T * pixel_mm`` (skimage sums pixel values; ours are mm).
        """
        ny, nx = (int(v) for v in image_shape_yx)
        cy = (ny // 2 - (ny - 1) / 2.0) * pixel_mm
        cx = (nx // 2 - (nx - 1) / 2.0) * pixel_mm
        off = -(n_radial // 2 - (n_radial - 1) / 2.0) * pixel_mm
        theta = np.deg2rad(np.asarray(theta_deg, dtype=np.float64).reshape(-1))
        return cls(len(theta), int(n_radial), float(pixel_mm), angles=theta, n_planes=n_planes,
                   plane_spacing_mm=float(pixel_mm if plane_spacing_mm is None else plane_spacing_mm),
                   centre_mm=(cy, cx), radial_offset_mm=off)

    @property
    def n_planes(self) -> int:
        return self._n_planes

    @property
    def n_views(self) -> int:
        return self._n_views

    @property
    def n_radial(self) -> int:
        return self._n_radial

    @property
    def is_planar(self) -> bool:
        return True

    def radial_positions_mm(self) -> np.ndarray:
        return (np.arange(self._n_radial) - (self._n_radial - 1) / 2.0) * self.radial_spacing_mm + self.radial_offset_mm

    def inplane_endpoints(self, views=None):
        v = _as_view_index(views, self._n_views)
        th = self.angles[v][:, None]
        t = self.radial_positions_mm()[None, :]
        d = np.stack(np.broadcast_arrays(np.cos(th), np.sin(th)), axis=-1)      # ray direction (y, x)
        u = np.stack(np.broadcast_arrays(-np.sin(th), np.cos(th)), axis=-1)     # radial direction (y, x)
        mid = np.asarray(self.centre_mm)[None, None, :] + t[..., None] * u
        return mid - self.half_length_mm * d, mid + self.half_length_mm * d

    def plane_z_endpoints(self):
        return self.plane_z_mm.copy(), self.plane_z_mm.copy()

    @property
    def fov_radius_mm(self) -> float:
        return (self._n_radial - 1) / 2.0 * self.radial_spacing_mm + self.radial_spacing_mm / 2.0 - abs(
            self.radial_offset_mm)

    @property
    def fov_centre_yx_mm(self) -> tuple[float, float]:
        return self.centre_mm

    @property
    def radial_spacing_estimate_mm(self) -> float:
        return self.radial_spacing_mm

    def _endpoint_clearance_mm(self) -> float:
        return self.half_length_mm

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "n_views": self._n_views, "n_radial": self._n_radial,
            "radial_spacing_mm": self.radial_spacing_mm, "angles": [float(a) for a in self.angles],
            "n_planes": self._n_planes, "plane_z_mm": [float(z) for z in self.plane_z_mm],
            "plane_spacing_mm": self.plane_spacing_mm, "centre_mm": list(self.centre_mm),
            "radial_offset_mm": self.radial_offset_mm,
        }

    @classmethod
    def _from_dict(cls, d: dict) -> "ParallelBeamGeometry":
        _require_keys(d, cls.kind, ["n_views", "n_radial", "radial_spacing_mm"],
                      ["angles", "n_planes", "plane_z_mm", "plane_spacing_mm", "centre_mm", "radial_offset_mm"])
        return cls(d["n_views"], d["n_radial"], d["radial_spacing_mm"], angles=d.get("angles"),
                   n_planes=d.get("n_planes", 1), plane_z_mm=d.get("plane_z_mm"),
                   plane_spacing_mm=d.get("plane_spacing_mm", 2.0), centre_mm=tuple(d.get("centre_mm", (0.0, 0.0))),
                   radial_offset_mm=d.get("radial_offset_mm", 0.0))

    def describe(self) -> str:
        a = np.rad2deg(self.angles)
        return (f"parallel-beam geometry: {self._n_planes} plane(s), {self._n_views} views "
                f"({a.min():.1f}..{a.max():.1f} deg), {self._n_radial} radial bins of {self.radial_spacing_mm:g} mm "
                f"(FOV diameter {2 * self.fov_radius_mm:.1f} mm); sinogram (planes, views, radial) = "
                f"{self.sinogram_shape}")


class RingScannerGeometry(Geometry):
    """Stack of identical regular-polygon detector rings around the z axis.

    Detector endpoints (in every ring): side ``s`` of ``n_sides`` sits at angle
    ``phi_s = 2 pi s / n_sides`` (measured from +x towards +y) at distance ``radius_mm`` (inner radius,
    i.e. the polygon's apothem); its ``endpoints_per_side`` endpoints are spaced by
    ``endpoint_spacing_mm`` along the side, centred on it. Endpoint number ``e = s * endpoints_per_side + i``
    (``n = n_sides * endpoints_per_side`` per ring, must be even). Ring ``r`` lies at
    ``z_r = (r - (n_rings - 1) / 2) * ring_spacing_mm`` (centred on z = 0).

    Sinogram order (plane, view, radial):

    * view ``v`` in ``[0, n/2)`` and radial bin ``k`` in ``[0, n_radial)``, ``n_radial = n + 1 - 2 * radial_trim``:
      with ``j = k - (n_radial - 1) / 2`` and separation ``d = n/2 - j``, the LOR joins endpoint
      ``a = (v - floor(d / 2)) mod n`` (start) to ``b = (a + d) mod n`` (end). All LORs of a view are
      (nearly) parallel (interleaved: odd ``d`` are turned by half an endpoint step, pi / n), with their
      normal at angle ``mu_v ~ 2 pi (v - (endpoints_per_side - 1) / 2) / n`` from +x towards +y; ``k``
      increases with the signed distance of the LOR from the axis along ``(y, x) = (sin mu_v, cos mu_v)``
      and the centre bin ``k = (n_radial - 1) / 2`` joins opposite endpoints (through the axis when
      ``n_sides`` is even).
    * planes (span 1, Michelogram order): first the ``n_rings`` direct planes (ring r -> ring r, r
      ascending); then for each ring difference ``delta = 1 .. max_ring_difference``: the planes
      start ring r -> end ring r + delta (r ascending), followed by start ring r + delta -> end ring r
      (r ascending). ``plane_rings()`` returns the (start ring, end ring) of every plane.

    ``max_ring_difference = 0`` gives direct planes only (2.5-D, ``is_planar``); larger values add
    oblique planes (fully 3-D, matrix-free projector).
    """

    kind = "ring"

    def __init__(self, radius_mm: float, n_sides: int, endpoints_per_side: int, endpoint_spacing_mm: float,
                 n_rings: int = 1, ring_spacing_mm: float = 2.0, max_ring_difference: int = 0,
                 radial_trim: int = 3):
        for name, val, lo in (("n_sides", n_sides, 3), ("endpoints_per_side", endpoints_per_side, 1),
                              ("n_rings", n_rings, 1), ("max_ring_difference", max_ring_difference, 0),
                              ("radial_trim", radial_trim, 1)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
                raise ValueError(f"{name} must be an integer >= {lo}; got {val!r}")
        for name, val in (("radius_mm", radius_mm), ("endpoint_spacing_mm", endpoint_spacing_mm),
                          ("ring_spacing_mm", ring_spacing_mm)):
            if not (np.isfinite(val) and val > 0):
                raise ValueError(f"{name} must be a positive number of mm; got {val!r}")
        self.radius_mm = float(radius_mm)
        self.n_sides = int(n_sides)
        self.endpoints_per_side = int(endpoints_per_side)
        self.endpoint_spacing_mm = float(endpoint_spacing_mm)
        self.n_rings = int(n_rings)
        self.ring_spacing_mm = float(ring_spacing_mm)
        self.max_ring_difference = int(max_ring_difference)
        self.radial_trim = int(radial_trim)
        n = self.n_endpoints_per_ring
        if n % 2:
            raise ValueError(
                f"n_sides * endpoints_per_side must be even (got {self.n_sides} x {self.endpoints_per_side} = {n}) "
                "so that views pair opposite endpoints"
            )
        side = 2.0 * self.radius_mm * math.tan(math.pi / self.n_sides)
        if self.endpoints_per_side * self.endpoint_spacing_mm > side * (1 + 1e-9):
            raise ValueError(
                f"{self.endpoints_per_side} endpoints spaced {self.endpoint_spacing_mm:g} mm do not fit on a polygon "
                f"side of {side:.2f} mm (radius {self.radius_mm:g} mm, {self.n_sides} sides); reduce "
                f"endpoint_spacing_mm to <= {side / self.endpoints_per_side:.3f} mm"
            )
        if self.radial_trim > n // 2:
            raise ValueError(f"radial_trim must be <= {n // 2} for {n} endpoints per ring; got {self.radial_trim}")
        if self.max_ring_difference > self.n_rings - 1:
            raise ValueError(
                f"max_ring_difference must be <= n_rings - 1 = {self.n_rings - 1}; got {self.max_ring_difference}"
            )
        self._endpoints_yx = self._ring_endpoints()
        self._start_ring, self._end_ring = self._michelogram()
        self._fov = None

    @property
    def n_endpoints_per_ring(self) -> int:
        return self.n_sides * self.endpoints_per_side

    @property
    def n_planes(self) -> int:
        return int(self._start_ring.size)

    @property
    def n_views(self) -> int:
        return self.n_endpoints_per_ring // 2

    @property
    def n_radial(self) -> int:
        return self.n_endpoints_per_ring + 1 - 2 * self.radial_trim

    @property
    def is_planar(self) -> bool:
        return self.max_ring_difference == 0

    def ring_z_mm(self) -> np.ndarray:
        return (np.arange(self.n_rings) - (self.n_rings - 1) / 2.0) * self.ring_spacing_mm

    def plane_rings(self) -> tuple[np.ndarray, np.ndarray]:
        """(start ring, end ring) of every sinogram plane, int arrays (n_planes,)."""
        return self._start_ring.copy(), self._end_ring.copy()

    def _ring_endpoints(self) -> np.ndarray:
        m = self.endpoints_per_side
        e = np.arange(self.n_endpoints_per_ring)
        side, i = e // m, e % m
        phi = 2.0 * np.pi * side / self.n_sides
        u = (i - (m - 1) / 2.0) * self.endpoint_spacing_mm
        x = self.radius_mm * np.cos(phi) - u * np.sin(phi)
        y = self.radius_mm * np.sin(phi) + u * np.cos(phi)
        return np.stack([y, x], axis=-1)

    def _michelogram(self) -> tuple[np.ndarray, np.ndarray]:
        r = np.arange(self.n_rings)
        start, end = [r], [r]
        for delta in range(1, self.max_ring_difference + 1):
            lo = np.arange(self.n_rings - delta)
            start += [lo, lo + delta]
            end += [lo + delta, lo]
        return np.concatenate(start).astype(np.int64), np.concatenate(end).astype(np.int64)

    def endpoint_indices(self, views=None) -> tuple[np.ndarray, np.ndarray]:
        """In-ring endpoint numbers (start, end) of the selected views, int arrays (n_sel, n_radial)."""
        v = _as_view_index(views, self.n_views)
        n = self.n_endpoints_per_ring
        j = np.arange(self.n_radial) - (self.n_radial - 1) // 2
        d = n // 2 - j
        a = np.mod(v[:, None] - d[None, :] // 2, n)
        b = np.mod(a + d[None, :], n)
        return a, b

    def inplane_endpoints(self, views=None):
        a, b = self.endpoint_indices(views)
        return self._endpoints_yx[a], self._endpoints_yx[b]

    def plane_z_endpoints(self):
        z = self.ring_z_mm()
        return z[self._start_ring], z[self._end_ring]

    def _lor_distances(self) -> np.ndarray:
        s, e = self.inplane_endpoints()
        dvec = e - s
        cross = s[..., 0] * dvec[..., 1] - s[..., 1] * dvec[..., 0]
        return np.abs(cross) / np.linalg.norm(dvec, axis=-1)

    @property
    def fov_radius_mm(self) -> float:
        if self._fov is None:
            dist = self._lor_distances()
            self._fov = float(min(dist[:, 0].min(), dist[:, -1].min()))
        return self._fov

    @property
    def radial_spacing_estimate_mm(self) -> float:
        return math.pi * self.radius_mm / self.n_endpoints_per_ring

    def _endpoint_clearance_mm(self) -> float:
        return self.radius_mm

    def _axial_half_gap_mm(self) -> float:
        return self.ring_spacing_mm / 2.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind, "radius_mm": self.radius_mm, "n_sides": self.n_sides,
            "endpoints_per_side": self.endpoints_per_side, "endpoint_spacing_mm": self.endpoint_spacing_mm,
            "n_rings": self.n_rings, "ring_spacing_mm": self.ring_spacing_mm,
            "max_ring_difference": self.max_ring_difference, "radial_trim": self.radial_trim,
        }

    @classmethod
    def _from_dict(cls, d: dict) -> "RingScannerGeometry":
        _require_keys(d, cls.kind, ["radius_mm", "n_sides", "endpoints_per_side", "endpoint_spacing_mm"],
                      ["n_rings", "ring_spacing_mm", "max_ring_difference", "radial_trim"])
        return cls(d["radius_mm"], d["n_sides"], d["endpoints_per_side"], d["endpoint_spacing_mm"],
                   n_rings=d.get("n_rings", 1), ring_spacing_mm=d.get("ring_spacing_mm", 2.0),
                   max_ring_difference=d.get("max_ring_difference", 0), radial_trim=d.get("radial_trim", 3))

    def describe(self) -> str:
        mode = ("direct planes only (2.5-D)" if self.is_planar
                else f"span 1 up to ring difference {self.max_ring_difference} (3-D)")
        return (f"ring scanner: radius {self.radius_mm:g} mm, {self.n_sides} sides x {self.endpoints_per_side} "
                f"endpoints ({self.endpoint_spacing_mm:g} mm), {self.n_rings} ring(s) {self.ring_spacing_mm:g} mm "
                f"apart, {mode}; sinogram (planes, views, radial) = {self.sinogram_shape}, radial spacing "
                f"~{self.radial_spacing_estimate_mm:.2f} mm, transaxial FOV diameter {2 * self.fov_radius_mm:.1f} mm")


def brain_scanner(n_rings: int = 1, max_ring_difference: int = 0) -> RingScannerGeometry:
    """Preset for 128 x 128 images with 2 mm pixels (and 2 mm slices, one ring per slice).

    Radius 300 mm, 40 sides x 11 endpoints 4.29 mm apart (no gaps): 440 endpoints per ring, 220 views,
    ~2.14 mm radial sampling at the centre, 185 radial bins covering a transaxial FOV of ~367 mm
    diameter (the whole 256 mm square, corners included). Rings 2 mm apart so that direct planes sit at
    the centres of 2 mm slices of a centred grid: use ``brain_scanner(n_rings=nz)`` for nz slices.
    """
    return RingScannerGeometry(radius_mm=300.0, n_sides=40, endpoints_per_side=11, endpoint_spacing_mm=4.29,
                               n_rings=n_rings, ring_spacing_mm=2.0, max_ring_difference=max_ring_difference,
                               radial_trim=128)
