"""Reconstruction-time adaptation: the adapter, DDIP-HQS and PET-LiSch + SCD on the tiny problem."""
import numpy as np
import pytest
import torch

from napari_petdiff.engine import reconstruct
from napari_petdiff.engine.likelihood import PoissonLikelihood
from napari_petdiff.engine.methods import get_method
from napari_petdiff.engine.run import CancelToken, Cancelled, Progress
from napari_petdiff.engine.params import make_params
from napari_petdiff.engine.samplers import core
from napari_petdiff.engine.samplers.adapt import NetworkAdapter, adapted_tweedie
from napari_petdiff.engine.samplers.lisch_scd import is_adapted_step


@pytest.fixture
def use_tiny(tiny_prior, monkeypatch):
    monkeypatch.setitem(core._PRIOR_CACHE, ("tiny", "cpu"), tiny_prior)
    return "tiny"


def _x_t(seed=0, S=2):
    return torch.randn((S, 1, 32, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["lora", "decoder", "full"])
def test_adapter_starts_as_the_prior_restarts_exactly_and_leaves_it_untouched(tiny_prior, mode):
    x = _x_t()
    before = {k: v.clone() for k, v in tiny_prior.net.state_dict().items()}
    ref = tiny_prior.eps_volume(x, 500)
    ad = NetworkAdapter(tiny_prior, mode, rank=2, lr=1e-2)
    torch.testing.assert_close(ad.prior.eps_volume(x, 500), ref, rtol=0, atol=1e-6)
    target = torch.zeros_like(x)
    ad.fit(lambda: ((adapted_tweedie(ad, x, 500, torch.arange(1)) - target) ** 2).mean(), 3)
    moved = ad.prior.eps_volume(x, 500)
    assert (moved - ref).abs().max() > 1e-4
    with ad.base() as base:  # the unadapted prediction stays available while adapted
        torch.testing.assert_close(base.eps_volume(x, 500), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ad.prior.eps_volume(x, 500), moved, rtol=0, atol=0)
    ad.restart()
    torch.testing.assert_close(ad.prior.eps_volume(x, 500), ref, rtol=0, atol=1e-6)
    for k, v in tiny_prior.net.state_dict().items():  # the shared prior was never modified
        assert torch.equal(v, before[k]), k
    assert tiny_prior._lora is None


def test_adaptation_lowers_the_data_loss(small_acq, tiny_prior):
    """A few LoRA steps on the Poisson NLL of the Tweedie estimate raise its likelihood."""
    lik = PoissonLikelihood(small_acq.acquisition)
    x = _x_t(3, 1)
    truth = small_acq.truth
    c = truth[truth > 0].mean().view(1, 1, 1, 1)
    ad = NetworkAdapter(tiny_prior, "lora", rank=4, lr=3e-3)

    def u_of():
        return lik.mask(c * adapted_tweedie(ad, x, 200, torch.arange(1)).clamp_min(0))

    def loss():
        u = u_of()
        _, g = lik.value_and_gradient(u.detach())
        return -(g * u).sum() / float(lik.sensitivity.sum())

    with torch.no_grad():
        l0 = float(lik.value(u_of()))
    ad.fit(loss, 15)
    with torch.no_grad():
        l1 = float(lik.value(u_of()))
    assert l1 > l0


def test_adapter_rejects_bad_settings(tiny_prior):
    with pytest.raises(ValueError, match="rank"):
        NetworkAdapter(tiny_prior, "lora", rank=0)
    with pytest.raises(ValueError, match="mode"):
        NetworkAdapter(tiny_prior, "encoder")
    with pytest.raises(ValueError, match="learning rate"):
        NetworkAdapter(tiny_prior, "lora", lr=0.0)
    with pytest.raises(ValueError, match="rank"):
        make_params(get_method("ddip-hqs").params, {"rank": 0})
    with pytest.raises(ValueError, match="rho"):
        make_params(get_method("ddip-hqs").params, {"rho": -1.0})


def test_hqs_x_step_solves_its_subproblem(small_acq):
    """The EM-prox fixed point is a stationary point of L(x) - rho/2 ||x - z||^2 (x > 0)."""
    lik = PoissonLikelihood(small_acq.acquisition)
    z = lik.mask(torch.full(lik.image_shape, 1.0) * lik.fov)
    z = z * (float(small_acq.acquisition.prompts.sum()) / float(lik.forward(z).sum()))
    rho = 0.5 * lik.sensitivity / z.max()
    x = z.clone()
    for _ in range(400):
        x = lik.em_prox(x, z, rho)
    g = lik.gradient(x) - rho * (x - z)
    inside = lik.fov & (x > 1e-3 * x.max())
    scale = lik.sensitivity[inside].mean()
    assert float(g[inside].abs().max() / scale) < 1e-3


def test_hqs_x_step_with_rdp_climbs_to_the_penalised_optimum(small_acq):
    """With an RDP term the x-step still climbs, and its fixed point is stationary for
    L - rho/2 ||x - z||^2 - beta R; at rho = 0 that is MAP-RDP's optimum, which BSREM reaches too."""
    from napari_petdiff.engine.rdp import RDP
    from napari_petdiff.engine.samplers.ddip import penalised_em_prox

    acq = small_acq.acquisition
    lik = PoissonLikelihood(acq)
    rdp = RDP(acq.grid.voxel_size, is_2d=True)
    beta = 0.3 * float(lik.sensitivity[lik.fov].mean())
    z = lik.mask(small_acq.truth.clone())
    fixed = {}
    for rho_f in (0.0, 0.5):
        rho = rho_f * lik.sensitivity / z.max()

        def objective(x):
            return float(lik.value(x)) - float((rho * (x - z) ** 2).sum()) / 2 - beta * float(rdp.value(x))

        x = lik.uniform_image()
        vals = [objective(x)]
        for _ in range(400):
            x = penalised_em_prox(lik, x, z, rho, rdp, beta)
            vals.append(objective(x))
        assert min(np.diff(vals)) > -1e-6 * abs(vals[-1]) and vals[-1] > vals[0]
        g = lik.gradient(x) - rho * (x - z) - beta * rdp.gradient(x)
        inside = lik.fov & (x > 1e-3 * x.max())
        assert float(g[inside].abs().max() / lik.sensitivity[inside].mean()) < 1e-3
        fixed[rho_f] = x
    bsrem = reconstruct(acq, "map-rdp", beta=beta, epochs=200, subsets=1).mean
    assert float((bsrem - fixed[0.0]).norm() / fixed[0.0].norm()) < 0.01
    # the pull toward z moves the optimum toward z
    assert float((fixed[0.5] - z).norm()) < float((fixed[0.0] - z).norm())
    # without the penalty the step is em_prox itself
    torch.testing.assert_close(penalised_em_prox(lik, z, z, 1.0, rdp, 0.0), lik.em_prox(z, z, 1.0))


def test_ddip_rdp_weight_smooths_and_is_validated(small_acq, use_tiny):
    from napari_petdiff.engine.rdp import RDP

    rdp = RDP(small_acq.acquisition.grid.voxel_size, is_2d=True)
    kw = dict(prior=use_tiny, steps=4, samples=1, fit_iterations=1, seed=0)
    plain = reconstruct(small_acq.acquisition, "ddip-hqs", **kw).mean
    smooth = reconstruct(small_acq.acquisition, "ddip-hqs", rdp_weight=1.0, **kw).mean
    assert float(rdp.value(smooth) / smooth.sum()) < 0.8 * float(rdp.value(plain) / plain.sum())
    with pytest.raises(ValueError, match="rdp_weight"):
        make_params(get_method("ddip-hqs").params, {"rdp_weight": -0.1})


def test_ddip_and_scd_run_reproducibly_with_samples_and_progress(small_acq, use_tiny):
    for name, extra in [("ddip-hqs", dict(fit_iterations=2)),
                        ("lisch-scd", dict(fit_iterations=2, adapt_every=2, target_iteration=5.0))]:
        events = []
        kw = dict(prior=use_tiny, steps=4, samples=2, batch=2, eta=0.0, seed=0, **extra)
        a = reconstruct(small_acq.acquisition, name, on_event=events.append, **kw)
        b = reconstruct(small_acq.acquisition, name, **kw)
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        assert a.std is not None and float(a.std.max()) > 0
        assert a.samples.shape[0] == 2 and bool(torch.isfinite(a.mean).all()) and float(a.mean.min()) >= 0
        assert a.metadata["adapted_parameters"] > 0 and len(a.metadata["adaptation_losses"]) > 0
        assert sum(isinstance(e, Progress) and e.stage == name for e in events) == 4
        assert len(a.likelihood) == 4


def test_scd_ends_at_the_lisch_target(small_acq, use_tiny):
    res = reconstruct(small_acq.acquisition, "lisch-scd", prior=use_tiny, steps=6, samples=1, fit_iterations=2,
                      target_iteration=8.0, max_updates=30)
    for v in res.metadata["per_sample_likelihood"]:
        assert v >= res.metadata["final_target"] - 1e-6 * abs(res.metadata["final_target"])


def test_ddip_with_adaptation_window_closed_is_plain_hqs(small_acq, use_tiny):
    """Outside the window nothing is fitted: the method reduces to an HQS sampler without fine-tuning."""
    res = reconstruct(small_acq.acquisition, "ddip-hqs", prior=use_tiny, steps=3, t_min=700, t_max=700,
                      samples=1)
    assert res.metadata["adaptation_losses"] == []


def test_scd_adapts_on_the_scheduled_steps():
    assert [i for i in range(12) if is_adapted_step(i, 12, 5, 2)] == [0, 5, 10, 11]


def test_adaptive_methods_cancel_within_one_step(small_acq, use_tiny):
    for name in ("ddip-hqs", "lisch-scd"):
        token, steps_after = CancelToken(), []

        def on_event(e):
            if isinstance(e, Progress) and e.step >= 1:
                if token.cancelled:
                    steps_after.append(e.step)
                token.cancel()

        with pytest.raises(Cancelled):
            reconstruct(small_acq.acquisition, name, prior=use_tiny, steps=20, fit_iterations=3, cancel=token,
                        on_event=on_event)
        assert steps_after == []


@pytest.mark.parametrize("method", ["lisch", "lisch-scd", "ddip-hqs"])
def test_cli_diffusion_recon_writes_mean_std_samples(tmp_path, small_acq, tiny_prior, method):
    import json

    import nibabel as nib

    from napari_petdiff.cli import main
    from napari_petdiff.engine.diffusion.io import save_prior
    from napari_petdiff.engine.io import save_acquisition

    f = save_acquisition(tmp_path / "scan.petacq", small_acq.acquisition)
    weights = save_prior(tiny_prior, tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["recon", str(f), "--method", method, "--prior", str(weights), "--steps", "3", "--samples", "2",
            "--batch", "2", "--out", str(out)]
    if method != "lisch":
        args += ["--fit-iterations", "1"]
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["method"] == method and run["params"]["samples"] == 2
    assert nib.load(out / "samples.nii.gz").shape == (32, 32, 1, 2)  # (x, y, z, sample)
    std = np.asarray(nib.load(out / "std.nii.gz").dataobj)
    assert std.max() > 0
    assert (out / "mean.nii.gz").exists()


@pytest.fixture
def use_tiny_mr(monkeypatch):
    """An untrained MR-conditioned network with a random output layer: plumbing, not quality."""
    from napari_petdiff.engine.diffusion.prior import ScorePrior
    from napari_petdiff.engine.diffusion.unet import UNet

    torch.manual_seed(0)
    net = UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), cond_channels=1, image_size=32)
    torch.nn.init.normal_(net.out.weight, std=0.01)
    for p in net.parameters():
        p.requires_grad_(False)
    prior = ScorePrior(net.eval(), name="tiny-mr", image_size=32, voxel_size_mm=2.0)
    monkeypatch.setitem(core._PRIOR_CACHE, ("tiny-mr", "cpu"), prior)
    return "tiny-mr"


def test_mr_conditioned_prior_needs_the_mr_and_uses_it(small_acq, use_tiny_mr):
    acq = small_acq.acquisition
    if getattr(acq, "mr", None) is not None:
        acq = acq.with_mr(None)
    kw = dict(prior=use_tiny_mr, steps=3, samples=1, eta=0.0, fit_iterations=1)
    with pytest.raises(ValueError, match="MR-conditioned.*no MR image"):
        reconstruct(acq, "ddip-hqs", **kw)
    mr_a = (small_acq.truth > 0).float() * 0.7
    a = reconstruct(acq.with_mr(mr_a), "ddip-hqs", **kw)
    b = reconstruct(acq.with_mr(torch.zeros_like(mr_a)), "ddip-hqs", **kw)
    assert a.metadata["mr_conditioned"] and not torch.equal(a.mean, b.mean)
    with pytest.raises(ValueError, match="resample the MR"):
        acq.with_mr(mr_a[:, :16])
    g = reconstruct(acq.with_mr(mr_a), "lisch-scd", guidance=2.0, target_iteration=3.0, **kw)
    assert bool(torch.isfinite(g.mean).all())
