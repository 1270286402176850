"""Diffusion-prior Patlak (RED-diff, HQS) with the tiny test prior, and direct nested EM."""
import numpy as np
import pytest
import torch

from napari_petdiff.engine import reconstruct
from napari_petdiff.engine.kinetics.direct import NestedEM
from napari_petdiff.engine.kinetics.frames import FrameModel
from napari_petdiff.engine.kinetics.patlak import patlak_setup
from napari_petdiff.engine.metrics import nrmse
from napari_petdiff.engine.samplers import core

from .test_kinetics import tiny_dynamic


@pytest.fixture
def use_tiny(tiny_prior, monkeypatch):
    monkeypatch.setitem(core._PRIOR_CACHE, ("tiny", "cpu"), tiny_prior)


@pytest.fixture(scope="module")
def noisy():
    return tiny_dynamic(counts=3e5, seed=3)


def test_red_diff_and_hqs_beat_voxelwise_ls(use_tiny, noisy):
    sim, mask = noisy
    ls = reconstruct(sim.acquisition, "patlak-ls")
    e_ls = nrmse(ls.mean, sim.ki, mask)
    red = reconstruct(sim.acquisition, "patlak-red-diff", prior="tiny", steps=20)
    hqs = reconstruct(sim.acquisition, "patlak-hqs", prior="tiny", steps=8, samples=2)
    e_red, e_hqs = nrmse(red.mean, sim.ki, mask), nrmse(hqs.mean, sim.ki, mask)
    assert e_red < 0.8 * e_ls, (e_red, e_ls)
    assert e_hqs < 0.8 * e_ls, (e_hqs, e_ls)
    for r in (red, hqs):
        assert torch.isfinite(r.mean).all() and (r.mean >= 0).all()
        assert r.extra["intercept"].shape == sim.ki.shape
        assert r.metadata["t_star_min"] == 30.0 and r.metadata["map_scales"]["ki"] > 0
    assert "ki_std" in hqs.extra and float(hqs.extra["ki_std"][torch.as_tensor(mask)].mean()) > 0
    assert hqs.samples.shape == (2, *sim.ki.shape)
    # a zero prior weight leaves the (positive part of the) voxel-wise WLS fit
    hqs0 = reconstruct(sim.acquisition, "patlak-hqs", prior="tiny", steps=2, weight=0.0)
    wls = reconstruct(sim.acquisition, "patlak-wls")
    torch.testing.assert_close(hqs0.mean, wls.mean.clamp_min(0), rtol=1e-3, atol=1e-6)


def test_direct_nested_em_increases_dynamic_likelihood(noisy):
    sim, mask = noisy
    res = reconstruct(sim.acquisition, "patlak-direct", prior="none", subsets=1, iterations=8, inner=3)
    trace = np.asarray(res.likelihood)
    assert trace.size == 9
    assert np.all(np.diff(trace) >= -1e-7 * np.abs(trace).max()), np.diff(trace)
    assert trace[-1] > trace[0]
    # the same value from the model directly
    setup = patlak_setup(sim.acquisition, 30.0)
    model = FrameModel(sim.acquisition, setup.index)
    nem = NestedEM(model, setup.design * (setup.calibration * setup.decay_int_s)[:, None])
    theta = torch.stack([res.mean, res.extra["intercept"]])
    assert nem.value(theta) == pytest.approx(trace[-1], rel=1e-6)


def test_direct_with_prior(use_tiny, noisy):
    sim, mask = noisy
    ls = reconstruct(sim.acquisition, "patlak-ls")
    res = reconstruct(sim.acquisition, "patlak-direct", prior="tiny", iterations=8)
    assert torch.isfinite(res.mean).all()
    assert nrmse(res.mean, sim.ki, mask) < nrmse(ls.mean, sim.ki, mask)
    assert res.metadata["units"]["ki"].startswith("1/min")


def test_prior_must_fit_the_grid(use_tiny):
    from napari_petdiff.engine.diffusion.prior import ScorePrior

    sim, _ = tiny_dynamic(counts=1e5)
    small = ScorePrior(core._PRIOR_CACHE[("tiny", "cpu")].net, name="tiny16", image_size=16)
    core._PRIOR_CACHE[("tiny16", "cpu")] = small
    try:
        with pytest.raises(ValueError, match="does not fit prior"):
            reconstruct(sim.acquisition, "patlak-hqs", prior="tiny16", steps=2)
        with pytest.raises(ValueError, match=">= 3 frames"):
            reconstruct(sim.acquisition, "patlak-red-diff", prior="tiny", t_star=50.0)
    finally:
        core._PRIOR_CACHE.pop(("tiny16", "cpu"), None)


def test_three_d_slice_wise(use_tiny):
    from napari_petdiff.engine.geometry import ParallelBeamGeometry
    from napari_petdiff.engine.grid import ImageGrid
    from napari_petdiff.engine.kinetics.compartment import kinetic_set
    from napari_petdiff.engine.kinetics.simulate import frame_schedule, simulate_dynamic

    from .test_kinetics import tiny_fractions

    fr, mask = tiny_fractions()
    fr3 = {k: np.repeat(v, 3, axis=0) for k, v in fr.items()}
    grid = ImageGrid((3, 32, 32), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=24, n_radial=47, radial_spacing_mm=1.6, n_planes=3)
    sim = simulate_dynamic(fr3, grid, geom, None, kinetics=kinetic_set(), frames=frame_schedule(start_min=30),
                           counts=6e5, seed=4)
    for method, kw in (("patlak-hqs", {"steps": 3}), ("patlak-direct", {"iterations": 3}),
                       ("patlak-red-diff", {"steps": 3})):
        res = reconstruct(sim.acquisition, method, prior="tiny", **kw)
        assert res.mean.shape == (3, 32, 32) and torch.isfinite(res.mean).all()
        assert res.extra["intercept"].shape == (3, 32, 32)
