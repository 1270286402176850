import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from napari_petdiff.cli import main
from napari_petdiff.engine.simulate import simulate


def test_simulation_counts_background_and_seed(small_setup):
    from tests.conftest import blob_image

    grid, geom = small_setup
    img = blob_image(32)
    a = simulate(img, grid, geom, counts=5e4, background_fraction=0.25, seed=3, noise=False)
    trues = a.expected - a.acquisition.additive
    assert float(trues.sum()) == pytest.approx(5e4, rel=1e-4)
    assert float(a.acquisition.additive.sum()) == pytest.approx(0.25 * 5e4, rel=1e-4)
    b1 = simulate(img, grid, geom, counts=5e4, seed=3)
    b2 = simulate(img, grid, geom, counts=5e4, seed=3)
    b3 = simulate(img, grid, geom, counts=5e4, seed=4)
    assert torch.equal(b1.acquisition.prompts, b2.acquisition.prompts)
    assert not torch.equal(b1.acquisition.prompts, b3.acquisition.prompts)
    # trues per mm^3 of emission volume
    c = simulate(img, grid, geom, counts=None, trues_per_mm3=2.5, noise=False, background_fraction=0)
    vol = float((img > 0).sum()) * 8.0
    assert float(c.expected.sum()) == pytest.approx(2.5 * vol, rel=1e-4)


def test_simulation_errors(small_setup):
    grid, geom = small_setup
    with pytest.raises(ValueError, match="shape"):
        simulate(np.ones((1, 8, 8)), grid, geom)
    with pytest.raises(ValueError, match=">= 0"):
        simulate(-np.ones(grid.shape), grid, geom)


def test_cli_simulate_recon_info_methods(tmp_path, capsys):
    f = tmp_path / "scan.petacq"
    assert main(["simulate", "--phantom", "shepp2d", "--counts", "2e4", "--seed", "1", "--out", str(f)]) == 0
    assert main(["info", str(f)]) == 0
    assert "static PET acquisition" in capsys.readouterr().out
    out = tmp_path / "r"
    assert main(["recon", str(f), "--method", "osem", "--iterations", "2", "--subsets", "4", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == "osem" and run["params"] == {"iterations": 2, "subsets": 4}
    assert len(run["likelihood"]) == 3
    assert (out / "mean.nii.gz").exists()
    assert main(["methods"]) == 0
    assert "map-rdp" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["recon", str(tmp_path / "missing.petacq"), "--method", "osem", "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["recon", "x", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    f = tmp_path / "s.petacq"
    main(["simulate", "--phantom", "shepp2d", "--counts", "1e4", "--out", str(f)])
    assert main(["recon", str(f), "--method", "osem", "--iterations", "0", "--out", str(tmp_path / "o")]) == 2
    assert "minimum" in capsys.readouterr().err


def test_cli_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "napari_petdiff.cli", "methods"], capture_output=True, text=True)
    assert r.returncode == 0 and "osem" in r.stdout


# ------------------------------------------------------------------- MR image
@pytest.fixture(scope="module")
def shepp_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("mr") / "scan.petacq"
    assert main(["simulate", "--phantom", "shepp2d", "--counts", "1e4", "--seed", "2", "--out", str(f)]) == 0
    return f


def test_make_scan_attaches_the_phantom_mr():
    from napari_petdiff.engine.samples import make_phantom, make_scan

    acq, images = make_scan("shepp2d", counts=1e4)
    assert acq.mr is not None and tuple(acq.mr.shape) == acq.grid.shape
    torch.testing.assert_close(acq.mr, images["mr"])
    np.testing.assert_allclose(acq.mr.numpy(), make_phantom("shepp2d").mr)


def test_simulate_writes_the_mr_and_info_reports_it(shepp_file, capsys):
    from napari_petdiff.engine.io import load_acquisition

    acq = load_acquisition(shepp_file)
    assert acq.mr is not None and tuple(acq.mr.shape) == acq.grid.shape
    capsys.readouterr()
    assert main(["info", str(shepp_file)]) == 0
    assert "MR image: attached" in capsys.readouterr().out


def test_recon_mr_option_attaches_or_refuses(shepp_file, tmp_path, capsys, monkeypatch):
    from napari_petdiff.engine.io import load_acquisition, write_nifti
    from napari_petdiff.engine.grid import ImageGrid

    ran = []
    monkeypatch.setattr("napari_petdiff._cli.recon.run_and_write", lambda spec, acq, *a, **kw: ran.append(acq) or 0)
    stored = load_acquisition(shepp_file)
    recon = ["recon", str(shepp_file), "--method", "osem", "--iterations", "1", "--out", str(tmp_path / "o")]
    assert main(recon) == 0
    torch.testing.assert_close(ran[-1].mr, stored.mr)  # without --mr: the file's MR
    mine = 0.5 * stored.mr.numpy() + 0.1
    write_nifti(tmp_path / "mr.nii.gz", mine, stored.grid)
    assert main(recon + ["--mr", str(tmp_path / "mr.nii.gz")]) == 0
    np.testing.assert_allclose(ran[-1].mr.numpy(), mine, rtol=1e-6)  # --mr overrides it
    n_runs = len(ran)
    capsys.readouterr()
    write_nifti(tmp_path / "small.nii.gz", np.ones((1, 64, 64), np.float32), ImageGrid((1, 64, 64), (4.0, 4.0, 2.0)))
    assert main(recon + ["--mr", str(tmp_path / "small.nii.gz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not match the PET reconstruction grid" in err and "resample" in err
    shifted = ImageGrid(stored.grid.shape, stored.grid.voxel_size, tuple(o + 10.0 for o in stored.grid.origin))
    write_nifti(tmp_path / "shifted.nii.gz", mine, shifted)
    assert main(recon + ["--mr", str(tmp_path / "shifted.nii.gz")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(recon + ["--mr", str(tmp_path / "missing.nii.gz")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert len(ran) == n_runs  # nothing ran on a refused MR
