"""Personalise widget: stages in a worker, their images as layers, the prior's path, errors, cancel."""
from __future__ import annotations

import pytest
import torch
from napari.components import ViewerModel

from napari_petdiff._widgets.layers import acquisition_layer_data
from napari_petdiff._widgets.personal import PersonaliseWidget
from napari_petdiff.engine.acquisition import Acquisition
from napari_petdiff.engine.geometry import ParallelBeamGeometry
from napari_petdiff.engine.phantoms import brain_phantom

from .conftest import add_layer_data

pytest.importorskip("SimpleITK")
TIMEOUT = 60_000


def coarse_acquisition(with_mr: bool = True) -> Acquisition:
    ph = brain_phantom(dims=2, shape=(1, 32, 32), voxel_size_mm=8.0, deformation_seed=5)
    geom = ParallelBeamGeometry(n_views=6, n_radial=40, radial_spacing_mm=8.0)
    prompts = torch.poisson(torch.full(geom.sinogram_shape, 5.0), generator=torch.Generator().manual_seed(1))
    return Acquisition(prompts, geom, ph.grid, metadata={"name": "subject"}, mr=ph.mr if with_mr else None)


@pytest.fixture
def widget(qtbot, tmp_path, monkeypatch):
    from napari_petdiff.engine.diffusion.io import save_prior
    from napari_petdiff.engine.diffusion.prior import ScorePrior
    from tests.engine._tiny_prior import make_tiny_prior

    tiny = make_tiny_prior()
    base = save_prior(ScorePrior(tiny.net, tiny.schedule, name="tiny", image_size=32, voxel_size_mm=8.0),
                      tmp_path / "tiny")
    monkeypatch.setattr("napari_petdiff._widgets.personal.notify_error", lambda m: None)
    viewer = ViewerModel()
    w = PersonaliseWidget(viewer)
    qtbot.addWidget(w)
    w.base_prior.setText(str(base))
    w.out.setText(str(tmp_path / "work"))
    w.sources.setText("phantom:2")
    w.n_pseudo.setValue(3)
    w.subset.setValue(2)
    w.steps.setValue(2)
    return viewer, w


def test_all_stages_show_their_images_and_the_prior(qtbot, widget):
    viewer, w = widget
    add_layer_data(viewer, acquisition_layer_data(coarse_acquisition(), name="subject"))
    with qtbot.waitSignal(w.run_finished, timeout=TIMEOUT) as done:
        w.run_button.click()
    summary = done.args[0]
    assert summary["prior"].endswith("personalised.safetensors") and summary["steps"] == 2
    assert viewer.layers["personalise: warped source PETs"].data.shape == (2, 1, 32, 32)
    assert viewer.layers["personalise: pseudo-PETs"].data.shape == (3, 1, 32, 32)
    assert summary["prior"] in w.prior_label.text()
    assert w.run_button.isEnabled() and not w.cancel_button.isEnabled()


def test_without_an_mr_the_run_is_refused(qtbot, widget):
    viewer, w = widget
    add_layer_data(viewer, acquisition_layer_data(coarse_acquisition(with_mr=False), name="subject"))
    with qtbot.waitSignal(w.run_failed, timeout=TIMEOUT) as failed:
        w.run_button.click()
    assert "needs the subject's MR" in failed.args[0]
    assert w.run_button.isEnabled()


def test_cancel_stops_and_a_second_run_continues(qtbot, widget):
    viewer, w = widget
    add_layer_data(viewer, acquisition_layer_data(coarse_acquisition(), name="subject"))
    w.sources.setText("phantom:6")
    w.stage_box.setCurrentText("register only")
    with qtbot.waitSignal(w.run_cancelled, timeout=TIMEOUT):
        w.run_button.click()
        w.cancel_button.click()
    assert w.run_button.isEnabled()
    with qtbot.waitSignal(w.run_finished, timeout=TIMEOUT):
        w.run_button.click()
    assert viewer.layers["personalise: warped source PETs"].data.shape[0] == 6
