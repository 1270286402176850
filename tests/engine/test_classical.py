import numpy as np
import pytest
import torch

from napari_petdiff.engine import reconstruct
from napari_petdiff.engine.classical import MLEMParams, run_mlem
from napari_petdiff.engine.metrics import nrmse
from napari_petdiff.engine.run import CancelToken, Cancelled, Intermediate, Progress, drive


def test_mlem_result_and_events(small_acq):
    events = []
    res = reconstruct(small_acq.acquisition, "mlem", iterations=5, on_event=events.append)
    assert res.mean.shape == (1, 32, 32)
    assert len(res.likelihood) == 6 and np.all(np.diff(res.likelihood) > 0)
    assert sum(isinstance(e, Progress) for e in events) == 5
    assert any(isinstance(e, Intermediate) for e in events)
    assert res.metadata["params"] == {"iterations": 5}


def test_osem_converges_faster_than_mlem_per_pass(small_acq):
    m = reconstruct(small_acq.acquisition, "mlem", iterations=2)
    o = reconstruct(small_acq.acquisition, "osem", iterations=2, subsets=6)
    assert o.likelihood[-1] > m.likelihood[-1]


def test_osem_one_subset_equals_mlem(small_acq):
    m = reconstruct(small_acq.acquisition, "mlem", iterations=3)
    o = reconstruct(small_acq.acquisition, "osem", iterations=3, subsets=1)
    torch.testing.assert_close(m.mean, o.mean)


def test_map_rdp_smooths_and_tracks_objective(small_acq):
    truth = small_acq.truth
    osem = reconstruct(small_acq.acquisition, "osem", iterations=20, subsets=6)
    beta = 2e-2 * float(small_acq.acquisition.prompts.sum()) / truth.numel() ** 0.5
    mp = reconstruct(small_acq.acquisition, "map-rdp", beta=beta, epochs=20, subsets=6)
    assert nrmse(mp.mean, truth) < nrmse(osem.mean, truth)
    obj = mp.metadata["objective"]
    assert obj[-1] > obj[1]
    assert (mp.mean >= 0).all()


def test_map_rdp_beta_zero_fits_data_like_osem(small_acq):
    mp = reconstruct(small_acq.acquisition, "map-rdp", beta=0.0, epochs=5, subsets=4)
    os_ = reconstruct(small_acq.acquisition, "osem", iterations=6, subsets=4)
    assert mp.likelihood[-1] == pytest.approx(os_.likelihood[-1], rel=2e-3)


def test_cancel_stops_inside_loop(small_acq):
    tok = CancelToken()
    n = {"k": 0}

    def on_event(ev):
        if isinstance(ev, Progress):
            n["k"] += 1
            if n["k"] == 2:
                tok.cancel()

    with pytest.raises(Cancelled):
        drive(run_mlem(small_acq.acquisition, MLEMParams(50), tok), on_event)
    assert n["k"] == 2


def test_unknown_method_and_bad_params(small_acq):
    with pytest.raises(ValueError, match="unknown method 'nope'.*osem"):
        reconstruct(small_acq.acquisition, "nope")
    with pytest.raises(ValueError, match="unknown parameter"):
        reconstruct(small_acq.acquisition, "osem", itterations=3)
    with pytest.raises(ValueError, match="below its minimum"):
        reconstruct(small_acq.acquisition, "osem", iterations=0)
