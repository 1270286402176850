"""List-mode likelihood: events that histogram to a sinogram give the sinogram's EM update."""
import pytest
import torch

from napari_petdiff.engine.acquisition import Acquisition, AcquisitionError, ListmodeEvents
from napari_petdiff.engine.likelihood import PoissonLikelihood


def _listmode_from_sinogram(acq):
    xs, xe = acq.geometry.lor_endpoints()
    y = acq.prompts.round().long()
    reps = y.flatten()
    ev_s = xs.reshape(-1, 3).repeat_interleave(reps, 0)
    ev_e = xe.reshape(-1, 3).repeat_interleave(reps, 0)
    mult = acq.multiplicative.flatten().repeat_interleave(reps)
    add = acq.additive.flatten().repeat_interleave(reps)
    lm = ListmodeEvents(ev_s, ev_e, mult, add)
    return Acquisition(None, acq.geometry, acq.grid, acq.multiplicative, None, acq.psf_fwhm_mm, listmode=lm)


def test_listmode_em_equals_sinogram_em(small_setup):
    from napari_petdiff.engine.simulate import simulate
    from tests.conftest import blob_image

    grid, geom = small_setup
    img = blob_image(32)
    acq = simulate(img, grid, geom, (img > 0) * 0.0096, counts=2e3, background_fraction=0.2, seed=1).acquisition
    lm_acq = _listmode_from_sinogram(acq)
    assert lm_acq.is_listmode and lm_acq.total_counts == pytest.approx(float(acq.prompts.sum()))
    sino = PoissonLikelihood(acq)
    lm = PoissonLikelihood(lm_acq)
    x = sino.uniform_image() * 1.2
    torch.testing.assert_close(lm.em_step(x), sino.em_step(x), rtol=2e-3, atol=1e-4 * float(x.max()))
    torch.testing.assert_close(lm.gradient(x), sino.gradient(x), rtol=2e-3, atol=2e-3 * float(sino.sensitivity.max()))
    # values differ by a constant (sum of the background), so differences of values agree
    dv_lm = float(lm.value(1.1 * x) - lm.value(x))
    dv_s = float(sino.value(1.1 * x) - sino.value(x))
    assert dv_lm == pytest.approx(dv_s, rel=1e-3)
    d = lm.em_direction(x)
    alpha, val, reached = lm.line_search_to_target(x, d, float(lm.value(x)) + 0.5 * dv_lm, 1.0)
    assert float(lm.value(x + float(alpha) * d)) == pytest.approx(float(val), rel=1e-6)


def test_listmode_event_shapes_are_checked():
    with pytest.raises(AcquisitionError, match="n_events, 3"):
        ListmodeEvents(torch.zeros(5, 2), torch.zeros(5, 2))
    with pytest.raises(AcquisitionError, match="multiplicative"):
        ListmodeEvents(torch.zeros(5, 3), torch.ones(5, 3), torch.zeros(5))
