"""Personalise dock widget: a prior fine-tuned for the subject of the chosen acquisition.

Runs the engine's ``personalise`` stages (register the sources' MRs to this subject's MR, build
pseudo-PETs, fine-tune) in a worker thread with progress and cancel; after each stage its images
appear as layers (warped source PETs, pseudo-PETs) so they can be inspected before fine-tuning.
The finished prior's path goes into the Reconstruction widget's ``prior`` field by hand (shown,
selectable): the reconstruction is then an ordinary PET-DDS / PET-LiSch run.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QComboBox, QFormLayout, QLabel, QLineEdit, QSpinBox, QVBoxLayout, QWidget

from ..engine.run import CancelToken, Cancelled, Progress
from .common import AcquisitionPicker, AliveFlag, add_run_controls
from .layers import upsert_image
from .reconstruction import MRPicker, notify_error, with_chosen_mr
from .run_session import describe_error

log = logging.getLogger(__name__)

STAGE_CHOICES = {"all stages": ("register", "pseudo", "finetune"), "register only": ("register",),
                 "pseudo-PETs only": ("pseudo",), "fine-tune only": ("finetune",)}
MAX_SHOWN = 16  # pseudo-PET volumes put into the viewer (all are on disk)


def default_out(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "scan"
    return str(Path(os.path.expanduser("~")) / "napari-petdiff" / "personalised" / safe)


def _stack(folder: Path, pattern: str, limit: int) -> Optional[np.ndarray]:
    from ..engine.io import read_nifti

    files = sorted(folder.glob(pattern))[:limit]
    return np.stack([read_nifti(f)[0] for f in files]) if files else None


def personalise_job(cfg, mr, grid, stages, token: CancelToken, device):
    """Worker thread: yields ('progress', stage, step, total, msg) and ('layer', name, array); returns an outcome."""
    from ..engine.personal import personalise

    try:
        gen = personalise(cfg, mr, grid, stages=stages, acquisition_grid=grid, cancel=token, device=device)
        stage = None
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                summary = stop.value
                break
            if isinstance(ev, Progress):
                if ev.stage != stage and stage is not None:
                    yield from _stage_layers(cfg, stage)
                stage = ev.stage
                yield ("progress", ev.stage, int(ev.step), int(ev.total), str(ev.message))
        if stage is not None:
            yield from _stage_layers(cfg, stage)
        return ("ok", summary)
    except Cancelled:
        return ("cancelled", None)
    except Exception as exc:  # noqa: BLE001 - every engine error must reach the user
        log.error("personalise failed", exc_info=True)
        return ("error", describe_error(exc))


def _stage_layers(cfg, stage):
    root = Path(cfg.out)
    if stage == "register":
        arr = _stack(root / "warped", "*_pet.nii.gz", 64)
        if arr is not None:
            yield ("layer", "personalise: warped source PETs", arr)
    elif stage == "pseudo":
        arr = _stack(root / "pseudo", "pseudo-*.nii.gz", MAX_SHOWN)
        if arr is not None:
            yield ("layer", "personalise: pseudo-PETs", arr)


class PersonaliseWidget(QWidget):
    run_finished = Signal(object)   # the summary dict (its "prior" is the personalised prior's path)
    run_cancelled = Signal()
    run_failed = Signal(str)

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self._alive = AliveFlag(self)
        self.worker = None
        self.token: Optional[CancelToken] = None
        self.summary: Optional[dict] = None
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.acq_picker = AcquisitionPicker(self.viewer)
        self.acq_picker.setToolTip("the subject to personalise for: its image grid is where the pseudo-PETs live")
        form.addRow("acquisition", self.acq_picker)
        self.mr_picker = MRPicker(self.viewer)
        self.mr_picker.setToolTip("the subject's MR on the PET grid: the acquisition's own, or an image layer")
        form.addRow("target MR", self.mr_picker)
        self.sources = QLineEdit("phantom:8")
        self.sources.setToolTip("phantom:N (built-in differently deformed phantoms with their own lesions) or a "
                                "folder of <subject>_pet.nii.gz + <subject>_mr.nii.gz pairs")
        form.addRow("sources", self.sources)
        self.base_prior = QLineEdit("brain-fdg-2d")
        self.base_prior.setToolTip("the prior to fine-tune: a shipped name (petdiff priors) or a .safetensors path")
        form.addRow("base prior", self.base_prior)
        self.out = QLineEdit("")
        self.out.setToolTip("work folder: warped/, pseudo/, finetune/ and the prior; running again continues")
        form.addRow("work folder", self.out)
        self.n_pseudo, self.subset, self.steps = QSpinBox(), QSpinBox(), QSpinBox()
        for box, lo, hi, v, tip in ((self.n_pseudo, 1, 100000, 64, "pseudo-PET volumes"),
                                    (self.subset, 1, 1000, 4, "sources averaged per pseudo-PET"),
                                    (self.steps, 1, 1000000, 200,
                                     "fine-tuning steps (more: more of the MR anatomy, fewer PET-only findings)")):
            box.setRange(lo, hi)
            box.setValue(v)
            box.setToolTip(tip)
        form.addRow("pseudo-PETs", self.n_pseudo)
        form.addRow("subset size", self.subset)
        form.addRow("fine-tune steps", self.steps)
        self.stage_box = QComboBox()
        self.stage_box.addItems(list(STAGE_CHOICES))
        form.addRow("run", self.stage_box)
        lay.addLayout(form)
        add_run_controls(self, lay)
        self.prior_label = QLabel("")
        self.prior_label.setWordWrap(True)
        self.prior_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.prior_label)
        lay.addStretch(1)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.acq_picker.currentTextChanged.connect(lambda *_: self._suggest_out())
        self._suggest_out()

    def _suggest_out(self) -> None:
        if not self.out.isModified():
            self.out.setText(default_out(self.acq_picker.source_name() or "scan"))

    @property
    def running(self) -> bool:
        return self.worker is not None

    def _fail(self, msg: str) -> None:
        self.status.setText(f"error: {msg}")
        notify_error(msg)
        self.run_failed.emit(msg)

    def config(self):
        from ..engine.personal import PersonaliseConfig, RegistrationConfig
        from .settings import SETTINGS

        threads = max(1, int(getattr(SETTINGS, "threads", 2) or 2))
        return PersonaliseConfig(out=self.out.text().strip(), sources=self.sources.text().strip(),
                                 base_prior=self.base_prior.text().strip() or "brain-fdg-2d",
                                 registration=RegistrationConfig(threads=threads), n_pseudo=self.n_pseudo.value(),
                                 subset_size=self.subset.value(), steps=self.steps.value(), threads=threads)

    def run(self) -> None:
        if self.running:
            return
        acq = self.acq_picker.acquisition()
        if acq is None:
            self._fail("no acquisition loaded: open a .petacq file or a sample (File > Open Sample)")
            return
        try:
            acq = with_chosen_mr(acq, self.mr_picker.choice())
            if acq.mr is None:
                raise ValueError("a personalised prior needs the subject's MR: pick an MR image layer on the PET "
                                 "grid as the target MR (this acquisition has none attached)")
            if not self.out.text().strip():
                raise ValueError("choose a work folder")
            cfg = self.config()
            cfg.validate()
        except ValueError as exc:
            self._fail(str(exc))
            return
        from napari.qt.threading import create_worker

        from .settings import SETTINGS

        self._grid = acq.grid
        self.token = CancelToken()
        stages = STAGE_CHOICES[self.stage_box.currentText()]
        self.worker = create_worker(personalise_job, cfg, acq.mr.cpu().numpy(), acq.grid, stages, self.token,
                                    SETTINGS.torch_device(), _start_thread=False)
        self.worker.yielded.connect(self._on_yield)
        self.worker.returned.connect(self._on_returned)
        self._set_busy(True)
        self.progress.setRange(0, 0)
        self.status.setText("starting...")
        self.prior_label.setText("")
        self.worker.start()

    def cancel(self) -> None:
        if self.running and self.token is not None:
            self.cancel_button.setEnabled(False)
            self.status.setText("cancelling (the current subject or training step finishes first)...")
            self.token.cancel()

    def _set_busy(self, busy: bool) -> None:
        self.run_button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        for w in (self.acq_picker, self.mr_picker, self.sources, self.base_prior, self.out, self.n_pseudo, self.subset, self.steps,
                  self.stage_box):
            w.setEnabled(not busy)

    def _on_yield(self, item) -> None:
        if item[0] == "layer":
            _, name, arr = item
            upsert_image(self.viewer, name, arr, self._grid, {"petdiff_output": "personalise"}, colormap="gray_r")
            return
        if not self._alive[0]:
            return
        _, stage, step, total, msg = item
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(min(step, total))
        self.status.setText(f"{stage}: {msg}")

    def _on_returned(self, outcome) -> None:
        self.worker = None
        tag = outcome[0]
        if tag == "ok":
            self.summary = outcome[1]
        if not self._alive[0]:
            return
        self._set_busy(False)
        self.progress.setRange(0, 1)
        if tag == "ok":
            self.progress.setValue(1)
            prior = self.summary.get("prior")
            if self.summary.get("stopped"):
                self.status.setText(f"stopped after {self.summary.get('steps')} steps; Run continues")
            else:
                self.status.setText("done")
            if prior:
                self.prior_label.setText(f"personalised prior: {prior}\n(put this path into the Reconstruction "
                                         "widget's 'prior' field, method dds or lisch)")
            self.run_finished.emit(self.summary)
        elif tag == "cancelled":
            self.status.setText("cancelled; Run continues where it stopped")
            self.run_cancelled.emit()
        else:
            self._fail(outcome[1])

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt API
        if self.token is not None:
            self.token.cancel()
        super().closeEvent(event)
