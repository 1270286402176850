"""PET-DEFT: the h-network, its training task and the sampler (tiny prior trained in the session)."""
import json

import pytest
import torch

from napari_petdiff import cli
from napari_petdiff.engine.diffusion.data import DataConfig
from napari_petdiff.engine.diffusion.deft import DeftConfig, DeftTask, guidance_image, load_deft
from napari_petdiff.engine.diffusion.io import load_prior, save_prior
from napari_petdiff.engine.likelihood import PoissonLikelihood
from napari_petdiff.engine.params import make_params
from napari_petdiff.engine.run import CancelToken, drive
from napari_petdiff.engine.samplers import core
from napari_petdiff.engine.samplers.core import SamplingParams, run_sampler
from napari_petdiff.engine.samplers.deft import DEFTParams, run_deft
from tests.engine._tiny_prior import blob_images

TINY = dict(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), threads=1, counts_range=(1e4, 1e5),
            batch_size=4, warmup_steps=1)


def tiny_data():
    return DataConfig(source="synthetic", image_size=32, volume_shape=(8, 32, 32), orientation_probs=(1, 0, 0),
                      min_support=10, slices_per_volume=4, volumes_per_group=2, workers=0)


@pytest.fixture(scope="module")
def prior_file(tmp_path_factory, tiny_prior):
    """The tiny prior as a file (DEFT records and checks the sha256 of its prior)."""
    path = tmp_path_factory.mktemp("deft") / "tiny"
    save_prior(tiny_prior, path)
    return str(path) + ".safetensors"


@pytest.fixture
def deft_cfg(tmp_path, prior_file):
    return DeftConfig(out=str(tmp_path / "run"), name="tdeft", prior=prior_file, steps=2, data=tiny_data(), **TINY)


@pytest.fixture
def use_file_prior(prior_file, monkeypatch):
    monkeypatch.setitem(core._PRIOR_CACHE, ("tinyf", "cpu"), load_prior(prior_file))
    return "tinyf"


def test_untrained_h_leaves_the_sampler_unconditional(small_acq, deft_cfg, use_file_prior):
    task = DeftTask(deft_cfg, torch.device("cpu"))
    from napari_petdiff.engine.diffusion.unet import UNet

    net = UNet(**deft_cfg.arch())
    h_path = task.export(dict(net.state_dict()), 0, 0.0, float("nan"), 1)
    kw = dict(prior=use_file_prior, steps=6, eta=0.4, samples=2, batch=2, seed=3)
    res = drive(run_deft(small_acq.acquisition, make_params(DEFTParams, dict(kw, network=str(h_path))),
                         CancelToken()))
    # the unconditional sampler: the prior's epsilon, no data consistency
    plain = drive(run_sampler(small_acq.acquisition, SamplingParams(**kw), CancelToken(), None, "plain",
                              lambda lik, c, tok: (lambda z, x_t, state: z)))
    assert torch.equal(res.samples, plain.samples)
    assert res.metadata["method"] == "deft" and res.std is not None and float(res.std.max()) > 0


def test_one_training_step_lowers_the_loss_on_a_fixed_batch(deft_cfg):
    import numpy as np
    from napari_petdiff.engine.diffusion.unet import UNet

    task = DeftTask(deft_cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    batch = torch.from_numpy(blob_images(np.random.default_rng(1), 4, 32))
    x0, ctx = task.targets(batch, task.draws(4, gen))
    t = torch.tensor([100, 300, 500, 800])
    eps = torch.randn(x0.shape, generator=gen)
    a = task.prior.schedule.alpha_bar[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.manual_seed(0)
    net = UNet(**deft_cfg.arch())
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)  # a warm-up-sized first step

    def loss():
        return (task.predict(net, x_t, t, ctx) - eps).square().mean()

    before = loss()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss()
    assert float(after) < float(before.detach())


def test_training_pairs_are_in_the_samplers_units(deft_cfg):
    """x0 = truth / c with c the sampler's OSEM scale: the support mean of x0 is about 1."""
    import numpy as np

    task = DeftTask(deft_cfg, torch.device("cpu"))
    batch = torch.from_numpy(blob_images(np.random.default_rng(2), 3, 32))
    draws = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 2.0], [0.5, 0.5, 3.0]], dtype=torch.float64)
    x0, ctx = task.targets(batch, draws)
    assert x0.shape == (3, 1, 32, 32) and len(ctx) == 3
    for i in range(3):
        supp = batch[i, 0] > 0
        assert 0.7 < float(x0[i, 0][supp].mean()) < 1.4
    # the count level follows the draws: 1e4 trues at u = 0, 1e5 at u = 1
    nets = [float(lik.acq.prompts.sum()) for lik, _ in ctx]
    assert nets[1] > 5 * nets[0]


def test_guidance_points_toward_the_data(small_acq):
    lik = PoissonLikelihood(small_acq.acquisition, 1)
    truth = small_acq.truth[None]
    c = torch.ones(1, 1, 1, 1) * float(truth[truth > 0].mean())
    x_true = truth / c
    inside = (lik.fov & (truth > 0)).expand_as(x_true)
    g_low = guidance_image(lik, c, 0.5 * x_true, 0.0, 10.0)
    g_high = guidance_image(lik, c, 2.0 * x_true, 0.0, 10.0)
    assert float(g_low[inside].mean()) > 0 > float(g_high[inside].mean())
    # the definition: (EM(u) - u) / c at u = c (x0 + delta), clipped
    u = lik.mask(c * (x_true + 0.01))
    ref = ((lik.em_step(u) - u) / c).clamp(-10, 10)
    assert torch.allclose(guidance_image(lik, c, x_true, 0.01, 10.0), ref, atol=1e-6)
    assert float(guidance_image(lik, c, 1e-3 * x_true, 0.0, 0.5).abs().max()) <= 0.5


def test_train_deft_cli_resume_equals_uninterrupted(tmp_path, prior_file, capsys):
    base = ["--threads", "1", "train-deft", "--prior", prior_file, "--source", "synthetic", "--image-size", "32",
            "--batch-size", "2", "--base-channels", "8", "--channel-mult", "1,2", "--attention", "",
            "--workers", "0", "--slices-per-volume", "4", "--volumes-per-group", "2", "--counts-min", "1e4",
            "--counts-max", "1e5", "--warmup", "1", "--quiet"]
    assert cli.main([*base, "--steps", "4", "--out", str(tmp_path / "full")]) == 0
    assert cli.main([*base, "--steps", "2", "--out", str(tmp_path / "part")]) == 0
    assert cli.main(["--threads", "1", "train-deft", "--resume", str(tmp_path / "part"), "--steps", "4",
                     "--quiet"]) == 0
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "full" / "deft.json").read_text())
    assert card["kind"] == "deft-h-unet-2d" and card["base_prior"]["weights_sha256"]
    assert card["deft"]["counts_range"] == [1e4, 1e5] and card["architecture"]["cond_channels"] == 2


def test_bad_deft_requests_get_clear_errors(deft_cfg, small_acq, use_file_prior):
    from napari_petdiff.engine.diffusion.unet import UNet

    task = DeftTask(deft_cfg, torch.device("cpu"))
    h_path = task.export(dict(UNet(**deft_cfg.arch()).state_dict()), 0, 0.0, float("nan"), 1)
    prior = load_prior(deft_cfg.prior)
    with pytest.raises(ValueError, match="unknown DEFT network 'nope'"):
        load_deft("nope", prior)
    # trained for another prior
    other = load_prior(deft_cfg.prior)
    other.card = dict(other.card, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="was trained on the prior"):
        load_deft(str(h_path), other)
    # a plain prior is not an h-network
    with pytest.raises(ValueError, match="not a DEFT h-network"):
        load_deft(deft_cfg.prior, prior)
    # corrupt weights
    data = bytearray(h_path.read_bytes())
    data[-3] ^= 0xFF
    h_path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated, corrupt"):
        drive(run_deft(small_acq.acquisition, make_params(DEFTParams, {"prior": use_file_prior, "steps": 2,
                                                                        "network": str(h_path)}), CancelToken()))
    with pytest.raises(ValueError, match="counts_range"):
        DeftConfig(counts_range=(0, 10)).validate()
    with pytest.raises(ValueError, match="cond_channels does not apply"):
        DeftConfig(cond_channels=1).validate()
    with pytest.raises(ValueError, match="MR-conditioned"):
        DeftTask(DeftConfig(prior="brain-fdg-mr-2d"), torch.device("cpu"))
    with pytest.raises(ValueError, match="DEFT data are 32x32"):
        DeftTask(DeftConfig(prior="brain-fdg-2d", data=tiny_data()), torch.device("cpu"))


def test_shipped_deft_network_fits_the_shipped_prior(capsys):
    from napari_petdiff.engine.diffusion import get_prior
    from napari_petdiff.engine.diffusion.deft import DEFAULT_DEFT

    h = load_deft(DEFAULT_DEFT, get_prior("brain-fdg-2d"))  # the sha256 of its prior must match
    assert h.card["steps"] > 0 and h.card["base_prior"]["name"] == "brain-fdg-2d"
    assert h.image_size == 128 and h.net.cond_channels == 2
    assert cli.main(["priors"]) == 0
    assert f"{DEFAULT_DEFT} (DEFT h-network for brain-fdg-2d" in capsys.readouterr().out


def test_deft_on_a_volume_runs_axially_with_the_3d_likelihood(tmp_path, deft_cfg, use_file_prior):
    from napari_petdiff.engine.diffusion.unet import UNet
    from napari_petdiff.engine.grid import ImageGrid
    from napari_petdiff.engine.samples import geometry_for
    from napari_petdiff.engine.simulate import simulate
    from tests.conftest import blob_image

    grid = ImageGrid((3, 32, 32), (2.0, 2.0, 2.0))
    img = blob_image(32, nz=3)
    sim = simulate(img, grid, geometry_for(grid), (img > 0) * 0.0096, counts=3e4, seed=2)
    torch.manual_seed(1)
    net = UNet(**deft_cfg.arch())
    torch.nn.init.normal_(net.out.weight, std=1e-3)  # a non-zero h, so the 3-D path is exercised
    h_path = DeftTask(deft_cfg, torch.device("cpu")).export(dict(net.state_dict()), 1, 0.0, 0.0, 1)
    kw = dict(prior=use_file_prior, network=str(h_path), steps=3, samples=2, batch=2)
    res = drive(run_deft(sim.acquisition, make_params(DEFTParams, kw), CancelToken()))
    assert res.mean.shape == (3, 32, 32) and res.samples.shape == (2, 3, 32, 32)
    assert float(res.samples.min()) >= 0 and torch.isfinite(res.samples).all()
    with pytest.raises(ValueError, match="trained with scale_threshold 0.05"):
        drive(run_deft(sim.acquisition, make_params(DEFTParams, dict(kw, scale_threshold=0.2)), CancelToken()))
    with pytest.raises(ValueError, match="trained on axial slices"):
        drive(run_deft(sim.acquisition, make_params(DEFTParams, dict(kw, orientation="all")), CancelToken()))


def test_train_deft_under_torchrun_equals_one_process(tmp_path, prior_file):
    """Two DDP processes splitting one global batch take the step one process takes (the
    per-slice count levels and Poisson seeds are drawn for the whole batch)."""
    from safetensors.torch import load_file

    from tests.engine._ddp import torchrun_cli

    flags = ["train-deft", "--prior", prior_file, "--source", "synthetic", "--image-size", "32", "--batch-size", "4",
             "--steps", "2", "--base-channels", "8", "--channel-mult", "1,2", "--attention", "", "--workers", "0",
             "--slices-per-volume", "4", "--volumes-per-group", "2", "--data-sharding", "global", "--warmup", "1",
             "--counts-min", "1e4", "--counts-max", "1e5", "--quiet"]
    torchrun_cli([*flags, "--out", str(tmp_path / "ddp")])
    assert cli.main(["--threads", "1", *flags, "--out", str(tmp_path / "one")]) == 0
    la = (tmp_path / "ddp" / "loss.csv").read_text().splitlines()[1:]
    lb = (tmp_path / "one" / "loss.csv").read_text().splitlines()[1:]
    # the logged loss is the mean over the global batch: equal only if both saw the same pairs
    assert [float(r.split(",")[1]) for r in la] == pytest.approx([float(r.split(",")[1]) for r in lb], rel=1e-4)
    a = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000002" / "model.safetensors"))
    b = load_file(str(tmp_path / "one" / "checkpoints" / "step-00000002" / "model.safetensors"))
    from napari_petdiff.engine.diffusion.unet import UNet

    torch.manual_seed(0)  # the config's seed: the initial weights of both runs
    w0 = UNet(cond_channels=2, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), image_size=32).state_dict()
    biggest = max(float((b[k] - w0[k]).abs().max()) for k in b)  # the largest update
    assert biggest > 0 and max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05 * biggest
