"""Open napari with the 2-D brain sample and the Reconstruction widget docked.

``python -m napari_petdiff.launch`` runs the viewer; ``--screenshot PATH`` instead waits until the
window is drawn, saves a screenshot of the whole window and exits (used by ``make run`` without a
display, under Xvfb).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCREENSHOT_SIZE = (1500, 950)


def open_viewer(sample: str = "brain2d", widget: str = "Reconstruction", show: bool = True):
    import napari

    viewer = napari.Viewer(title="napari-petdiff", show=show)
    viewer.open_sample("napari-petdiff", sample)
    dock, w = viewer.window.add_plugin_dock_widget("napari-petdiff", widget)
    return viewer, dock, w


def take_screenshot(viewer, path, delay_ms: int = 1500) -> int:
    """Screenshot the window once it is drawn, then quit the Qt loop; returns the exit code."""
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = {"code": 1}

    def shoot():
        try:
            viewer.screenshot(str(path), canvas_only=False, flash=False)
            status["code"] = 0
            print(f"wrote {path}")
        except Exception as exc:  # noqa: BLE001 - report and exit non-zero
            print(f"screenshot failed: {exc}", file=sys.stderr)
        finally:
            viewer.close()
            QApplication.instance().quit()

    QTimer.singleShot(delay_ms, shoot)
    QApplication.instance().exec()
    return status["code"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m napari_petdiff.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--screenshot", metavar="PATH", help="save a screenshot of the window to PATH and exit")
    ap.add_argument("--sample", default="brain2d", choices=["brain2d", "brain3d"], help="sample to open")
    ap.add_argument("--delay", type=float, default=1.5, help="seconds to wait before the screenshot (default 1.5)")
    args = ap.parse_args(argv)
    viewer, _, _ = open_viewer(args.sample)
    if args.screenshot:
        viewer.window.resize(*SCREENSHOT_SIZE)
        return take_screenshot(viewer, args.screenshot, int(args.delay * 1000))
    import napari

    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
