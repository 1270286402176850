"""Personalised priors: registration, pseudo-PETs, the staged pipeline and its errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.personal import (PersonaliseConfig, RegistrationConfig, dirichlet_weights, load_subjects,
                                            personalise, pseudo_pet, register)
from napari_petdiff.engine.phantoms import brain_phantom, deform, random_deformation_field
from napari_petdiff.engine.run import Cancelled, CancelToken

pytest.importorskip("SimpleITK")

# whole head at coarse voxels: registration and fine-tuning take seconds
COARSE = dict(dims=2, shape=(1, 32, 32), voxel_size_mm=8.0)


def _drain(gen):
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return events, stop.value


# --- registration ---------------------------------------------------------------------------------
def test_registration_recovers_a_known_deformation():
    ph = brain_phantom(dims=2, deformation_seed=3)
    true = random_deformation_field(ph.grid.shape, 3.0, ph.grid.voxel_size, seed=11, affine_jitter=True,
                                    origin=ph.grid.origin)
    moved = deform(ph.mr, true)  # the same subject, deformed: moved(p) = mr(p + d(p))
    field, info = register(moved, ph.mr, ph.grid)
    brain = deform(ph.brain_mask, true)[0]  # where the fixed image has anatomy
    # a one-slice grid registers in-plane: compare (dy, dx)
    err = np.linalg.norm(field.displacement_mm[0, ..., 1:] - true.displacement_mm[0, ..., 1:], axis=-1)[brain]
    size = np.linalg.norm(true.displacement_mm[0, ..., 1:], axis=-1)[brain]
    assert np.median(size) > 4.0  # a deformation worth recovering (mm)
    assert np.median(err) < 0.1 * np.median(size) and np.median(err) < 0.6
    assert np.percentile(err, 90) < 1.5
    assert info["mr_rmse_after"] < 0.15 * info["mr_rmse_before"]


def test_registration_3d_and_warping_a_pet_follows_the_mr():
    tgt = brain_phantom(dims=3, shape=(12, 32, 32), voxel_size_mm=6.0, deformation_seed=1)
    src = brain_phantom(dims=3, shape=(12, 32, 32), voxel_size_mm=6.0, deformation_seed=2)
    field, info = register(tgt.mr, src.mr, tgt.grid, cfg=RegistrationConfig(levels=(2, 1)))
    assert field.displacement_mm.shape == (12, 32, 32, 3)
    dice = lambda a, b: 2 * ((a > 0.5) & (b > 0.5)).sum() / ((a > 0.5).sum() + (b > 0.5).sum())  # noqa: E731
    assert dice(tgt.gm, deform(src.gm, field)) > dice(tgt.gm, src.gm) + 0.1
    assert info["mr_rmse_after"] < info["mr_rmse_before"]


def test_registration_bad_inputs():
    ph = brain_phantom(**COARSE)
    with pytest.raises(ValueError, match="registration method"):
        register(ph.mr, ph.mr, ph.grid, cfg=RegistrationConfig(method="syn"))
    with pytest.raises(ValueError, match="empty"):
        register(ph.mr, np.zeros_like(ph.mr), ph.grid)
    with pytest.raises(ValueError, match="shape"):
        register(ph.mr[:, :16], ph.mr, ph.grid)
    bad = ph.mr.copy()
    bad[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        register(ph.mr, bad, ph.grid)


# --- pseudo-PETs ----------------------------------------------------------------------------------
def test_dirichlet_weights_sum_to_one_on_a_subset():
    rng = np.random.default_rng(0)
    for alpha in (0.3, 1.0, 10.0):
        for _ in range(50):
            w = dirichlet_weights(rng, 8, 4, alpha)
            assert w.sum() == pytest.approx(1.0, abs=1e-12)
            assert (w >= 0).all() and (w > 0).sum() == 4
    # a large concentration tends to the plain subset average
    w = dirichlet_weights(rng, 5, 5, 1e6)
    assert np.allclose(w, 0.2, atol=5e-3)
    with pytest.raises(ValueError, match="empty"):
        dirichlet_weights(rng, 0, 1)
    with pytest.raises(ValueError, match="subset size"):
        dirichlet_weights(rng, 3, 4)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_weights(rng, 3, 2, 0.0)


def test_added_lesions_are_hot_or_cold_spheres_in_the_head():
    from napari_petdiff.engine.personal import add_random_lesions

    ph = brain_phantom(dims=2, deformation_seed=4)
    img = ph.activity / ph.activity[ph.brain_mask].mean()
    seen = set()
    for seed in range(6):
        out, les = add_random_lesions(img, ph.grid, np.random.default_rng(seed))
        assert 1 <= len(les) <= 3 and out.shape == img.shape and (out >= 0).all()
        changed = out != img
        assert changed.any() and (img[changed] > 0).all()  # only inside the head
        seen |= {"hot" if le["contrast"] >= 1 else "cold" for le in les}
    assert seen == {"hot", "cold"}


def test_pseudo_pet_is_the_weighted_average():
    rng = np.random.default_rng(1)
    stack = rng.random((3, 2, 4, 4)).astype(np.float32)
    w = np.array([0.2, 0.0, 0.8])
    assert np.allclose(pseudo_pet(stack, w), 0.2 * stack[0] + 0.8 * stack[2], atol=1e-6)


# --- sources --------------------------------------------------------------------------------------
def test_source_sets(tmp_path):
    from napari_petdiff.engine.io import write_nifti

    grid = brain_phantom(**COARSE).grid
    subs = load_subjects("phantom:3", grid)
    assert [s.name for s in subs] == ["phantom-00", "phantom-01", "phantom-02"]
    assert len({float(s.pet.sum()) for s in subs}) == 3  # each its own anatomy and uptake
    with pytest.raises(ValueError, match="empty"):
        load_subjects("phantom:0", grid)
    with pytest.raises(ValueError, match="empty"):
        load_subjects(str(tmp_path), grid)
    write_nifti(tmp_path / "a_pet.nii.gz", subs[0].pet, grid)
    with pytest.raises(ValueError, match="no MR"):
        load_subjects(str(tmp_path), grid)
    write_nifti(tmp_path / "a_mr.nii.gz", subs[0].mr, grid)
    (loaded,) = load_subjects(str(tmp_path), grid)
    assert loaded.name == "a" and np.allclose(loaded.pet, subs[0].pet) and loaded.grid.matches(grid)


# --- pipeline -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_prior(tmp_path_factory):
    """The tiny test prior saved at the coarse voxel size (a stand-in for brain-fdg-2d)."""
    from napari_petdiff.engine.diffusion.io import save_prior
    from napari_petdiff.engine.diffusion.prior import ScorePrior

    from ._tiny_prior import make_tiny_prior

    tiny = make_tiny_prior()
    p = ScorePrior(tiny.net, tiny.schedule, name="tiny-coarse", image_size=32, voxel_size_mm=8.0)
    return str(save_prior(p, tmp_path_factory.mktemp("prior") / "tiny-coarse"))


def _cfg(out, base, **kw):
    reg = RegistrationConfig(levels=(2, 1), demons_iterations=30, threads=1)
    return PersonaliseConfig(out=str(out), sources="phantom:3", n_pseudo=4, subset_size=2, base_prior=base, steps=2,
                             batch_size=2, threads=1, registration=reg, **kw)


def test_pipeline_stages_resume_and_card(tmp_path, base_prior):
    from napari_petdiff.engine.diffusion.io import load_prior

    tgt = brain_phantom(**COARSE, deformation_seed=5)
    cfg = _cfg(tmp_path / "p", base_prior)
    events, _ = _drain(personalise(cfg, tgt.mr, tgt.grid, stages=("register",)))
    assert {e.stage for e in events} == {"register"}
    warped = sorted(p.name for p in (tmp_path / "p" / "warped").iterdir())
    assert warped == [f"phantom-0{i}_{k}.nii.gz" for i in range(3) for k in ("mr", "pet")]
    with pytest.raises(ValueError, match="pseudo stage first"):
        _drain(personalise(cfg, tgt.mr, tgt.grid, stages=("finetune",)))
    events, summary = _drain(personalise(cfg, tgt.mr, tgt.grid))  # the rest; registration is not redone
    assert "register" not in {e.stage for e in events}
    record = json.loads((tmp_path / "p" / "pseudo" / "weights.json").read_text())
    weights = record["weights"]
    assert len(weights) == 4 and all(abs(sum(w) - 1) < 1e-9 and sum(v > 0 for v in w) == 2 for w in weights)
    assert len(record["lesions"]) == 4
    prior = load_prior(summary["prior"])
    pers = prior.card["personalised"]
    assert ImageGrid.from_dict(pers["target_grid"]).matches(tgt.grid) and pers["base_prior"] == base_prior
    assert prior.card["steps"] == 2
    # done: nothing runs again; more steps continue the fine-tune from its checkpoint
    events, again = _drain(personalise(cfg, tgt.mr, tgt.grid))
    assert events == [] and again["prior"] == summary["prior"]
    cfg.steps = 3
    events, more = _drain(personalise(cfg, tgt.mr, tgt.grid))
    assert [e.step for e in events] == [3] and load_prior(more["prior"]).card["steps"] == 3


def test_pipeline_refuses_mixed_folders_and_bad_targets(tmp_path, base_prior):
    tgt = brain_phantom(**COARSE, deformation_seed=5)
    cfg = _cfg(tmp_path / "p", base_prior)
    _drain(personalise(cfg, tgt.mr, tgt.grid, stages=("register",)))
    other = _cfg(tmp_path / "p", base_prior)
    other.registration.method = "affine"
    with pytest.raises(ValueError, match="other register settings"):
        _drain(personalise(other, tgt.mr, tgt.grid))
    with pytest.raises(ValueError, match="another target MR"):
        _drain(personalise(cfg, brain_phantom(**COARSE, deformation_seed=6).mr, tgt.grid))
    # the MR must live where the reconstruction does
    shifted = ImageGrid(tgt.grid.shape, tgt.grid.voxel_size, (0.0, 4.0, 0.0))
    with pytest.raises(ValueError, match="does not match the acquisition"):
        _drain(personalise(cfg, tgt.mr, tgt.grid, acquisition_grid=shifted))
    with pytest.raises(ValueError, match="empty"):
        _drain(personalise(_cfg(tmp_path / "q", base_prior), np.zeros_like(tgt.mr), tgt.grid))
    empty = _cfg(tmp_path / "r", base_prior)
    empty.sources = str(tmp_path / "nothing-here")
    (tmp_path / "nothing-here").mkdir()
    with pytest.raises(ValueError, match="source set is empty"):
        _drain(personalise(empty, tgt.mr, tgt.grid))


def test_pipeline_cancel_then_resume(tmp_path, base_prior):
    tgt = brain_phantom(**COARSE, deformation_seed=5)
    cfg = _cfg(tmp_path / "p", base_prior)
    token = CancelToken()
    gen = personalise(cfg, tgt.mr, tgt.grid, stages=("register",), cancel=token)
    next(gen)  # first subject starting
    next(gen)  # first subject registered, second starting
    token.cancel()
    with pytest.raises(Cancelled):
        _drain(gen)
    assert len(list((tmp_path / "p" / "warped").glob("*_pet.nii.gz"))) == 1
    events, _ = _drain(personalise(cfg, tgt.mr, tgt.grid, stages=("register",)))
    assert len(list((tmp_path / "p" / "warped").glob("*_pet.nii.gz"))) == 3


def test_personalised_prior_refuses_another_grid_and_corrupt_files(tmp_path, base_prior, small_setup):
    from napari_petdiff.engine import reconstruct
    from napari_petdiff.engine.geometry import ParallelBeamGeometry
    from napari_petdiff.engine.simulate import simulate

    tgt = brain_phantom(**COARSE, deformation_seed=5)
    cfg = _cfg(tmp_path / "p", base_prior)
    _, summary = _drain(personalise(cfg, tgt.mr, tgt.grid))
    geom = ParallelBeamGeometry(n_views=24, n_radial=47, radial_spacing_mm=6.0)
    sim = simulate(tgt.activity, tgt.grid, geom, counts=1e5, seed=0)
    out = reconstruct(sim.acquisition, "dds", prior=summary["prior"], steps=2, samples=1)
    assert out.mean.shape == (1, 32, 32)
    other = ImageGrid(tgt.grid.shape, tgt.grid.voxel_size, (8.0,) + tgt.grid.origin[1:])  # another slice
    geom2 = ParallelBeamGeometry(n_views=24, n_radial=47, radial_spacing_mm=6.0, plane_z_mm=other.voxel_centres(0))
    sim2 = simulate(tgt.activity, other, geom2, counts=1e5, seed=0)
    with pytest.raises(ValueError, match="personalised for the subject"):
        reconstruct(sim2.acquisition, "dds", prior=summary["prior"], steps=2, samples=1)
    weights = tmp_path / "p" / "personalised.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated, corrupt"):
        reconstruct(sim.acquisition, "dds", prior=str(weights), steps=2, samples=1)


def test_grid_contains():
    g = ImageGrid((25, 8, 8), (2.0, 2.0, 2.0))
    assert g.contains(g)
    assert g.contains(ImageGrid((1, 8, 8), (2.0, 2.0, 2.0), (0.0,) + g.origin[1:]))
    assert g.contains(ImageGrid((3, 8, 8), (2.0, 2.0, 2.0), (g.origin[0] + 4.0,) + g.origin[1:]))
    assert not g.contains(ImageGrid((1, 8, 8), (2.0, 2.0, 2.0), (1.0,) + g.origin[1:]))   # between slices
    assert not g.contains(ImageGrid((1, 8, 8), (2.0, 2.0, 2.0), (30.0,) + g.origin[1:]))  # outside
    assert not g.contains(ImageGrid((1, 8, 8), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0)))         # shifted in-plane
    assert not g.contains(ImageGrid((1, 8, 9), (2.0, 2.0, 2.0)))


def test_cli_personalise_stage_and_errors(tmp_path, capsys):
    from napari_petdiff.cli import main
    from napari_petdiff.engine.io import write_nifti

    tgt = brain_phantom(**COARSE, deformation_seed=5)
    mr = write_nifti(tmp_path / "t1.nii.gz", tgt.mr, tgt.grid)
    out = tmp_path / "work"
    assert main(["--threads", "1", "personalise", "--mr", str(mr), "--out", str(out), "--sources", "phantom:2",
                 "--stage", "register", "--stage", "pseudo", "--pseudo", "3", "--subset", "2", "--quiet"]) == 0
    assert len(list((out / "pseudo").glob("pseudo-*.nii.gz"))) == 3
    assert "stages register, pseudo done" in capsys.readouterr().out
    (tmp_path / "none").mkdir()
    assert main(["personalise", "--mr", str(mr), "--out", str(tmp_path / "w2"), "--sources",
                 str(tmp_path / "none")]) == 2
    assert "source set is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    assert main(["personalise", "--mr", str(bad), "--out", str(tmp_path / "w3")]) == 2
    assert "not a readable NIfTI" in capsys.readouterr().err
