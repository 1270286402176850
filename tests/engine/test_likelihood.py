import numpy as np
import pytest
import torch

from napari_petdiff.engine.likelihood import PoissonLikelihood, herman_meyer_order


def test_herman_meyer_is_a_permutation_and_spreads_subsets():
    order = herman_meyer_order(28)
    assert sorted(order) == list(range(28))
    assert order[:4] == [0, 14, 7, 21]
    assert herman_meyer_order(1) == [0]
    with pytest.raises(ValueError):
        herman_meyer_order(0)


def test_mlem_likelihood_never_decreases(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.uniform_image()
    vals = [float(lik.value(x))]
    for _ in range(30):
        x = lik.em_step(x)
        vals.append(float(lik.value(x)))
    diffs = np.diff(vals)
    assert (diffs >= -1e-6 * abs(vals[-1])).all()
    assert vals[-1] > vals[0]


def test_em_step_equals_preconditioned_gradient_step(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.uniform_image() * torch.rand(lik.image_shape, generator=torch.Generator().manual_seed(0)) + 0.1
    x = lik.mask(x)
    em = lik.em_step(x)
    pg = lik.mask(x + x / lik.sensitivity.clamp_min(1e-12) * lik.gradient(x))
    torch.testing.assert_close(em, pg, rtol=1e-4, atol=1e-5 * float(em.max()))


def test_gradient_matches_autograd(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.mask(lik.uniform_image() * 1.3).double()
    # finite differences along a random direction, float64 on a masked direction
    d = lik.mask(torch.randn(lik.image_shape, generator=torch.Generator().manual_seed(2))).double()
    g = lik.gradient(x.float()).double()
    h = 1e-3 * float(x.max())
    fd = (float(lik.value((x + h * d).float())) - float(lik.value((x - h * d).float()))) / (2 * h)
    assert fd == pytest.approx(float((g * d).sum()), rel=2e-2)


def test_osem_one_subset_equals_mlem(small_acq):
    lik1 = PoissonLikelihood(small_acq.acquisition, 1)
    x = lik1.uniform_image()
    torch.testing.assert_close(lik1.em_step(x, 0), lik1.em_step(x))


def test_subset_sensitivities_sum_to_full(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition, 4)
    total = sum(p.sens for p in lik._parts)
    torch.testing.assert_close(total, lik.sensitivity, rtol=1e-4, atol=1e-4 * float(lik.sensitivity.max()))


def test_em_prox_solves_its_subproblem(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.mask(lik.uniform_image() * 1.1)
    z = lik.mask(small_acq.truth.clone())
    for rho in (1e-3, 1.0, 50.0):
        xp = lik.em_prox(x, z, rho)
        x_em, s = lik.em_step(x), lik.sensitivity
        inside = lik.fov & (xp > 1e-6)
        # KKT of max sum s (x_em log x - x) - rho/2 (x - z)^2 : s x_em / x - s - rho (x - z) = 0
        kkt = s * x_em / xp.clamp_min(1e-12) - s - rho * (xp - z)
        assert float(kkt[inside].abs().max()) < 1e-3 * float(s.max())
    torch.testing.assert_close(lik.em_prox(x, z, 0.0), lik.em_step(x))
    with pytest.raises(ValueError, match="rho"):
        lik.em_prox(x, z, -1.0)


def test_line_search_hits_target(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.uniform_image()
    d = lik.em_direction(x)
    v0 = float(lik.value(x))
    v1 = float(lik.value(lik.em_step(x)))
    target = v0 + 0.5 * (v1 - v0)
    alpha, val, reached = lik.line_search_to_target(x, d, target, alpha_max=1.0)
    assert bool(reached)
    assert 0 < float(alpha) < 1
    assert float(lik.value(x + float(alpha) * d)) == pytest.approx(target, rel=1e-7, abs=1e-6 * abs(target))


def test_line_search_batched_and_unreachable(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.uniform_image((2,))
    d = lik.em_direction(x)
    v1 = float(lik.value(lik.em_step(x[0])))
    far = v1 + 1e9
    alpha, val, reached = lik.line_search_to_target(x, d, torch.tensor([v1, far], dtype=torch.float64), 1.0)
    assert bool(reached[0]) and not bool(reached[1])
    assert float(alpha[1]) > 0


def test_value_batched_matches_single(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition)
    x = lik.uniform_image()
    xb = torch.stack([x, 2 * x])
    v = lik.value(xb)
    assert v.shape == (2,)
    assert float(v[1]) == pytest.approx(float(lik.value(2 * x)), rel=1e-9)


def test_bad_inputs(small_acq):
    with pytest.raises(ValueError, match="n_subsets"):
        PoissonLikelihood(small_acq.acquisition, 10_000)
    lik = PoissonLikelihood(small_acq.acquisition)
    with pytest.raises(ValueError, match="grid"):
        lik.value(torch.ones(1, 16, 16))
