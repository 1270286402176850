"""Comparison dock widget: run several methods on one acquisition, view them side by side, tabulate.

Runs go one after another (each a RunSession, same layers as the Reconstruction widget). Then the
viewer switches to grid mode with the reference and each method's mean in its own cell, with
linked contrast limits, and the table lists NRMSE / PSNR / SSIM against the reference (ground
truth, when there is one) and mean / CoV inside a region drawn as a Shapes or Labels layer.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                            QListWidget, QListWidgetItem, QProgressBar, QPushButton, QStackedWidget,
                            QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ..engine.methods import get_method, list_methods
from .common import AcquisitionPicker, AliveFlag, LayerPicker
from .layers import KEY_ROLE, publish_result, reference_layer, result_layer_names
from .param_form import ParamForm
from .reconstruction import layer_metadata, notify_error, notify_warning
from .roi import roi_mask, roi_stats
from .run_session import RunSession
from .settings import SETTINGS

log = logging.getLogger(__name__)

COLUMNS = ("method", "NRMSE", "PSNR (dB)", "SSIM", "ROI mean", "ROI CoV (%)", "time (s)")
HEADERS = ("method", "NRMSE", "PSNR dB", "SSIM", "ROI mean", "ROI CoV %", "time s")
DEFAULT_CHECKED = ("osem", "map-rdp")
REFERENCE_ROW = "reference"  # the region measured in the reference image itself


def compute_metrics(image: np.ndarray, reference: Optional[np.ndarray], mask: Optional[np.ndarray],
                    support: Optional[np.ndarray] = None) -> dict:
    """The table row of one image: engine.metrics against the reference (inside ``support``, e.g. the
    brain mask, when given), mean / CoV inside the drawn region ``mask``."""
    out = {}
    img = np.asarray(image, np.float32)
    if reference is not None:
        from ..engine import metrics

        ref = np.asarray(reference, np.float32).reshape(img.shape)
        sup = None if support is None else np.asarray(support).reshape(img.shape) > 0
        out["NRMSE"] = float(metrics.nrmse(img, ref, sup))
        out["PSNR (dB)"] = float(metrics.psnr(img, ref, sup))
        out["SSIM"] = float(metrics.ssim(img, ref, sup))
    if mask is not None:
        out["ROI mean"], out["ROI CoV (%)"] = roi_stats(img, mask)
    return out


def grid_of(viewer):
    """The viewer's grid settings (``viewer.canvas.grid`` from napari 0.9, ``viewer.grid`` before)."""
    canvas = getattr(viewer, "canvas", None)
    grid = getattr(canvas, "grid", None)
    return grid if grid is not None else viewer.grid


def _is_image(lay) -> bool:
    return type(lay).__name__ == "Image" and lay.metadata.get(KEY_ROLE) != "prompts"


def _is_region(lay) -> bool:
    return type(lay).__name__ in ("Shapes", "Labels")


class ComparisonWidget(QWidget):
    comparison_finished = Signal(list)   # method names that produced a result
    comparison_cancelled = Signal()
    comparison_failed = Signal(str)      # a run could not start (bad parameters, no data)
    metrics_updated = Signal()

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._alive = AliveFlag(self)
        self.session: Optional[RunSession] = None
        self.queue: list = []
        self.done: list[str] = []
        self.failed: dict[str, str] = {}
        self.runtimes: dict[str, float] = {}
        self.rows: dict[str, dict] = {}
        self.forms: dict[str, ParamForm] = {}
        self._linked: list = []

        lay = QVBoxLayout(self)
        top = QFormLayout()
        self.acq_picker = AcquisitionPicker(self.viewer)
        top.addRow("acquisition", self.acq_picker)
        lay.addLayout(top)

        mbox = QGroupBox("methods (tick to compare; select to edit parameters)")
        ml = QHBoxLayout(mbox)
        self.method_list = QListWidget()
        self.method_list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.method_list.setMaximumWidth(130)
        self.method_list.setMaximumHeight(150)
        self.form_stack = QStackedWidget()
        for spec in list_methods(kind="static"):
            item = QListWidgetItem(spec.name)
            item.setData(Qt.ItemDataRole.UserRole, spec.name)
            item.setToolTip(spec.description)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if spec.name in DEFAULT_CHECKED else Qt.CheckState.Unchecked)
            self.method_list.addItem(item)
            form = ParamForm(spec.params)
            self.forms[spec.name] = form
            self.form_stack.addWidget(form)
        ml.addWidget(self.method_list, 0, Qt.AlignmentFlag.AlignTop)
        ml.addWidget(self.form_stack, 1, Qt.AlignmentFlag.AlignTop)
        lay.addWidget(mbox, 0)
        self.method_list.currentRowChanged.connect(self.form_stack.setCurrentIndex)
        self.method_list.setCurrentRow(0)

        mform = QFormLayout()
        self.ref_picker = LayerPicker(self.viewer, _is_image, none_label="(none)")
        self.ref_picker.setToolTip("ground truth for NRMSE / PSNR / SSIM (the acquisition's truth by default)")
        mform.addRow("reference", self.ref_picker)
        self.roi_picker = LayerPicker(self.viewer, _is_region, none_label="(none)")
        self.roi_picker.setToolTip("a Shapes or Labels layer: mean and CoV are computed inside it")
        mform.addRow("region", self.roi_picker)
        self.side_by_side = QCheckBox("show side by side (grid view, linked contrast)")
        self.side_by_side.setChecked(True)
        mform.addRow(self.side_by_side)
        lay.addLayout(mform)

        buttons = QHBoxLayout()
        self.run_button = QPushButton("Run comparison")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.metrics_button = QPushButton("Update metrics")
        for b in (self.run_button, self.cancel_button, self.metrics_button):
            buttons.addWidget(b)
        lay.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        lay.addWidget(self.progress)
        self.status = QLabel("ready")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setToolTip("NRMSE / PSNR / SSIM against the reference, inside the acquisition's brain mask "
                              "when it has one; ROI mean and CoV inside the chosen region")
        self.table.setMinimumHeight(120)
        lay.addWidget(self.table, 1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.metrics_button.clicked.connect(self.update_metrics)
        self.acq_picker.picked.connect(self._default_reference)
        self._default_reference()

    # ----------------------------------------------------------- choices
    def checked_methods(self) -> list[str]:
        out = []
        for i in range(self.method_list.count()):
            it = self.method_list.item(i)
            if it.checkState() == Qt.CheckState.Checked:
                out.append(it.data(Qt.ItemDataRole.UserRole))
        return out

    def set_checked(self, names) -> None:
        names = set(names)
        for i in range(self.method_list.count()):
            it = self.method_list.item(i)
            it.setCheckState(Qt.CheckState.Checked if it.data(Qt.ItemDataRole.UserRole) in names
                             else Qt.CheckState.Unchecked)

    def _default_reference(self) -> None:
        ref = reference_layer(self.viewer.layers, self.acq_picker.source_name(), "truth")
        if ref is not None:
            self.ref_picker.select(ref.name)

    # --------------------------------------------------------------- run
    @property
    def running(self) -> bool:
        return self.session is not None and self.session.running

    def _fail_early(self, msg: str) -> None:
        self.status.setText(f"error: {msg}")
        notify_error(msg)
        self.comparison_failed.emit(msg)

    def run(self) -> None:
        if self.running:
            return
        acq = self.acq_picker.acquisition()
        if acq is None:
            self._fail_early("no acquisition: load a sample, open a .petacq file or simulate one in the Data widget")
            return
        names = self.checked_methods()
        if not names:
            self._fail_early("tick at least one method to compare")
            return
        queue = []
        for name in names:
            spec = get_method(name)
            try:
                params = self.forms[name].params()
                SETTINGS.check_memory(acq, spec, params)
            except ValueError as exc:
                self._fail_early(f"{name}: {exc}")
                return
            queue.append((spec, params))
        self.queue = queue
        self.total = len(queue)
        self.done, self.failed, self.runtimes, self.rows = [], {}, {}, {}
        self._acq = acq
        self._source = self.acq_picker.source_name()
        self._path = self.acq_picker.layer().metadata.get("petdiff_acquisition_path")
        self._set_busy(True)
        self._next()

    def _set_busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.method_list.setEnabled(not busy)
        self.acq_picker.setEnabled(not busy)

    def _next(self) -> None:
        if not self.queue:
            self._all_done()
            return
        spec, params = self.queue.pop(0)
        k = self.total - len(self.queue)
        self.progress.setRange(0, 0)
        self.status.setText(f"[{k}/{self.total}] running {spec.name}...")
        self.session = RunSession(self.viewer, spec, self._acq, params, device=SETTINGS.torch_device(),
                                  live_rate=SETTINGS.live_rate, listener=self, source=self._source)
        self.session.start()

    def cancel(self) -> None:
        if self.running:
            self.queue = []
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling...")
            self.session.cancel()

    # -------------------------------------------------- session callbacks
    def on_progress(self, step, total, msg) -> None:
        if self._alive[0]:
            k = self.total - len(self.queue)
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(min(step, total))
            self.status.setText(f"[{k}/{self.total}] {msg}")

    def on_warning(self, msg: str) -> None:
        notify_warning(msg)

    def on_result(self, out: dict) -> None:
        s = self.session
        publish_result(self.viewer, s.spec.name, out, s.acquisition.grid,
                       layer_metadata(s.spec, s, out, self._source, self._path))
        self.done.append(s.spec.name)
        self.runtimes[s.spec.name] = float(out.get("runtime_s") or 0.0)
        if self._alive[0]:
            self._next()

    def on_cancelled(self) -> None:
        if not self._alive[0]:
            return
        self._set_busy(False)
        self.progress.setRange(0, 1)
        self.status.setText(f"cancelled; {len(self.done)} finished result(s) kept")
        if self.done:
            self.show_results()
        self.comparison_cancelled.emit()

    def on_failed(self, msg: str, exc) -> None:
        name = self.session.spec.name
        self.failed[name] = msg
        notify_error(f"{name} failed: {msg}")
        if self._alive[0]:
            self._next()  # the other methods still give a comparison

    def _all_done(self) -> None:
        self.session_done = True
        self._set_busy(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        fails = "; failed: " + ", ".join(self.failed) if self.failed else ""
        self.status.setText(f"compared {len(self.done)} method(s){fails}")
        if self.done:
            self.show_results()
        self.comparison_finished.emit(list(self.done))

    # ------------------------------------------------------------- view
    def result_layers(self) -> list:
        out = []
        for name in self.done:
            lname = result_layer_names(name)["mean"]
            if lname in self.viewer.layers:
                out.append(self.viewer.layers[lname])
        return out

    def show_results(self) -> None:
        results = self.result_layers()
        ref = self.ref_picker.layer()
        shown = ([ref] if ref is not None else []) + results
        if self.side_by_side.isChecked() and shown:
            region = self.roi_picker.layer()
            # Compare by name: a docked widget sees layers through napari's proxies, so `is` fails.
            names = {s.name for s in shown}
            for lay in self.viewer.layers:
                lay.visible = lay.name in names
            if region is not None:
                region.visible = False  # in grid mode it would take a cell of its own
            grid_of(self.viewer).enabled = True
            self.viewer.reset_view()
            # napari fills the grid from the bottom of the layer list: say which cell is which.
            order = [lay.name for lay in self.viewer.layers if lay.name in names]
            self.status.setText(self.status.text() + "; grid (left to right, top to bottom): "
                                + ", ".join(n.removesuffix(" mean") for n in order))
        self._link_contrast(shown)
        self.update_metrics()

    def _link_contrast(self, layers) -> None:
        if self._linked:
            try:
                self.viewer.layers.unlink_layers(self._linked, ("contrast_limits",))
            except Exception:  # noqa: BLE001 - a layer of the old group may be gone
                log.debug("unlink failed", exc_info=True)
            self._linked = []
        if not layers:
            return
        hi = max(float(np.percentile(np.asarray(lay.data), 99.9)) for lay in layers)
        hi = hi if hi > 0 else 1.0
        for lay in layers:
            lay.contrast_limits = (0.0, hi)
        if len(layers) > 1:
            self.viewer.layers.link_layers(layers, ("contrast_limits",))
            self._linked = list(layers)

    def update_metrics(self) -> None:
        ref = self.ref_picker.layer()
        region = self.roi_picker.layer()
        ref_data = np.asarray(ref.data) if ref is not None else None
        rows = {}
        mask = None
        errors = []
        results = self.result_layers()
        support = None
        brain = reference_layer(self.viewer.layers, self.acq_picker.source_name(), "brain_mask")
        if brain is not None and results and np.asarray(brain.data).size == np.asarray(results[0].data).size:
            support = np.asarray(brain.data)
        self.support_used = support is not None
        if region is not None and results:
            try:
                mask = roi_mask(region, results[0])
            except ValueError as exc:
                errors.append(str(exc))
        for lay in results:
            method = lay.metadata.get("petdiff_method", lay.name)
            try:
                if ref_data is not None and ref_data.size != np.asarray(lay.data).size:
                    raise ValueError(f"the reference '{ref.name}' has shape {ref_data.shape}, the result "
                                     f"{np.asarray(lay.data).shape}: pick a reference on the same grid")
                rows[method] = compute_metrics(np.asarray(lay.data), ref_data, mask, support)
            except ValueError as exc:
                rows[method] = {}
                errors.append(f"{method}: {exc}")
            rows[method]["time (s)"] = self.runtimes.get(method, lay.metadata.get("petdiff_runtime_s") or float("nan"))
        for name, msg in self.failed.items():
            rows[name] = {"NRMSE": f"failed: {msg}"}
        if ref is not None and mask is not None and ref_data is not None and results \
                and ref_data.size == np.asarray(results[0].data).size:
            # the region in the reference itself: the value the reconstructions should recover
            try:
                m, c = roi_stats(ref_data, mask)
                rows[REFERENCE_ROW] = {"ROI mean": m, "ROI CoV (%)": c}
            except ValueError:
                pass
        self.rows = rows
        self._fill_table(rows)
        if errors:
            self.status.setText("; ".join(errors))
        self.metrics_updated.emit()

    def _fill_table(self, rows: dict) -> None:
        self.table.setRowCount(len(rows))
        for r, (name, vals) in enumerate(rows.items()):
            self.table.setItem(r, 0, QTableWidgetItem(name))
            for c, col in enumerate(COLUMNS[1:], start=1):
                v = vals.get(col)
                if v is None:
                    text = "-"
                elif isinstance(v, str):
                    text = v
                elif math.isnan(v):
                    text = "-"
                else:
                    text = f"{v:.4g}"
                item = QTableWidgetItem(text)
                item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()

