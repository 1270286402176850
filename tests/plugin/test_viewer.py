"""The real napari viewer (under Xvfb): docking through the manifest, a real OSEM run, closing mid-run."""
from __future__ import annotations

import gc

import numpy as np
import pytest
from qtpy.QtCore import QCoreApplication, QEvent

from napari_petdiff._widgets import run_session
from napari_petdiff._widgets.comparison import grid_of
from napari_petdiff._widgets.layers import acquisition_layer_data

from .conftest import add_layer_data, small_scan

TIMEOUT = 20_000


@pytest.fixture
def viewer_with_scan(make_napari_viewer):
    viewer = make_napari_viewer()
    acq, truth = small_scan()
    add_layer_data(viewer, acquisition_layer_data(acq, {"truth": truth}, name="small"))
    return viewer


def test_osem_run_in_docked_widget(qtbot, viewer_with_scan):
    viewer = viewer_with_scan
    dock, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Reconstruction")
    assert type(w).__name__ == "ReconstructionWidget"
    w.set_method("osem")
    w.form.set_values({"iterations": 2, "subsets": 2})
    with qtbot.waitSignal(w.run_finished, timeout=TIMEOUT):
        w.run_button.click()
    mean = viewer.layers["osem mean"]
    assert mean.data.shape == (1, 32, 32)
    np.testing.assert_allclose(mean.scale, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(mean.translate, viewer.layers["small truth"].translate)
    trace = mean.metadata["petdiff_likelihood"]
    assert len(trace) == 3 and trace[2] > trace[0]  # EM increases the likelihood
    assert mean.metadata["petdiff_params"] == {"iterations": 2, "subsets": 2}
    assert "osem std" not in viewer.layers  # OSEM has no posterior
    assert float(mean.data.max()) > 0
    lo, hi = mean.contrast_limits
    assert lo < hi <= float(mean.data.max())
    # the status and progress show the end of the run, not a late progress event
    assert "osem done" in w.status.text()
    assert w.progress.value() == w.progress.maximum()


def test_closing_dock_mid_run_is_safe(qtbot, viewer_with_scan, fake_methods):
    viewer = viewer_with_scan
    dock, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Reconstruction")
    w.set_method("fake")
    w.form.set_values({"steps": 30, "delay": 0.01})
    with qtbot.waitSignal(w.live_updated, timeout=TIMEOUT):
        w.run_button.click()
    session = w.session
    viewer.window.remove_dock_widget(dock)
    w.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete.value)
    del w, dock
    gc.collect()
    # The worker finishes after the widget is gone; its result still reaches the viewer.
    qtbot.waitUntil(lambda: session.outcome is not None, timeout=TIMEOUT)
    qtbot.waitUntil(lambda: session not in run_session._ACTIVE, timeout=TIMEOUT)
    assert session.outcome == "ok"
    assert "fake mean" in viewer.layers and "fake live" not in viewer.layers


def test_cancel_in_real_viewer(qtbot, viewer_with_scan, fake_methods):
    viewer = viewer_with_scan
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Reconstruction")
    w.set_method("fake")
    w.form.set_values({"steps": 1_000_000, "delay": 0.005})
    with qtbot.waitSignal(w.live_updated, timeout=TIMEOUT):
        w.run_button.click()
    assert "fake live" in viewer.layers
    with qtbot.waitSignal(w.run_cancelled, timeout=TIMEOUT):
        w.cancel_button.click()
    assert "fake live" not in viewer.layers and "fake mean" not in viewer.layers
    assert w.run_button.isEnabled()


def test_sample_data_opens_with_truth_and_acquisition(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-petdiff", "brain2d")
    prompts = viewer.layers["brain2d prompts"]
    truth = viewer.layers["brain2d truth"]
    acq = prompts.metadata["petdiff_acquisition"]
    assert truth.data.shape == acq.grid.shape == (1, 128, 128)
    np.testing.assert_allclose(truth.scale, acq.grid.voxel_size)
    np.testing.assert_allclose(truth.translate, acq.grid.origin)
    assert prompts.data.shape == tuple(acq.prompts.shape)
    assert "brain2d mu" in viewer.layers and "brain2d brain mask" in viewer.layers


def test_comparison_grid_in_docked_widget(qtbot, viewer_with_scan):
    """Through the dock the widget sees napari's layer proxies: visibility and links must still work."""
    viewer = viewer_with_scan
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Comparison")
    w.set_checked(["mlem", "osem"])
    w.forms["mlem"].set_values({"iterations": 1})
    w.forms["osem"].set_values({"iterations": 1, "subsets": 2})
    with qtbot.waitSignal(w.comparison_finished, timeout=TIMEOUT):
        w.run_button.click()
    assert grid_of(viewer).enabled
    visible = {lay.name for lay in viewer.layers if lay.visible}
    assert visible == {"small truth", "mlem mean", "osem mean"}
    viewer.layers["osem mean"].contrast_limits = (0.0, 0.5)
    assert tuple(viewer.layers["mlem mean"].contrast_limits) == (0.0, 0.5)
    assert w.table.rowCount() == 2


def test_launch_screenshot_shows_the_docked_window(tmp_path):
    from qtpy.QtGui import QImage

    from napari_petdiff import launch

    out = tmp_path / "window.png"
    assert launch.main(["--screenshot", str(out), "--delay", "0.3"]) == 0
    img = QImage(str(out))
    assert (img.width(), img.height()) == launch.SCREENSHOT_SIZE  # the whole window, not only the canvas
    # the canvas shows the sample: many distinct colours, not a blank frame
    colours = {img.pixel(x, y) for x in range(0, img.width(), 7) for y in range(0, img.height(), 7)}
    assert len(colours) > 50
