"""Diffusion samplers on the tiny problem with a tiny prior trained in the session."""
import math

import pytest
import torch

from napari_petdiff.engine import reconstruct
from napari_petdiff.engine.likelihood import PoissonLikelihood
from napari_petdiff.engine.methods import get_method
from napari_petdiff.engine.params import make_params
from napari_petdiff.engine.run import CancelToken, Cancelled, Progress, RunWarning, Sample, drive
from napari_petdiff.engine.samplers import core
from napari_petdiff.engine.samplers.lisch import lisch_targets, mlem_curve


@pytest.fixture
def use_tiny(tiny_prior, monkeypatch):
    monkeypatch.setitem(core._PRIOR_CACHE, ("tiny", "cpu"), tiny_prior)
    return "tiny"


def test_eta_zero_is_deterministic_and_seed_matters(small_acq, use_tiny):
    kw = dict(prior=use_tiny, steps=6, eta=0.0, samples=1, target_iteration=5.0)
    a = reconstruct(small_acq.acquisition, "lisch", seed=0, **kw)
    b = reconstruct(small_acq.acquisition, "lisch", seed=0, **kw)
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    c = reconstruct(small_acq.acquisition, "lisch", seed=1, **kw)
    assert not torch.equal(a.mean, c.mean)


def test_lisch_ends_at_its_target_likelihood(small_acq, use_tiny):
    res = reconstruct(small_acq.acquisition, "lisch", prior=use_tiny, steps=8, samples=2, batch=2,
                      target_iteration=10.0, max_updates=30)
    target = res.metadata["final_target"]
    curve = res.metadata["mlem_curve"]
    assert target == pytest.approx(curve[10])
    for v in res.metadata["per_sample_likelihood"]:
        # at or just above the target: the line search stops where the target is reached
        assert v >= target - 1e-6 * abs(target)
        assert v - target <= 0.02 * (curve[10] - curve[0])
    assert not res.warnings or "one posterior sample" not in res.warnings[0]


def test_lisch_targets_interpolate_the_mlem_curve(small_acq):
    curve = mlem_curve(small_acq.acquisition, 10)
    assert all(b >= a for a, b in zip(curve, curve[1:]))
    t = lisch_targets(curve, 4, 0.0, 10.0, "linear")
    assert t[-1] == pytest.approx(curve[10])
    assert t[0] == pytest.approx(curve[2] + 0.5 * (curve[3] - curve[2]))
    tsq = lisch_targets(curve, 4, 0.0, 10.0, "sqrt")
    assert tsq[0] > t[0]  # sqrt map targets more data consistency early


def test_unreachable_target_warns(small_acq, use_tiny):
    events = []
    res = reconstruct(small_acq.acquisition, "lisch", prior=use_tiny, steps=4, target_iteration=100.0,
                      max_updates=1, on_event=events.append)
    assert any(isinstance(e, RunWarning) and "could not reach" in e.message for e in events)
    assert any("could not reach" in w for w in res.warnings)


def test_dds_lambda0_one_subset_K1_is_an_mlem_step_from_tweedie(small_acq, use_tiny):
    """With anchor 0, one subset and K = 1 the DC step is exactly EM(c * max(x0, 0))."""
    captured = {}
    orig = core.run_sampler

    def spy(acq, params, cancel, device, method, make_dc, **kw):
        def make_dc_spy(lik, c, tok):
            dc = make_dc(lik, c, tok)

            def wrapped(z, x_t, state):
                u = dc(z, x_t, state)
                captured.setdefault("pairs", []).append((z.clone(), u.clone(), lik))
                return u
            return wrapped
        return (yield from orig(acq, params, cancel, device, method, make_dc_spy, **kw))

    import napari_petdiff.engine.samplers.dds as dds_mod
    mp = pytest.MonkeyPatch()
    mp.setattr(dds_mod, "run_sampler", spy)
    try:
        reconstruct(small_acq.acquisition, "dds", prior=use_tiny, steps=3, dc_iterations=1, anchor=0.0, subsets=1)
    finally:
        mp.undo()
    for z, u, lik in captured["pairs"]:
        em = lik.em_step(z.clamp_min(0))
        # the DC clamps u at 1e-4 c below; where z > that floor it is exactly EM
        sel = z > 1e-3 * float(z.max())
        torch.testing.assert_close(u[sel], em[sel], rtol=1e-5, atol=1e-6 * float(em.max()))


def test_posterior_std_positive_and_samples_events(small_acq, use_tiny):
    events = []
    res = reconstruct(small_acq.acquisition, "dds", prior=use_tiny, steps=4, samples=3, batch=2,
                      dc_iterations=2, on_event=events.append)
    assert res.samples.shape == (3, 1, 32, 32)
    assert res.std is not None and float(res.std[0][res.mean[0] > 0].mean()) > 0
    assert [e.index for e in events if isinstance(e, Sample)] == [0, 1, 2]
    torch.testing.assert_close(res.mean, res.samples.mean(0))
    assert (res.samples >= 0).all()
    assert len(res.likelihood) == 4


def test_cancel_stops_within_one_step(small_acq, use_tiny):
    tok = CancelToken()
    steps_seen = []
    spec = get_method("lisch")
    p = make_params(spec.params, dict(prior=use_tiny, steps=20, target_iteration=5.0))

    def on_event(ev):
        if isinstance(ev, Progress) and ev.stage == "lisch":
            steps_seen.append(ev.step)
            if ev.step == 2:
                tok.cancel()

    with pytest.raises(Cancelled):
        drive(spec.run(small_acq.acquisition, p, tok), on_event)
    assert steps_seen == [1, 2]


def test_bad_requests_get_clear_errors(small_acq, use_tiny, small_setup):
    with pytest.raises(ValueError, match="samples"):
        reconstruct(small_acq.acquisition, "lisch", prior=use_tiny, samples=0)
    with pytest.raises(ValueError, match="start_iteration"):
        reconstruct(small_acq.acquisition, "lisch", prior=use_tiny, start_iteration=30.0, target_iteration=5.0)
    # a prior whose grid does not fit the acquisition
    from napari_petdiff.engine.geometry import ParallelBeamGeometry
    from napari_petdiff.engine.grid import ImageGrid
    from napari_petdiff.engine.simulate import simulate
    grid = ImageGrid((1, 48, 48), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=16, n_radial=69, radial_spacing_mm=1.6)
    sim = simulate(torch.ones(grid.shape), grid, geom, counts=1e4)
    with pytest.raises(ValueError) as ei:
        reconstruct(sim.acquisition, "lisch", prior=use_tiny, steps=2)
    assert "48" in str(ei.value) and "32" in str(ei.value)


def test_dps_data_steps_raise_the_likelihood(small_acq, use_tiny):
    kw = dict(prior=use_tiny, steps=8, eta=0.0, seed=3)
    free = reconstruct(small_acq.acquisition, "dps", zeta=0.0, **kw)
    guided = reconstruct(small_acq.acquisition, "dps", zeta=2.0, **kw)
    assert guided.metadata["per_sample_likelihood"][0] > free.metadata["per_sample_likelihood"][0]


def test_dds_subsets_and_anchor_run_and_stay_non_negative(small_acq, use_tiny):
    res = reconstruct(small_acq.acquisition, "dds", prior=use_tiny, steps=3, dc_iterations=2, subsets=4,
                      anchor=0.5)
    assert (res.mean >= 0).all() and float(res.mean.sum()) > 0
    assert res.metadata["scale"] > 0
