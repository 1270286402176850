"""Dynamic simulation, input functions, compartment model and voxel-wise Patlak (no prior)."""
import numpy as np
import pytest
import torch

from napari_petdiff.engine import reconstruct
from napari_petdiff.engine.acquisition import Acquisition, AcquisitionError, FrameTiming
from napari_petdiff.engine.geometry import ParallelBeamGeometry
from napari_petdiff.engine.grid import ImageGrid
from napari_petdiff.engine.kinetics.compartment import TissueKinetics, exp_convolve, kinetic_set, tissue_curve
from napari_petdiff.engine.kinetics.frames import FrameModel
from napari_petdiff.engine.kinetics.input_function import (FENG_PARAMS, InputFunction, InputFunctionError,
                                                           decay_integral_s, feng_cp)
from napari_petdiff.engine.kinetics.patlak import fit_patlak, patlak_plot, patlak_setup, region_curve
from napari_petdiff.engine.kinetics.simulate import DEFAULT_SCHEDULE, frame_schedule, simulate_dynamic
from napari_petdiff.engine.likelihood import PoissonLikelihood
from napari_petdiff.engine.methods import list_methods
from napari_petdiff.engine.metrics import nrmse
from napari_petdiff.engine.run import CancelToken, Cancelled, drive

N = 32


def tiny_fractions(n=N):
    """A disc of WM with a GM ring and one hot lesion: (1, n, n) fraction maps + the disc mask."""
    yy, xx = np.mgrid[0:n, 0:n].astype(float)
    c = (n - 1) / 2
    r = np.hypot(yy - c, xx - c)
    disc = (r < 0.38 * n).astype(float)
    les = (np.hypot(yy - 12, xx - 19) < 2.5).astype(float)
    gm = ((r < 0.30 * n) & (r > 0.20 * n)).astype(float) * (1 - les)
    wm = disc * (1 - gm) * (1 - les)
    return {"gm": gm[None], "wm": wm[None], "hot_lesion": les[None]}, disc[None] > 0


def tiny_dynamic(counts=1e6, model="2tcm", noise=True, seed=1, start_min=30.0, k4_zero=True, background=0.3):
    grid = ImageGrid((1, N, N), (2.0, 2.0, 2.0))
    geom = ParallelBeamGeometry(n_views=24, n_radial=47, radial_spacing_mm=1.6)
    fr, mask = tiny_fractions()
    sim = simulate_dynamic(fr, grid, geom, None, kinetics=kinetic_set("huang1980", k4_zero),
                           frames=frame_schedule(start_min=start_min), counts=counts, model=model, noise=noise,
                           seed=seed, background_fraction=background)
    return sim, mask


# ------------------------------------------------------------------ input function and compartments
def test_feng_input_function():
    t = np.array([0.0, 0.25, 0.5, 0.6, 1.0, 60.0])
    cp = feng_cp(t)
    assert cp[0] == 0 and cp[1] == 0 and cp[2] == 0  # nothing before the 0.5 min delay
    assert cp[3] > 50  # the bolus
    late = FENG_PARAMS["A2"] * np.exp(FENG_PARAMS["l2"] * 59.5) + FENG_PARAMS["A3"] * np.exp(FENG_PARAMS["l3"] * 59.5)
    assert cp[-1] == pytest.approx(late, rel=1e-6)
    inp = InputFunction.feng(end_s=3600.0, dt_s=1.0)
    # exact piecewise-linear integral agrees with a fine trapezoid of the model itself
    tf = np.linspace(0, 3600, 360001)
    ref = np.trapezoid(feng_cp(tf / 60.0), tf)
    assert inp.integral_at(3600.0) == pytest.approx(ref, rel=1e-4)
    with pytest.raises(InputFunctionError, match="increasing"):
        InputFunction([0, 2, 1], [0, 1, 2])
    with pytest.raises(InputFunctionError, match=">= 0"):
        InputFunction([0, 1], [0, -1])


def test_one_tissue_model_matches_analytic_solution():
    """1-tissue model (k3 = 0) with an exponential input: C_T = K1 A (e^{-at} - e^{-k2 t}) / (k2 - a)."""
    A, a = 10.0, 0.1
    t_s = np.arange(0, 3601, 1.0)
    cp = A * np.exp(-a * t_s / 60)
    kin = TissueKinetics(K1=0.2, k2=0.3, k3=0.0, k4=0.0, vb=0.0)
    got = tissue_curve(t_s, cp, kin)
    tm = t_s / 60
    ref = kin.K1 * A * (np.exp(-a * tm) - np.exp(-kin.k2 * tm)) / (kin.k2 - a)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-9 * ref.max())
    # the exponential convolution is exact for linear pieces: a constant input gives (1 - e^{-bt}) / b
    ones = np.ones_like(t_s)
    np.testing.assert_allclose(exp_convolve(t_s, ones, 0.5), (1 - np.exp(-0.5 * tm)) / 0.5, rtol=1e-10, atol=1e-12)


def test_two_tissue_model_matches_ode():
    from scipy.integrate import solve_ivp

    inp = InputFunction.feng(end_s=1800.0)
    kin = TissueKinetics(0.102, 0.130, 0.062, 0.0068, 0.0)
    got = tissue_curve(inp.t_s, inp.cp, kin)

    def rhs(t_min, c):
        p = np.interp(t_min * 60, inp.t_s, inp.cp)
        return [kin.K1 * p - (kin.k2 + kin.k3) * c[0] + kin.k4 * c[1], kin.k3 * c[0] - kin.k4 * c[1]]

    sol = solve_ivp(rhs, (0, 30), [0.0, 0.0], t_eval=inp.t_s / 60, max_step=1 / 120, rtol=1e-9, atol=1e-12)
    ref = sol.y.sum(0)
    np.testing.assert_allclose(got, ref, atol=2e-4 * ref.max())
    assert kin.irreversible().k4 == 0
    assert TissueKinetics(0.1, 0.2, 0.05, 0.0, 0.05).ki == pytest.approx(0.95 * 0.1 * 0.05 / 0.25)


def test_frame_schedule():
    fr = frame_schedule()
    assert fr.n_frames == sum(n for n, _ in DEFAULT_SCHEDULE) == 35
    assert fr.stop_s[-1] == pytest.approx(3600.0)
    np.testing.assert_allclose(fr.start_s[1:], fr.stop_s[:-1])
    late = frame_schedule(start_min=30)
    assert late.n_frames == 6 and late.start_s[0] == pytest.approx(1800.0)
    # decay since injection: a 5-min frame counts ~300 s x exp(-lambda t_mid) of decay-corrected activity
    d = decay_integral_s(late)
    lam = np.log(2) / 6586.2
    np.testing.assert_allclose(d, 300 * np.exp(-lam * late.mid_s), rtol=1e-3)
    assert np.all(np.diff(d) < 0)
    with pytest.raises(ValueError, match="no frame"):
        frame_schedule(start_min=61)


# ------------------------------------------------------------------ simulation + Patlak truth
def test_simulated_frames_follow_the_forward_model():
    sim, _ = tiny_dynamic(noise=False, model="patlak")
    acq = sim.acquisition
    setup = patlak_setup(acq, 30.0)
    model = FrameModel(acq, setup.index)
    counts_img = setup.to_counts(sim.frame_activity)
    expected = model._full[0].forward(counts_img) + model.b
    torch.testing.assert_close(acq.prompts, expected, rtol=1e-4, atol=1e-3)
    # frame counts grow with activity x duration: 5-min frames here, activity rising with uptake
    per_frame = acq.prompts.flatten(1).sum(1)
    assert torch.all(per_frame > 0)
    assert acq.metadata["activity_calibration"] == pytest.approx(sim.calibration)


@pytest.mark.parametrize("model", ["patlak", "2tcm"])
def test_ls_recovers_truth_noise_free(model):
    sim, mask = tiny_dynamic(noise=False, model=model)
    setup = patlak_setup(sim.acquisition, 30.0, weighting="uniform")
    ki, v = fit_patlak(sim.frame_activity, setup)
    torch.testing.assert_close(ki, sim.ki, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(v, sim.intercept, rtol=1e-4, atol=1e-6)
    wsetup = patlak_setup(sim.acquisition, 30.0, weighting="counts")
    ki_w, _ = fit_patlak(sim.frame_activity, wsetup, wsetup.weights)
    # the truth is the unweighted fit; the 2TCM curve is not exactly linear, so WLS differs slightly
    tol = 1e-4 if model == "patlak" else 2e-3
    torch.testing.assert_close(ki_w, sim.ki, rtol=tol, atol=1e-7)
    cls = sim.classes
    if model == "patlak":
        for k in cls:
            assert cls[k]["ki"] == pytest.approx(cls[k]["ki_analytic"], rel=1e-5)
    else:  # k4 = 0: Patlak's slope is within 2 % of K1 k3 / (k2 + k3) in GM and WM
        for k in ("gm", "wm"):
            assert cls[k]["ki"] == pytest.approx(cls[k]["ki_analytic"], rel=0.02)


def test_k4_positive_biases_patlak_low():
    sim, _ = tiny_dynamic(noise=False, k4_zero=False)
    gm = sim.classes["gm"]
    assert 0.7 < gm["ki"] / gm["ki_analytic"] < 0.95


def test_patlak_plot_slope_matches_fit():
    sim, _ = tiny_dynamic(noise=False, model="patlak")
    setup = patlak_setup(sim.acquisition, 30.0, weighting="uniform")
    fr, _ = tiny_fractions()
    tac = region_curve(sim.frame_activity, fr["gm"] > 0.5)
    plot = patlak_plot(tac, setup)
    ki, v = fit_patlak(sim.frame_activity, setup)
    gm = torch.as_tensor(fr["gm"] > 0.5)
    assert plot["slope"] == pytest.approx(float(ki[gm].mean()), rel=1e-4)
    assert plot["intercept"] == pytest.approx(float(v[gm].mean()), rel=1e-4)
    assert np.all(np.diff(plot["x_min"]) > 0)  # "stretched time" increases


def test_end_to_end_ls_noise_free_and_noisy():
    sim, mask = tiny_dynamic(noise=False)
    res = reconstruct(sim.acquisition, "patlak-ls", iterations=60, subsets=4)
    inner = torch.as_tensor(mask) & (sim.ki > 0.5 * float(sim.ki.max() * 0.2))
    assert nrmse(res.mean, sim.ki, inner) < 0.08
    assert res.metadata["frames_used"] == list(range(6))
    assert res.metadata["units"]["ki"].startswith("1/min")
    assert "intercept" in res.extra
    noisy, _ = tiny_dynamic(counts=3e5)
    ls = reconstruct(noisy.acquisition, "patlak-ls")
    wls = reconstruct(noisy.acquisition, "patlak-wls")
    e_ls, e_wls = nrmse(ls.mean, noisy.ki, mask), nrmse(wls.mean, noisy.ki, mask)
    assert 0.2 < e_ls < 2.0 and 0.2 < e_wls < 2.0
    assert not torch.equal(ls.mean, wls.mean)


def test_frame_model_matches_static_likelihood():
    sim, _ = tiny_dynamic(counts=2e5)
    acq = sim.acquisition
    idx = [1, 3]
    model = FrameModel(acq, idx, n_subsets=4)
    x = model.uniform_image() * (1 + torch.rand(2, 1, N, N, generator=torch.Generator().manual_seed(0)))
    for j, k in enumerate(idx):
        lik = PoissonLikelihood(acq.frame(k), 4)
        torch.testing.assert_close(model.em_step(x, 2)[j], lik.em_step(x[j], 2), rtol=1e-4, atol=1e-6)
        assert float(model.value(x)[j]) == pytest.approx(float(lik.value(x[j])), rel=1e-6)


# ------------------------------------------------------------------ input from a file
def test_csv_input_function_minutes_and_seconds(tmp_path):
    sim, _ = tiny_dynamic(noise=False, model="patlak")
    inp = sim.input_function
    t = inp.t_s[::5]
    (tmp_path / "min.csv").write_text("time_min,cp\n" + "\n".join(f"{a / 60:.8f},{b:.8f}" for a, b in
                                                                    zip(t, inp.cp[::5])))
    (tmp_path / "s.csv").write_text("\n".join(f"{a:.3f};{b:.8f}" for a, b in zip(t, inp.cp[::5])))
    ref = patlak_setup(sim.acquisition, 30.0)
    for f in ("min.csv", "s.csv"):
        s = patlak_setup(sim.acquisition, 30.0, input_function=str(tmp_path / f))
        # samples every 5 s miss a little of the bolus peak: 0.1 % of the integral
        np.testing.assert_allclose(s.u, ref.u, rtol=2e-3)
        np.testing.assert_allclose(s.v, ref.v, rtol=1e-4)
    pop = patlak_setup(sim.acquisition, 30.0, input_function="population")
    np.testing.assert_allclose(pop.u, ref.u, rtol=1e-9)
    (tmp_path / "bad.csv").write_text("t,cp\n0,1\n1,x\n")
    with pytest.raises(InputFunctionError, match="two numbers"):
        patlak_setup(sim.acquisition, 30.0, input_function=str(tmp_path / "bad.csv"))


# ------------------------------------------------------------------ bad timing
def test_bad_timing_errors():
    sim, _ = tiny_dynamic(noise=False, model="patlak")
    acq = sim.acquisition
    with pytest.raises(AcquisitionError, match="overlap"):
        FrameTiming([1800, 1900], [2100, 2400])
    with pytest.raises(AcquisitionError, match="sorted"):
        FrameTiming([2100, 1800], [2400, 2100])
    with pytest.raises(ValueError, match="after the start of the last frame"):
        patlak_setup(acq, 59.0)
    with pytest.raises(ValueError, match="at least 2"):
        patlak_setup(acq, 52.0)
    short = dict(acq.input_function)
    keep = np.asarray(short["t_s"]) <= 3000
    short["t_s"] = list(np.asarray(short["t_s"])[keep])
    short["cp"] = list(np.asarray(short["cp"])[keep])
    acq_short = Acquisition(acq.prompts, acq.geometry, acq.grid, acq.multiplicative, acq.additive,
                            acq.psf_fwhm_mm, acq.frames, None, short, acq.metadata)
    with pytest.raises(InputFunctionError, match="must cover every frame"):
        patlak_setup(acq_short, 30.0)
    with pytest.raises(AcquisitionError, match="frame timing lists"):
        Acquisition(acq.prompts[:5], acq.geometry, acq.grid, acq.multiplicative, None, acq.psf_fwhm_mm,
                    acq.frames, None, acq.input_function)
    setup = patlak_setup(acq, 30.0)
    with pytest.raises(ValueError, match="one image per frame"):
        fit_patlak(sim.frame_activity[:4], setup)
    with pytest.raises(ValueError, match="dynamic"):
        patlak_setup(acq.frame(0), 30.0)
    no_if = Acquisition(acq.prompts, acq.geometry, acq.grid, acq.multiplicative, acq.additive,
                        acq.psf_fwhm_mm, acq.frames, None, None, {})
    with pytest.raises(InputFunctionError, match="no input function"):
        patlak_setup(no_if, 30.0)


def test_uncalibrated_data_warn(tmp_path):
    sim, _ = tiny_dynamic(counts=2e5)
    acq = sim.acquisition
    bare = Acquisition(acq.prompts, acq.geometry, acq.grid, acq.multiplicative, acq.additive, acq.psf_fwhm_mm,
                       acq.frames, None, acq.input_function, {})
    res = reconstruct(bare, "patlak-ls", iterations=1)
    assert any("calibration" in w for w in res.warnings)
    assert "relative" not in res.metadata["units"]["ki"] and "no activity calibration" in res.metadata["units"]["ki"]


def test_registry_and_cancel():
    names = {s.name for s in list_methods(kind="dynamic")}
    assert {"patlak-ls", "patlak-wls", "patlak-red-diff", "patlak-hqs", "patlak-direct"} <= names
    sim, _ = tiny_dynamic(counts=2e5)
    from napari_petdiff.engine.methods import get_method
    from napari_petdiff.engine.params import make_params

    spec = get_method("patlak-ls")
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        drive(spec.run(sim.acquisition, make_params(spec.params), tok))


def test_mid_frame_timing_is_close_to_frame_average():
    sim, _ = tiny_dynamic(noise=False, model="patlak")
    avg = patlak_setup(sim.acquisition, 30.0)
    mid = patlak_setup(sim.acquisition, 30.0, timing="mid")
    np.testing.assert_allclose(mid.u, avg.u, rtol=5e-3)
    np.testing.assert_allclose(mid.v, avg.v, rtol=5e-3)
    assert not np.allclose(mid.u, avg.u, rtol=1e-6)
    with pytest.raises(ValueError, match="timing"):
        patlak_setup(sim.acquisition, 30.0, timing="start")
