"""Settings dock widget: torch threads, device, memory guard, live update rate (shared by all widgets)."""
from __future__ import annotations

import os

from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QLabel, QSpinBox, QVBoxLayout, QWidget

from .common import connect_while_alive
from .param_form import GDoubleSpinBox
from .settings import SETTINGS, _fmt, available_bytes


class SettingsWidget(QWidget):
    def __init__(self, napari_viewer=None):
        super().__init__()
        self.viewer = napari_viewer
        lay = QVBoxLayout(self)
        form = QFormLayout()
        lay.addLayout(form)
        cores = os.cpu_count() or 1
        self.threads = QSpinBox()
        self.threads.setRange(1, max(cores * 2, 1))
        self.threads.setToolTip(f"torch CPU threads ({cores} cores here). With other jobs on the machine, fewer "
                                "threads can be faster.")
        form.addRow("torch threads", self.threads)
        self.device = QComboBox()
        for d in SETTINGS.devices():
            self.device.addItem(d, d)
        self.device.setToolTip("where the engine runs (CUDA appears when torch sees a GPU)")
        form.addRow("device", self.device)
        self.guard = QCheckBox("refuse 3-D runs that would not fit in RAM")
        form.addRow("memory guard", self.guard)
        self.rate = GDoubleSpinBox()
        self.rate.setRange(0.2, 30.0)
        self.rate.setSuffix(" /s")
        self.rate.setToolTip("live layer updates per second during a run (each costs GUI time)")
        form.addRow("live updates", self.rate)
        self.memory = QLabel("")
        form.addRow("available RAM", self.memory)
        self.error = QLabel("")
        self.error.setWordWrap(True)
        lay.addWidget(self.error)
        lay.addStretch(1)
        self._load()
        self.threads.valueChanged.connect(lambda v: self._apply(threads=v))
        self.device.currentIndexChanged.connect(lambda *_: self._apply(device=self.device.currentData()))
        self.guard.toggled.connect(lambda v: self._apply(memory_guard=v))
        self.rate.valueChanged.connect(lambda v: self._apply(live_rate=v))
        connect_while_alive(self, SETTINGS.changed, self._load)

    def _load(self) -> None:
        for w in (self.threads, self.device, self.guard, self.rate):
            w.blockSignals(True)
        self.threads.setValue(SETTINGS.threads)
        self.device.setCurrentIndex(max(self.device.findData(SETTINGS.device), 0))
        self.guard.setChecked(SETTINGS.memory_guard)
        self.rate.setValue(SETTINGS.live_rate)
        for w in (self.threads, self.device, self.guard, self.rate):
            w.blockSignals(False)
        have = available_bytes()
        self.memory.setText(_fmt(have) if have else "unknown")

    def _apply(self, **kw) -> None:
        try:
            SETTINGS.update(**kw)
            self.error.setText("")
        except ValueError as exc:
            self.error.setText(str(exc))
