"""Data dock widget: choose a loaded acquisition, open or save one, or simulate one in a worker."""
from __future__ import annotations

import logging
from typing import Optional

from qtpy.QtCore import Signal
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QLineEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from .common import AcquisitionPicker, AliveFlag
from .layers import KEY_ROLE, KEY_SOURCE, acquisition_layer_data, acquisition_of
from .param_form import GDoubleSpinBox
from .reconstruction import notify_error

log = logging.getLogger(__name__)

PHANTOM_HELP = {"brain2d": "2-D brain slice (MNI-based, FDG)", "brain3d": "3-D brain volume (64 slices)",
                "shepp2d": "2-D Shepp-Logan (quick tests)"}


def simulate_scan(phantom: str, counts: float, background_fraction: float, seed: int, psf_fwhm_mm: float,
                  lesions: bool):
    """Worker function: returns ('ok', acquisition, images) or ('error', message)."""
    from ..engine.samples import make_scan

    try:
        acq, images = make_scan(phantom, counts=counts, background_fraction=background_fraction,
                                psf_fwhm_mm=psf_fwhm_mm, lesions=lesions, seed=seed)
        return ("ok", acq, images)
    except Exception as exc:  # noqa: BLE001 - shown to the user, not lost in the thread
        log.exception("simulation failed")
        return ("error", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")


def upsert_layer_data(viewer, layer_data) -> list:
    """Add LayerDataTuples; a layer of the same name and type is updated in place."""
    out = []
    for data, kwargs, kind in layer_data:
        name = kwargs.get("name")
        if name in viewer.layers and type(viewer.layers[name]).__name__.lower() == kind:
            layer = viewer.layers[name]
            layer.scale = kwargs.get("scale", layer.scale)
            layer.translate = kwargs.get("translate", layer.translate)
            layer.data = data
            layer.metadata.clear()
            layer.metadata.update(kwargs.get("metadata", {}))
            if kind == "image":
                layer.reset_contrast_limits()
        else:
            if name in viewer.layers:
                viewer.layers.remove(name)
            layer = getattr(viewer, f"add_{kind}")(data, **kwargs)
        out.append(layer)
    return out


class DataWidget(QWidget):
    simulation_finished = Signal(str)   # name of the new acquisition
    simulation_failed = Signal(str)

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._worker = None
        self._alive = AliveFlag(self)
        lay = QVBoxLayout(self)

        box = QGroupBox("loaded acquisition")
        bl = QVBoxLayout(box)
        self.picker = AcquisitionPicker(self.viewer)
        bl.addWidget(self.picker)
        self.info = QLabel("")
        self.info.setWordWrap(True)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.TypeWriter)
        mono.setPointSize(max(mono.pointSize() - 1, 7))
        self.info.setFont(mono)
        bl.addWidget(self.info)
        row = QHBoxLayout()
        self.open_button = QPushButton("Open file...")
        self.save_button = QPushButton("Save as .petacq...")
        row.addWidget(self.open_button)
        row.addWidget(self.save_button)
        bl.addLayout(row)
        lay.addWidget(box)

        sim = QGroupBox("simulate an acquisition")
        form = QFormLayout(sim)
        from ..engine.samples import PHANTOMS

        self.phantom = QComboBox()
        for p in PHANTOMS:
            self.phantom.addItem(p, p)
            self.phantom.setItemData(self.phantom.count() - 1, PHANTOM_HELP.get(p, p), 3)
        form.addRow("phantom", self.phantom)
        self.counts = GDoubleSpinBox()
        self.counts.setRange(1e2, 1e11)
        self.counts.setValue(1e5)
        self.counts.setToolTip("total expected true coincidences in the sinogram (all slices)")
        form.addRow("counts (trues)", self.counts)
        self.background = GDoubleSpinBox()
        self.background.setRange(0.0, 10.0)
        self.background.setValue(0.3)
        self.background.setToolTip("expected randoms + scatter as a fraction of the trues")
        form.addRow("background fraction", self.background)
        self.psf = GDoubleSpinBox()
        self.psf.setRange(0.0, 20.0)
        self.psf.setSuffix(" mm")
        self.psf.setValue(0.0)
        self.psf.setToolTip("scanner resolution: Gaussian PSF FWHM in mm (0 = none)")
        form.addRow("PSF FWHM", self.psf)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setToolTip("seed of the Poisson noise (same seed = same data)")
        form.addRow("seed", self.seed)
        self.lesions = QCheckBox()
        self.lesions.setToolTip("add the default hot and cold lesions (and a lesions Labels layer)")
        form.addRow("lesions", self.lesions)
        self.name = QLineEdit()
        self.name.setPlaceholderText("(phantom name)")
        self.name.setToolTip("layer name prefix of the new acquisition")
        form.addRow("name", self.name)
        self.simulate_button = QPushButton("Simulate")
        form.addRow(self.simulate_button)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        form.addRow(self.progress)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        form.addRow(self.status)
        lay.addWidget(sim)
        lay.addStretch(1)

        self.picker.picked.connect(self._picked)
        self.open_button.clicked.connect(self.open_dialog)
        self.save_button.clicked.connect(self.save_dialog)
        self.simulate_button.clicked.connect(self.simulate)
        self._picked()

    # ------------------------------------------------------------ loaded
    def _picked(self) -> None:
        acq = self.picker.acquisition()
        self.save_button.setEnabled(acq is not None)
        if acq is None:
            self.info.setText("no acquisition loaded yet: open a .petacq file, load a sample "
                              "(File > Open Sample) or simulate one below")
            return
        self.info.setText(acq.describe())
        layer = self.picker.layer()
        # Selecting it makes the other widgets follow.
        active = self.viewer.layers.selection.active
        if active is None or active.name != layer.name:
            self.viewer.layers.selection.active = layer

    def open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open acquisition or image", "",
                                              "PET data (*.petacq *.nii *.nii.gz);;All files (*)")
        if path:
            self.open_path(path)

    def open_path(self, path: str) -> list:
        try:
            return self.viewer.open(path, plugin="napari-petdiff")
        except Exception as exc:  # noqa: BLE001
            msg = f"could not open {path}: {exc}"
            self.status.setText(msg)
            notify_error(msg)
            return []

    def save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save acquisition", "", "napari-petdiff acquisition (*.petacq)")
        if path:
            self.save_path(path)

    def reference_images(self, source: str) -> dict:
        """Image layers tagged with this acquisition (truth, mu, mr) -> {role: array}."""
        out = {}
        for lay in self.viewer.layers:
            md = lay.metadata
            if md.get(KEY_SOURCE) == source and md.get(KEY_ROLE) not in (None, "prompts") \
                    and acquisition_of(lay) is None and type(lay).__name__ == "Image":
                out[md[KEY_ROLE]] = lay.data
        return out

    def save_path(self, path: str) -> Optional[str]:
        from ..engine.io import ACQ_SUFFIX, save_acquisition

        acq = self.picker.acquisition()
        if acq is None:
            return None
        if not path.endswith(ACQ_SUFFIX):
            path += ACQ_SUFFIX
        try:
            save_acquisition(path, acq, self.reference_images(self.picker.source_name()))
        except Exception as exc:  # noqa: BLE001
            msg = f"could not save {path}: {exc}"
            self.status.setText(msg)
            notify_error(msg)
            return None
        self.status.setText(f"saved {path}")
        return path

    # ---------------------------------------------------------- simulate
    def simulate(self) -> None:
        if self._worker is not None:
            return
        from napari.qt.threading import create_worker

        phantom = self.phantom.currentData()
        name = self.name.text().strip() or phantom
        args = (phantom, float(self.counts.value()), float(self.background.value()), int(self.seed.value()),
                float(self.psf.value()), self.lesions.isChecked())
        self.simulate_button.setEnabled(False)
        self.progress.setRange(0, 0)
        self.status.setText(f"simulating {phantom} ({args[1]:.3g} counts)...")
        worker = create_worker(simulate_scan, *args, _start_thread=False,
                               _progress={"desc": f"simulating {phantom}"})
        worker.returned.connect(lambda out, name=name: self._simulated(out, name))
        self._worker = worker
        worker.start()

    def _simulated(self, outcome, name: str) -> None:
        self._worker = None
        if outcome[0] == "ok":
            _, acq, images = outcome
            acq.metadata.setdefault("name", name)
            upsert_layer_data(self.viewer, acquisition_layer_data(acq, images, name=name))
            if not self._alive[0]:
                return
            self.picker.refresh()
            self.picker.select(f"{name} prompts")
            self._finish(f"simulated '{name}': {acq.total_counts:.4g} prompts")
            self.simulation_finished.emit(name)
        else:
            msg = f"simulation failed: {outcome[1]}"
            notify_error(msg)
            if not self._alive[0]:
                return
            self._finish(msg)
            self.simulation_failed.emit(outcome[1])

    def _finish(self, msg: str) -> None:
        self.simulate_button.setEnabled(True)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        self.status.setText(msg)

