"""Data widget (simulate in a worker, pick, save) and the shared settings with their memory guard."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from napari.components import ViewerModel

from napari_petdiff._reader import get_reader
from napari_petdiff._widgets import settings as settings_mod
from napari_petdiff._widgets.data import DataWidget
from napari_petdiff._widgets.layers import KEY_ACQ
from napari_petdiff._widgets.settings import SETTINGS, MemoryGuardError, estimate_run_bytes
from napari_petdiff._widgets.settings_widget import SettingsWidget
from napari_petdiff.engine.methods import get_method

from .conftest import FAKE, fake_acquisition, small_scan

TIMEOUT = 20_000


def fake_make_scan(calls):
    def make_scan(name, counts=1e5, background_fraction=0.3, psf_fwhm_mm=0.0, lesions=False, seed=0, **kw):
        calls.append(dict(name=name, counts=counts, background_fraction=background_fraction, seed=seed,
                          psf_fwhm_mm=psf_fwhm_mm, lesions=lesions))
        if counts < 1000:
            raise ValueError("counts too low for this test: use at least 1000")
        acq, truth = small_scan(name=name, counts=counts)
        return acq, {"truth": truth, "brain_mask": (truth > 0).float()}
    return make_scan


def test_simulate_adds_an_acquisition_the_widgets_find(qtbot, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("napari_petdiff.engine.samples.make_scan", fake_make_scan(calls))
    viewer = ViewerModel()
    w = DataWidget(viewer)
    qtbot.addWidget(w)
    assert "no acquisition" in w.info.text()
    w.phantom.setCurrentIndex(w.phantom.findData("shepp2d"))
    w.counts.setValue(5e4)
    w.background.setValue(0.5)
    w.seed.setValue(11)
    w.name.setText("sim")
    with qtbot.waitSignal(w.simulation_finished, timeout=TIMEOUT) as blocker:
        w.simulate_button.click()
    assert blocker.args == ["sim"]
    assert calls == [dict(name="shepp2d", counts=5e4, background_fraction=0.5, seed=11, psf_fwhm_mm=0.0,
                          lesions=False)]
    prompts = viewer.layers["sim prompts"]
    assert prompts.metadata[KEY_ACQ] is w.picker.acquisition()
    assert {"sim truth", "sim brain mask"} <= {lay.name for lay in viewer.layers}
    assert "static PET acquisition" in w.info.text()
    assert w.simulate_button.isEnabled()
    # save it and read it back through the reader
    path = w.save_path(str(tmp_path / "saved"))
    assert path.endswith(".petacq")
    layers = get_reader(path)(path)
    names = {kw["name"] for _, kw, _ in layers}
    assert names == {"saved prompts", "saved truth"}
    acq = [kw for _, kw, _ in layers if kw["name"] == "saved prompts"][0]["metadata"][KEY_ACQ]
    assert float(acq.prompts.sum()) == float(prompts.metadata[KEY_ACQ].prompts.sum())


def test_resimulating_updates_layers_in_place(qtbot, monkeypatch):
    monkeypatch.setattr("napari_petdiff.engine.samples.make_scan", fake_make_scan([]))
    viewer = ViewerModel()
    w = DataWidget(viewer)
    qtbot.addWidget(w)
    w.name.setText("sim")
    with qtbot.waitSignal(w.simulation_finished, timeout=TIMEOUT):
        w.simulate_button.click()
    layer = viewer.layers["sim prompts"]
    n = len(viewer.layers)
    w.counts.setValue(4e5)
    with qtbot.waitSignal(w.simulation_finished, timeout=TIMEOUT):
        w.simulate_button.click()
    assert viewer.layers["sim prompts"] is layer and len(viewer.layers) == n
    assert layer.metadata[KEY_ACQ].total_counts > 2e5


def test_simulation_error_is_reported(qtbot, monkeypatch):
    shown = []
    monkeypatch.setattr("napari_petdiff.engine.samples.make_scan", fake_make_scan([]))
    monkeypatch.setattr("napari_petdiff._widgets.data.notify_error", shown.append)
    w = DataWidget(ViewerModel())
    qtbot.addWidget(w)
    w.counts.setValue(500)
    with qtbot.waitSignal(w.simulation_failed, timeout=TIMEOUT) as blocker:
        w.simulate_button.click()
    assert "counts too low" in blocker.args[0] and shown
    assert w.simulate_button.isEnabled() and "counts too low" in w.status.text()


@pytest.fixture
def restore_settings():
    old = (SETTINGS.threads, SETTINGS.device, SETTINGS.memory_guard, SETTINGS.live_rate)
    yield
    SETTINGS.update(threads=old[0], device=old[1], memory_guard=old[2], live_rate=old[3])


def test_settings_widget_changes_the_shared_settings(qtbot, restore_settings):
    w = SettingsWidget()
    qtbot.addWidget(w)
    assert [w.device.itemData(i) for i in range(w.device.count())] == SETTINGS.devices()
    assert ("cuda" in SETTINGS.devices()) == torch.cuda.is_available()
    w.threads.setValue(1)
    assert SETTINGS.threads == 1 and torch.get_num_threads() == 1
    w.guard.setChecked(False)
    assert SETTINGS.memory_guard is False
    w.rate.setValue(2.0)
    assert SETTINGS.live_rate == 2.0
    SETTINGS.update(memory_guard=True)  # another widget's change shows here
    assert w.guard.isChecked()


def test_settings_reject_unavailable_device(restore_settings):
    with pytest.raises(ValueError, match="not available"):
        SETTINGS.update(device="tpu")


def test_memory_guard_refuses_3d_that_does_not_fit(restore_settings, monkeypatch):
    acq3 = fake_acquisition(nz=8)
    params = FAKE.params(samples=4)
    need = estimate_run_bytes(acq3, FAKE, params)
    assert need > estimate_run_bytes(acq3, FAKE, FAKE.params(samples=1))  # more samples, more memory
    with pytest.raises(MemoryGuardError, match="needs about .* only .* of RAM"):
        SETTINGS.check_memory(acq3, FAKE, params, available=need // 2)
    assert SETTINGS.check_memory(acq3, FAKE, params, available=need * 2) == need
    # 2-D runs and a switched-off guard are never refused
    assert SETTINGS.check_memory(fake_acquisition(nz=1), FAKE, params, available=1) > 0
    SETTINGS.update(memory_guard=False)
    assert SETTINGS.check_memory(acq3, FAKE, params, available=1) == need


def test_available_memory_reads_the_system():
    have = settings_mod.available_bytes()
    assert have > 0
    # /proc/meminfo path agrees with psutil to within what other processes allocate meanwhile
    with open("/proc/meminfo") as fh:
        line = next(l for l in fh if l.startswith("MemAvailable:"))
    assert abs(int(line.split()[1]) * 1024 - have) < 0.25 * have


def test_classical_factor_smaller_than_diffusion():
    acq = fake_acquisition(nz=8)
    osem = get_method("osem")
    assert estimate_run_bytes(acq, osem, osem.params()) < estimate_run_bytes(acq, FAKE, FAKE.params(samples=1))
