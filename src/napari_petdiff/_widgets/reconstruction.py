"""Reconstruction dock widget: pick an acquisition and a method, set its parameters, Run / Cancel.

Everything method-specific comes from the registry: the form is built from the method's Params
dataclass. The one exception is a ``target_iteration`` field (likelihood-matched diffusion
methods), which gets the MLEM log-likelihood curve to choose the target on. An optional MR image
layer (for MR-conditioned methods) is attached to the acquisition with ``with_mr`` at Run.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGroupBox, QLabel, QVBoxLayout, QWidget

from ..engine.methods import get_method, list_methods
from ..engine.params import fields_of
from .common import AcquisitionPicker, AliveFlag, LayerPicker, add_run_controls, connect_while_alive
from .layers import KEY_PATH, acquisition_of, mr_from_layer, publish_result
from .likelihood_plot import LikelihoodTargetPlot
from .param_form import ParamForm
from .run_session import RunSession
from .settings import SETTINGS, MemoryGuardError

log = logging.getLogger(__name__)

TARGET_FIELD = "target_iteration"
DEFAULT_METHOD = "osem"
MR_OWN = "acquisition's own"   # use acq.mr as it is (None if it has none)
MR_NONE = "none"               # reconstruct without MR
NO_ACQUISITION = ("no acquisition loaded: open a .petacq file, load a sample (File > Open Sample > "
                  "napari-petdiff) or simulate one in the Data widget")


def notify_error(msg: str) -> None:
    try:
        from napari.utils.notifications import show_error

        show_error(msg)
    except Exception:  # noqa: BLE001 - a headless viewer may have no notification sink
        log.error(msg)


def notify_warning(msg: str) -> None:
    try:
        from napari.utils.notifications import show_warning

        show_warning(msg)
    except Exception:  # noqa: BLE001
        log.warning(msg)


def _is_mr_candidate(layer) -> bool:
    """Image layers that could hold an MR: not sinograms, not RGB, not reconstruction results."""
    return (type(layer).__name__ == "Image" and acquisition_of(layer) is None and not getattr(layer, "rgb", False)
            and "petdiff_output" not in layer.metadata and layer.name != MR_NONE)


class MRPicker(LayerPicker):
    """MR image layer to attach: the acquisition's own MR (default), none, or an Image layer."""

    def __init__(self, viewer, parent=None):
        super().__init__(viewer, _is_mr_candidate, MR_OWN, parent)

    def refresh(self) -> None:
        cur = self.currentText()
        super().refresh()
        if self.currentText() != cur:
            # LayerPicker falls back to the newest layer; an MR must never be guessed: use the own one.
            self.setCurrentIndex(0)

    def names(self) -> list[str]:
        return [MR_NONE] + super().names()

    def choice(self):
        """MR_OWN, MR_NONE or the chosen layer."""
        name = self.currentText()
        return name if name in (MR_OWN, MR_NONE) else self.layer()

    def describe(self, acq) -> Optional[str]:
        """What the run used, for the result layers' metadata."""
        c = self.choice()
        if c == MR_OWN or c is None:
            return None if acq.mr is None else "acquisition"
        return None if c == MR_NONE else c.name


def with_chosen_mr(acq, choice):
    """``acq`` with the MR picked in the widget attached (ValueError if the layer does not fit the grid)."""
    if choice == MR_OWN or choice is None:
        return acq
    if choice == MR_NONE:
        return acq if acq.mr is None else acq.with_mr(None)
    return acq.with_mr(mr_from_layer(choice, acq.grid))


def layer_metadata(spec, session: RunSession, out: dict, source: Optional[str], path: Optional[str]) -> dict:
    params = out.get("params", {})
    seed = params.get("seed", out["metadata"].get("seed"))
    return {"petdiff_method": spec.name, "petdiff_params": params, "petdiff_seed": seed,
            "petdiff_likelihood": out["likelihood"], "petdiff_source_acquisition": source,
            "petdiff_acquisition_path": path, "petdiff_runtime_s": out.get("runtime_s"),
            "petdiff_warnings": out["warnings"], "petdiff_device": str(session.device),
            "petdiff_result_metadata": out["metadata"]}


class ReconstructionWidget(QWidget):
    """Dock widget. The parameter must be named ``napari_viewer`` for napari to inject the viewer."""

    run_started = Signal(str)
    run_finished = Signal(object)    # the result dict (numpy arrays, likelihood, metadata)
    run_cancelled = Signal()
    run_failed = Signal(str)
    live_updated = Signal(int)       # step of the engine event shown

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session: Optional[RunSession] = None
        self._values: dict[str, dict] = {}   # remembered form values per method
        self._ui_alive = AliveFlag(self)
        self.form: Optional[ParamForm] = None
        self.spec = None
        self._mr_for: Optional[str] = None   # acquisition layer the MR choice was made for

        lay = QVBoxLayout(self)
        top = QFormLayout()
        self.acq_picker = AcquisitionPicker(self.viewer)
        self.acq_picker.setToolTip("the acquisition (prompts layer) to reconstruct")
        top.addRow("acquisition", self.acq_picker)
        self.acq_info = QLabel("")
        self.acq_info.setWordWrap(True)
        top.addRow(self.acq_info)
        self.mr_picker = MRPicker(self.viewer)
        self.mr_picker.setToolTip("anatomical MR on the PET image grid, read by MR-conditioned methods: the "
                                  "acquisition's own MR (if it has one), none, or an image layer")
        top.addRow("MR image", self.mr_picker)
        self.method_box = QComboBox()
        for s in list_methods(kind="static"):
            self.method_box.addItem(s.name, s.name)
            self.method_box.setItemData(self.method_box.count() - 1, s.description, 3)  # tooltip role
        top.addRow("method", self.method_box)
        self.method_info = QLabel("")
        self.method_info.setWordWrap(True)
        top.addRow(self.method_info)
        lay.addLayout(top)

        self.params_box = QGroupBox("parameters")
        self.params_layout = QVBoxLayout(self.params_box)
        lay.addWidget(self.params_box)

        self.target_box = QGroupBox("likelihood target")
        tl = QVBoxLayout(self.target_box)
        self.target_plot = LikelihoodTargetPlot()
        tl.addWidget(self.target_plot)
        lay.addWidget(self.target_box)

        self.keep_samples = QCheckBox("keep posterior samples as a layer")
        self.keep_samples.setChecked(True)
        lay.addWidget(self.keep_samples)
        add_run_controls(self, lay)
        lay.addStretch(1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.method_box.currentIndexChanged.connect(lambda *_: self._method_changed())
        self.acq_picker.picked.connect(self._acquisition_picked)
        connect_while_alive(self, SETTINGS.changed, lambda *_: self._acquisition_changed())
        i = self.method_box.findData(DEFAULT_METHOD)
        self.method_box.blockSignals(True)
        self.method_box.setCurrentIndex(max(i, 0))
        self.method_box.blockSignals(False)
        self._method_changed()
        self._acquisition_picked()

    # ----------------------------------------------------------------- form
    @property
    def method(self) -> str:
        return self.method_box.currentData()

    def set_method(self, name: str) -> None:
        i = self.method_box.findData(name)
        if i < 0:
            raise ValueError(f"method '{name}' is not in the list: {[self.method_box.itemData(k) for k in range(self.method_box.count())]}")
        self.method_box.setCurrentIndex(i)

    def refresh_methods(self) -> None:
        """Re-read the registry (methods registered after the widget was built)."""
        cur = self.method
        self.method_box.blockSignals(True)
        self.method_box.clear()
        for s in list_methods(kind="static"):
            self.method_box.addItem(s.name, s.name)
        self.method_box.blockSignals(False)
        i = self.method_box.findData(cur)
        self.method_box.setCurrentIndex(max(i, 0))
        self._method_changed()

    def _method_changed(self) -> None:
        if self.form is not None and self.spec is not None:
            try:
                self._values[self.spec.name] = self.form.values()
            except ValueError:
                pass
            self.form.setParent(None)
            self.form.deleteLater()
            self.form = None
        name = self.method
        if name is None:
            self.spec = None
            return
        self.spec = get_method(name)
        self.method_info.setText(self.spec.description)
        self.form = ParamForm(self.spec.params, self._values.get(name))
        self.params_layout.addWidget(self.form)
        self.form.changed.connect(self._param_changed)
        has_target = TARGET_FIELD in {f.name for f in fields_of(self.spec.params)}
        self.target_box.setVisible(has_target)
        self.keep_samples.setVisible(bool(self.spec.samples))
        if has_target:
            self.target_plot.set_target(self.form.value(TARGET_FIELD))
            self._update_curve()

    def _param_changed(self, name: str) -> None:
        if name == TARGET_FIELD:
            self.target_plot.set_target(self.form.value(TARGET_FIELD))
            self._update_curve()

    def _curve_length(self) -> int:
        target = int(math.ceil(float(self.form.value(TARGET_FIELD))))
        f = next(f for f in fields_of(self.spec.params) if f.name == TARGET_FIELD)
        n = max(2 * target, 30)
        if f.metadata.get("max") is not None:
            n = min(n, int(f.metadata["max"]))
        return max(n, target, 1)

    def _update_curve(self) -> None:
        if not self.target_box.isVisible() and not (self.form and TARGET_FIELD in self.form.editors):
            return
        acq = self.acq_picker.acquisition()
        if acq is None or acq.is_dynamic or self.form is None or TARGET_FIELD not in self.form.editors:
            return
        self.target_plot.compute(acq, self._curve_length(), SETTINGS.torch_device())

    def _acquisition_picked(self) -> None:
        # Another acquisition: back to its own MR (an MR picked for one scan must not follow to the next).
        if self.acq_picker.currentText() != self._mr_for:
            self._mr_for = self.acq_picker.currentText()
            self.mr_picker.setCurrentIndex(0)
        self._acquisition_changed()

    def _acquisition_changed(self) -> None:
        acq = self.acq_picker.acquisition()
        if acq is None:
            self.acq_info.setText(NO_ACQUISITION)
        else:
            g = acq.grid
            self.acq_info.setText(f"{'2-D' if g.is_2d else '3-D'} {g.shape[2]}x{g.shape[1]}"
                                  f"{'' if g.is_2d else 'x' + str(g.shape[0])}, {g.voxel_size[2]:g} mm voxels, "
                                  f"{acq.total_counts:.3g} prompts, {'with' if acq.mr is not None else 'no'} "
                                  f"MR; device {SETTINGS.device}")
        if self.form is not None and TARGET_FIELD in self.form.editors:
            self._update_curve()

    # ------------------------------------------------------------------ run
    @property
    def running(self) -> bool:
        return self.session is not None and self.session.running

    def _set_busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.method_box.setEnabled(not busy)
        self.acq_picker.setEnabled(not busy)
        self.mr_picker.setEnabled(not busy)
        if self.form is not None:
            self.form.setEnabled(not busy)

    def _fail_early(self, msg: str) -> None:
        self.status.setText(f"error: {msg}")
        notify_error(msg)
        self.run_failed.emit(msg)

    def run(self) -> Optional[RunSession]:
        if self.running:
            return None
        acq = self.acq_picker.acquisition()
        if acq is None:
            self._fail_early(NO_ACQUISITION)
            return None
        spec = self.spec
        try:
            params = self.form.params()
            if acq.is_dynamic and spec.kind == "static":
                raise ValueError("this acquisition is dynamic (several frames); static methods need one frame. "
                                 "Use the Patlak widget for dynamic data.")
            acq = with_chosen_mr(acq, self.mr_picker.choice())
            SETTINGS.check_memory(acq, spec, params)
        except (ValueError, MemoryGuardError) as exc:
            self._fail_early(str(exc))
            return None
        layer = self.acq_picker.layer()
        self._run_context = (self.acq_picker.source_name(), layer.metadata.get(KEY_PATH), self.keep_samples.isChecked(),
                             self.mr_picker.describe(acq))
        self.session = RunSession(self.viewer, spec, acq, params, device=SETTINGS.torch_device(),
                                  live_rate=SETTINGS.live_rate, listener=self, source=self._run_context[0])
        self._t0 = time.monotonic()
        self._set_busy(True)
        self.progress.setRange(0, 0)  # indeterminate until the first Progress event
        self.status.setText(f"running {spec.name}...")
        self.session.start()
        self.run_started.emit(spec.name)
        return self.session

    def cancel(self) -> None:
        if self.running:
            self.status.setText("cancelling...")
            self.cancel_button.setEnabled(False)
            self.session.cancel()

    # ------------------------------------------------- session callbacks
    def on_progress(self, step: int, total: int, msg: str) -> None:
        if not self._ui_alive[0]:
            return
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(step, max(total, 1)))
        self.status.setText(msg or f"{step}/{total}")

    def on_live(self, step: int, label: str) -> None:
        if self._ui_alive[0]:
            self.live_updated.emit(step)

    def on_sample(self, index: int) -> None:
        if self._ui_alive[0]:
            self.status.setText(f"posterior sample {index + 1} done")

    def on_warning(self, msg: str) -> None:
        notify_warning(msg)

    def on_result(self, out: dict) -> None:
        session = self.session
        source, path, keep, mr = self._run_context
        # Results go to the viewer even if this dock was closed meanwhile.
        publish_result(self.viewer, session.spec.name, out, session.acquisition.grid,
                       dict(layer_metadata(session.spec, session, out, source, path), petdiff_mr=mr),
                       keep_samples=keep)
        if not self._ui_alive[0]:
            return
        self._set_busy(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        note = f"; {len(out['warnings'])} warning(s)" if out["warnings"] else ""
        self.status.setText(f"{session.spec.name} done in {out.get('runtime_s', 0):.1f} s{note}")
        self.run_finished.emit(out)

    def on_cancelled(self) -> None:
        if not self._ui_alive[0]:
            return
        self._set_busy(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText("cancelled; ready")
        self.run_cancelled.emit()

    def on_failed(self, msg: str, exc) -> None:
        notify_error(f"{self.session.spec.name if self.session else 'run'} failed: {msg}")
        if not self._ui_alive[0]:
            return
        self._set_busy(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.status.setText(f"error: {msg}")
        self.run_failed.emit(msg)

