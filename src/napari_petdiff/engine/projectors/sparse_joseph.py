"""Precomputed sparse Joseph projector for 2-D and 2.5-D (direct-plane) geometries.

All planes of a planar geometry share the same in-plane LORs, so ONE plane matrix
A (n_views * n_radial, ny * nx) serves every slice: an image stack (B, nz, ny, nx) is projected with
a single SpMM, A @ X where X has one column per (batch, slice). A and its transpose are stored as
torch CSR tensors (float32 values, int32 indices by default), built once by a vectorised numpy ray
tracer and cached on disk (see ``matrix_cache``).

The tracer uses the same Joseph discretisation as ``matrix_free`` (identical formulas, float64), so
both backends agree to rounding.
"""
from __future__ import annotations

import hashlib
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..geometry import Geometry
from ..grid import ImageGrid
from . import matrix_cache
from .base import Projector

TRACER_VERSION = 1
_LOR_CHUNK = 4096
_MEMORY_CACHE: "OrderedDict[str, PlaneMatrix]" = OrderedDict()
_MEMORY_CACHE_SIZE = 3
_LOCK = threading.Lock()   # one build at a time; the cache dict is shared by worker threads


def trace_joseph_2d(p0: np.ndarray, p1: np.ndarray, grid: ImageGrid, chunk: int = _LOR_CHUNK):
    """Joseph system matrix of in-plane segments p0 -> p1 ((N, 2) arrays, (y, x) mm) on ``grid``'s plane.

    Returns CSR arrays (indptr, indices, data) with float64 values in mm, shape (N, ny * nx), column
    indices sorted within each row. Discretisation (formula for formula the same as
    ``matrix_free.joseph_samples``): principal axis = the one crossing most voxel planes; at each plane
    centre c_j the segment's secondary voxel coordinate q0 + j * dq is computed from the plane index
    (never accumulated) and linearly interpolated between the two neighbouring voxels; each plane counts
    with step length v_a |d| / |d_a| times the fraction of its slab [c_j - v_a / 2, c_j + v_a / 2] that
    the segment covers (exact for segments ending inside the image).
    """
    p0 = np.asarray(p0, dtype=np.float64).reshape(-1, 2)
    p1 = np.asarray(p1, dtype=np.float64).reshape(-1, 2)
    _, ny, nx = grid.shape
    shape = np.array([ny, nx])
    vox = np.array(grid.voxel_size[1:], dtype=np.float64)
    org = np.array(grid.origin[1:], dtype=np.float64)
    n = p0.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    cols_out, vals_out = [], []
    for c0 in range(0, n, chunk):
        P0, D = p0[c0:c0 + chunk], p1[c0:c0 + chunk] - p0[c0:c0 + chunk]
        length = np.hypot(D[:, 0], D[:, 1])
        principal = np.argmax(np.abs(D) / vox, axis=1)
        rows_c, pix_c, w_c = [], [], []
        for ax in (0, 1):
            sel = np.nonzero((principal == ax) & (length > 0))[0]
            if sel.size == 0:
                continue
            s = 1 - ax
            na, ns = int(shape[ax]), int(shape[s])
            va, vs, oa, os_ = vox[ax], vox[s], org[ax], org[s]
            p0a, p0s, da, ds = P0[sel, ax], P0[sel, s], D[sel, ax], D[sel, s]
            # index space: u = principal coordinate in plane units, q = secondary voxel coordinate
            u0 = (p0a - oa) / va
            u1 = u0 + da / va
            ulo, uhi = np.minimum(u0, u1), np.maximum(u0, u1)
            step = va * length[sel] / np.abs(da)
            slope = ds / da
            q0 = (p0s + (oa - p0a) * slope - os_) / vs
            dq = slope * va / vs
            # candidate planes: slabs touching the segment, where the sample can reach a voxel
            j_lo = np.ceil(ulo - 0.5)
            j_hi = np.floor(uhi + 0.5)
            with np.errstate(divide="ignore", invalid="ignore"):
                ja, jb = (-1.0 - q0) / dq, (ns - q0) / dq
            inside0 = (q0 > -1.0) & (q0 < ns)
            jmin = np.where(dq > 0, ja, np.where(dq < 0, jb, np.where(inside0, -np.inf, np.inf)))
            jmax = np.where(dq > 0, jb, np.where(dq < 0, ja, np.where(inside0, np.inf, -np.inf)))
            j_lo = np.maximum(np.maximum(j_lo, np.floor(jmin) - 1.0), 0.0)
            j_hi = np.minimum(np.minimum(j_hi, np.ceil(jmax) + 1.0), na - 1.0)
            empty = ~(j_lo <= j_hi)
            cnt = np.where(empty, 0, j_hi - j_lo + 1).astype(np.int64)
            j0 = np.where(empty, 0, j_lo).astype(np.int64)
            ids = np.repeat(np.arange(sel.size), cnt)
            starts = np.cumsum(cnt) - cnt
            j = j0[ids] + (np.arange(ids.size) - starts[ids])
            # per-sample geometry, directly from the plane index
            jf = j.astype(np.float64)
            q = q0[ids] + jf * dq[ids]
            i0 = np.floor(q)
            f = q - i0
            i0 = i0.astype(np.int64)
            cov = np.clip(np.minimum(uhi[ids], jf + 0.5) - np.maximum(ulo[ids], jf - 0.5), 0.0, 1.0)
            w = step[ids] * cov
            w0, w1 = w * (1.0 - f), w * f
            m0 = (i0 >= 0) & (i0 < ns) & (w0 > 0)
            m1 = (i0 + 1 >= 0) & (i0 + 1 < ns) & (w1 > 0)
            if ax == 0:   # y principal: voxel (row j, col i0 / i0 + 1)
                pix0, dpix = j * nx + i0, 1
            else:         # x principal: voxel (row i0 / i0 + 1, col j)
                pix0, dpix = i0 * nx + j, nx
            r = sel[ids]
            rows_c += [r[m0], r[m1]]
            pix_c += [pix0[m0], pix0[m1] + dpix]
            w_c += [w0[m0], w1[m1]]
        if not rows_c:
            continue
        rows_c, pix_c, w_c = np.concatenate(rows_c), np.concatenate(pix_c), np.concatenate(w_c)
        order = np.argsort(rows_c * (ny * nx) + pix_c, kind="stable")
        counts[c0:c0 + chunk] = np.bincount(rows_c, minlength=P0.shape[0])
        cols_out.append(pix_c[order])
        vals_out.append(w_c[order])
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.concatenate(cols_out) if cols_out else np.zeros(0, dtype=np.int64)
    data = np.concatenate(vals_out) if vals_out else np.zeros(0, dtype=np.float64)
    return indptr, indices, data


def csr_transpose(indptr, indices, data, n_cols):
    """CSR arrays of the transpose (columns sorted within rows)."""
    n_rows = indptr.shape[0] - 1
    rows = np.repeat(np.arange(n_rows, dtype=indices.dtype), np.diff(indptr))
    order = np.argsort(indices, kind="stable")
    t_indptr = np.zeros(n_cols + 1, dtype=indptr.dtype)
    np.cumsum(np.bincount(indices, minlength=n_cols), out=t_indptr[1:])
    return t_indptr, rows[order], data[order]


def _csr(indptr, indices, data, shape, device, dtype) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            torch.as_tensor(indptr).to(device), torch.as_tensor(indices).to(device),
            torch.as_tensor(data).to(device=device, dtype=dtype), size=shape, check_invariants=False)


class PlaneMatrix:
    """Plane matrix A and its transpose (numpy master copy) + torch CSR copies per views/device/dtype."""

    def __init__(self, arrays: dict, shape: tuple[int, int], n_radial: int, info: dict):
        self.arrays = arrays
        self.shape = shape
        self.n_radial = n_radial
        self.info = info
        self._torch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def nnz(self) -> int:
        return int(self.arrays["a_data"].shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the numpy master copy (A and A^T)."""
        return int(sum(a.nbytes for a in self.arrays.values()))

    def _subset_arrays(self, views: np.ndarray):
        a_ptr, a_idx, a_val = self.arrays["a_indptr"], self.arrays["a_indices"], self.arrays["a_data"]
        rows = (views[:, None] * self.n_radial + np.arange(self.n_radial)[None, :]).reshape(-1)
        cnt = a_ptr[rows + 1] - a_ptr[rows]
        ptr = np.zeros(rows.size + 1, dtype=a_ptr.dtype)
        np.cumsum(cnt, out=ptr[1:])
        pos = np.repeat(a_ptr[rows] - ptr[:-1], cnt) + np.arange(int(ptr[-1]), dtype=a_ptr.dtype)
        idx, val = a_idx[pos], a_val[pos]
        if np.all(np.diff(views) > 0):
            # keep the stored transpose's (sorted) order; only drop and renumber columns
            t_ptr, t_idx, t_val = self.arrays["t_indptr"], self.arrays["t_indices"], self.arrays["t_data"]
            new_col = np.full(self.shape[0], -1, dtype=t_idx.dtype)
            new_col[rows] = np.arange(rows.size, dtype=t_idx.dtype)
            mapped = new_col[t_idx]
            keep = mapped >= 0
            t_rows = np.repeat(np.arange(self.shape[1]), np.diff(t_ptr))
            tp = np.zeros(self.shape[1] + 1, dtype=t_ptr.dtype)
            np.cumsum(np.bincount(t_rows[keep], minlength=self.shape[1]), out=tp[1:])
            t = (tp, mapped[keep], t_val[keep])
        else:
            t = csr_transpose(ptr, idx, val, self.shape[1])
        return (ptr, idx, val), t, rows.size

    def matrices(self, views: np.ndarray | None, device: torch.device, dtype: torch.dtype):
        key = (None if views is None else views.tobytes(), str(device), dtype)
        mats = self._torch.get(key)
        if mats is None:
            if views is None:
                a = (self.arrays["a_indptr"], self.arrays["a_indices"], self.arrays["a_data"])
                t = (self.arrays["t_indptr"], self.arrays["t_indices"], self.arrays["t_data"])
                n_rows = self.shape[0]
            else:
                a, t, n_rows = self._subset_arrays(views)
            mats = (_csr(*a, (n_rows, self.shape[1]), device, dtype),
                    _csr(*t, (self.shape[1], n_rows), device, dtype))
            self._torch[key] = mats
        return mats

    def drop_torch_copies(self, keep_device: torch.device | None = None) -> None:
        self._torch = {k: v for k, v in self._torch.items() if keep_device is not None and k[1] == str(keep_device)}


def plane_matrix_key(geometry: Geometry, grid: ImageGrid, dtype: torch.dtype) -> str:
    s_yx, e_yx = geometry.inplane_endpoints()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"joseph2d-v{TRACER_VERSION}-{matrix_cache.FORMAT_VERSION}|{dtype}|".encode())
    h.update(repr((grid.shape[1:], grid.voxel_size[1:], grid.origin[1:])).encode())
    h.update(np.ascontiguousarray(s_yx).tobytes())
    h.update(np.ascontiguousarray(e_yx).tobytes())
    return h.hexdigest()


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
            torch.bfloat16: np.float32}[dtype]


def build_plane_matrix(geometry: Geometry, grid: ImageGrid, dtype: torch.dtype = torch.float32,
                       cache_dir=None) -> PlaneMatrix:
    """Load (memory, then disk cache) or build the plane matrix. ``cache_dir=False`` disables the disk cache."""
    key = plane_matrix_key(geometry, grid, dtype)
    with _LOCK:
        pm = _MEMORY_CACHE.get(key)
        if pm is None:
            pm = _load_or_build(geometry, grid, dtype, cache_dir, key)
            _MEMORY_CACHE[key] = pm
            while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
                _MEMORY_CACHE.popitem(last=False)
        else:
            _MEMORY_CACHE.move_to_end(key)
        return pm


def _load_or_build(geometry, grid, dtype, cache_dir, key) -> PlaneMatrix:
    n_rows = geometry.n_views * geometry.n_radial
    n_pix = grid.shape[1] * grid.shape[2]
    np_dtype = _np_dtype(dtype)
    path = None
    if cache_dir is not False:
        root = matrix_cache.default_cache_dir() if cache_dir is None else Path(cache_dir)
        path = root / f"joseph2d-{key}.npz"
    meta = matrix_cache.load(path, key, (n_rows, n_pix), np_dtype) if path is not None else None
    if meta is not None:
        arrays = meta.pop("arrays")
        info = dict(meta, source="disk cache", path=str(path))
    else:
        t0 = time.perf_counter()
        s_yx, e_yx = geometry.inplane_endpoints()
        ptr, idx, val = trace_joseph_2d(s_yx.reshape(-1, 2), e_yx.reshape(-1, 2), grid)
        index_dtype = np.int32 if max(idx.size, n_rows, n_pix) < 2 ** 31 - 1 else np.int64
        ptr, idx = ptr.astype(index_dtype), idx.astype(index_dtype)
        t_ptr, t_idx, t_val = csr_transpose(ptr, idx, val, n_pix)
        arrays = {"a_indptr": ptr, "a_indices": idx, "a_data": val.astype(np_dtype),
                  "t_indptr": t_ptr, "t_indices": t_idx, "t_data": t_val.astype(np_dtype)}
        info = {"build_seconds": time.perf_counter() - t0, "nnz": int(idx.size), "shape": [n_rows, n_pix],
                "dtype": str(dtype), "geometry": geometry.to_dict(), "grid": grid.to_dict()}
        if path is not None and matrix_cache.save(path, key, arrays, info):
            info = dict(info, path=str(path))
        info["source"] = "built"
    return PlaneMatrix(arrays, (n_rows, n_pix), geometry.n_radial, info)


def clear_memory_cache() -> None:
    with _LOCK:
        _MEMORY_CACHE.clear()


class SparseJosephProjector(Projector):
    """2-D / 2.5-D Joseph projector using one precomputed CSR plane matrix for all slices."""

    backend = "sparse"

    def __init__(self, geometry: Geometry, grid: ImageGrid, views=None, dtype=torch.float32, device=None,
                 cache_dir=None, _matrix: PlaneMatrix | None = None):
        if not geometry.is_planar:
            raise ValueError(
                "the sparse backend handles 2-D/2.5-D geometries (direct planes only); this geometry has oblique "
                "planes: use backend='matrix-free' (or 'auto')"
            )
        super().__init__(geometry, grid, views=views, dtype=dtype, device=device)
        geometry.check_grid(grid)
        self.matrix = _matrix if _matrix is not None else build_plane_matrix(geometry, grid, dtype, cache_dir)
        self._sel = None if self.views is None else self.views.numpy()
        self._n_pix = grid.shape[1] * grid.shape[2]

    def _mats(self, x: torch.Tensor):
        return self.matrix.matrices(self._sel, x.device, x.dtype)

    def _apply(self, x):
        a, _ = self._mats(x)
        b, nz = x.shape[0], x.shape[1]
        cols = x.reshape(b * nz, self._n_pix).t().contiguous()
        y = torch.sparse.mm(a, cols)                      # (n_sel * n_radial, b * nz)
        return y.t().reshape(b, nz, self.out_shape[1], self.out_shape[2])

    def _adjoint(self, y):
        _, at = self._mats(y)
        b, nz = y.shape[0], y.shape[1]
        cols = y.reshape(b * nz, -1).t().contiguous()
        x = torch.sparse.mm(at, cols)                     # (ny * nx, b * nz)
        return x.t().reshape((b,) + self.in_shape)

    def _subset(self, abs_views):
        return SparseJosephProjector(self.geometry, self.grid, views=abs_views, dtype=self._dtype,
                                     device=self._device, _matrix=self.matrix)

    def _to(self, device):
        # copies on other devices are dropped to free memory; the new one is made on first use
        self.matrix.drop_torch_copies(keep_device=device)

    @property
    def info(self) -> dict:
        """Build / cache facts: nnz, bytes (A and A^T), build_seconds or cache path, source."""
        return dict(self.matrix.info, nnz=self.matrix.nnz, nbytes=self.matrix.nbytes)
