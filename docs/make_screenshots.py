"""Screenshots of the real napari window for docs/plugin.md (run under Xvfb: `make screenshots`).

Each shot drives the widgets the way a user does (sample data, buttons, a drawn region) and waits
for the runs to finish, so the pictures show the plugin actually working.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "screenshots"
SIZE = (1500, 950)
MAX_BYTES = 400_000


def wait_until(pred, timeout: float = 300.0, what: str = "condition") -> None:
    from qtpy.QtWidgets import QApplication

    t0 = time.monotonic()
    while not pred():
        QApplication.processEvents()
        time.sleep(0.02)
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_and_wait(w, what: str, timeout: float = 600.0) -> None:
    """Click a widget's Run button and wait for run_finished; a run_failed message ends the script."""
    done = []
    w.run_finished.connect(lambda *_: done.append(True))
    w.run_failed.connect(lambda msg: done.append(msg))
    w.run_button.click()
    wait_until(lambda: done, timeout=timeout, what=what)
    if done[0] is not True:
        raise SystemExit(f"{what} failed: {done[0]}")


def settle(seconds: float = 0.8) -> None:
    from qtpy.QtWidgets import QApplication

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        QApplication.processEvents()
        time.sleep(0.02)


def shoot(viewer, name: str) -> Path:
    settle()
    path = OUT / f"{name}.png"
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1000:.0f} kB)")
    if size > MAX_BYTES:
        raise SystemExit(f"{path} is {size} bytes, above the {MAX_BYTES} byte budget")
    return path


def new_viewer():
    import napari

    viewer = napari.Viewer(title="napari-petdiff")
    viewer.window.resize(*SIZE)
    viewer.open_sample("napari-petdiff", "brain2d")
    return viewer


def reconstruction_shot() -> None:
    viewer = new_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Reconstruction")
    w.set_method("osem")
    w.form.set_values({"iterations": 2, "subsets": 8})
    run_and_wait(w, "the OSEM run")
    viewer.layers["brain2d truth"].visible = False
    shoot(viewer, "reconstruction")
    # the likelihood-target control of a likelihood-matched diffusion method (if registered)
    names = [w.method_box.itemData(i) for i in range(w.method_box.count())]
    target = next((n for n in ("lisch",) if n in names), None)
    if target is not None:
        w.set_method(target)
        wait_until(lambda: len(w.target_plot.values) > 5 and w.target_plot.busy is False, what="the MLEM curve")
        shoot(viewer, "likelihood-target")
    viewer.close()


def comparison_shot() -> None:
    viewer = new_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Comparison")
    w.set_checked(["mlem", "osem", "map-rdp"])
    w.forms["mlem"].set_values({"iterations": 40})
    w.forms["osem"].set_values({"iterations": 4, "subsets": 8})
    w.forms["map-rdp"].set_values({"epochs": 10, "beta": 1.0})
    # a region of interest, drawn in world coordinates (mm)
    viewer.add_shapes([[[0, -30, -40], [0, -30, -25], [0, -10, -25], [0, -10, -40]]], shape_type="ellipse",
                      name="ROI", edge_color="cyan", face_color="transparent", edge_width=1.5)
    w.roi_picker.select("ROI")
    finished = []
    w.comparison_finished.connect(lambda names: finished.append(names))
    w.run_button.click()
    wait_until(lambda: finished, timeout=600, what="the comparison runs")
    shoot(viewer, "comparison")
    viewer.close()


def data_shot() -> None:
    viewer = new_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Data")
    viewer.window.add_plugin_dock_widget("napari-petdiff", "Settings", tabify=False)
    w.phantom.setCurrentIndex(w.phantom.findData("brain2d"))
    w.counts.setValue(3e4)
    w.lesions.setChecked(True)
    w.name.setText("low-count")
    finished = []
    w.simulation_finished.connect(lambda name: finished.append(name))
    w.simulation_failed.connect(lambda msg: finished.append(msg))
    w.simulate_button.click()
    wait_until(lambda: finished, what="the simulation")
    for lay in viewer.layers:
        lay.visible = lay.name in ("low-count prompts",)
    viewer.layers.selection.active = viewer.layers["low-count prompts"]
    viewer.reset_view()
    shoot(viewer, "data")
    viewer.close()


def patlak_shot() -> None:
    import napari

    viewer = napari.Viewer(title="napari-petdiff")
    viewer.window.resize(*SIZE)
    viewer.open_sample("napari-petdiff", "brain2d_dynamic")
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Patlak")
    w.method_box.setCurrentIndex(w.method_box.findData("patlak-ls"))
    w.form.set_values({"t_star": 30.0, "iterations": 3, "subsets": 10, "postfilter_fwhm": 6.0})
    run_and_wait(w, "the Patlak run")
    if w.frames_button.isVisible():
        ready = []
        w.frames_ready.connect(lambda: ready.append(True))
        w.frames_button.click()
        wait_until(lambda: ready, timeout=600, what="the frame images")
    for lay in viewer.layers:
        lay.visible = lay.name == "patlak-ls Ki"
    ki = viewer.layers["patlak-ls Ki"]
    viewer.layers.selection.active = ki
    # a grey-matter voxel: the 95th percentile of Ki inside the brain
    import numpy as np

    data = np.asarray(ki.data)
    target = np.percentile(data[data > 0], 95)
    idx = np.unravel_index(int(np.argmin(np.abs(data - target))), data.shape)
    w.show_voxel(tuple(int(i) for i in idx))
    viewer.reset_view()
    shoot(viewer, "patlak")
    viewer.close()


def posterior_shot(method: str, values: dict, shown: tuple, name: str, timeout: float = 600.0) -> None:
    """Run a posterior-sampling method on the sample scan; show ``shown`` layers side by side (grid)."""
    viewer = new_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Reconstruction")
    w.set_method(method)
    w.form.set_values(values)
    run_and_wait(w, f"the {method} run", timeout=timeout)
    for lay in viewer.layers:
        lay.visible = lay.name in shown
    viewer.layers.selection.active = viewer.layers[f"{method} mean"]
    from napari_petdiff._widgets.comparison import grid_of

    grid_of(viewer).enabled = True
    viewer.reset_view()
    shoot(viewer, name)
    viewer.close()


def ood_shot() -> None:
    """MR-guided DDIP-HQS (the MR-conditioned prior reads the sample's MR) with its posterior std."""
    posterior_shot("ddip-hqs", {"prior": "brain-fdg-mr-2d", "steps": 25, "samples": 2, "batch": 2, "rho": 0.3},
                   ("brain2d mr", "ddip-hqs mean", "ddip-hqs std"), "ddip-mr", timeout=900)


def deft_shot() -> None:
    """PET-DEFT on the sample scan: posterior mean and std of 8 samples in 20 steps."""
    posterior_shot("deft", {"steps": 20, "samples": 8, "batch": 8}, ("brain2d truth", "deft mean", "deft std"),
                   "deft")


def personalise_shot() -> None:
    """Personalise widget on the sample scan: 8 built-in sources registered to its MR, then pseudo-PETs."""
    import tempfile

    viewer = new_viewer()
    _, w = viewer.window.add_plugin_dock_widget("napari-petdiff", "Personalise")
    w.out.setText(tempfile.mkdtemp(prefix="petdiff-personalise-"))
    for stage in ("register only", "pseudo-PETs only"):
        w.stage_box.setCurrentText(stage)
        run_and_wait(w, f"personalise ({stage})", timeout=600)
    shown = ("brain2d mr", "brain2d truth", "personalise: warped source PETs", "personalise: pseudo-PETs")
    for lay in viewer.layers:
        lay.visible = lay.name in shown
    from napari_petdiff._widgets.comparison import grid_of

    grid_of(viewer).enabled = True
    viewer.reset_view()
    shoot(viewer, "personalise")
    viewer.close()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    from qtpy.QtWidgets import QApplication  # noqa: F401 - napari.Viewer creates the app

    shots = {"reconstruction": reconstruction_shot, "comparison": comparison_shot, "data": data_shot,
             "patlak": patlak_shot, "ddip-mr": ood_shot,
             "deft": deft_shot, "personalise": personalise_shot}
    for name in sys.argv[1:] or list(shots):
        shots[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
