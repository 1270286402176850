"""Training of the slice prior: data stream, loss decrease, exact resume, stop signals, DDP, CLI."""
import json
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from napari_petdiff import cli
from napari_petdiff.engine.diffusion.data import DataConfig, SliceStream, fit_to_size, slices_from_volume
from napari_petdiff.engine.diffusion.io import list_priors, load_prior
from napari_petdiff.engine.diffusion.train import TrainConfig, train
from napari_petdiff.engine.diffusion.unet import UNet
from napari_petdiff.engine.run import Cancelled, CancelToken
from tests.engine._ddp import torchrun_cli

SMALL = dict(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), warmup_steps=1, bf16=False,
             threads=1, export_minutes=1e9, checkpoint_minutes=1e9)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_cfg(out, **kw) -> TrainConfig:
    data = DataConfig(source="synthetic", image_size=16, volume_shape=(8, 16, 16), min_support=10,
                      slices_per_volume=6, volumes_per_group=2, workers=kw.pop("workers", 0))
    args = dict(SMALL, out=str(out), name="t", data=data)
    args.update(kw)
    return TrainConfig(**args)


def run(cfg, cancel=None):
    gen = train(cfg, cancel)
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return stop.value, events


def ckpt_tensors(out, step):
    d = out / "checkpoints" / f"step-{step:08d}"
    return {f: load_file(str(d / f"{f}.safetensors")) for f in ("model", "ema", "optim")}


# --- data -------------------------------------------------------------------------------------------
def test_slices_normalised_padded_and_stream_resumable():
    cfg = DataConfig(source="synthetic", image_size=16, volume_shape=(8, 16, 12), min_support=5,
                     slices_per_volume=5, volumes_per_group=2, workers=0, scale_range=(1.0, 1.0))
    rng = np.random.default_rng(0)
    vol = np.zeros((8, 16, 12), np.float32)
    vol[2:6, 4:12, 3:9] = 3.0
    sl = slices_from_volume(vol, cfg, rng, 20)
    assert sl.shape == (20, 1, 16, 16)
    for im in sl[:, 0]:
        assert abs(im[im > 0].mean() - 1.0) < 1e-6  # support mean 1 (scale range fixed to 1 here)
    assert fit_to_size(np.ones((8, 12), np.float32), 16)[4:12, 2:14].all()
    assert fit_to_size(np.ones((8, 12), np.float32), 16).sum() == 96
    full = SliceStream(cfg, 3, seed=5)
    batches = [b for _, b in zip(range(6), full)]
    assert full.position == 18
    later = SliceStream(cfg, 3, seed=5, start=9)  # mid-group: the group holds 10 slices
    again = [b for _, b in zip(range(3), later)]
    assert all(torch.equal(a, b) for a, b in zip(batches[3:], again))
    other = SliceStream(cfg, 3, seed=5, rank=1)
    assert not torch.equal(next(iter(other)), batches[0])


def test_nifti_folder_source_is_resampled_to_the_training_voxel_size(tmp_path):
    nib = pytest.importorskip("nibabel")
    vol = np.zeros((20, 24, 10), np.float32)  # NIfTI order (x, y, z), 4 mm voxels
    vol[5:15, 6:18, 2:8] = 2.0
    nib.save(nib.Nifti1Image(vol, np.diag([4.0, 4.0, 4.0, 1.0])), str(tmp_path / "a.nii.gz"))
    cfg = DataConfig(source=f"nifti:{tmp_path}", image_size=64, voxel_size_mm=2.0, min_support=10,
                     slices_per_volume=4, volumes_per_group=1, workers=0, orientation_probs=(1, 0, 0),
                     scale_range=(1.0, 1.0))
    batch = next(iter(SliceStream(cfg, 4)))
    assert batch.shape == (4, 1, 64, 64)
    for im in batch[:, 0]:
        sup = im > 0
        ys, xs = np.nonzero(sup.numpy())
        # the 10 x 12 voxel block at 4 mm is about 20 (x) by 24 (y) pixels at 2 mm
        assert 18 <= xs.max() - xs.min() + 1 <= 22 and 22 <= ys.max() - ys.min() + 1 <= 26
        assert abs(float(im[sup].mean()) - 1.0) < 1e-5


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown training source"):
        SliceStream(DataConfig(source="foo"), 2)
    with pytest.raises(ValueError, match="no .nii"):
        SliceStream(DataConfig(source="nifti:/nonexistent-folder"), 2)


# --- training ---------------------------------------------------------------------------------------
def test_training_lowers_the_loss_on_a_fixed_batch(tmp_path):
    cfg = small_cfg(tmp_path, steps=40, batch_size=8, lr=3e-3)
    summary, events = run(cfg)
    assert summary["steps"] == 40 and len(events) == 40 and "loss" in events[-1].message
    torch.manual_seed(0)
    init = UNet(**cfg.arch())
    trained = load_prior(summary["export"]).net  # EMA starts at step 50: raw weights at step 40
    batch = next(iter(SliceStream(cfg.data, 16, seed=123)))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (16,), generator=g)
    eps = torch.randn(batch.shape, generator=g)
    ab = torch.as_tensor(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()], dtype=torch.float32)
    xt = ab.sqrt().view(-1, 1, 1, 1) * batch + (1 - ab).sqrt().view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        before = F.mse_loss(init(xt, t), eps).item()
        after = F.mse_loss(trained(xt, t), eps).item()
    assert after < 0.8 * before
    card = json.loads((tmp_path / "t.json").read_text())
    assert card["steps"] == 40 and card["wall_time_s"] > 0 and card["training"]["batch_size"] == 8
    rows = (tmp_path / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,wall_s" and len(rows) == 41


def test_resume_is_exact_and_checkpoints_rotate(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    w = dict(loss_weighting="trunc-snr", max_loss_weight=10.0)
    run(small_cfg(a, steps=6, batch_size=4, workers=1, checkpoint_every=2, **w))
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    run(small_cfg(b, steps=3, batch_size=4, **w))
    run(small_cfg(b, steps=6, batch_size=4, resume=str(b), **w))
    ta, tb = ckpt_tensors(a, 6), ckpt_tensors(b, 6)
    for f in ta:
        assert ta[f].keys() == tb[f].keys()
        assert all(torch.equal(ta[f][k], tb[f][k]) for k in ta[f]), f
    la = (a / "loss.csv").read_text().splitlines()
    lb = (b / "loss.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in la] == [r.split(",")[1] for r in lb]
    with pytest.raises(ValueError, match="cannot resume"):
        run(small_cfg(b, steps=8, batch_size=4, base_channels=16, resume=str(b)))


def test_cancel_and_sigterm_checkpoint_and_stop(tmp_path):
    cancel = CancelToken()
    gen = train(small_cfg(tmp_path / "c", steps=100, batch_size=2), cancel)
    next(gen)
    next(gen)
    cancel.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(gen)
    assert (tmp_path / "c" / "checkpoints" / "step-00000003").is_dir()

    gen = train(small_cfg(tmp_path / "s", steps=100, batch_size=2))
    next(gen)
    os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler turns it into a clean stop
    summary = None
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        summary = stop.value
    assert summary["stopped"] and summary["steps"] == 2
    assert (tmp_path / "s" / "checkpoints" / "step-00000002").is_dir()
    assert signal.getsignal(signal.SIGTERM) is not None


def test_ddp_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    flags = ["train", "--source", "synthetic", "--image-size", "16", "--batch-size", "4", "--steps", "2",
             "--base-channels", "8", "--channel-mult", "1,2", "--attention", "", "--no-bf16", "--warmup", "1",
             "--slices-per-volume", "4", "--volumes-per-group", "2", "--workers", "0",
             "--data-sharding", "global", "--quiet", "--lr", "1e-3"]
    torchrun_cli([*flags, "--out", str(tmp_path / "ddp")])
    assert cli.main(["--threads", "1", *flags, "--out", str(tmp_path / "one")]) == 0
    torch.manual_seed(0)
    w0 = UNet(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), image_size=16).state_dict()
    a, b = ckpt_tensors(tmp_path / "ddp", 2)["model"], ckpt_tensors(tmp_path / "one", 2)["model"]
    num = sum(float((a[k] - b[k]).square().sum()) for k in a)
    den = sum(float((b[k] - w0[k]).square().sum()) for k in a)
    # Same update up to float rounding: the gradient all-reduce sums in another order, and Adam's
    # m / sqrt(v) magnifies that for near-zero gradients (measured 1e-4 to 1.5e-3 between runs); a
    # wrong reduction (sum instead of mean, a rank's data missing) gives O(1).
    assert den > 0 and (num / den) ** 0.5 < 1e-2
    # Adam turns rounding-level gradient differences of near-zero entries into lr-sized steps, so the
    # per-entry check is relative to the largest update
    biggest = max(float((b[k] - w0[k]).abs().max()) for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 0.05 * biggest
    la = (tmp_path / "ddp" / "loss.csv").read_text().splitlines()[1:]
    lb = (tmp_path / "one" / "loss.csv").read_text().splitlines()[1:]
    assert [float(r.split(",")[1]) for r in la] == pytest.approx([float(r.split(",")[1]) for r in lb], abs=1e-5)


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_train_resume_uses_checkpoint_config(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["--threads", "1", "train", "--source", "synthetic", "--image-size", "16", "--steps", "2",
            "--batch-size", "2", "--base-channels", "8", "--channel-mult", "1,2", "--attention", "",
            "--no-bf16", "--workers", "0", "--slices-per-volume", "4", "--out", str(out), "--name", "cli"]
    assert cli.main(args) == 0
    assert cli.main(["--threads", "1", "train", "--resume", str(out), "--steps", "3"]) == 0
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["config"]["base_channels"] == 8 and state["config"]["steps"] == 3
    assert cli.main(["train", "--source", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown training source" in capsys.readouterr().err


def test_petdiff_priors_lists_the_shipped_prior(capsys):
    assert cli.main(["priors"]) == 0
    out = capsys.readouterr().out
    assert "brain-fdg-2d: 128x128 slices at 2 mm" in out and "training steps" in out
    # both shipped priors, and the MR-conditioned one says what it needs
    assert "brain-fdg-mr-2d: 128x128 slices at 2 mm" in out and "MR-conditioned: needs an MR image" in out
    cards = {c["name"]: c for c in list_priors()}
    assert cards["brain-fdg-mr-2d"]["architecture"]["cond_channels"] == 1
    assert cards["brain-fdg-2d"]["architecture"]["cond_channels"] == 0
    prior = load_prior("brain-fdg-2d")
    assert prior.image_size == 128 and prior.card["steps"] > 0 and prior.card["wall_time_s"] > 0


def test_registry_caches_shipped_prior_and_rejects_unknown_names():
    from napari_petdiff.engine.diffusion import get_prior, shipped_prior_names

    assert "brain-fdg-2d" in shipped_prior_names()
    assert get_prior("brain-fdg-2d") is get_prior("brain-fdg-2d")
    with pytest.raises(ValueError, match="Shipped priors: .*brain-fdg-2d"):
        get_prior("no-such-prior")


def test_config_file_and_flags(tmp_path):
    from napari_petdiff.engine.diffusion.train_cli import build_config

    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"steps": 50, "base_channels": 16, "data": {"image_size": 64, "source": "synthetic"}}))
    args = cli.build_parser().parse_args(["train", "--config", str(cfg_file), "--steps", "7", "--attention", "8,4"])
    cfg = build_config(args)
    assert cfg.steps == 7 and cfg.base_channels == 16 and cfg.data.image_size == 64
    assert cfg.attention_resolutions == (8, 4) and cfg.lr == 2e-4
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg_file.write_text(json.dumps({"stepz": 5}))
    with pytest.raises(ValueError, match="unknown training config keys"):
        build_config(cli.build_parser().parse_args(["train", "--config", str(cfg_file)]))


# --- MR-conditioned training ------------------------------------------------------------------------
def test_paired_slices_share_geometry_and_keep_the_mr_range():
    cfg = DataConfig(source="synthetic", image_size=16, volume_shape=(8, 16, 16), min_support=10, with_mr=True)
    vol = np.stack([np.ones((8, 16, 16), np.float32), np.full((8, 16, 16), 0.5, np.float32)])
    vol[:, :, :, :3] = 0  # an asymmetric support: a left-right flip moves it
    s = slices_from_volume(vol, cfg, np.random.default_rng(0), 12)
    assert s.shape == (12, 2, 16, 16)
    assert np.array_equal(s[:, 0] > 0, s[:, 1] > 0)  # PET and MR flipped/padded alike
    assert np.allclose(s[:, 1][s[:, 1] > 0], 0.5)  # MR not normalised
    stream = next(iter(SliceStream(cfg, 4, seed=1)))
    assert stream.shape == (4, 2, 16, 16)


def test_phantom_training_volume_with_mr_is_the_same_draw_plus_its_mr():
    from napari_petdiff.engine.phantoms import random_training_volume

    a = random_training_volume(np.random.default_rng(5), shape=(1, 64, 64), voxel_size_mm=4.0)
    b = random_training_volume(np.random.default_rng(5), shape=(1, 64, 64), voxel_size_mm=4.0, with_mr=True)
    assert b.shape == (2, 1, 64, 64)
    np.testing.assert_allclose(b[0], a, atol=1e-6)
    assert 0.0 <= b[1].min() and b[1].max() <= 1.0 and b[1].std() > 0.05


def test_conditional_fine_tuning_starts_from_the_unconditional_prior(tmp_path):
    base, _ = run(small_cfg(tmp_path / "u", steps=3, batch_size=4))
    cfg = small_cfg(tmp_path / "c", steps=6, batch_size=4, lr=3e-3, cond_channels=1, init_from=base["export"])
    net = UNet(**cfg.arch())
    from napari_petdiff.engine.diffusion.train import init_weights_from

    init_weights_from(net, base["export"])
    uncond = load_prior(base["export"]).net
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():  # zero MR weights: the same function whatever the MR
        torch.testing.assert_close(net(x, t, torch.rand(2, 1, 16, 16)), uncond(x, t), rtol=0, atol=1e-6)
    summary, _ = run(cfg)
    prior = load_prior(summary["export"])
    assert prior.cond_channels == 1
    card = json.loads((tmp_path / "c" / "t.json").read_text())
    assert card["training"]["conditioning"]["dropout"] == 0.1
    with torch.no_grad():  # after training the MR matters
        e1 = prior.eps(x, 500, cond=torch.zeros(2, 1, 16, 16))
        e2 = prior.eps(x, 500, cond=torch.ones(2, 1, 16, 16))
    assert (e1 - e2).abs().max() > 1e-5
    with pytest.raises(ValueError, match="paired MR"):
        small_cfg(tmp_path / "n", cond_channels=1, data=DataConfig(source="nifti:/nowhere")).validate()
    with pytest.raises(ValueError, match="different layers|needs"):
        init_weights_from(UNet(base_channels=8, channel_mult=(1, 2, 2), attention_resolutions=()), base["export"])
