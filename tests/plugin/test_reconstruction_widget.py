"""Reconstruction widget + worker logic against a canvas-less ViewerModel, with fake methods."""
from __future__ import annotations

import re

import numpy as np
import pytest

from napari_petdiff._widgets.reconstruction import ReconstructionWidget

from .conftest import slow_values

TIMEOUT = 10_000


@pytest.fixture
def widget(qtbot, model_viewer, fake_methods):
    w = ReconstructionWidget(model_viewer)
    qtbot.addWidget(w)
    w.set_method("fake")
    return w


def run_and_wait(qtbot, w, signal="run_finished"):
    with qtbot.waitSignal(getattr(w, signal), timeout=TIMEOUT) as blocker:
        w.run_button.click()
    return blocker.args


def test_lists_registry_methods_and_picks_acquisition(widget):
    names = [widget.method_box.itemData(i) for i in range(widget.method_box.count())]
    assert {"osem", "mlem", "map-rdp", "fake"} <= set(names)
    assert widget.acq_picker.currentText() == "fake prompts"
    assert "16x16" in widget.acq_info.text()


def test_run_adds_named_layers_on_the_image_grid(qtbot, widget, model_viewer):
    widget.form.set_values({"steps": 3, "samples": 3, "seed": 7})
    (out,) = run_and_wait(qtbot, widget)
    mean = model_viewer.layers["fake mean"]
    std = model_viewer.layers["fake std"]
    samples = model_viewer.layers["fake samples"]
    truth = model_viewer.layers["fake truth"]
    assert mean.data.shape == (1, 16, 16) and std.data.shape == (1, 16, 16)
    assert samples.data.shape == (3, 1, 16, 16)
    np.testing.assert_allclose(mean.scale, truth.scale)
    np.testing.assert_allclose(mean.translate, truth.translate)
    np.testing.assert_allclose(samples.scale[1:], truth.scale)
    assert mean.metadata["petdiff_params"]["steps"] == 3
    assert mean.metadata["petdiff_seed"] == 7
    assert mean.metadata["petdiff_likelihood"] == [0.0, 1.0, 2.0, 3.0]
    np.testing.assert_allclose(mean.data, out["samples"].mean(0), rtol=1e-5)
    assert "fake live" not in model_viewer.layers
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "done" in widget.status.text()


def test_rerun_updates_layers_in_place(qtbot, widget, model_viewer):
    widget.form.set_values({"steps": 2, "seed": 1})
    run_and_wait(qtbot, widget)
    layer = model_viewer.layers["fake mean"]
    first = layer.data.copy()
    n_layers = len(model_viewer.layers)
    widget.form.set_values({"seed": 2})
    run_and_wait(qtbot, widget)
    assert model_viewer.layers["fake mean"] is layer
    assert len(model_viewer.layers) == n_layers
    assert not np.allclose(layer.data, first)
    assert layer.metadata["petdiff_seed"] == 2
    lo, hi = layer.contrast_limits
    assert hi <= float(layer.data.max()) + 1e-6  # contrast follows the new data


def test_samples_layer_optional(qtbot, widget, model_viewer):
    widget.keep_samples.setChecked(False)
    run_and_wait(qtbot, widget)
    assert "fake samples" not in model_viewer.layers
    assert "fake mean" in model_viewer.layers


def test_live_updates_arrive_during_run(qtbot, widget, model_viewer):
    widget.form.set_values({"steps": 40, "delay": 0.02})
    seen = []
    widget.live_updated.connect(lambda step: seen.append(("fake live" in model_viewer.layers, step)))
    run_and_wait(qtbot, widget)
    # 40 steps x 20 ms at a few updates per second: several live updates, far fewer than steps.
    assert 1 <= len(seen) < 40
    assert all(present for present, _ in seen)
    assert widget.session.n_live == len(seen)


def test_cancel_leaves_no_partial_result(qtbot, widget, model_viewer):
    widget.form.set_values(slow_values())
    with qtbot.waitSignal(widget.live_updated, timeout=TIMEOUT):
        widget.run_button.click()
    assert widget.running and not widget.run_button.isEnabled()
    with qtbot.waitSignal(widget.run_cancelled, timeout=TIMEOUT):
        widget.cancel_button.click()
    assert not any(name.startswith("fake ") and name != "fake prompts" and name != "fake truth"
                   for name in [lay.name for lay in model_viewer.layers])
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert "cancelled" in widget.status.text()
    # and it runs again afterwards
    widget.form.set_values({"steps": 2, "delay": 0.0})
    run_and_wait(qtbot, widget)
    assert "fake mean" in model_viewer.layers


def test_engine_error_reaches_user_and_widget_recovers(qtbot, widget, model_viewer, monkeypatch):
    shown = []
    monkeypatch.setattr("napari_petdiff._widgets.reconstruction.notify_error", shown.append)
    widget.form.set_values({"steps": 5, "fail_at": 2})
    (msg,) = run_and_wait(qtbot, widget, "run_failed")
    assert "fake failure at step 2" in msg
    assert any("fake failure at step 2" in s for s in shown)
    assert "fake failure" in widget.status.text()
    assert "fake mean" not in model_viewer.layers and "fake live" not in model_viewer.layers
    assert widget.run_button.isEnabled()
    widget.form.set_values({"fail_at": -1})
    run_and_wait(qtbot, widget)
    assert "fake mean" in model_viewer.layers


def test_warnings_are_notified_and_stored(qtbot, widget, model_viewer, monkeypatch):
    shown = []
    monkeypatch.setattr("napari_petdiff._widgets.reconstruction.notify_warning", shown.append)
    widget.form.set_values({"steps": 1, "warn": True})
    run_and_wait(qtbot, widget)
    assert shown == ["fake warning"]
    assert model_viewer.layers["fake mean"].metadata["petdiff_warnings"] == ["fake warning"]


def test_no_acquisition_is_a_clear_error(qtbot, fake_methods, monkeypatch):
    from napari.components import ViewerModel

    shown = []
    monkeypatch.setattr("napari_petdiff._widgets.reconstruction.notify_error", shown.append)
    w = ReconstructionWidget(ViewerModel())
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.run_failed, timeout=TIMEOUT) as blocker:
        w.run_button.click()
    assert "no acquisition" in blocker.args[0] and shown
    assert w.run_button.isEnabled()


def test_memory_guard_refuses_before_starting(qtbot, fake_methods, monkeypatch):
    from napari.components import ViewerModel

    from napari_petdiff._widgets import settings
    from napari_petdiff._widgets.layers import acquisition_layer_data

    from .conftest import add_layer_data, fake_acquisition

    viewer = ViewerModel()
    add_layer_data(viewer, acquisition_layer_data(fake_acquisition(nz=4), name="vol"))
    monkeypatch.setattr(settings, "available_bytes", lambda: 1000)
    monkeypatch.setattr("napari_petdiff._widgets.reconstruction.notify_error", lambda m: None)
    w = ReconstructionWidget(viewer)
    qtbot.addWidget(w)
    w.set_method("fake")
    with qtbot.waitSignal(w.run_failed, timeout=TIMEOUT) as blocker:
        w.run_button.click()
    assert "RAM is available" in blocker.args[0]
    assert w.session is None and w.run_button.isEnabled()


def test_form_values_remembered_per_method(widget):
    widget.form.set_values({"steps": 9})
    widget.set_method("osem")
    assert "iterations" in widget.form.editors and not widget.target_box.isVisibleTo(widget)
    widget.set_method("fake")
    assert widget.form.value("steps") == 9


def test_target_iteration_gets_the_likelihood_plot(qtbot, widget):
    widget.set_method("fake-target")
    assert widget.target_box.isVisibleTo(widget)
    widget.form.set_value("target_iteration", 3.5)
    assert widget.target_plot.target == 3.5
    widget.target_plot.set_values([-10.0, -5.0, -3.0, -2.0, -1.5])
    assert widget.target_plot.target_value() == pytest.approx(-1.75)
    widget.set_method("fake")
    assert not widget.target_box.isVisibleTo(widget)


def test_likelihood_curve_is_computed_from_mlem(qtbot, fake_methods):
    from napari.components import ViewerModel

    from napari_petdiff._widgets.layers import acquisition_layer_data
    from napari_petdiff.engine.classical import mlem_iterates
    from napari_petdiff.engine.likelihood import PoissonLikelihood

    from .conftest import add_layer_data, small_scan

    viewer = ViewerModel()
    acq, truth = small_scan()
    add_layer_data(viewer, acquisition_layer_data(acq, {"truth": truth}, name="small"))
    w = ReconstructionWidget(viewer)
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.target_plot.curve_ready, timeout=TIMEOUT):
        w.set_method("fake-target")
    values = w.target_plot.values
    assert len(values) == 31  # x_0 .. x_30: max(2 x target, 30) iterations
    lik = PoissonLikelihood(acq, 1)
    expected = [float(lik.value(x)) for _, x in mlem_iterates(lik, 4)]
    assert values[:5] == pytest.approx(expected, rel=1e-6)
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(values[1:], values[2:]))  # EM never decreases L
    assert w.target_plot.target_value() == pytest.approx(values[4])
    # a target beyond the computed curve extends it
    with qtbot.waitSignal(w.target_plot.curve_ready, timeout=TIMEOUT):
        w.form.set_value("target_iteration", 20.0)
    assert len(w.target_plot.values) == 41


# ------------------------------------------------------------------- MR image
def _mr_viewer():
    """A viewer with one fake acquisition that carries its own MR (shown as its 'mr' layer)."""
    import torch
    from napari.components import ViewerModel

    from napari_petdiff._widgets.layers import acquisition_layer_data

    from .conftest import add_layer_data, fake_acquisition

    viewer = ViewerModel()
    acq = fake_acquisition(name="withmr")
    acq = acq.with_mr(torch.rand(acq.grid.shape, generator=torch.Generator().manual_seed(4)))
    add_layer_data(viewer, acquisition_layer_data(acq, name="withmr"))
    return viewer, acq


def test_mr_selector_attaches_a_chosen_layer(qtbot, widget, model_viewer):
    from napari_petdiff._widgets.layers import acquisition_of, grid_kwargs
    from napari_petdiff._widgets.reconstruction import MR_NONE, MR_OWN

    acq = acquisition_of(model_viewer.layers["fake prompts"])
    t1 = np.random.default_rng(0).random(acq.grid.shape).astype(np.float32)
    model_viewer.add_image(t1, name="T1", **grid_kwargs(acq.grid))
    # a new image layer is listed but never chosen by itself
    items = [widget.mr_picker.itemText(i) for i in range(widget.mr_picker.count())]
    assert items[:2] == [MR_OWN, MR_NONE] and {"T1", "fake truth"} <= set(items)
    assert "fake prompts" not in items and widget.mr_picker.currentText() == MR_OWN
    assert widget.mr_picker.select("T1")
    run_and_wait(qtbot, widget)
    np.testing.assert_array_equal(widget.session.acquisition.mr.numpy(), t1)
    assert acquisition_of(model_viewer.layers["fake prompts"]).mr is None  # the loaded acquisition is untouched
    assert model_viewer.layers["fake mean"].metadata["petdiff_mr"] == "T1"
    assert "fake mean" not in [widget.mr_picker.itemText(i) for i in range(widget.mr_picker.count())]


def test_mr_selector_defaults_to_the_acquisitions_own_mr_or_none(qtbot, fake_methods):
    viewer, acq = _mr_viewer()
    assert "withmr mr" in viewer.layers
    w = ReconstructionWidget(viewer)
    qtbot.addWidget(w)
    w.set_method("fake")
    assert "with MR" in w.acq_info.text()
    run_and_wait(qtbot, w)
    assert w.session.acquisition is acq  # own MR: run on the acquisition as it is
    assert w.mr_picker.select("none")
    run_and_wait(qtbot, w)
    assert w.session.acquisition.mr is None and acq.mr is not None
    assert viewer.layers["fake mean"].metadata["petdiff_mr"] is None
    # a newly loaded acquisition gets its own MR again, not the choice made for the previous one
    from napari_petdiff._widgets.layers import acquisition_layer_data

    from .conftest import add_layer_data, fake_acquisition

    add_layer_data(viewer, acquisition_layer_data(fake_acquisition(name="other"), name="other"))
    assert w.acq_picker.currentText() == "other prompts"
    assert w.mr_picker.currentText() == "acquisition's own" and "no MR" in w.acq_info.text()


@pytest.mark.parametrize("shape,placed,match", [
    ((1, 8, 8), True, r"MR layer 'bad' has shape \(1, 8, 8\) but the PET reconstruction grid is \(1, 16, 16\)"),
    ((1, 16, 16), False, "MR layer 'bad' is placed with scale"),
])
def test_misfit_mr_layer_is_a_clear_error(qtbot, widget, model_viewer, monkeypatch, shape, placed, match):
    from napari_petdiff._widgets.layers import acquisition_of, grid_kwargs

    shown = []
    monkeypatch.setattr("napari_petdiff._widgets.reconstruction.notify_error", shown.append)
    grid = acquisition_of(model_viewer.layers["fake prompts"]).grid
    model_viewer.add_image(np.ones(shape, np.float32), name="bad", **(grid_kwargs(grid) if placed else {}))
    assert widget.mr_picker.select("bad")
    with qtbot.waitSignal(widget.run_failed, timeout=TIMEOUT) as blocker:
        widget.run_button.click()
    assert re.search(match, blocker.args[0]) and "resample" in blocker.args[0].lower()
    assert widget.status.text().startswith("error: MR layer 'bad'") and shown == [blocker.args[0]]
    assert widget.session is None and widget.run_button.isEnabled()
    assert "fake mean" not in model_viewer.layers
