import math

import numpy as np
import pytest
import torch

from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.operators import (AdjointOperator, ComposedOperator, GaussianPSF, LinearOperator,
                                             SinogramScaling, attenuation_factors)


class Dense(LinearOperator):
    """A small dense matrix acting on arrays of shape in_shape (test helper)."""

    def __init__(self, m: torch.Tensor, in_shape, out_shape):
        super().__init__(in_shape, out_shape)
        self.m = m

    def _apply(self, x):
        return (x.reshape(x.shape[0], -1) @ self.m.T.to(x.dtype)).reshape((x.shape[0],) + self.out_shape)

    def _adjoint(self, y):
        return (y.reshape(y.shape[0], -1) @ self.m.to(y.dtype)).reshape((y.shape[0],) + self.in_shape)


class BrokenAdjoint(Dense):
    def _adjoint(self, y):
        return super()._adjoint(y) * 1.01


def dense(seed=0, in_shape=(2, 3), out_shape=(4,)):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(int(np.prod(out_shape)), int(np.prod(in_shape)), generator=g, dtype=torch.float64)
    return Dense(m, in_shape, out_shape)


def test_adjointness_test_detects_a_wrong_adjoint():
    assert dense().adjointness_test() < 1e-12
    assert BrokenAdjoint(dense().m, (2, 3), (4,)).adjointness_test() > 1e-3


def test_norm_matches_largest_singular_value():
    op = dense(in_shape=(5,), out_shape=(7,))
    assert op.norm(n_iter=200) == pytest.approx(float(torch.linalg.matrix_norm(op.m, ord=2)), rel=1e-4)


def test_batch_dimensions():
    op = dense()
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64)
    y = op.apply(x)
    assert y.shape == (2, 5, 4)
    torch.testing.assert_close(y[1, 3], op.apply(x[1, 3]))
    z = op.adjoint(y)
    assert z.shape == x.shape
    torch.testing.assert_close(z[0, 2], op.adjoint(y[0, 2]))


def test_shape_errors_name_expected_and_got():
    op = dense()
    with pytest.raises(ValueError, match=r"expected input of shape \(\*batch, 2, 3\); got \(3, 2\)"):
        op.apply(torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\*batch, 4\)"):
        op.adjoint(torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.Tensor"):
        op.apply(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="floating"):
        op.apply(torch.zeros(2, 3, dtype=torch.long))
    img_op = Dense(torch.eye(16, dtype=torch.float64), (1, 4, 4), (1, 4, 4))
    with pytest.raises(ValueError, match=r"\(1, ny, nx\)"):
        img_op.apply(torch.zeros(4, 4, dtype=torch.float64))


def test_composition_transpose_and_errors():
    a, b = dense(1, (4,), (3,)), dense(2, (2, 3), (4,))
    ab = a @ b
    assert isinstance(ab, ComposedOperator) and ab.in_shape == (2, 3) and ab.out_shape == (3,)
    x = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(ab.apply(x), a.apply(b.apply(x)))
    assert ab.adjointness_test() < 1e-12
    assert isinstance(ab.T, AdjointOperator) and ab.T.T is ab
    y = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(ab.T.apply(y), ab.adjoint(y))
    torch.testing.assert_close(a @ y.new_ones(4), a(y.new_ones(4)))
    with pytest.raises(ValueError, match="cannot compose"):
        b @ a


def test_autograd_backward_is_adjoint():
    op = dense(3)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64)
    (op(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, op.adjoint(w))
    # apply() on a tensor that requires grad also goes through the adjoint
    x2 = x.detach().clone().requires_grad_(True)
    (op.apply(x2) * w).sum().backward()
    torch.testing.assert_close(x2.grad, op.adjoint(w))
    # and the backward itself is differentiable (double backward = gradcheck of the Function)
    xs = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t), (xs,))
    assert torch.autograd.gradgradcheck(lambda t: (op(t) ** 2), (xs,))


def test_sinogram_scaling():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(2, 6, 5, generator=g, dtype=torch.float64) + 0.5
    s = SinogramScaling(f)
    y = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    torch.testing.assert_close(s.apply(y), y * f)
    assert s.adjointness_test() < 1e-12
    assert s.norm(n_iter=300) == pytest.approx(float(f.max()), rel=1e-3)
    sub = s.subset(torch.tensor([4, 1]))
    assert sub.in_shape == (2, 2, 5)
    torch.testing.assert_close(sub.apply(y[:, :, [4, 1]]), y[:, :, [4, 1]] * f[:, [4, 1]])
    # float32 factors applied to float64 data keep float64
    s32 = SinogramScaling(f.float())
    assert s32.apply(y).dtype == torch.float64
    with pytest.raises(ValueError, match="NaN"):
        SinogramScaling(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="n_planes, n_views, n_radial"):
        SinogramScaling(torch.ones(5)).subset([0])


def _delta(shape, pos):
    x = torch.zeros((1,) + shape, dtype=torch.float64)
    x[(0,) + pos] = 1.0
    return x


def test_gaussian_psf_width_mass_and_identity_axes():
    grid = ImageGrid((9, 41, 41), (3.0, 2.0, 1.0))
    psf = GaussianPSF(grid, (0.0, 6.0, 4.0))
    out = psf.apply(_delta(grid.shape, (4, 20, 20)))[0]
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-9)        # interior: mass kept
    assert torch.count_nonzero(out.sum((1, 2))) == 1                  # fwhm 0 along z: untouched
    for axis, fwhm, v in ((1, 6.0, 2.0), (2, 4.0, 1.0)):
        prof = out.sum(tuple(a for a in (0, 1, 2) if a != axis)).numpy()
        pos = (np.arange(prof.size) - 20) * v
        sigma = math.sqrt((prof * pos ** 2).sum() / prof.sum())
        assert sigma == pytest.approx(fwhm / 2.3548, rel=0.02)
    # a 2-D image's length-1 z axis is left alone even with a z FWHM
    g2 = ImageGrid((1, 16, 16), (2.0, 2.0, 2.0))
    x = torch.rand(1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(GaussianPSF(g2, (5.0, 0.0, 0.0)).apply(x), x)
    torch.testing.assert_close(GaussianPSF(g2, 0.0).apply(x), x)


def test_gaussian_psf_is_symmetric_matrix_with_zero_padding():
    grid = ImageGrid((3, 5, 4), (2.0, 1.5, 1.0))
    psf = GaussianPSF(grid, (4.0, 3.0, 2.5))
    eye = torch.eye(grid.n_voxels, dtype=torch.float64).reshape((-1,) + grid.shape)
    m = psf.apply(eye).reshape(grid.n_voxels, grid.n_voxels)
    torch.testing.assert_close(m, m.T)
    assert psf.adjointness_test() < 1e-12
    assert float(m.sum(1).max()) <= 1.0 + 1e-12 and float(m.sum(1).min()) < 0.99   # border loses mass
    with pytest.raises(ValueError, match="fwhm_mm"):
        GaussianPSF(grid, (-1.0, 0.0, 0.0))
    assert psf.to("cpu") is psf and psf.adjointness_test() < 1e-12


def test_attenuation_factors():
    op = dense(4, (2, 3), (4,))
    mu = torch.rand(2, 3, dtype=torch.float64) * 0.01
    torch.testing.assert_close(attenuation_factors(op, mu), torch.exp(-op.apply(mu)))
    with pytest.raises(ValueError, match="negative"):
        attenuation_factors(op, -mu - 0.1)
