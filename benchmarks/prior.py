"""Benchmark and figures of a slice prior (default: the shipped brain-fdg-2d).

    python benchmarks/prior.py bench   [--prior NAME|PATH] [--quick]  -> table in docs/benchmarks.md
    python benchmarks/prior.py samples [--n 16] [--steps 50]           -> docs/figures/prior_samples.png (eta 0 and 1)
    python benchmarks/prior.py loss    [--csv training/brain-fdg-2d/loss.csv] -> docs/figures/prior_loss.png

bench measures (i) Tweedie denoising of held-out phantom slices (deformation seeds never used in
training) against the best Gaussian filter per noise level, (ii) intensity statistics of 50-step
DDIM samples (eta 0 and eta 1) against training slices, (iii) sampling time per image.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_petdiff.engine.diffusion.data import DataConfig, slices_from_volume  # noqa: E402
from napari_petdiff.engine.diffusion.io import load_prior  # noqa: E402

FIG = ROOT / "docs" / "figures"
BENCH_MD = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- prior:start -->", "<!-- prior:end -->"
HELD_OUT_SEED = 10_000  # training uses SeedSequence([seed, rank, group]); these plain seeds are disjoint


def held_out_slices(n: int, prior, seed: int = HELD_OUT_SEED, with_mr: bool = False) -> torch.Tensor:
    """Axial phantom slices from held-out deformation seeds, normalised like training (no scaling/flip);
    (n, 1, S, S), or (n, 2, S, S) PET and MR pairs with ``with_mr``."""
    from napari_petdiff.engine.phantoms.training import random_training_volume

    s = prior.image_size
    cfg = DataConfig(image_size=s, volume_shape=(s // 2, s, s), voxel_size_mm=prior.voxel_size_mm,
                     orientation_probs=(1.0, 0.0, 0.0), scale_range=(1.0, 1.0), flip_lr=False, workers=0,
                     with_mr=with_mr)
    out, k = [], 0
    while sum(len(o) for o in out) < n:
        rng = np.random.default_rng(seed + k)
        vol = random_training_volume(rng, shape=cfg.volume_shape, voxel_size_mm=cfg.voxel_size_mm, with_mr=with_mr)
        out.append(slices_from_volume(vol, cfg, rng, min(4, n)))
        k += 1
    return torch.from_numpy(np.concatenate(out)[:n])


def gaussian_filter_batch(y: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return y
    r = int(np.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=y.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    pad = torch.nn.functional.pad(y, (r, r, r, r), mode="reflect")
    out = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1))


@torch.no_grad()
def ddim_samples(prior, n: int, steps: int = 50, eta: float = 0.0, seed: int = 0, batch: int = 8,
                 clip: float = 10.0, cond: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM samples (conditional on ``cond`` (n, 1, S, S) MR slices if given); x0 clipped to
    [0, clip] (the normalised data range) unless clip <= 0."""
    g = torch.Generator().manual_seed(seed)
    sched = prior.schedule
    ts = sched.timesteps(steps)
    outs = []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        x = torch.randn((b, 1, prior.image_size, prior.image_size), generator=g)
        for j, t in enumerate(ts):
            t_next = ts[j + 1] if j + 1 < len(ts) else -1
            eps = prior.eps(x, t, None if cond is None else cond[i:i + b])
            x0 = sched.tweedie(x, eps, t)
            if clip > 0:
                x0 = x0.clamp(0, clip)
            x = sched.ddim_step(x0, eps, t, t_next, eta=eta, generator=g)
        outs.append(x)
    return torch.cat(outs)


def image_stats(imgs: torch.Tensor) -> dict:
    """Per-image statistics that separate FDG 'GM' from 'WM' without labels (robust percentiles)."""
    res = {"hi_lo": [], "bg": [], "area": [], "support_mean": []}
    for im in imgs[:, 0].numpy():
        thr = 0.2 * np.percentile(im, 99.5)
        sup = im > thr
        if sup.sum() < 50:
            continue
        v = im[sup]
        res["hi_lo"].append(np.percentile(v, 90) / max(np.percentile(v, 25), 1e-6))
        res["bg"].append(float(np.abs(im[~sup]).mean()) / float(v.mean()))
        res["area"].append(float(sup.sum()))
        res["support_mean"].append(float(v.mean()))
    return {k: np.asarray(v) for k, v in res.items()}


def fmt_q(a: np.ndarray, digits: int = 2) -> str:
    if len(a) == 0:
        return "n/a"
    q = np.percentile(a, [10, 50, 90])
    return f"{q[1]:.{digits}f} [{q[0]:.{digits}f}, {q[2]:.{digits}f}]"


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    n_img = 8 if args.quick else 32
    conditional = prior.cond_channels > 0
    pairs = held_out_slices(n_img, prior, with_mr=conditional)
    x0, mr = pairs[:, :1], (pairs[:, 1:] if conditional else None)
    rows = []
    g = torch.Generator().manual_seed(1)
    for sigma in (0.1, 0.25, 0.5, 1.0):
        t = prior.schedule.t_for_noise_std(sigma)
        ab = float(prior.schedule.alpha_bar[t])
        eps = torch.randn(x0.shape, generator=g)
        xt = prior.schedule.q_sample(x0, t, eps)
        y = xt / ab ** 0.5  # noisy image, noise std sqrt((1-ab)/ab)
        eff = ((1 - ab) / ab) ** 0.5
        tw = torch.cat([prior.tweedie(xt[i:i + 8], t) for i in range(0, len(xt), 8)])
        mse_tw = float(((tw - x0) ** 2).mean())
        if conditional:  # the MR given: the number that matters for an MR-guided prior
            tw_mr = torch.cat([prior.tweedie(xt[i:i + 8], t, mr[i:i + 8]) for i in range(0, len(xt), 8)])
            mse_tw = (mse_tw, float(((tw_mr - x0) ** 2).mean()))
        best = min((float(((gaussian_filter_batch(y, s) - x0) ** 2).mean()), s)
                   for s in (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0))
        rows.append((eff, t, float(((y - x0) ** 2).mean()), best[0], best[1], mse_tw))
    n_s = 8 if args.quick else 16
    ref = held_out_slices(max(n_s, 16), prior, seed=HELD_OUT_SEED + 500, with_mr=conditional)
    train_imgs, ref_mr = ref[:, :1], (ref[:n_s, 1:] if conditional else None)
    t0 = time.perf_counter()
    samples = ddim_samples(prior, n_s, steps=50, batch=8, cond=ref_mr)
    t_batch = (time.perf_counter() - t0) / n_s
    # eta 1 (ancestral) from the same noise: fresh noise at every step corrects the layout errors that
    # a deterministic eta-0 path carries from the high-noise steps to the end
    samples_1 = ddim_samples(prior, n_s, steps=50, eta=1.0, batch=8, cond=ref_mr)
    t0 = time.perf_counter()
    ddim_samples(prior, 1, steps=50, batch=1, cond=None if ref_mr is None else ref_mr[:1])
    t_single = time.perf_counter() - t0
    st_s, st_1, st_t = image_stats(samples), image_stats(samples_1), image_stats(train_imgs)

    card = prior.card
    start, end = markers(prior.name)
    mr_col = " Tweedie MSE, MR given | gain with MR |" if conditional else ""
    lines = [
        start,
        f"### Diffusion prior `{prior.name}` ({dt.date.today().isoformat()}, `python benchmarks/prior.py bench"
        f"{' --quick' if args.quick else ''}`)",
        "",
        f"Weights after {card.get('steps', '?')} training steps ({card.get('wall_time_s', 0) / 3600:.2f} h on "
        f"2 shared CPU cores), {card.get('parameters', '?')} parameters. Held-out phantom slices: {n_img} axial "
        f"slices from deformation seeds {HELD_OUT_SEED}+ (never drawn in training), normalised to support mean 1.",
        "",
        "| noise std (normalised units) | t | MSE noisy | best Gaussian filter MSE (sigma px) | Tweedie MSE"
        f"{' (MR zeroed)' if conditional else ''} | gain |{mr_col}",
        "|---|---|---|---|---|---|" + ("---|---|" if conditional else ""),
    ]
    for eff, t, mn, mg, sg, mt in rows:
        mt, mt_mr = (mt if conditional else (mt, None))
        extra = f" {mt_mr:.4f} | {mg / mt_mr:.2f}x |" if conditional else ""
        lines.append(f"| {eff:.2f} | {t} | {mn:.4f} | {mg:.4f} ({sg:g}) | {mt:.4f} | {mg / mt:.2f}x |{extra}")
    lines += [
        "",
        f"50-step DDIM (x0 clipped to [0, 10] at every step; eta 0 deterministic, eta 1 ancestral, the same "
        f"initial noise) {'samples given held-out MR slices' if conditional else 'unconditional samples'} ({n_s}) "
        f"vs held-out phantom slices ({len(train_imgs)}), median [10th, 90th percentile] per image. The support is "
        "'pixels above 20 % of the image's 99.5th percentile', so stray background activity in a sample also "
        "lowers its 25th percentile:",
        "",
        "| statistic | samples, eta 0 | samples, eta 1 | phantom slices |",
        "|---|---|---|---|",
    ]
    for label, key, digits in (("90th / 25th percentile in the support (GM:WM-like contrast)", "hi_lo", 2),
                               ("mean over support (normalised; training 0.5-1.5)", "support_mean", 2),
                               ("background mean abs / support mean", "bg", 2),
                               ("support area (pixels above 20 % of the 99.5th percentile)", "area", 0)):
        lines.append(f"| {label} | {fmt_q(st_s[key], digits)} | {fmt_q(st_1[key], digits)} | "
                     f"{fmt_q(st_t[key], digits)} |")
    lines += [
        "",
        f"Sampling time, 50 DDIM steps at {prior.image_size}x{prior.image_size}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: {t_single:.1f} s per image at batch 1, {t_batch:.1f} s per image at batch 8.",
        end,
    ]
    write_section("\n".join(lines), start, end)
    print("\n".join(lines))


def markers(name: str) -> tuple[str, str]:
    key = "prior" if name == "brain-fdg-2d" else f"prior-{name}"
    return f"<!-- {key}:start -->", f"<!-- {key}:end -->"


def write_section(text: str, start: str = START, end: str = END) -> None:
    old = BENCH_MD.read_text() if BENCH_MD.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda m: text, old, count=1, flags=re.S)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    BENCH_MD.write_text(new)


def samples_figure(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    if prior.cond_channels:
        return conditional_samples_figure(args, prior, plt)
    t0 = time.perf_counter()
    s0 = ddim_samples(prior, args.n, steps=args.steps, seed=args.seed, clip=args.clip)
    dt_s = time.perf_counter() - t0
    s1 = ddim_samples(prior, args.n, steps=args.steps, eta=1.0, seed=args.seed, clip=args.clip)
    ref = held_out_slices(4, prior)
    cols = 8
    per = int(np.ceil(args.n / cols))
    fig, axes = plt.subplots(2 * per + 1, cols, figsize=(cols * 1.1, (2 * per + 1) * 1.18))
    for ax in axes.ravel():
        ax.axis("off")
    for block, (eta, s) in enumerate(((0, s0), (1, s1))):
        for i in range(args.n):
            im = s[i, 0].numpy()
            axes[block * per + i // cols, i % cols].imshow(im, cmap="gray_r", vmin=0,
                                                           vmax=max(float(np.percentile(im, 99.7)), 1e-3))
        axes[block * per, 0].set_title(f"eta {eta}", fontsize=6, loc="left")
    for j in range(4):
        axes[-1, j].imshow(ref[j, 0].numpy(), cmap="gray_r", vmin=0)
    axes[-1, 0].set_title("held-out phantom slices", fontsize=6, loc="left")
    fig.suptitle(f"{prior.name} (step {prior.card.get('steps', '?')}): {args.n} unconditional {args.steps}-step "
                 f"samples from the same noise, DDIM eta 0 (top) and eta 1 (middle), x0 clip [0, {args.clip:g}]; "
                 "last row: phantoms", fontsize=6)
    plt.subplots_adjust(wspace=0.03, hspace=0.12, left=0.01, right=0.99, bottom=0.01, top=0.93)
    _save(fig, "prior_samples.png", f"{dt_s / args.n:.2f} s per eta-0 sample; eta 1 min {float(s1.min()):.2f} "
          f"max {float(s1.max()):.2f}")


def conditional_samples_figure(args, prior, plt) -> None:
    """Columns of (held-out MR, a sample given that MR, the phantom slice it came with)."""
    n = min(args.n, 8)
    ref = held_out_slices(n, prior, seed=HELD_OUT_SEED + 500, with_mr=True)
    s = ddim_samples(prior, n, steps=args.steps, seed=args.seed, clip=args.clip, cond=ref[:, 1:])
    fig, axes = plt.subplots(3, n, figsize=(n * 1.1, 3 * 1.18))
    for j in range(n):
        vmax = float(np.percentile(ref[j, 0].numpy(), 99.7)) or 1
        for i, (img, kw) in enumerate([(ref[j, 1], dict(cmap="gray", vmin=0, vmax=1)),
                                       (s[j, 0], dict(cmap="gray_r", vmin=0, vmax=vmax)),
                                       (ref[j, 0], dict(cmap="gray_r", vmin=0, vmax=vmax))]):
            axes[i, j].imshow(img.numpy(), **kw)
            axes[i, j].axis("off")
    for i, label in enumerate(["MR (input)", "sample given the MR", "phantom PET"]):
        axes[i, 0].set_title(label, fontsize=6, loc="left")
    fig.suptitle(f"{prior.name}: {args.steps}-step DDIM samples given held-out MR slices "
                 f"(step {prior.card.get('steps', '?')})", fontsize=7)
    plt.subplots_adjust(wspace=0.03, hspace=0.12, left=0.01, right=0.99, bottom=0.01, top=0.9)
    _save(fig, f"prior_samples_{prior.name}.png", "")


def _save(fig, name: str, note: str) -> None:
    FIG.mkdir(parents=True, exist_ok=True)
    out = FIG / name
    fig.savefig(out, dpi=80)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB) {note}")


def loss_figure(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.genfromtxt(args.csv, delimiter=",", names=True)
    step, loss, wall = data["step"], data["loss"], data["wall_s"]
    k = max(1, min(50, len(loss) // 20))
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.semilogy(step, loss, lw=0.4, alpha=0.35, label="per step")
    ax.semilogy(step[k - 1:], smooth, lw=1.2, label=f"mean of {k}")
    for mark in args.mark:
        at, _, label = mark.partition(":")
        ax.axvline(float(at), color="k", lw=0.8, ls="--")
        ax.text(float(at), ax.get_ylim()[1], f" {label}", fontsize=7, va="top")
    ax.set_xlabel("step (global batch 8)")
    ax.set_ylabel("epsilon MSE (unweighted)")
    ax.set_title(f"{args.prior} training loss ({wall[-1] / 3600:.2f} h wall)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    FIG.mkdir(parents=True, exist_ok=True)
    out = FIG / ("prior_loss.png" if args.prior == "brain-fdg-2d" else f"loss_{args.prior}.png")
    fig.savefig(out, dpi=90)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["bench", "samples", "loss"])
    p.add_argument("--prior", default="brain-fdg-2d")
    p.add_argument("--quick", action="store_true", help="fewer images (a smoke run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", type=float, default=10.0, help="clip x0 to [0, clip] while sampling (0: off)")
    p.add_argument("--mark", action="append", default=[], help="loss plot: STEP:LABEL vertical marker")
    p.add_argument("--csv", default=str(ROOT / "training" / "brain-fdg-2d" / "loss.csv"))
    args = p.parse_args(argv)
    {"bench": bench, "samples": samples_figure, "loss": loss_figure}[args.what](args)


if __name__ == "__main__":
    main()
