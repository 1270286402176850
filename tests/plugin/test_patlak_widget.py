"""Patlak widget: dynamic acquisitions only, Ki / intercept layers, TAC and Patlak plot of a clicked voxel."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from napari.components import ViewerModel

from napari_petdiff._widgets.layers import acquisition_layer_data
from napari_petdiff._widgets.patlak import PatlakWidget
from napari_petdiff.engine import methods
from napari_petdiff.engine.acquisition import Acquisition, FrameTiming
from napari_petdiff.engine.geometry import ParallelBeamGeometry
from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.kinetics.input_function import InputFunction
from napari_petdiff.engine.kinetics.patlak import patlak_setup
from napari_petdiff.engine.params import param
from napari_petdiff.engine.run import Progress, Result

from .conftest import add_layer_data, fake_acquisition

TIMEOUT = 10_000


def dynamic_acquisition(n: int = 8) -> Acquisition:
    grid = ImageGrid((1, n, n), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=4, n_radial=n + 6, radial_spacing_mm=2.0)
    start = np.arange(6) * 600.0
    frames = FrameTiming(start, start + 600.0)
    prompts = torch.poisson(torch.full((6, *geom.sinogram_shape), 20.0), generator=torch.Generator().manual_seed(0))
    return Acquisition(prompts, geom, grid, frames=frames, input_function=InputFunction.feng(end_s=3600).to_dict(),
                       metadata={"name": "dyn", "activity_calibration": 1.0})


@dataclass
class FakePatlakParams:
    t_star: float = param(30.0, "Patlak start time", min=0.0, max=1000.0, unit="min")


def run_fake_patlak(acq, p: FakePatlakParams, cancel, device=None):
    """Frames that follow the Patlak model exactly: Ki = x / 100, V = y / 100 (voxel indices)."""
    st = patlak_setup(acq, p.t_star)
    z, y, x = np.indices(acq.grid.shape)
    ki, v = x / 100.0, y / 100.0 + 0.05
    frames = ki[None] * st.u[:, None, None, None] + v[None] * st.v[:, None, None, None]
    yield Progress(1, 1, "fit", "fit")
    return Result(mean=torch.as_tensor(ki, dtype=torch.float32),
                  extra={"intercept": torch.as_tensor(v, dtype=torch.float32),
                         "frames": torch.as_tensor(frames, dtype=torch.float32)},
                  metadata={"units": {"ki": "1/min"}})


FAKE_PATLAK = methods.MethodSpec("fake-patlak", run_fake_patlak, FakePatlakParams, "fake Patlak", kind="dynamic")


@pytest.fixture
def patlak_widget(qtbot):
    methods.list_methods()
    methods.register(FAKE_PATLAK)
    viewer = ViewerModel()
    add_layer_data(viewer, acquisition_layer_data(fake_acquisition(), name="static"))
    add_layer_data(viewer, acquisition_layer_data(dynamic_acquisition(), name="dyn"))
    w = PatlakWidget(viewer)
    qtbot.addWidget(w)
    yield viewer, w
    methods._REGISTRY.pop(FAKE_PATLAK.name, None)


def test_lists_dynamic_acquisitions_and_methods_only(patlak_widget):
    viewer, w = patlak_widget
    assert [w.acq_picker.itemText(i) for i in range(w.acq_picker.count())] == ["dyn prompts"]
    names = [w.method_box.itemData(i) for i in range(w.method_box.count())]
    assert "fake-patlak" in names and "osem" not in names


def test_run_gives_ki_and_intercept_and_voxel_curves(qtbot, patlak_widget):
    viewer, w = patlak_widget
    w.method_box.setCurrentIndex(w.method_box.findData("fake-patlak"))
    w.form.set_value("t_star", 20.0)
    with qtbot.waitSignal(w.voxel_shown, timeout=TIMEOUT) as shown:
        w.run_button.click()
    ki = viewer.layers["fake-patlak Ki"]
    assert ki.data.shape == (1, 8, 8) and "fake-patlak intercept" in viewer.layers
    np.testing.assert_allclose(ki.scale, (2.0, 2.0, 2.0))
    assert shown.args[0] == (0, 0, 7)  # the hottest Ki voxel is shown first
    assert "1/min" in w.status.text()
    # clicking a voxel (world mm) plots that voxel
    g = dynamic_acquisition().grid
    world = np.asarray(g.origin) + np.asarray(g.voxel_size) * np.array([0, 3, 5])
    with qtbot.waitSignal(w.voxel_shown, timeout=TIMEOUT) as shown:
        w._click(viewer, SimpleNamespace(type="mouse_press", position=tuple(world)))
    assert shown.args[0] == (0, 3, 5)
    d = w.curves((0, 3, 5))
    assert d["ki"] == pytest.approx(0.05) and d["intercept"] == pytest.approx(0.08)
    assert len(d["measured"]) == 4  # frames starting at 20, 30, 40, 50 min
    np.testing.assert_allclose(d["y"], d["line"], rtol=1e-4)   # model frames lie on the Patlak line
    np.testing.assert_allclose(d["measured"], d["model"], rtol=1e-4)
    assert w.world_to_index((0.0, 1e4, 0.0)) is None


def test_static_only_viewer_is_refused_clearly(qtbot, monkeypatch):
    methods.list_methods()
    methods.register(FAKE_PATLAK)
    try:
        monkeypatch.setattr("napari_petdiff._widgets.patlak.notify_error", lambda m: None)
        viewer = ViewerModel()
        add_layer_data(viewer, acquisition_layer_data(fake_acquisition(), name="static"))
        w = PatlakWidget(viewer)
        qtbot.addWidget(w)
        with qtbot.waitSignal(w.run_failed, timeout=TIMEOUT) as blocker:
            w.run_button.click()
        assert "no dynamic acquisition" in blocker.args[0]
    finally:
        methods._REGISTRY.pop(FAKE_PATLAK.name, None)


def test_real_patlak_method_and_frame_curves(qtbot, patlak_widget):
    """patlak-ls from the registry on the tiny dynamic scan; frames reconstructed on demand for the plots."""
    viewer, w = patlak_widget
    w.method_box.setCurrentIndex(w.method_box.findData("patlak-ls"))
    w.form.set_values({"t_star": 30.0, "iterations": 1, "subsets": 2, "input_function": "file"})
    with qtbot.waitSignal(w.run_finished, timeout=20_000):
        w.run_button.click()
    assert viewer.layers["patlak-ls Ki"].data.shape == (1, 8, 8)
    assert "patlak-ls intercept" in viewer.layers
    assert w.setup is not None and w.setup.n_frames == 3  # frames starting at 30, 40, 50 min
    if "frames" not in w.result["extra"]:
        assert w.frames_button.isVisibleTo(w)
        assert "fitted model only" in w.voxel_info.text()
        with qtbot.waitSignal(w.frames_ready, timeout=20_000):
            w.frames_button.click()
    d = w.curves((0, 4, 4))
    assert len(d["measured"]) == 3
    # Ki and the intercept are the least-squares fit C = Ki u + V v of exactly these frame values
    st = w.setup
    (ki, v), *_ = np.linalg.lstsq(np.stack([st.u, st.v], axis=1), d["measured"], rcond=None)
    assert ki == pytest.approx(d["ki"], rel=1e-3)
    assert v == pytest.approx(d["intercept"], rel=1e-3)
