"""One method run in a napari worker thread, feeding a live layer and napari's activity dock.

The worker thread drives the engine generator and forwards to the GUI thread only what the GUI
needs, throttled by time (run.Throttle): a live image a few times per second, progress at most
~10 times per second, every warning. Every outcome (result, cancel, error) comes back through
``returned`` as a tagged tuple, so exactly one of ``on_result`` / ``on_cancelled`` / ``on_failed``
is called, after the live layer is gone. The listener (the widget) can ``detach`` at any time,
e.g. when its dock is closed: the run is then cancelled and no Qt object of the widget is touched.
"""
from __future__ import annotations

import logging
import time
import traceback
from typing import Optional

import numpy as np

from ..engine.params import params_to_dict
from ..engine.run import CancelToken, Cancelled, Intermediate, Progress, Result, RunWarning, Sample, Throttle
from .layers import result_layer_names, to_numpy, upsert_image

log = logging.getLogger(__name__)

_ACTIVE: set = set()  # keeps sessions alive while their worker runs (signals hold weak refs)


def result_to_numpy(res: Result) -> dict:
    return {"mean": to_numpy(res.mean), "std": to_numpy(res.std), "samples": to_numpy(res.samples),
            "likelihood": [float(v) for v in (res.likelihood or [])],
            "metadata": dict(res.metadata or {}), "warnings": list(res.warnings or []),
            "extra": {k: to_numpy(v) for k, v in (res.extra or {}).items() if v is not None}}


def _live_image(img) -> np.ndarray:
    arr = to_numpy(img)
    while arr.ndim > 3:  # batched samples: show the first one live
        arr = arr[0]
    return arr.copy()


def engine_generator(spec, acquisition, params, token: CancelToken, device, rate: float):
    """Runs in the worker thread. Yields ('progress'|'live'|'warning'|'sample', ...), returns a tagged outcome."""
    live = Throttle(rate)
    prog = Throttle(10.0)
    t0 = time.monotonic()
    try:
        gen = spec.run(acquisition, params, token, device=device)
        warnings = []
        while True:
            if token.cancelled:
                gen.close()
                return ("cancelled", None)
            try:
                ev = next(gen)
            except StopIteration as stop:
                res = stop.value
                break
            if isinstance(ev, Progress):
                if prog(force=ev.step >= ev.total):
                    yield ("progress", int(ev.step), int(ev.total), str(ev.message or ev.stage))
            elif isinstance(ev, Intermediate):
                if live():
                    yield ("live", _live_image(ev.image), int(ev.step), str(ev.label))
            elif isinstance(ev, Sample):
                yield ("sample", int(ev.index))
                if live():
                    yield ("live", _live_image(ev.image), int(ev.index), f"sample {ev.index + 1}")
            elif isinstance(ev, RunWarning):
                warnings.append(ev.message)
                yield ("warning", str(ev.message))
        if not isinstance(res, Result):
            raise RuntimeError(f"method '{spec.name}' returned {type(res).__name__} instead of a Result")
        for w in warnings:
            if w not in res.warnings:
                res.warnings.append(w)
        out = result_to_numpy(res)
        out["runtime_s"] = time.monotonic() - t0
        return ("ok", out)
    except Cancelled:
        return ("cancelled", None)
    except Exception as exc:  # noqa: BLE001 - every engine error must reach the user, not vanish in a thread
        return ("error", exc, traceback.format_exc())


def describe_error(exc: BaseException) -> str:
    if isinstance(exc, ValueError):
        return str(exc)  # the engine's messages already say what is wrong and how to fix it
    if isinstance(exc, MemoryError):
        return "out of memory: use a smaller image grid or fewer samples"
    return f"{type(exc).__name__}: {exc}"


class RunSession:
    """Start with ``start()``; ``cancel()`` is cooperative; ``detach()`` forgets the listener."""

    def __init__(self, viewer, spec, acquisition, params, *, device=None, live_rate: float = 4.0,
                 listener=None, source: str = "", show_live: bool = True):
        self.viewer = viewer
        self.spec = spec
        self.acquisition = acquisition
        self.params = params
        self.device = device
        self.live_rate = live_rate
        self.listener = listener
        self.source = source
        self.show_live = show_live
        self.token = CancelToken()
        self.live_name = result_layer_names(spec.name)["live"]
        self.worker = None
        self.outcome: Optional[str] = None
        self.n_live = 0
        self._pbar = None
        self._cleaned = False

    # ------------------------------------------------------------- control
    def start(self) -> None:
        from napari.qt.threading import create_worker

        self.worker = create_worker(engine_generator, self.spec, self.acquisition, self.params, self.token,
                                    self.device, self.live_rate, _start_thread=False)
        self.worker.yielded.connect(self._on_yield)
        self.worker.returned.connect(self._on_returned)
        self.worker.errored.connect(self._on_errored)  # only for failures of the worker machinery itself
        self.worker.finished.connect(self._on_finished)
        _ACTIVE.add(self)
        try:
            from napari.utils import progress

            self._pbar = progress(total=0, desc=f"{self.spec.name}: starting")
        except Exception:  # noqa: BLE001 - the activity dock is a nicety, never a reason to fail a run
            self._pbar = None
        self.worker.start()

    def cancel(self) -> None:
        self.token.cancel()

    def detach(self) -> None:
        """The widget is going away: stop the run and never call back into it."""
        self.listener = None
        self.cancel()

    @property
    def running(self) -> bool:
        return self.outcome is None and self.worker is not None

    # ------------------------------------------------------------ GUI side
    def _call(self, name, *args):
        lst = self.listener
        if lst is None:
            return
        fn = getattr(lst, name, None)
        if fn is None:
            return
        try:
            fn(*args)
        except RuntimeError as exc:
            # "wrapped C/C++ object has been deleted": the widget died under us; stop talking to it.
            if "deleted" in str(exc):
                self.detach()
            else:
                raise

    def _on_yield(self, item) -> None:
        # napari's progress bar processes Qt events while it updates, so the next queued events
        # (even the result) can be handled *inside* this call: never act on an event that arrives
        # after the outcome, and tell the listener before touching the progress bar.
        if self.outcome is not None or self._cleaned:
            return
        kind = item[0]
        if kind == "progress":
            _, step, total, msg = item
            self._call("on_progress", step, total, msg)
            self._update_pbar(step, total, msg)
        elif kind == "live":
            _, img, step, label = item
            if self.token.cancelled or not self.show_live:
                return
            upsert_image(self.viewer, self.live_name, img, self.acquisition.grid,
                         {"petdiff_output": "live", "petdiff_method": self.spec.name}, colormap="magma")
            if self._cleaned:  # the run ended while the layer was being drawn
                self._remove_live()
                return
            self.n_live += 1
            self._call("on_live", step, label)
        elif kind == "sample":
            self._call("on_sample", item[1])
        elif kind == "warning":
            self._call("on_warning", item[1])

    def _update_pbar(self, step: int, total: int, msg: str) -> None:
        pbar = self._pbar
        if pbar is None or self._cleaned:
            return
        if pbar.total != total:
            pbar.total = total
        pbar.set_description(f"{self.spec.name}: {msg}")
        delta = step - pbar.n
        if delta and not self._cleaned:
            pbar.update(delta)

    def _remove_live(self) -> None:
        try:
            if self.live_name in self.viewer.layers:
                self.viewer.layers.remove(self.live_name)
        except Exception:  # noqa: BLE001 - viewer already closed
            log.debug("could not remove the live layer", exc_info=True)

    def _cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        self._remove_live()
        if self._pbar is not None:
            try:
                self._pbar.close()
            except Exception:  # noqa: BLE001
                log.debug("could not close the progress bar", exc_info=True)

    def _on_returned(self, outcome) -> None:
        self._cleanup()
        tag = outcome[0]
        self.outcome = tag
        if tag == "ok":
            out = outcome[1]
            out["params"] = params_to_dict(self.params)
            self._call("on_result", out)
        elif tag == "cancelled":
            self._call("on_cancelled")
        else:
            _, exc, tb = outcome
            log.error("%s failed:\n%s", self.spec.name, tb)
            self._call("on_failed", describe_error(exc), exc)

    def _on_errored(self, exc) -> None:
        self._cleanup()
        if self.outcome is None:
            self.outcome = "error"
            self._call("on_failed", describe_error(exc), exc)

    def _on_finished(self) -> None:
        self._cleanup()
        if self.outcome is None:  # aborted by someone calling worker.quit()
            self.outcome = "cancelled"
            self._call("on_cancelled")
        _ACTIVE.discard(self)
