"""Small Qt pieces shared by the widgets: viewer-event wiring that dies with the widget, pickers."""
from __future__ import annotations

import weakref
from typing import Callable, Optional

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox, QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from .layers import KEY_SOURCE, acquisition_layers, acquisition_of


def qt_alive(obj) -> bool:
    """False once the Qt (C++) side of ``obj`` is deleted (works for PyQt and PySide)."""
    try:
        obj.objectName()
        return True
    except RuntimeError:
        return False


class AliveFlag:
    """``flag[0]`` is True while the widget exists.

    Checked lazily instead of via ``destroyed`` handlers: Python code running inside a C++
    destructor (destroyed signal) crashed the interpreter here when the widget's viewer was gone.
    """

    def __init__(self, widget):
        self._ref = weakref.ref(widget)

    def __getitem__(self, i) -> bool:
        w = self._ref()
        return w is not None and qt_alive(w)


def connect_while_alive(widget: QWidget, emitter, callback: Callable) -> None:
    """Connect a napari/psygnal event to ``callback``; the call is dropped once ``widget`` is deleted.

    napari would otherwise keep calling into a deleted Qt object after the dock is closed. The relay
    stays connected (a few bytes) rather than being disconnected from a destructor.
    """
    alive = AliveFlag(widget)

    def relay(*args):
        if not alive[0]:
            return
        try:
            callback(*args)
        except RuntimeError as exc:
            if "deleted" not in str(exc):
                raise

    emitter.connect(relay)
    # The relay must live as long as the connection (some emitters keep only weak references).
    widget.__dict__.setdefault("_petdiff_relays", []).append(relay)


def layer_events(viewer):
    ev = viewer.layers.events
    return [ev.inserted, ev.removed, ev.reordered]


class LayerPicker(QComboBox):
    """Combo box of viewer layers passing ``accept``; keeps its choice across layer changes."""

    picked = Signal()

    def __init__(self, viewer, accept: Callable, none_label: Optional[str] = None, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.accept = accept
        self.none_label = none_label
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(12)
        for em in layer_events(viewer):
            connect_while_alive(self, em, lambda *_: self.refresh())
        self.currentIndexChanged.connect(lambda *_: self.picked.emit())
        self.refresh()

    def names(self) -> list[str]:
        return [lay.name for lay in self.viewer.layers if self.accept(lay)]

    def refresh(self) -> None:
        cur = self.currentText()
        names = self.names()
        items = ([self.none_label] if self.none_label is not None else []) + names
        if items == [self.itemText(i) for i in range(self.count())]:
            return
        self.blockSignals(True)
        self.clear()
        self.addItems(items)
        if cur in items:
            self.setCurrentIndex(items.index(cur))
        elif names:
            self.setCurrentIndex(items.index(names[-1]))  # the newest layer
        self.blockSignals(False)
        self.picked.emit()

    def layer(self):
        name = self.currentText()
        if not name or name == self.none_label or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def select(self, name: str) -> bool:
        i = self.findText(name)
        if i >= 0:
            self.setCurrentIndex(i)
            return True
        return False


class AcquisitionPicker(LayerPicker):
    """Acquisition layers; follows the viewer's selection when an acquisition (or its image) is selected."""

    def __init__(self, viewer, parent=None):
        super().__init__(viewer, lambda lay: acquisition_of(lay) is not None, None, parent)
        connect_while_alive(self, viewer.layers.selection.events.active, self._follow)

    def _follow(self, event=None) -> None:
        active = self.viewer.layers.selection.active
        if active is None:
            return
        if acquisition_of(active) is not None:
            self.select(active.name)
            return
        src = active.metadata.get(KEY_SOURCE) if hasattr(active, "metadata") else None
        if src:
            for lay in acquisition_layers(self.viewer.layers):
                if lay.metadata.get(KEY_SOURCE) == src:
                    self.select(lay.name)
                    return

    def acquisition(self):
        lay = self.layer()
        return None if lay is None else acquisition_of(lay)

    def source_name(self) -> Optional[str]:
        lay = self.layer()
        return None if lay is None else lay.metadata.get(KEY_SOURCE, lay.name)


def safe_canvas(figure):
    """A matplotlib Qt canvas whose deferred redraws die with it.

    matplotlib's ``draw_idle`` queues a bare ``QTimer.singleShot`` callback; if the dock is closed
    before it fires, it touches the deleted canvas. Here the timer is a child of the canvas.
    """
    from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
    from qtpy.QtCore import QTimer

    class _Canvas(FigureCanvasQTAgg):
        def __init__(self, fig):
            super().__init__(fig)
            self._idle_timer = QTimer(self)
            self._idle_timer.setSingleShot(True)
            self._idle_timer.setInterval(0)
            self._idle_timer.timeout.connect(self.draw)

        def draw_idle(self):  # noqa: D401 - matplotlib API
            self._idle_timer.start()

        def draw(self):
            # A redraw queued by matplotlib can fire after Qt deleted the canvas (dock closed).
            try:
                super().draw()
            except RuntimeError:
                pass

    return _Canvas(figure)


def add_run_controls(owner, layout, ready_text: str = "ready") -> None:
    """Run / Cancel buttons, a progress bar and a status line (``owner.run_button`` ...)."""
    row = QHBoxLayout()
    owner.run_button = QPushButton("Run")
    owner.cancel_button = QPushButton("Cancel")
    owner.cancel_button.setEnabled(False)
    row.addWidget(owner.run_button)
    row.addWidget(owner.cancel_button)
    layout.addLayout(row)
    owner.progress = QProgressBar()
    owner.progress.setRange(0, 1)
    owner.progress.setValue(0)
    layout.addWidget(owner.progress)
    owner.status = QLabel(ready_text)
    owner.status.setWordWrap(True)
    layout.addWidget(owner.status)

