"""A Qt form built from a method's Params dataclass (types, ranges, units, help, choices).

Any registered method gets its form from its dataclass alone: ints -> spin boxes, floats ->
spin boxes that print like ``%g`` (PET parameters span 1e-4 .. 1e6), bools -> check boxes,
``choices`` -> combo boxes, anything else -> a line edit parsed as a Python literal.
Fields flagged ``advanced`` go into a collapsed section.
"""
from __future__ import annotations

import ast
import dataclasses
import math
import typing
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import (QAbstractSpinBox, QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QLineEdit,
                            QSpinBox, QVBoxLayout, QWidget)
from superqt import QCollapsible

from ..engine.params import field_type, fields_of, make_params

INT_LIMIT = 2**31 - 1


class GDoubleSpinBox(QDoubleSpinBox):
    """QDoubleSpinBox that shows significant digits (1e-05, 0.25, 1.5e+06) instead of fixed decimals."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setDecimals(12)
        self.setStepType(QAbstractSpinBox.StepType.AdaptiveDecimalStepType)
        self.setKeyboardTracking(False)

    def textFromValue(self, value: float) -> str:  # noqa: N802 - Qt override
        return f"{value:.6g}"

    def valueFromText(self, text: str) -> float:  # noqa: N802 - Qt override
        try:
            return float(text.replace(self.suffix(), "").strip())
        except ValueError:
            return self.value()

    def validate(self, text, pos):
        from qtpy.QtGui import QValidator

        body = text.replace(self.suffix(), "").strip()
        try:
            v = float(body)
        except ValueError:
            ok = body in ("", "-", "+", ".", "-.", "+.") or body.lower().endswith(("e", "e-", "e+"))
            return (QValidator.State.Intermediate if ok else QValidator.State.Invalid), text, pos
        if self.minimum() <= v <= self.maximum():
            return QValidator.State.Acceptable, text, pos
        return QValidator.State.Intermediate, text, pos


def _base_type(t):
    """int for Optional[int] etc.; returns (type, optional)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return t, False


def tooltip_for(f: dataclasses.Field) -> str:
    m = f.metadata
    parts = [m.get("help", "") or f.name]
    lo, hi = m.get("min"), m.get("max")
    if lo is not None or hi is not None:
        parts.append(f"range {'' if lo is None else lo} .. {'' if hi is None else hi}")
    if m.get("unit"):
        parts.append(f"unit: {m['unit']}")
    parts.append(f"default: {f.default!r}")
    return "\n".join(parts)


class ParamForm(QWidget):
    """Editable values of one Params dataclass; ``params()`` returns a validated instance."""

    changed = Signal(str)  # name of the field that changed

    def __init__(self, params_cls, values: dict | None = None, parent=None):
        super().__init__(parent)
        self.params_cls = params_cls
        self.editors: dict[str, QWidget] = {}
        self._kinds: dict[str, tuple] = {}
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        main = QFormLayout()
        lay.addLayout(main)
        adv_fields = [f for f in fields_of(params_cls) if f.metadata.get("advanced")]
        adv_form = None
        self.advanced = None
        if adv_fields:
            self.advanced = QCollapsible("Advanced", self)
            box = QWidget()
            adv_form = QFormLayout(box)
            adv_form.setContentsMargins(0, 0, 0, 0)
            self.advanced.addWidget(box)
        for f in fields_of(params_cls):
            ed = self._make_editor(f)
            ed.setToolTip(tooltip_for(f))
            ed.setObjectName(f"param_{f.name}")
            self.editors[f.name] = ed
            label = f.name.replace("_", " ")
            (adv_form if f.metadata.get("advanced") else main).addRow(label, ed)
            if hasattr(main, "labelForField"):
                lbl = (adv_form if f.metadata.get("advanced") else main).labelForField(ed)
                if lbl is not None:
                    lbl.setToolTip(tooltip_for(f))
        if self.advanced is not None:
            lay.addWidget(self.advanced)
        if values:
            self.set_values(values)

    # ---------------------------------------------------------------- editors
    def _make_editor(self, f: dataclasses.Field) -> QWidget:
        t, optional = _base_type(field_type(self.params_cls, f))
        m = f.metadata
        unit = f" {m['unit']}" if m.get("unit") else ""
        choices = m.get("choices")
        name = f.name
        if choices:
            ed = QComboBox()
            for c in choices:
                ed.addItem(str(c), c)
            ed.setCurrentIndex(max(list(choices).index(f.default), 0) if f.default in choices else 0)
            ed.currentIndexChanged.connect(lambda *_: self.changed.emit(name))
            self._kinds[name] = ("choice", optional)
        elif t is bool:
            ed = QCheckBox()
            ed.setChecked(bool(f.default))
            ed.toggled.connect(lambda *_: self.changed.emit(name))
            self._kinds[name] = ("bool", optional)
        elif t is int and not optional:
            ed = QSpinBox()
            lo = m.get("min")
            hi = m.get("max")
            ed.setRange(int(lo) if lo is not None else -INT_LIMIT, int(hi) if hi is not None else INT_LIMIT)
            ed.setSuffix(unit)
            ed.setKeyboardTracking(False)
            ed.setValue(int(f.default))
            ed.valueChanged.connect(lambda *_: self.changed.emit(name))
            self._kinds[name] = ("int", optional)
        elif t is float and not optional:
            ed = GDoubleSpinBox()
            lo = m.get("min")
            hi = m.get("max")
            ed.setRange(float(lo) if lo is not None else -1e300, float(hi) if hi is not None else 1e300)
            ed.setSuffix(unit)
            ed.setValue(float(f.default))
            ed.valueChanged.connect(lambda *_: self.changed.emit(name))
            self._kinds[name] = ("float", optional)
        else:
            ed = QLineEdit()
            ed.setText("" if f.default is None else (f.default if t is str else repr(f.default)))
            if optional:
                ed.setPlaceholderText("(none)")
            ed.editingFinished.connect(lambda: self.changed.emit(name))
            self._kinds[name] = ("str" if t is str else "literal", optional)
        return ed

    # ----------------------------------------------------------------- values
    def value(self, name: str) -> Any:
        ed = self.editors[name]
        kind, optional = self._kinds[name]
        if kind == "choice":
            return ed.currentData()
        if kind == "bool":
            return ed.isChecked()
        if kind == "int":
            return int(ed.value())
        if kind == "float":
            return float(ed.value())
        text = ed.text().strip()
        if text == "" and optional:
            return None
        if kind == "str":
            return text
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"parameter '{name}': cannot read {text!r}; type a number, a list like [1, 2], "
                             "or leave it empty for none") from None

    def values(self) -> dict:
        return {name: self.value(name) for name in self.editors}

    def set_value(self, name: str, v: Any) -> None:
        ed = self.editors[name]
        kind, _ = self._kinds[name]
        if kind == "choice":
            i = ed.findData(v)
            if i >= 0:
                ed.setCurrentIndex(i)
        elif kind == "bool":
            ed.setChecked(bool(v))
        elif kind == "int":
            ed.setValue(int(v))
        elif kind == "float":
            ed.setValue(float(v) if v is not None and math.isfinite(float(v)) else ed.value())
        else:
            ed.setText("" if v is None else (v if kind == "str" else repr(v)))

    def set_values(self, values: dict) -> None:
        for k, v in values.items():
            if k in self.editors:
                self.set_value(k, v)

    def params(self):
        """A validated Params instance (ValueError with the engine's message if a value is wrong)."""
        return make_params(self.params_cls, self.values())
