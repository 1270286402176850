"""Matrix-free Joseph projector for arbitrary LOR endpoints (oblique 3-D planes, list-mode events).

Vectorised torch, chunked over LORs to bound memory. For every LOR segment ``xstart -> xend``:

* principal axis ``a`` = the axis crossing most voxel planes (max |d_i| / v_i);
* candidate planes come from the exact intersection of the segment with the image box (and with
  the band where the two secondary coordinates can still reach a voxel), in closed form;
* at plane ``j`` (centre ``c_j = origin_a + j * v_a``) the sample position is computed from ``j``
  directly - never accumulated - and bilinearly interpolated between the 4 neighbouring voxels;
* the plane's weight is the step length ``v_a |d| / |d_a|`` times the fraction of its slab that the
  segment covers (so segments ending inside the image are integrated exactly).

The same (index, weight) lists drive the forward (gather) and the adjoint (``index_add_``), so the
adjoint is exact. Geometry is computed in float64; values in the dtype of the data.
The in-plane special case matches ``sparse_joseph.trace_joseph_2d`` formula for formula.
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import Geometry
from ..grid import ImageGrid
from ..operators import LinearOperator
from .base import Projector

# secondary axes for principal axis 0 (z), 1 (y), 2 (x)
_SECONDARY = ((1, 2), (0, 2), (0, 1))
_DEFAULT_MAX_SAMPLES = 1 << 20


class _GridConsts:
    def __init__(self, grid: ImageGrid, device):
        f64 = dict(dtype=torch.float64, device=device)
        self.shape = torch.tensor(grid.shape, dtype=torch.long, device=device)
        self.shape_f = self.shape.to(torch.float64)
        self.vox = torch.tensor(grid.voxel_size, **f64)
        self.org = torch.tensor(grid.origin, **f64)
        nz, ny, nx = grid.shape
        self.stride = torch.tensor([ny * nx, nx, 1], dtype=torch.long, device=device)
        self.secondary = torch.tensor(_SECONDARY, dtype=torch.long, device=device)
        self.max_dim = max(grid.shape)
        self.n_vox = grid.n_voxels


def _plane_range(q0, dq, ns):
    """Plane indices j (float) where q0 + j * dq lies in (-1, ns); +-inf when unbounded/empty."""
    inf = torch.full_like(q0, float("inf"))
    inside0 = (q0 > -1.0) & (q0 < ns)
    safe = torch.where(dq == 0, torch.ones_like(dq), dq)
    ja, jb = (-1.0 - q0) / safe, (ns - q0) / safe
    jmin = torch.where(dq > 0, ja, torch.where(dq < 0, jb, torch.where(inside0, -inf, inf)))
    jmax = torch.where(dq > 0, jb, torch.where(dq < 0, ja, torch.where(inside0, inf, -inf)))
    return jmin, jmax


def joseph_samples(xs: torch.Tensor, xe: torch.Tensor, g: _GridConsts):
    """Sample lists of LOR segments xs -> xe ((N, 3) float64): lor ids (S,), voxel ids (S, 4), weights (S, 4)."""
    d = xe - xs
    length = torch.linalg.vector_norm(d, dim=1)
    a = torch.argmax(d.abs() / g.vox, dim=1)
    sec = g.secondary[a]                                  # (N, 2)
    a1 = a[:, None]
    p0a, da = xs.gather(1, a1)[:, 0], d.gather(1, a1)[:, 0]
    va, oa, na = g.vox[a], g.org[a], g.shape_f[a]
    ok = length > 0
    da_safe = torch.where(ok, da, torch.ones_like(da))
    lo, hi = torch.minimum(p0a, p0a + da), torch.maximum(p0a, p0a + da)
    step = va * length / da_safe.abs()
    j_lo = torch.ceil((lo - oa) / va - 0.5)
    j_hi = torch.floor((hi - oa) / va + 0.5)
    p0_sec, d_sec = [], []
    for k in range(2):
        s = sec[:, k]
        p0s, ds = xs.gather(1, s[:, None])[:, 0], d.gather(1, s[:, None])[:, 0]
        p0_sec.append(p0s)
        d_sec.append(ds)
        vs, os_, ns = g.vox[s], g.org[s], g.shape_f[s]
        q0 = (p0s + (oa - p0a) * (ds / da_safe) - os_) / vs
        dq = va * (ds / da_safe) / vs
        jmin, jmax = _plane_range(q0, dq, ns)
        j_lo = torch.maximum(j_lo, torch.floor(jmin) - 1.0)
        j_hi = torch.minimum(j_hi, torch.ceil(jmax) + 1.0)
    j_lo = torch.clamp(j_lo, min=0.0)
    j_hi = torch.minimum(j_hi, na - 1.0)
    empty = ~(j_lo <= j_hi) | ~ok
    cnt = torch.where(empty, torch.zeros_like(j_lo), j_hi - j_lo + 1.0).to(torch.long)
    j0 = torch.where(empty, torch.zeros_like(j_lo), j_lo).to(torch.long)
    n = xs.shape[0]
    ids = torch.repeat_interleave(torch.arange(n, device=xs.device), cnt)
    starts = torch.cumsum(cnt, 0) - cnt
    j = j0[ids] + (torch.arange(ids.numel(), device=xs.device) - starts[ids])
    # per-sample geometry, from the plane index
    ai = a[ids]
    c = oa[ids] + j.to(torch.float64) * va[ids]
    t = (c - p0a[ids]) / da_safe[ids]
    flat = j * g.stride[ai]
    fr, base = [], []
    for k in range(2):
        s = sec[ids, k]
        q = (p0_sec[k][ids] + t * d_sec[k][ids] - g.org[s]) / g.vox[s]
        i0 = torch.floor(q)
        fr.append(q - i0)
        base.append((i0.to(torch.long), g.shape[s], g.stride[s]))
    cov = torch.clamp((torch.minimum(hi[ids], c + va[ids] / 2) - torch.maximum(lo[ids], c - va[ids] / 2)) / va[ids],
                      0.0, 1.0)
    w = step[ids] * cov
    (i1, n1, st1), (i2, n2, st2) = base
    f1, f2 = fr
    idx_l, w_l = [], []
    for o1, g1 in ((0, 1.0 - f1), (1, f1)):
        for o2, g2 in ((0, 1.0 - f2), (1, f2)):
            ii1, ii2 = i1 + o1, i2 + o2
            valid = (ii1 >= 0) & (ii1 < n1) & (ii2 >= 0) & (ii2 < n2)
            idx_l.append(torch.where(valid, flat + ii1 * st1 + ii2 * st2, torch.zeros_like(flat)))
            w_l.append(torch.where(valid, w * g1 * g2, torch.zeros_like(w)))
    return ids, torch.stack(idx_l, 1), torch.stack(w_l, 1)


def _chunk_size(g: _GridConsts, batch: int, max_samples: int) -> int:
    return max(1, max_samples // (g.max_dim * max(1, batch)))


def joseph_forward(xs, xe, g: _GridConsts, img: torch.Tensor, max_samples: int = _DEFAULT_MAX_SAMPLES):
    """Line integrals: img (B, n_vox) -> (B, N)."""
    b = img.shape[0]
    vol = img.t().contiguous()                              # (n_vox, B): one gather per sample
    out = torch.zeros(xs.shape[0], b, dtype=img.dtype, device=img.device)
    step = _chunk_size(g, b, max_samples)
    for c0 in range(0, xs.shape[0], step):
        ids, idx, w = joseph_samples(xs[c0:c0 + step], xe[c0:c0 + step], g)
        if ids.numel() == 0:
            continue
        vals = vol.index_select(0, idx.reshape(-1)).view(idx.shape[0], 4, b)
        contrib = (vals * w.to(img.dtype).unsqueeze(-1)).sum(1)
        out[c0:c0 + step].index_add_(0, ids, contrib)
    return out.t()


def joseph_adjoint(xs, xe, g: _GridConsts, y: torch.Tensor, max_samples: int = _DEFAULT_MAX_SAMPLES):
    """Back projection: y (B, N) -> (B, n_vox), the exact transpose of :func:`joseph_forward`."""
    b = y.shape[0]
    lors = y.t().contiguous()                               # (N, B)
    vol = torch.zeros(g.n_vox, b, dtype=y.dtype, device=y.device)
    step = _chunk_size(g, b, max_samples)
    for c0 in range(0, xs.shape[0], step):
        ids, idx, w = joseph_samples(xs[c0:c0 + step], xe[c0:c0 + step], g)
        if ids.numel() == 0:
            continue
        contrib = lors[c0:c0 + step].index_select(0, ids)   # (S, B)
        vals = contrib.unsqueeze(1) * w.to(y.dtype).unsqueeze(-1)
        vol.index_add_(0, idx.reshape(-1), vals.reshape(-1, b))
    return vol.t()


class _Endpoints:
    """LOR endpoints (float64) with cached copies per device."""

    def __init__(self, xs: torch.Tensor, xe: torch.Tensor, grid: ImageGrid):
        self.grid = grid
        self._by_device: dict[str, tuple] = {}
        self._base = (xs, xe)
        self.move(xs.device)

    def move(self, device) -> None:
        device = torch.device(device)
        xs, xe = self._base
        self._base = (xs.to(device), xe.to(device))
        self._by_device = {str(device): (self._base[0], self._base[1], _GridConsts(self.grid, device))}

    def on(self, device):
        key = str(device)
        v = self._by_device.get(key)
        if v is None:
            v = (self._base[0].to(device), self._base[1].to(device), _GridConsts(self.grid, device))
            self._by_device[key] = v
        return v


def _check_endpoints(xstart, xend) -> tuple[torch.Tensor, torch.Tensor]:
    xs = torch.as_tensor(xstart.detach().cpu() if isinstance(xstart, torch.Tensor) else np.asarray(xstart),
                         dtype=torch.float64)
    xe = torch.as_tensor(xend.detach().cpu() if isinstance(xend, torch.Tensor) else np.asarray(xend),
                         dtype=torch.float64)
    if xs.dim() != 2 or xs.shape[-1] != 3 or xs.shape != xe.shape:
        raise ValueError(
            f"xstart and xend must both have shape (n_events, 3) with (z, y, x) mm coordinates; got "
            f"{tuple(xs.shape)} and {tuple(xe.shape)}"
        )
    if xs.shape[0] == 0:
        raise ValueError("no events: xstart/xend are empty")
    if not bool(torch.isfinite(xs).all() & torch.isfinite(xe).all()):
        raise ValueError("xstart/xend contain NaN or infinite coordinates")
    zero = torch.linalg.vector_norm(xe - xs, dim=1) == 0
    if bool(zero.any()):
        raise ValueError(f"{int(zero.sum())} event(s) have xstart == xend (zero-length LOR); drop them first")
    return xs, xe


class MatrixFreeJosephProjector(Projector):
    """Sinogram projector for any geometry (oblique planes included), computed on the fly."""

    backend = "matrix-free"

    def __init__(self, geometry: Geometry, grid: ImageGrid, views=None, dtype=torch.float32, device=None,
                 max_samples: int = _DEFAULT_MAX_SAMPLES):
        super().__init__(geometry, grid, views=views, dtype=dtype, device=device)
        geometry.check_grid(grid)
        xs, xe = geometry.lor_endpoints(None if self.views is None else self.views.numpy())
        self._ends = _Endpoints(xs.reshape(-1, 3), xe.reshape(-1, 3), grid)
        self._ends.move(self._device)
        self.max_samples = int(max_samples)

    def _apply(self, x):
        xs, xe, g = self._ends.on(x.device)
        y = joseph_forward(xs, xe, g, x.reshape(x.shape[0], -1), self.max_samples)
        return y.reshape((x.shape[0],) + self.out_shape)

    def _adjoint(self, y):
        xs, xe, g = self._ends.on(y.device)
        x = joseph_adjoint(xs, xe, g, y.reshape(y.shape[0], -1), self.max_samples)
        return x.reshape((y.shape[0],) + self.in_shape)

    def _subset(self, abs_views):
        return MatrixFreeJosephProjector(self.geometry, self.grid, views=abs_views, dtype=self._dtype,
                                         device=self._device, max_samples=self.max_samples)

    def _to(self, device):
        self._ends.move(device)


class ListmodeProjector(LinearOperator):
    """List-mode projector: image -> (n_events,) line integrals (mm) along each event's LOR.

    ``xstart``/``xend``: (n_events, 3) LOR endpoints in mm, (z, y, x) order (numpy or torch).
    """

    def __init__(self, xstart, xend, grid: ImageGrid, device=None, dtype=torch.float32,
                 max_samples: int = _DEFAULT_MAX_SAMPLES):
        if not isinstance(grid, ImageGrid):
            raise ValueError(f"grid must be an ImageGrid; got {type(grid).__name__}")
        xs, xe = _check_endpoints(xstart, xend)
        super().__init__(grid.shape, (xs.shape[0],))
        self.grid = grid
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._dtype = dtype
        self._ends = _Endpoints(xs, xe, grid)
        self._ends.move(self._device)
        self.max_samples = int(max_samples)

    @property
    def n_events(self) -> int:
        return self.out_shape[0]

    @property
    def device(self):
        return self._device

    @property
    def dtype(self):
        return self._dtype

    def _apply(self, x):
        xs, xe, g = self._ends.on(x.device)
        return joseph_forward(xs, xe, g, x.reshape(x.shape[0], -1), self.max_samples)

    def _adjoint(self, y):
        xs, xe, g = self._ends.on(y.device)
        x = joseph_adjoint(xs, xe, g, y, self.max_samples)
        return x.reshape((y.shape[0],) + self.in_shape)

    def subset(self, event_idx) -> "ListmodeProjector":
        """Projector for a subset of the events (e.g. list-mode OSEM)."""
        idx = torch.as_tensor(event_idx, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= self.n_events:
            raise ValueError(f"event indices must lie in [0, {self.n_events - 1}] and not be empty")
        xs, xe = self._ends._base
        return ListmodeProjector(xs.cpu()[idx], xe.cpu()[idx], self.grid, device=self._device, dtype=self._dtype,
                                 max_samples=self.max_samples)

    def to(self, device) -> "ListmodeProjector":
        self._device = torch.device(device)
        self._ends.move(self._device)
        return self
