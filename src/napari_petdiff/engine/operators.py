"""Linear operators on torch tensors (projectors, PSF, sinogram scalings) and their algebra.

Every operator maps arrays of shape ``(*batch, *in_shape)`` to ``(*batch, *out_shape)``; leading
batch dimensions are optional. ``op(x)`` (and ``op.apply(x)`` on tensors that require grad) runs
through a :class:`torch.autograd.Function` whose backward is the exact adjoint, so operators can be
used inside losses without autograd tracing their internals.

Operators adapt to the device and floating dtype of their input: fixed arrays they hold (factors,
kernels, matrices) are converted on first use and the converted copy is cached.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np
import torch

from .grid import ImageGrid

__all__ = [
    "LinearOperator", "ComposedOperator", "AdjointOperator", "SinogramScaling", "GaussianPSF",
    "attenuation_factors",
]


def _shape_str(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


class _CastCache:
    """A fixed tensor plus cached copies on other devices / dtypes."""

    def __init__(self, tensor: torch.Tensor):
        self.base = tensor
        self._copies: dict[tuple, torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        if self.base.device == x.device and self.base.dtype == x.dtype:
            return self.base
        key = (str(x.device), x.dtype)
        t = self._copies.get(key)
        if t is None:
            t = self.base.to(device=x.device, dtype=x.dtype)
            self._copies[key] = t
        return t


class _OperatorFunction(torch.autograd.Function):
    """y = A x with backward A^T g (itself differentiable: it goes through A.T)."""

    @staticmethod
    def forward(ctx, x, op):
        ctx.op = op
        return op._apply_batched(x)

    @staticmethod
    def backward(ctx, grad_out):
        return ctx.op.T(grad_out), None


class LinearOperator(ABC):
    """Base class: subclasses set ``in_shape``/``out_shape`` and implement ``_apply``/``_adjoint``.

    ``_apply`` and ``_adjoint`` receive a tensor with exactly ONE leading batch dimension
    ``(B, *in_shape)`` (resp. ``(B, *out_shape)``); the base class handles any batch shape.
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int]):
        self.in_shape = tuple(int(s) for s in in_shape)
        self.out_shape = tuple(int(s) for s in out_shape)

    # --- to implement ----------------------------------------------------------------------------
    @abstractmethod
    def _apply(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    @property
    def device(self) -> torch.device | None:
        """Device of the operator's stored data (None: holds none, works anywhere)."""
        return None

    @property
    def dtype(self) -> torch.dtype:
        return torch.get_default_dtype()

    @property
    def name(self) -> str:
        return type(self).__name__

    def to(self, device) -> "LinearOperator":
        """Move stored data to ``device`` (in place) and return self; inputs elsewhere still work."""
        return self

    # --- shape handling ---------------------------------------------------------------------------
    def _check(self, x, shape: tuple[int, ...], what: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"{self.name}: the {what} must be a torch.Tensor; got {type(x).__name__} "
                "(convert with torch.as_tensor(array, dtype=torch.float32))"
            )
        if not (x.is_floating_point() or x.is_complex()):
            raise ValueError(f"{self.name}: the {what} must have a floating dtype; got {x.dtype} (use x.float())")
        n = len(shape)
        if x.dim() < n or tuple(x.shape[x.dim() - n:]) != shape:
            hint = ""
            if len(shape) == 3 and shape[0] == 1 and tuple(x.shape[-2:]) == shape[1:]:
                hint = " A 2-D image has shape (1, ny, nx): add the z axis with x[..., None, :, :]."
            raise ValueError(
                f"{self.name}: expected {what} of shape (*batch, {_shape_str(shape)[1:-1]}); "
                f"got {_shape_str(tuple(x.shape))}.{hint}"
            )
        return x

    def _apply_batched(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[: x.dim() - len(self.in_shape)]
        out = self._apply(x.reshape((-1,) + self.in_shape))
        return out.reshape(tuple(batch) + self.out_shape)

    def _adjoint_batched(self, y: torch.Tensor) -> torch.Tensor:
        batch = y.shape[: y.dim() - len(self.out_shape)]
        out = self._adjoint(y.reshape((-1,) + self.out_shape))
        return out.reshape(tuple(batch) + self.in_shape)

    # --- public API -------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A x for x of shape (*batch, *in_shape)."""
        self._check(x, self.in_shape, "input")
        if torch.is_grad_enabled() and x.requires_grad:
            return _OperatorFunction.apply(x, self)
        return self._apply_batched(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """A^T y for y of shape (*batch, *out_shape)."""
        return self.T.apply(y)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x, self.in_shape, "input")
        return _OperatorFunction.apply(x, self)

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ComposedOperator(self, other)
        if isinstance(other, torch.Tensor):
            return self(other)
        return NotImplemented

    @property
    def T(self) -> "LinearOperator":
        return AdjointOperator(self)

    def adjointness_test(self, dtype: torch.dtype = torch.float64, seed: int = 0, device=None) -> float:
        """Relative error |<Ax, y> - <x, A^T y>| / |<Ax, y>| for random Gaussian x, y."""
        device = torch.device(device) if device is not None else (self.device or torch.device("cpu"))
        g = torch.Generator().manual_seed(int(seed))
        x = torch.randn(self.in_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        y = torch.randn(self.out_shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        with torch.no_grad():
            lhs = float(torch.sum(self.apply(x).double() * y.double()))
            rhs = float(torch.sum(x.double() * self.adjoint(y).double()))
        return abs(lhs - rhs) / max(abs(lhs), 1e-300)

    def norm(self, n_iter: int = 30, seed: int = 0) -> float:
        """Largest singular value ||A||_2, by power iteration on A^T A."""
        device = self.device or torch.device("cpu")
        g = torch.Generator().manual_seed(int(seed))
        x = torch.rand(self.in_shape, generator=g, dtype=torch.float64).to(device=device, dtype=self.dtype)
        x = x / torch.linalg.vector_norm(x)
        s = 0.0
        with torch.no_grad():
            for _ in range(int(n_iter)):
                z = self.adjoint(self.apply(x))
                nz = float(torch.linalg.vector_norm(z))
                if nz == 0.0:
                    return 0.0
                s = math.sqrt(nz)
                x = z / nz
        return s

    def __repr__(self) -> str:
        return f"{self.name}({_shape_str(self.in_shape)} -> {_shape_str(self.out_shape)})"


class ComposedOperator(LinearOperator):
    """(A @ B) x = A (B x)."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator):
        if tuple(inner.out_shape) != tuple(outer.in_shape):
            raise ValueError(
                f"cannot compose {outer!r} @ {inner!r}: the inner operator produces {_shape_str(inner.out_shape)} "
                f"but the outer one expects {_shape_str(outer.in_shape)}"
            )
        super().__init__(inner.in_shape, outer.out_shape)
        self.outer, self.inner = outer, inner

    def _apply(self, x):
        return self.outer._apply_batched(self.inner._apply_batched(x))

    def _adjoint(self, y):
        return self.inner._adjoint_batched(self.outer._adjoint_batched(y))

    @property
    def device(self):
        return self.inner.device or self.outer.device

    def to(self, device) -> "ComposedOperator":
        self.outer.to(device)
        self.inner.to(device)
        return self

    @property
    def dtype(self):
        return self.inner.dtype

    def subset(self, view_idx) -> "LinearOperator":
        """Restrict the sinogram side to the given views (outer must support subset)."""
        if not hasattr(self.outer, "subset"):
            raise ValueError(f"{self.outer!r} has no view subsets, so {self!r} cannot be restricted to views")
        inner = self.inner.subset(view_idx) if hasattr(self.inner, "subset") else self.inner
        return ComposedOperator(self.outer.subset(view_idx), inner)

    def __repr__(self):
        return f"{self.outer!r} @ {self.inner!r}"


class AdjointOperator(LinearOperator):
    """The adjoint A^T of an operator, as an operator."""

    def __init__(self, op: LinearOperator):
        super().__init__(op.out_shape, op.in_shape)
        self.op = op

    def _apply(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._apply(y)

    @property
    def T(self):
        return self.op

    @property
    def name(self) -> str:
        return f"{self.op.name} adjoint"

    def to(self, device) -> "AdjointOperator":
        self.op.to(device)
        return self

    @property
    def device(self):
        return self.op.device

    @property
    def dtype(self):
        return self.op.dtype

    def __repr__(self):
        return f"{self.op!r}.T"


def _as_tensor(a, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(a))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{what} must be an array of numbers; got {type(a).__name__}") from exc
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or infinite values; replace them (e.g. torch.nan_to_num) first")
    return t


class SinogramScaling(LinearOperator):
    """Elementwise multiplication by fixed factors (normalisation, attenuation factors...).

    ``factors`` has the sinogram shape (n_planes, n_views, n_radial) (any shape is accepted; view
    subsets need that 3-D layout). Self-adjoint.
    """

    def __init__(self, factors):
        f = _as_tensor(factors, "SinogramScaling factors")
        if f.dim() < 1:
            raise ValueError("SinogramScaling factors must have at least one dimension (a sinogram-shaped array)")
        super().__init__(f.shape, f.shape)
        self.factors = f
        self._cast = _CastCache(f)

    def _apply(self, x):
        return x * self._cast.like(x)

    def _adjoint(self, y):
        return y * self._cast.like(y)

    @property
    def device(self):
        return self.factors.device

    @property
    def dtype(self):
        return self.factors.dtype

    def to(self, device) -> "SinogramScaling":
        self.factors = self.factors.to(device)
        self._cast = _CastCache(self.factors)
        return self

    def subset(self, view_idx) -> "SinogramScaling":
        if self.factors.dim() != 3:
            raise ValueError(
                f"view subsets need factors of shape (n_planes, n_views, n_radial); these have {tuple(self.factors.shape)}"
            )
        from .geometry import _as_view_index
        idx = torch.as_tensor(_as_view_index(view_idx, self.factors.shape[1]), device=self.factors.device)
        return SinogramScaling(self.factors.index_select(1, idx))


class GaussianPSF(LinearOperator):
    """Image-space Gaussian blur with per-axis FWHM in mm (z, y, x); separable and self-adjoint.

    The 1-D kernels are Gaussians sampled at the voxel centres out to 4 sigma and normalised to sum 1;
    borders are zero padded (so the operator is a symmetric matrix, i.e. self-adjoint). FWHM 0 along an
    axis, or an axis of length 1 (a 2-D image's z), leaves that axis untouched.
    """

    def __init__(self, grid: ImageGrid, fwhm_mm):
        if not isinstance(grid, ImageGrid):
            raise ValueError(f"GaussianPSF needs an ImageGrid; got {type(grid).__name__}")
        f = np.broadcast_to(np.asarray(fwhm_mm, dtype=np.float64), (3,)) if np.ndim(fwhm_mm) == 0 else \
            np.asarray(fwhm_mm, dtype=np.float64)
        if f.shape != (3,) or not np.all(np.isfinite(f)) or np.any(f < 0):
            raise ValueError(f"fwhm_mm must be one or three non-negative mm values (z, y, x); got {fwhm_mm!r}")
        super().__init__(grid.shape, grid.shape)
        self.grid = grid
        self.fwhm_mm = tuple(float(v) for v in f)
        self._kernels: list[tuple[int, _CastCache] | None] = []
        for axis in range(3):
            n, v = grid.shape[axis], grid.voxel_size[axis]
            if self.fwhm_mm[axis] == 0.0 or n == 1:
                self._kernels.append(None)
                continue
            sigma = self.fwhm_mm[axis] / (2.0 * math.sqrt(2.0 * math.log(2.0))) / v
            r = max(1, int(math.ceil(4.0 * sigma)))
            k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
            k /= k.sum()
            r_eff = min(r, n - 1)  # taps beyond n-1 never pair two voxels of the image
            k = k[r - r_eff: r + r_eff + 1]
            self._kernels.append((r_eff, _CastCache(torch.from_numpy(k.copy()))))

    def _blur(self, x):
        for axis, spec in enumerate(self._kernels):
            if spec is None:
                continue
            r, kc = spec
            k = kc.like(x)
            dim = axis + 1
            xt = x.movedim(dim, -1)
            shp = xt.shape
            out = torch.nn.functional.conv1d(xt.reshape(-1, 1, shp[-1]), k.view(1, 1, -1), padding=r)
            x = out.reshape(shp).movedim(-1, dim)
        return x.contiguous()

    def to(self, device) -> "GaussianPSF":
        self._kernels = [None if k is None else (k[0], _CastCache(k[1].base.to(device))) for k in self._kernels]
        return self

    def _apply(self, x):
        return self._blur(x)

    def _adjoint(self, y):
        return self._blur(y)

    def __repr__(self):
        return f"GaussianPSF(fwhm_mm={self.fwhm_mm}, shape={self.in_shape})"


def attenuation_factors(projector: LinearOperator, mu) -> torch.Tensor:
    """Attenuation factors exp(-P mu) for an attenuation map ``mu`` in 1/mm (water ~0.0096 /mm).

    ``mu`` has the projector's image shape (optionally batched); returns the sinogram-shaped factors.
    """
    if not isinstance(projector, LinearOperator):
        raise ValueError(f"attenuation_factors needs a projector (LinearOperator); got {type(projector).__name__}")
    m = mu if isinstance(mu, torch.Tensor) else torch.as_tensor(np.asarray(mu, dtype=np.float32))
    if not m.is_floating_point():
        m = m.float()
    if not bool(torch.isfinite(m).all()):
        raise ValueError("the attenuation map contains NaN or infinite values")
    mn = float(m.min()) if m.numel() else 0.0
    if mn < 0:
        raise ValueError(
            f"the attenuation map has negative values (min {mn:.3g} /mm); attenuation coefficients are >= 0 "
            "(clamp interpolation undershoots with mu.clamp_min(0))"
        )
    with torch.no_grad():
        return torch.exp(-projector.apply(m))
