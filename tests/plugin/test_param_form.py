"""The parameter form is built from any Params dataclass: editors, ranges, units, tooltips, validation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
from qtpy.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QSpinBox

from napari_petdiff._widgets.param_form import ParamForm
from napari_petdiff.engine.methods import list_methods
from napari_petdiff.engine.params import param


@dataclass
class AllKinds:
    n: int = param(3, "how many", min=1, max=9)
    beta: float = param(1e-4, "tiny weight", min=0.0, unit="1/mm")
    on: bool = param(True, "switch")
    mode: str = param("b", "pick one", choices=("a", "b", "c"))
    label: str = param("x", "free text")
    seed: Optional[int] = param(None, "optional seed")
    sizes: tuple = param((1, 2), "a tuple", advanced=True)


def test_editors_ranges_units_and_tooltips(qtbot):
    f = ParamForm(AllKinds)
    qtbot.addWidget(f)
    ed = f.editors
    assert isinstance(ed["n"], QSpinBox) and (ed["n"].minimum(), ed["n"].maximum()) == (1, 9)
    assert isinstance(ed["beta"], QDoubleSpinBox) and ed["beta"].suffix() == " 1/mm"
    assert ed["beta"].text() == "0.0001 1/mm"  # significant digits, not fixed decimals
    assert isinstance(ed["on"], QCheckBox) and isinstance(ed["mode"], QComboBox)
    assert isinstance(ed["label"], QLineEdit) and isinstance(ed["seed"], QLineEdit)
    tip = ed["n"].toolTip()
    assert "how many" in tip and "range 1 .. 9" in tip and "default: 3" in tip
    assert "unit: 1/mm" in ed["beta"].toolTip()
    assert f.advanced is not None  # 'sizes' sits in the collapsed Advanced section
    assert f.values() == {"n": 3, "beta": 1e-4, "on": True, "mode": "b", "label": "x", "seed": None,
                          "sizes": (1, 2)}


def test_values_round_trip_and_validation(qtbot):
    f = ParamForm(AllKinds, {"n": 5, "mode": "c", "seed": 4, "sizes": (3,)})
    qtbot.addWidget(f)
    p = f.params()
    assert (p.n, p.mode, p.seed, p.sizes) == (5, "c", 4, (3,))
    f.editors["n"].setValue(100)  # clamped by the spin box range
    assert f.value("n") == 9
    f.editors["sizes"].setText("[1, 2")
    with pytest.raises(ValueError, match="sizes"):
        f.params()


def test_every_registered_method_gets_a_valid_default_form(qtbot):
    for spec in list_methods():
        f = ParamForm(spec.params)
        qtbot.addWidget(f)
        p = f.params()
        assert p == spec.params(), spec.name
