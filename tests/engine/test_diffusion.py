"""Diffusion prior building blocks: schedule, UNet, LoRA, ScorePrior volume helpers, prior files."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from napari_petdiff.engine.diffusion.io import list_priors, load_prior, save_prior
from napari_petdiff.engine.diffusion.lora import LoRA
from napari_petdiff.engine.diffusion.prior import ScorePrior
from napari_petdiff.engine.diffusion.schedule import DDPMSchedule
from napari_petdiff.engine.diffusion.unet import UNet
from napari_petdiff.engine.grid import ImageGrid


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny tensors: one thread is faster than two on this shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_unet(**kw):
    torch.manual_seed(0)
    args = dict(base_channels=8, channel_mult=(1, 2), attention_resolutions=(8,), image_size=16)
    args.update(kw)
    net = UNet(**args)
    # zero-initialised output layers would make every comparison trivially 0 == 0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


# --- schedule ---------------------------------------------------------------------------------------
def test_schedule_alpha_bar_and_timesteps():
    s = DDPMSchedule()
    assert s.alpha_bar.dtype == torch.float64 and s.alpha_bar.shape == (1000,)
    assert torch.all(s.alpha_bar[1:] < s.alpha_bar[:-1])
    assert abs(float(s.alpha_bar[0]) - (1 - 1e-4)) < 1e-12
    ts = s.timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert s.timesteps(1) == [999] and s.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="sampling steps"):
        s.timesteps(0)


def test_q_sample_tweedie_inverse_and_batched_t():
    s = DDPMSchedule()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand((3, 1, 8, 8), generator=g, dtype=torch.float64)
    eps = torch.randn((3, 1, 8, 8), generator=g, dtype=torch.float64)
    for t in (0, 500, 999, torch.tensor([3, 400, 999])):
        xt = s.q_sample(x0, t, eps)
        assert torch.allclose(s.tweedie(xt, eps, t), x0, atol=1e-9)
    ab = float(s.alpha_bar[400])
    assert torch.allclose(s.q_sample(x0, torch.tensor([3, 400, 999]), eps)[1],
                          ab ** 0.5 * x0[1] + (1 - ab) ** 0.5 * eps[1])
    with pytest.raises(ValueError, match="timestep out of range"):
        s.q_sample(x0, 1000, eps)


def test_ddim_eta0_deterministic_and_inverse_consistent():
    s = DDPMSchedule()
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand((2, 1, 8, 8), generator=g, dtype=torch.float64)
    eps = torch.randn((2, 1, 8, 8), generator=g, dtype=torch.float64)
    t, tn = 700, 680
    a = s.ddim_step(x0, eps, t, tn, eta=0.0, noise=torch.randn_like(x0))
    b = s.ddim_step(x0, eps, t, tn, eta=0.0, noise=torch.randn_like(x0))
    assert torch.equal(a, b)  # eta = 0 ignores the noise
    assert torch.allclose(a, s.q_sample(x0, tn, eps), atol=1e-12)
    # going back up with the same (x0, eps) returns x_t: DDIM with eta=0 is invertible
    xt = s.q_sample(x0, t, eps)
    assert torch.allclose(s.ddim_step(s.tweedie(a, eps, tn), eps, tn, t, eta=0.0), xt, atol=1e-9)
    # t_next = -1 is the clean image
    assert torch.allclose(s.ddim_step(x0, eps, 10, -1, eta=0.0), x0, atol=1e-12)
    assert torch.allclose(s.ddim_step(x0, eps, 10, -1, eta=1.0), x0, atol=1e-12)


def test_ddim_eta1_is_the_ddpm_posterior_std():
    s = DDPMSchedule()
    x = torch.zeros((1, 1, 2, 2), dtype=torch.float64)
    for t in (1, 300, 999):
        sig = float(s.sigma_ddim(t, t - 1, 1.0, x))
        ab, abp, beta = float(s.alpha_bar[t]), float(s.alpha_bar[t - 1]), float(s.betas[t])
        assert abs(sig ** 2 - (1 - abp) / (1 - ab) * beta) < 1e-12
    noise = torch.ones_like(x)
    out = s.ddim_step(x, x, 500, 480, eta=0.5, noise=noise)
    assert torch.allclose(out, s.sigma_ddim(500, 480, 0.5, x) * noise)
    with pytest.raises(ValueError, match="eta"):
        s.ddim_step(x, x, 500, 480, eta=1.5)


# --- UNet -------------------------------------------------------------------------------------------
def test_unet_shapes_square_nonsquare_and_bad_size():
    net = tiny_unet(channel_mult=(1, 2, 2))
    for shape in [(2, 1, 16, 16), (3, 1, 8, 16), (1, 1, 32, 12)]:
        out = net(torch.randn(shape), torch.tensor([5] * shape[0]))
        assert out.shape == shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 10, 16), 3)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        net(torch.randn(1, 2, 16, 16), 3)
    # the timestep matters
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(net(x, 0), net(x, 900))


def test_unet_conditioning_channels():
    net = tiny_unet(cond_channels=1)
    x, c = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    assert net(x, 3, c).shape == (2, 1, 16, 16)
    assert torch.equal(net(x, 3), net(x, 3, torch.zeros_like(c)))
    with pytest.raises(ValueError, match="cond"):
        tiny_unet()(x, 3, c)


def test_default_architecture_size():
    net = UNet()
    n = sum(p.numel() for p in net.parameters())
    assert 1.5e6 < n < 2.1e6  # fp32 weights file <= ~8 MB
    assert net.attn_levels == [3]  # attention at 16x16 for 128x128 slices


# --- LoRA -------------------------------------------------------------------------------------------
def test_lora_identity_at_init_reset_exact_and_count():
    net = tiny_unet()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 600])
    ref = net(x, t)
    lora = LoRA(net, rank=2, alpha=4.0)
    assert torch.equal(net(x, t), ref)
    expected = 0
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            expected += 2 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * 2
        elif isinstance(m, nn.Linear):
            expected += 2 * m.in_features + m.out_features * 2
    assert lora.num_trainable() == expected
    assert all(not p.requires_grad for p in net.parameters())
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.1)
    changed = net(x, t)
    assert not torch.allclose(changed, ref)
    lora.zero_()
    assert torch.equal(net(x, t), ref)
    with torch.no_grad():
        for p in lora.parameters():
            p.add_(0.1)
    lora.reset()
    assert torch.equal(net(x, t), ref)
    assert all(p.requires_grad for p in net.parameters())


def test_lora_trains_only_adapters_through_prior_context():
    prior = ScorePrior(tiny_unet(), image_size=16)
    base = {k: v.clone() for k, v in prior.net.state_dict().items()}
    x = torch.randn(2, 1, 16, 16)
    with prior.lora(rank=2, targets=["mid"]) as ad:
        opt = torch.optim.SGD(ad.parameters(), lr=0.1)
        for _ in range(2):
            loss = prior.eps(x, 300, grad=True).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert ad.num_trainable() > 0
        assert not torch.equal(prior.eps(x, 300), ScorePrior(tiny_unet(), image_size=16).eps(x, 300))
    assert all(torch.equal(v, base[k]) for k, v in prior.net.state_dict().items())
    assert torch.equal(prior.eps(x, 300), ScorePrior(tiny_unet(), image_size=16).eps(x, 300))
    with pytest.raises(ValueError, match="matched"):
        LoRA(prior.net, 2, targets=["no-such-layer"])


# --- ScorePrior -------------------------------------------------------------------------------------
class PixelStub(nn.Module):
    """Per-pixel 'network' (eps = x * (1 + t/1000)): any slicing error shows up as a mismatch."""

    def __init__(self, multiple=4):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.multiple, self.cond_channels, self.seen = multiple, 0, []

    def forward(self, x, t, cond=None):
        self.seen.append(x.shape)
        return self.w * x * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000)


def _slice(v, orientation, s, k):
    return {"xy": v[s, k], "xz": v[s, :, k], "yz": v[s, :, :, k]}[orientation]


@pytest.mark.parametrize("orientation", ["xy", "xz", "yz"])
def test_eps_volume_equals_per_slice_application(orientation):
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([100, 700])
    # a real network on slices of the training size: chunked volume call == one slice at a time
    prior = ScorePrior(tiny_unet(), image_size=16)
    vol = torch.randn((2, 16, 16, 16), generator=g)
    out = prior.eps_volume(vol, t, orientation, chunk=5)
    assert out.shape == vol.shape
    for s, k in [(0, 0), (1, 3), (1, 15)]:
        ref = prior.eps(_slice(vol, orientation, s, k)[None, None], t[s:s + 1])[0, 0]
        assert torch.allclose(_slice(out, orientation, s, k), ref, atol=1e-5)
    # smaller, non-square slices are noise-padded to 16x16: a per-pixel stub shows the crop is exact
    stub = ScorePrior(PixelStub(), image_size=16)
    vol = torch.randn((2, 8, 12, 16), generator=g)
    out_s = stub.eps_volume(vol, t, orientation, chunk=7)
    assert torch.allclose(out_s, vol * (1 + t.view(-1, 1, 1, 1) / 1000), atol=1e-6)
    assert stub.net.seen and all(shape[-2:] == (16, 16) for shape in stub.net.seen)
    # a single volume (nz, ny, nx) with a scalar t gives the first entry of the batched call
    assert torch.allclose(stub.eps_volume(vol[0], 100, orientation), out_s[0], atol=1e-6)


def test_eps_padding_is_schedule_consistent_noise_and_cropped():
    stub = PixelStub()
    prior = ScorePrior(stub, image_size=32)
    x = torch.full((2, 1, 6, 10), 0.5)
    captured = {}

    def grab(module, inp, out):
        captured["x"] = inp[0]

    h = stub.register_forward_hook(grab)
    out = prior.eps(x, 600)
    h.remove()
    assert out.shape == x.shape and torch.allclose(out, x * 1.6)
    big = captured["x"]
    assert big.shape == (2, 1, 32, 32)
    assert torch.equal(big[:, :, 13:19, 11:21], x)  # centred
    mask = torch.ones_like(big, dtype=torch.bool)
    mask[:, :, 13:19, 11:21] = False
    std = float(big[mask].std())
    expected = float((1 - prior.schedule.alpha_bar[600]) ** 0.5)
    assert abs(std - expected) < 0.05 * expected


def test_eps_runs_without_grad_by_default_and_checks_input():
    prior = ScorePrior(tiny_unet(), image_size=16)
    x = torch.randn(1, 1, 16, 16, requires_grad=True)
    assert not prior.eps(x, 5).requires_grad
    assert prior.eps(x, 5, grad=True).requires_grad
    with pytest.raises(ValueError, match="eps_volume"):
        prior.eps(torch.randn(4, 16, 16), 5)
    with pytest.raises(ValueError, match="orientation"):
        prior.eps_volume(torch.randn(4, 16, 16), 5, "zz")
    bf = ScorePrior(tiny_unet(), image_size=16, bf16=True)
    assert torch.allclose(bf.eps(x, 5), prior.eps(x, 5), atol=0.05)
    assert bf.eps(x, 5).dtype == torch.float32


def test_check_grid_messages():
    prior = ScorePrior(tiny_unet(), image_size=16, voxel_size_mm=2.0, name="p16")
    prior.check_grid(ImageGrid((1, 16, 16), (2.0, 2.0, 2.0)))
    prior.check_grid(ImageGrid((8, 12, 16), (2.0, 2.0, 2.0)), orientations=("xy", "xz", "yz"))
    with pytest.raises(ValueError, match=r"voxel size is 4 x 4 mm.*resample"):
        prior.check_grid(ImageGrid((1, 16, 16), (2.0, 4.0, 4.0)))
    with pytest.raises(ValueError, match=r"larger than the prior's 16x16.*train"):
        prior.check_grid(ImageGrid((1, 32, 32), (2.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match="xz voxel size"):
        prior.check_grid(ImageGrid((8, 16, 16), (3.0, 2.0, 2.0)), orientations=("xy", "xz"))


# --- prior files ------------------------------------------------------------------------------------
def test_save_load_round_trip_bit_exact(tmp_path):
    prior = ScorePrior(tiny_unet(), image_size=16, voxel_size_mm=2.0, name="rt")
    w = save_prior(prior, tmp_path / "rt", extra={"steps": 7, "wall_time_s": 1.5})
    card = json.loads((tmp_path / "rt.json").read_text())
    assert w.name == "rt.safetensors" and card["steps"] == 7 and len(card["weights_sha256"]) == 64
    assert card["architecture"]["base_channels"] == 8 and card["schedule"]["T"] == 1000
    loaded = load_prior(tmp_path / "rt.safetensors")
    a, b = prior.net.state_dict(), loaded.net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(prior.eps(x, 9), loaded.eps(x, 9))
    assert loaded.image_size == 16 and loaded.name == "rt"
    assert [c["name"] for c in list_priors(tmp_path)] == ["rt"]
    assert load_prior("rt", models_dir=tmp_path).name == "rt"


def test_corrupt_truncated_and_mismatched_files(tmp_path):
    prior = ScorePrior(tiny_unet(), image_size=16, name="bad")
    w = save_prior(prior, tmp_path / "bad")
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its card"):
        load_prior(w)
    w.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated"):
        load_prior(w)
    # correct sha but weights from another architecture
    save_prior(prior, tmp_path / "arch")
    card_p = tmp_path / "arch.json"
    card = json.loads(card_p.read_text())
    card["architecture"]["base_channels"] = 16
    card_p.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="wrong shape|do not fit"):
        load_prior(tmp_path / "arch")
    card["architecture"]["base_channels"] = 8
    card["architecture"]["channel_mult"] = [1, 2, 2]
    card_p.write_text(json.dumps(card))
    with pytest.raises(ValueError, match="missing keys"):
        load_prior(tmp_path / "arch")


def test_unknown_prior_lists_known_names(tmp_path):
    save_prior(ScorePrior(tiny_unet(), image_size=16, name="known-one"), tmp_path / "known-one")
    with pytest.raises(ValueError, match=r"unknown prior 'nope'.*known-one"):
        load_prior("nope", models_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_prior(tmp_path / "missing.safetensors")


def test_tiny_prior_for_sampler_tests_denoises():
    from tests.engine._tiny_prior import blob_images, make_tiny_prior

    prior = make_tiny_prior()
    assert make_tiny_prior() is prior  # cached per session
    x0 = torch.from_numpy(blob_images(np.random.default_rng(99), 8))
    t = 200
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    xt = prior.schedule.q_sample(x0, t, eps)
    naive = xt / float(prior.schedule.alpha_bar[t]) ** 0.5
    mse_naive = float(((naive - x0) ** 2).mean())
    mse_tweedie = float(((prior.tweedie(xt, t) - x0) ** 2).mean())
    assert mse_tweedie < 0.5 * mse_naive


class CondStub(PixelStub):
    """eps = the conditioning image: shows that the MR is sliced, padded and cropped like x."""

    def __init__(self):
        super().__init__()
        self.cond_channels = 1

    def forward(self, x, t, cond=None):
        return self.w * cond


@pytest.mark.parametrize("orientation", ["xy", "xz", "yz"])
def test_eps_volume_slices_the_mr_like_the_image(orientation):
    g = torch.Generator().manual_seed(5)
    vol, mr = torch.randn((2, 8, 12, 16), generator=g), torch.rand((2, 8, 12, 16), generator=g)
    stub = ScorePrior(CondStub(), image_size=16)
    torch.testing.assert_close(stub.eps_volume(vol, 300, orientation, chunk=5, cond=mr), mr)
    with pytest.raises(ValueError, match="cond volume"):
        stub.eps_volume(vol, 300, orientation, cond=mr[:, :4])
