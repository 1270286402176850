"""`petdiff patlak` and the brain dynamic scan used by `petdiff simulate --dynamic`."""
import json

import numpy as np
import pytest
import torch

from napari_petdiff.cli import main
from napari_petdiff.engine.io import load_acquisition, load_acquisition_images, read_nifti, save_acquisition

from .test_kinetics import tiny_dynamic


@pytest.fixture(scope="module")
def dyn_file(tmp_path_factory):
    sim, _ = tiny_dynamic(counts=3e5)
    p = tmp_path_factory.mktemp("dyn") / "scan.petacq"
    save_acquisition(p, sim.acquisition, {"ki": sim.ki, "intercept": sim.intercept})
    return p, sim


def test_dynamic_file_round_trip(dyn_file):
    p, sim = dyn_file
    acq = load_acquisition(p)
    assert acq.is_dynamic and acq.frames.n_frames == 6
    assert acq.input_function["units"] == "uCi/mL" and len(acq.input_function["t_s"]) > 3000
    assert acq.metadata["activity_calibration"] == pytest.approx(sim.calibration)
    torch.testing.assert_close(load_acquisition_images(p)["ki"], sim.ki)


def test_cli_patlak_ls_and_wls(dyn_file, tmp_path, capsys):
    p, sim = dyn_file
    out = tmp_path / "ls"
    assert main(["patlak", str(p), "--method", "ls", "--t-star", "35", "--out", str(out), "--iterations", "2"]) == 0
    ki, grid = read_nifti(out / "ki.nii.gz")
    icpt, _ = read_nifti(out / "intercept.nii.gz")
    assert ki.shape == tuple(sim.ki.shape) and icpt.shape == ki.shape
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "patlak-ls" and run["params"]["t_star"] == 35.0
    assert run["metadata"]["frames_used"] == [1, 2, 3, 4, 5]
    assert run["metadata"]["units"]["ki"].startswith("1/min")
    assert "[" in capsys.readouterr().err  # the progress bar
    # --help lists the method's options without running
    assert main(["patlak", "--method", "wls", "--help"]) == 0
    assert "--t-star" in capsys.readouterr().out


def test_cli_patlak_errors_and_cancel(dyn_file, tmp_path, capsys, monkeypatch):
    p, _ = dyn_file
    assert main(["patlak", str(p), "--method", "ls", "--t-star", "70", "--out", str(tmp_path / "x")]) == 2
    assert "after the start of the last frame" in capsys.readouterr().err
    assert main(["patlak", str(p), "--method", "osem", "--out", str(tmp_path / "y")]) == 2
    assert "not a Patlak method" in capsys.readouterr().err

    from napari_petdiff.engine.kinetics import frames

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(frames.FrameModel, "osem", interrupted)
    out = tmp_path / "cancelled"
    assert main(["patlak", str(p), "--method", "ls", "--out", str(out)]) == 130
    assert not (out / "ki.nii.gz").exists()


def test_make_dynamic_scan_brain():
    from napari_petdiff.engine.kinetics.simulate import make_dynamic_scan

    acq, images = make_dynamic_scan(counts=2e5, start_min=50, seed=2)
    assert acq.frames.n_frames == 2 and tuple(acq.prompts.shape[:2]) == (2, 1)
    assert acq.prompts.sum() > 2e5  # trues + 30 % background
    for k in ("ki", "intercept", "ki_analytic", "brain_mask", "mu", "lesion0", "lesion1"):
        assert k in images and images[k].shape == (1, 128, 128)
    bm = images["brain_mask"] > 0
    ki = images["ki"]
    assert 0.01 < float(ki[bm].mean()) < 0.04
    # the hot lesion has the highest Ki, the cold lesion less than WM
    hot, cold = images["lesion0"] > 0, images["lesion1"] > 0
    assert float(ki[hot].mean()) > 1.8 * float(ki[bm].mean()) and float(ki[cold].mean()) < 0.01
    assert acq.metadata["k4_zero"] is True and acq.metadata["t_star_min_truth"] == 30.0
    assert np.isclose(acq.input_function["t_s"][-1], 3600.0)
    with pytest.raises(ValueError, match="tissue classes"):
        make_dynamic_scan(phantom="shepp2d")
