"""Comparison widget (real OSEM / MLEM on a tiny scan) and ROI masks from Shapes / Labels layers."""
from __future__ import annotations

import numpy as np
import pytest
from napari.components import ViewerModel

from napari_petdiff._widgets.comparison import ComparisonWidget, grid_of
from napari_petdiff._widgets.layers import acquisition_layer_data
from napari_petdiff._widgets.roi import roi_mask, roi_stats
from napari_petdiff.engine import metrics

from .conftest import add_layer_data, small_scan

TIMEOUT = 20_000


@pytest.fixture
def scan_viewer():
    viewer = ViewerModel()
    acq, truth = small_scan()
    add_layer_data(viewer, acquisition_layer_data(acq, {"truth": truth}, name="small"))
    return viewer


def test_compare_two_methods_side_by_side_with_metrics(qtbot, scan_viewer):
    viewer = scan_viewer
    w = ComparisonWidget(viewer)
    qtbot.addWidget(w)
    w.set_checked(["osem", "mlem"])
    w.forms["osem"].set_values({"iterations": 2, "subsets": 2})
    w.forms["mlem"].set_values({"iterations": 3})
    assert w.ref_picker.currentText() == "small truth"
    # a region: the central hot disk, drawn as an ellipse in world coordinates (mm)
    viewer.add_shapes([[[0, -8, -8], [0, -8, 8], [0, 8, 8], [0, 8, -8]]], shape_type="ellipse", name="roi")
    w.roi_picker.select("roi")
    with qtbot.waitSignal(w.comparison_finished, timeout=TIMEOUT) as blocker:
        w.run_button.click()
    assert blocker.args[0] == ["mlem", "osem"]  # registry order
    osem, mlem, truth = (viewer.layers[n] for n in ("osem mean", "mlem mean", "small truth"))
    assert grid_of(viewer).enabled
    assert osem.visible and mlem.visible and truth.visible and not viewer.layers["small prompts"].visible
    assert osem.contrast_limits == mlem.contrast_limits == truth.contrast_limits
    osem.contrast_limits = (0.0, 1.0)  # linked: moving one moves the others
    assert tuple(mlem.contrast_limits) == (0.0, 1.0)
    assert set(w.rows) == {"osem", "mlem", "reference"}
    row = w.rows["osem"]
    assert row["NRMSE"] == pytest.approx(metrics.nrmse(osem.data, truth.data))
    assert row["SSIM"] == pytest.approx(metrics.ssim(osem.data, truth.data))
    mask = roi_mask(viewer.layers["roi"], osem)
    assert row["ROI mean"] == pytest.approx(float(osem.data[mask].mean()))
    assert w.rows["reference"]["ROI mean"] == pytest.approx(float(truth.data[mask].mean()))
    assert w.table.rowCount() == 3 and w.table.item(1, 0).text() == "osem"
    assert w.table.item(1, 1).text() == f"{row['NRMSE']:.4g}"
    assert w.run_button.isEnabled()


def test_bad_parameters_fail_before_any_run(qtbot, scan_viewer, monkeypatch):
    monkeypatch.setattr("napari_petdiff._widgets.comparison.notify_error", lambda m: None)
    w = ComparisonWidget(scan_viewer)
    qtbot.addWidget(w)
    w.set_checked([])
    with qtbot.waitSignal(w.comparison_failed, timeout=TIMEOUT) as blocker:
        w.run_button.click()
    assert "tick at least one method" in blocker.args[0]
    assert w.session is None


def test_cancel_keeps_finished_results_only(qtbot, scan_viewer, fake_methods):
    viewer = scan_viewer
    w = ComparisonWidget(viewer)
    qtbot.addWidget(w)
    w.set_checked(["mlem", "fake"])
    w.forms["mlem"].set_values({"iterations": 1})
    w.forms["fake"].set_values({"steps": 1_000_000, "delay": 0.005})
    with qtbot.waitSignal(w.comparison_cancelled, timeout=TIMEOUT):
        w.run_button.click()
        qtbot.waitUntil(lambda: w.session is not None and w.session.spec.name == "fake" and w.session.n_live > 0,
                        timeout=TIMEOUT)
        w.cancel_button.click()
    assert "mlem mean" in viewer.layers
    assert "fake mean" not in viewer.layers and "fake live" not in viewer.layers
    assert w.run_button.isEnabled()


def test_labels_roi_maps_through_world_coordinates():
    viewer = ViewerModel()
    img = viewer.add_image(np.arange(16, dtype=np.float32).reshape(1, 4, 4), scale=(2, 2, 2),
                           translate=(0, -3, -3))
    # labels at 1 mm: covers world y, x in [-3.5, 0.5) -> image voxels 0 and 1 along y and x
    lab = np.zeros((1, 8, 8), np.uint8)
    lab[0, :4, :4] = 1
    labels = viewer.add_labels(lab, scale=(2, 1, 1), translate=(0, -3.5, -3.5))
    mask = roi_mask(labels, img)
    expected = np.zeros((1, 4, 4), bool)
    expected[0, :2, :2] = True
    np.testing.assert_array_equal(mask, expected)
    mean, cov = roi_stats(img.data, mask)
    assert mean == pytest.approx(np.mean([0, 1, 4, 5]))
    assert cov == pytest.approx(np.std([0, 1, 4, 5]) / mean * 100)


def test_empty_region_is_a_clear_error():
    with pytest.raises(ValueError, match="region is empty"):
        roi_stats(np.ones((1, 2, 2)), np.zeros((1, 2, 2), bool))
