import pytest
import torch

from napari_petdiff.engine.rdp import RDP


@pytest.mark.parametrize("is2d,shape,vs", [(True, (1, 12, 10), (2.0, 2.0, 2.0)), (False, (5, 8, 7), (3.0, 2.0, 1.5))])
def test_rdp_gradient_matches_autograd(is2d, shape, vs):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.1).requires_grad_()
    rdp = RDP(vs, gamma=2.0, is_2d=is2d)
    rdp.value(x).backward()
    torch.testing.assert_close(rdp.gradient(x.detach()), x.grad, rtol=1e-6, atol=1e-9)


def test_rdp_axial_only_gradient_and_constant_image():
    x = (torch.rand(6, 5, 5, dtype=torch.float64) + 0.5).requires_grad_()
    rdp = RDP((2.0, 2.0, 2.0), axial_only=True, is_2d=False)
    rdp.value(x).backward()
    torch.testing.assert_close(rdp.gradient(x.detach()), x.grad)
    assert float(RDP().value(torch.full((1, 9, 9), 3.0))) == 0.0


def test_rdp_is_edge_preserving_vs_quadratic():
    # doubling a jump grows RDP sub-quadratically (gamma > 0): less penalty on edges
    rdp = RDP(gamma=2.0)
    base = torch.ones(1, 8, 8)
    a = base.clone(); a[..., 4:] = 2.0
    b = base.clone(); b[..., 4:] = 3.0
    assert float(rdp.value(b)) < 4 * float(rdp.value(a))


def test_rdp_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        RDP(gamma=-1)
