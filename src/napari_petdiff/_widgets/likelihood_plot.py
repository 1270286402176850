"""The likelihood-target control: the MLEM log-likelihood curve with the chosen target marked.

Diffusion methods with a ``target_iteration`` parameter stop their data-consistency updates at the
Poisson log-likelihood MLEM reaches after that many iterations. The curve (computed once per
acquisition in a worker, with classical.mlem_iterates) shows what a target means: early
iterations = smooth, data-poor; late = noisy, data-faithful.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

from matplotlib.figure import Figure
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QLabel, QVBoxLayout, QWidget

from ..engine.run import CancelToken, Cancelled, Throttle
from .common import AliveFlag, safe_canvas

log = logging.getLogger(__name__)

_CURVES: dict = {}  # (id(acquisition), device) -> [L(x_0), L(x_1), ...]


def mlem_curve(acquisition, n_iter: int, token: CancelToken, device=None, start: Optional[list] = None):
    """Worker generator: yields the growing list of log-likelihood values, returns the final list."""
    from ..engine.classical import mlem_iterates
    from ..engine.likelihood import PoissonLikelihood

    try:
        lik = PoissonLikelihood(acquisition, 1, device=device)
        values = []
        for k, x in mlem_iterates(lik, n_iter, token):
            values.append(float(lik.value(x)))
            yield list(values)
        return ("ok", values)
    except Cancelled:
        return ("cancelled", None)
    except Exception as exc:  # noqa: BLE001 - shown in the plot's status line
        return ("error", f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc))


class LikelihoodTargetPlot(QWidget):
    curve_ready = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(3.2, 2.0), dpi=90, tight_layout=True)
        self.canvas = safe_canvas(self.figure)
        self.canvas.setMinimumHeight(150)
        self.ax = self.figure.add_subplot(111)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.canvas)
        lay.addWidget(self.status)
        self.values: list = []
        self.target: Optional[int] = None
        self._worker = None
        self._token: Optional[CancelToken] = None
        self._key = None
        self._throttle = Throttle(4.0)
        self._alive = AliveFlag(self)
        self._draw()

    # --------------------------------------------------------------- data
    def compute(self, acquisition, n_iter: int, device=None) -> None:
        """Show the curve of ``acquisition`` up to ``n_iter`` MLEM iterations (cached, in a worker)."""
        key = (id(acquisition), str(device))
        cached = _CURVES.get(key)
        if cached is not None and len(cached) > n_iter:
            self._key = key
            self.set_values(cached)
            self.status.setText(f"MLEM log-likelihood, {len(cached) - 1} iterations")
            self.curve_ready.emit()
            return
        if self._worker is not None and self._key == key:
            return  # already computing this one
        self.stop()
        from napari.qt.threading import create_worker

        self._key = key
        self._token = CancelToken()
        self.status.setText(f"computing the MLEM curve ({n_iter} iterations)...")
        worker = create_worker(mlem_curve, acquisition, int(n_iter), self._token, device, _start_thread=False)
        alive = self._alive

        token = self._token

        def on_yield(values, key=key):
            if not alive[0]:
                token.cancel()  # the plot is gone: stop computing its curve
                return
            if self._key == key and self._throttle():
                self.set_values(values)

        def on_return(outcome, key=key, worker=worker):
            if not alive[0]:
                return
            if self._worker is worker:
                self._worker = None
            tag = outcome[0]
            if tag == "ok":
                _CURVES[key] = outcome[1]
                if self._key == key:
                    self.set_values(outcome[1])
                    self.status.setText(f"MLEM log-likelihood, {len(outcome[1]) - 1} iterations")
                    self.curve_ready.emit()
            elif tag == "error" and self._key == key:
                self.status.setText(f"could not compute the MLEM curve: {outcome[1]}")

        worker.yielded.connect(on_yield)
        worker.returned.connect(on_return)
        self._worker = worker
        worker.start()

    @property
    def busy(self) -> bool:
        """True while a curve is being computed."""
        return self._worker is not None

    def stop(self) -> None:
        if self._token is not None:
            self._token.cancel()
        self._worker = None

    def set_values(self, values) -> None:
        self.values = list(values)
        self._draw()

    def set_target(self, k: Optional[float]) -> None:
        self.target = None if k is None else float(k)
        self._draw()

    def target_value(self) -> Optional[float]:
        """L at the target iteration (linear between iterations: targets may be fractional)."""
        if self.target is None or not self.values or self.target > len(self.values) - 1:
            return None
        k0 = int(math.floor(self.target))
        k1 = min(k0 + 1, len(self.values) - 1)
        w = self.target - k0
        return (1 - w) * self.values[k0] + w * self.values[k1]

    # --------------------------------------------------------------- view
    def _draw(self) -> None:
        ax = self.ax
        ax.clear()
        ax.set_xlabel("MLEM iteration", fontsize=8)
        ax.set_ylabel("log-likelihood", fontsize=8)
        ax.tick_params(labelsize=7)
        if self.values:
            ks = list(range(len(self.values)))
            # Skip x_0 (uniform image): its likelihood is far below the rest and flattens the curve.
            lo = 1 if len(ks) > 2 else 0
            ax.plot(ks[lo:], self.values[lo:], color="tab:blue", lw=1.5)
        if self.target is not None:
            ax.axvline(self.target, color="tab:red", lw=1, ls="--")
            v = self.target_value()
            if v is not None:
                ax.plot([self.target], [v], "o", color="tab:red", ms=5)
                ax.set_title(f"target: iteration {self.target:g}, L = {v:.6g}", fontsize=8)
            else:
                ax.set_title(f"target: iteration {self.target:g}", fontsize=8)
        self.canvas.draw_idle()

