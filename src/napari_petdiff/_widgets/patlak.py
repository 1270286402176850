"""Patlak dock widget: Ki and intercept images from a dynamic acquisition, TAC and Patlak plot per voxel.

The methods are the registry's ``kind='dynamic'`` ones (their form holds t* and the rest). After a
run, clicking a voxel in the viewer plots its time-activity curve and its Patlak plot
(x = int Cp / Cp, y = C / Cp) with the fitted line (slope Ki, intercept V). The measured points
need the method's frame images (``Result.extra['frames']``, decay-corrected, one per fitted frame);
without them only the fitted model is drawn.
"""
from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QComboBox, QFormLayout, QGroupBox, QLabel, QPushButton, QVBoxLayout,
                            QWidget)

from ..engine.methods import get_method, list_methods
from .common import AliveFlag, LayerPicker, add_run_controls, safe_canvas
from .layers import KEY_PATH, KEY_SOURCE, acquisition_of, publish_result
from .param_form import ParamForm
from .reconstruction import layer_metadata, notify_error, notify_warning
from .run_session import RunSession
from .settings import SETTINGS

log = logging.getLogger(__name__)


def _is_dynamic_acq(layer) -> bool:
    acq = acquisition_of(layer)
    return acq is not None and acq.is_dynamic


class PatlakWidget(QWidget):
    run_finished = Signal(object)
    run_cancelled = Signal()
    run_failed = Signal(str)
    voxel_shown = Signal(tuple)   # (z, y, x) index plotted

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._alive = AliveFlag(self)
        self.session: Optional[RunSession] = None
        self.form: Optional[ParamForm] = None
        self.spec = None
        self.result: Optional[dict] = None
        self.setup = None
        self._grid = None
        self._last_idx = None
        lay = QVBoxLayout(self)
        top = QFormLayout()
        self.acq_picker = LayerPicker(self.viewer, _is_dynamic_acq)
        self.acq_picker.setToolTip("a dynamic acquisition (frames with start/stop times and an input function)")
        top.addRow("acquisition", self.acq_picker)
        self.method_box = QComboBox()
        for s in list_methods(kind="dynamic"):
            self.method_box.addItem(s.name, s.name)
        top.addRow("method", self.method_box)
        self.method_info = QLabel("")
        self.method_info.setWordWrap(True)
        top.addRow(self.method_info)
        lay.addLayout(top)
        self.params_box = QGroupBox("parameters")
        self.params_layout = QVBoxLayout(self.params_box)
        lay.addWidget(self.params_box)
        add_run_controls(self, lay, "ready" if self.method_box.count() else
                         "no dynamic (Patlak) methods are registered in this build")
        self.figure = Figure(figsize=(3.2, 4.2), dpi=90, tight_layout=True)
        self.canvas = safe_canvas(self.figure)
        self.canvas.setMinimumHeight(300)
        self.ax_tac = self.figure.add_subplot(211)
        self.ax_patlak = self.figure.add_subplot(212)
        lay.addWidget(self.canvas)
        self.voxel_info = QLabel("run, then click a voxel to see its curves")
        self.voxel_info.setWordWrap(True)
        lay.addWidget(self.voxel_info)
        self.frames_button = QPushButton("Reconstruct frames for the curves")
        self.frames_button.setToolTip("the method returned Ki and intercept only: reconstruct the fitted frames "
                                      "(OSEM, as the method did) to plot measured points")
        self.frames_button.setVisible(False)
        lay.addWidget(self.frames_button)
        self._frames_worker = None
        lay.addStretch(1)

        self.run_button.setEnabled(self.method_box.count() > 0)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.frames_button.clicked.connect(self.reconstruct_frames)
        self.method_box.currentIndexChanged.connect(lambda *_: self._method_changed())
        self._click = _click_handler(self._alive, self)
        self.viewer.mouse_drag_callbacks.append(self._click)
        self._method_changed()
        self._draw_empty()

    # -------------------------------------------------------------- form
    def _method_changed(self) -> None:
        if self.form is not None:
            self.form.setParent(None)
            self.form.deleteLater()
            self.form = None
        name = self.method_box.currentData()
        if name is None:
            return
        self.spec = get_method(name)
        self.method_info.setText(self.spec.description)
        self.form = ParamForm(self.spec.params)
        self.params_layout.addWidget(self.form)

    # --------------------------------------------------------------- run
    @property
    def running(self) -> bool:
        return self.session is not None and self.session.running

    def _fail(self, msg: str) -> None:
        self.status.setText(f"error: {msg}")
        notify_error(msg)
        self.run_failed.emit(msg)

    def run(self) -> None:
        if self.running or self.spec is None:
            return
        layer = self.acq_picker.layer()
        if layer is None:
            self._fail("no dynamic acquisition loaded: open a dynamic .petacq file (petdiff simulate --dynamic) or "
                       "load the dynamic sample (File > Open Sample)")
            return
        acq = acquisition_of(layer)
        try:
            params = self.form.params()
            SETTINGS.check_memory(acq, self.spec, params)
        except ValueError as exc:
            self._fail(str(exc))
            return
        self._ctx = (layer.metadata.get(KEY_SOURCE, layer.name), layer.metadata.get(KEY_PATH), acq, params)
        self.session = RunSession(self.viewer, self.spec, acq, params, device=SETTINGS.torch_device(),
                                  live_rate=SETTINGS.live_rate, listener=self)
        self._set_busy(True)
        self.progress.setRange(0, 0)
        self.status.setText(f"running {self.spec.name}...")
        self.session.start()

    def cancel(self) -> None:
        if self.running:
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling...")
            self.session.cancel()

    def _set_busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        self.method_box.setEnabled(not busy)
        self.acq_picker.setEnabled(not busy)

    def on_progress(self, step, total, msg) -> None:
        if self._alive[0]:
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(min(step, total))
            self.status.setText(msg)

    def on_warning(self, msg: str) -> None:
        notify_warning(msg)

    def on_result(self, out: dict) -> None:
        s = self.session
        source, path, acq, params = self._ctx
        publish_result(self.viewer, s.spec.name, out, acq.grid, layer_metadata(s.spec, s, out, source, path),
                       mean_label="Ki")
        self.result, self._grid, self._acq, self._params = out, acq.grid, acq, params
        self.setup = self._patlak_setup(acq, params, out)
        if not self._alive[0]:
            return
        self._set_busy(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(1)
        units = out["metadata"].get("units", {})
        self.status.setText(f"{s.spec.name} done in {out.get('runtime_s', 0):.1f} s"
                            + (f"; Ki in {units.get('ki')}" if isinstance(units, dict) and units.get("ki") else ""))
        self.frames_button.setVisible("frames" not in out["extra"] and self.setup is not None)
        self.run_finished.emit(out)
        # start with the hottest Ki voxel so the plots show something at once
        ki = out["mean"]
        self.show_voxel(tuple(int(i) for i in np.unravel_index(int(np.argmax(ki)), ki.shape)))

    def on_cancelled(self) -> None:
        if self._alive[0]:
            self._set_busy(False)
            self.progress.setRange(0, 1)
            self.status.setText("cancelled; ready")
            self.run_cancelled.emit()

    def on_failed(self, msg: str, exc) -> None:
        notify_error(f"{self.spec.name} failed: {msg}")
        if self._alive[0]:
            self._set_busy(False)
            self.progress.setRange(0, 1)
            self.status.setText(f"error: {msg}")
            self.run_failed.emit(msg)

    @staticmethod
    def _patlak_setup(acq, params, out):
        """Regressors of the frames the method fitted (for the plots), or None for non-Patlak methods."""
        try:
            from ..engine.kinetics.patlak import patlak_setup

            return patlak_setup(acq, getattr(params, "t_star", 30.0), getattr(params, "timing", "average"),
                                getattr(params, "input_function", "file"), getattr(params, "time_unit", "auto"),
                                getattr(params, "calibration", 0.0))
        except Exception:  # noqa: BLE001 - the plots are optional; the images are the result
            log.warning("no Patlak regressors for the plots", exc_info=True)
            return None

    frames_ready = Signal()

    def reconstruct_frames(self) -> None:
        """Frame images of the fitted frames (engine's reconstruct_frames, in a worker) for measured curves."""
        if self.result is None or self.setup is None or self._frames_worker is not None:
            return
        from napari.qt.threading import create_worker

        from ..engine.kinetics.patlak import PatlakParams

        base = PatlakParams()
        p = SimpleNamespace(iterations=getattr(self._params, "iterations", base.iterations),
                            subsets=getattr(self._params, "subsets", base.subsets),
                            postfilter_fwhm=getattr(self._params, "postfilter_fwhm", base.postfilter_fwhm))
        self.frames_button.setEnabled(False)
        self.status.setText(f"reconstructing {self.setup.n_frames} frames for the curves...")
        worker = create_worker(_frames_job, self._acq, self.setup, p, SETTINGS.torch_device(), _start_thread=False,
                               _progress={"desc": "Patlak frames"})
        alive, result = self._alive, self.result

        def done(outcome):
            self._frames_worker = None
            if outcome[0] == "ok":
                result["extra"]["frames"] = outcome[1]
            if not alive[0]:
                return
            self.frames_button.setEnabled(True)
            if outcome[0] == "ok":
                self.frames_button.setVisible(False)
                self.status.setText("frame images ready: click a voxel")
                if self._last_idx is not None:
                    self.show_voxel(self._last_idx)
                self.frames_ready.emit()
            else:
                self.status.setText(f"could not reconstruct the frames: {outcome[1]}")

        worker.returned.connect(done)
        self._frames_worker = worker
        worker.start()

    # ------------------------------------------------------------ voxel
    def world_to_index(self, world) -> Optional[tuple]:
        if self._grid is None:
            return None
        g = self._grid
        pos = np.asarray(world, float)[-3:]
        idx = np.rint((pos - np.asarray(g.origin)) / np.asarray(g.voxel_size)).astype(int)
        if np.any(idx < 0) or np.any(idx >= np.asarray(g.shape)):
            return None
        return tuple(int(i) for i in idx)

    def curves(self, idx: tuple) -> dict:
        """TAC and Patlak-plot data of voxel ``idx`` (z, y, x) from the last result."""
        out = self.result
        ki = float(out["mean"][idx])
        v = float(out["extra"]["intercept"][idx]) if "intercept" in out["extra"] else 0.0
        d = {"ki": ki, "intercept": v}
        st = self.setup
        if st is not None:
            t_mid = 0.5 * (st.start_s + st.stop_s) / 60.0
            d.update(t_min=t_mid, model=ki * st.u + v * st.v, x=st.u / st.v)
            d["line"] = ki * d["x"] + v
            frames = out["extra"].get("frames")
            if frames is not None and frames.shape[0] == st.n_frames:
                c = frames[(slice(None),) + idx]
                d.update(measured=c, y=c / st.v)
        return d

    def show_voxel(self, idx: tuple) -> None:
        if self.result is None or not self._alive[0]:
            return
        self._last_idx = idx
        d = self.curves(idx)
        ax1, ax2 = self.ax_tac, self.ax_patlak
        ax1.clear()
        ax2.clear()
        if "t_min" in d:
            if "measured" in d:
                ax1.plot(d["t_min"], d["measured"], "o", ms=3, color="tab:blue", label="frames")
                ax2.plot(d["x"], d["y"], "o", ms=3, color="tab:blue")
            ax1.plot(d["t_min"], d["model"], "-", color="tab:red", lw=1, label="Patlak fit")
            ax2.plot(d["x"], d["line"], "-", color="tab:red", lw=1)
            ax1.legend(fontsize=7, loc="best")
        ax1.set_xlabel("time (min)", fontsize=8)
        ax1.set_ylabel("activity", fontsize=8)
        ax1.set_title(f"voxel (z, y, x) = {idx}", fontsize=8)
        ax2.set_xlabel("∫Cp / Cp (min)", fontsize=8)
        ax2.set_ylabel("C / Cp", fontsize=8)
        ax2.set_title(f"Ki = {d['ki']:.4g}, intercept = {d['intercept']:.4g}", fontsize=8)
        for ax in (ax1, ax2):
            ax.tick_params(labelsize=7)
        self.canvas.draw_idle()
        note = "" if "measured" in d else " (the method returned no frame images: fitted model only)"
        self.voxel_info.setText(f"voxel {idx}: Ki {d['ki']:.4g}, intercept {d['intercept']:.4g}{note}")
        self.voxel_shown.emit(idx)

    def _draw_empty(self) -> None:
        for ax, (xl, yl) in ((self.ax_tac, ("time (min)", "activity")),
                             (self.ax_patlak, ("∫Cp / Cp (min)", "C / Cp"))):
            ax.clear()
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
            ax.tick_params(labelsize=7)
        self.canvas.draw_idle()


def _frames_job(acq, setup, params, device):
    from ..engine.kinetics.patlak import reconstruct_frames
    from ..engine.run import CancelToken

    try:
        gen = reconstruct_frames(acq, setup, params, CancelToken(), device)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                conc, _ = stop.value
                break
        return ("ok", conc.detach().cpu().numpy().astype(np.float32))
    except Exception as exc:  # noqa: BLE001 - reported in the status line
        log.exception("frame reconstruction failed")
        return ("error", str(exc))


def _click_handler(alive, widget):
    def on_click(viewer, event):
        if not alive[0] or event.type != "mouse_press":
            return
        idx = widget.world_to_index(event.position)
        if idx is not None:
            widget.show_voxel(idx)
    return on_click
