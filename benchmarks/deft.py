"""PET-DEFT against PET-LiSch and MAP-RDP on the same 2-D data, with posterior calibration.

Same test subject, lesions and count levels as benchmarks/quality.py (held-out deformation seed,
background fraction 0.3). MAP-RDP and PET-LiSch get oracle sweeps (best beta / target by NRMSE);
DEFT has no data-consistency knob and is run at several step counts (its ablation). Posterior
methods report, besides NRMSE/SSIM of the posterior mean, the sample diversity (RMS posterior
std over the brain relative to the RMS truth) and the coverage of per-voxel credible intervals:
the fraction of brain voxels whose true value lies in mean +- z std (z for 50/80/90/95 %).

Usage: python benchmarks/deft.py [--realisations 3] [--counts 3e4 1e5 1e6] [--jobs 2]
Writes the `deft` section of docs/benchmarks.md and docs/figures/deft_grid.png, deft_calibration.png.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import image_grid, machine, runtime_lines, write_section  # noqa: E402
from quality import FIG, evaluate  # noqa: E402

from napari_petdiff.engine import reconstruct  # noqa: E402
from napari_petdiff.engine.samples import make_scan  # noqa: E402

LEVELS = (0.5, 0.8, 0.9, 0.95)
Z = {0.5: 0.674, 0.8: 1.282, 0.9: 1.645, 0.95: 1.960}


def sweeps(quick: bool, samples: int):
    post = dict(samples=samples, batch=samples)
    return {
        "MAP-RDP": ("map-rdp", "beta", [3.0, 10.0] if quick else [1.0, 3.0, 10.0, 30.0, 100.0],
                    dict(epochs=20, subsets=8)),
        "PET-LiSch": ("lisch", "target_iteration", [4.0, 8.0] if quick else [4.0, 8.0, 16.0, 32.0],
                      dict(steps=25, **post)),
        "PET-DEFT": ("deft", "steps", [5, 20] if quick else [5, 10, 20, 50], dict(eta=0.5, **post)),
    }


def coverage(samples: torch.Tensor, truth: np.ndarray, m: np.ndarray) -> dict:
    s = samples[:, 0].numpy()
    mu, sd = s.mean(0), s.std(0, ddof=1)
    return {lv: float(np.mean(np.abs(truth - mu)[m] <= Z[lv] * sd[m])) for lv in LEVELS}


def one_realisation(task):
    counts, r, quick, samples, subject = task
    torch.set_num_threads(1)
    acq, ref = make_scan("brain2d", counts=counts, background_fraction=0.3, lesions=True, seed=1000 + r,
                         deformation_seed=subject)
    truth, mask = ref["truth"], ref["brain_mask"]
    les_hot, les_cold = ref["lesion0"][0].numpy() > 0, ref["lesion1"][0].numpy() > 0
    m = mask[0].numpy() > 0
    wm_bg = m & ~les_hot & ~les_cold
    t_np = truth[0].numpy()
    rms_truth = float(np.sqrt(np.mean(t_np[m] ** 2)))
    out = {}
    for name, (method, pname, values, fixed) in sweeps(quick, samples).items():
        for v in values:
            t0 = time.perf_counter()
            res = reconstruct(acq, method, **{pname: v}, **fixed)
            dt = (time.perf_counter() - t0) / max(1, fixed.get("samples", 1))
            sc = evaluate(res.mean, truth, mask, les_hot, les_cold, wm_bg)
            if res.samples is not None and res.samples.shape[0] > 1:
                sc["diversity"] = float(np.sqrt(np.mean(res.std[0].numpy()[m] ** 2))) / rms_truth
                sc["coverage"] = coverage(res.samples, t_np, m)
            out[(name, v)] = (sc, dt, res.mean[0].numpy(), None if res.std is None else res.std[0].numpy())
        print(f"counts {counts:.0e} realisation {r}: {name} done", flush=True)
    return counts, r, out, t_np, m


def h_effect(n: int = 16, seed: int = 424242) -> str:
    """What h adds in one step: NRMSE of the Tweedie estimate x0 with and without h on held-out
    simulated pairs (a data stream seed never used in training), per noise level and count level."""
    from napari_petdiff.engine.diffusion.data import SliceStream
    from napari_petdiff.engine.diffusion.deft import DEFAULT_DEFT, DeftConfig, DeftTask, load_deft

    cfg = DeftConfig.from_json(Path(__file__).resolve().parents[1] / "training-state" / "brain-fdg-2d-deft" /
                               "config.json")
    cfg.data.workers = 0
    task = DeftTask(cfg, torch.device("cpu"))
    h = load_deft(DEFAULT_DEFT, task.prior)
    batch = next(iter(SliceStream(cfg.data, n, seed=seed, rank=0, start=0)))
    sched = task.prior.schedule
    lines = ["| trues | t | x0 NRMSE, prior alone | x0 NRMSE, prior + h | ratio |", "|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(seed)
    for counts in (3e4, 1e6):
        lo = (math.log(counts) - math.log(cfg.counts_range[0])) / (math.log(cfg.counts_range[1]) - math.log(cfg.counts_range[0]))
        draws = task.draws(n, gen)
        draws[:, 0], draws[:, 1] = lo, (0.3 - cfg.background_range[0]) / (cfg.background_range[1] - cfg.background_range[0])
        x0, ctx = task.targets(batch, draws)
        for t in (100, 300, 600, 900):
            eps = torch.randn(x0.shape, generator=gen)
            a = float(sched.alpha_bar[t])
            x_t = a ** 0.5 * x0 + (1 - a) ** 0.5 * eps
            tt = torch.full((n,), t)
            with torch.no_grad():
                e0 = task.prior.eps(x_t, tt)
                e1 = task.predict(h.net, x_t, tt, ctx)
            err = lambda e: float(((sched.tweedie(x_t, e, t).clamp_min(0) - x0).square().sum() /  # noqa: E731
                                   x0.square().sum()).sqrt())
            r0, r1 = err(e0), err(e1)
            lines.append(f"| {counts:.0e} | {t} | {r0:.3f} | {r1:.3f} | {r1 / r0:.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--realisations", type=int, default=3)
    ap.add_argument("--counts", type=float, nargs="+", default=[3e4, 1e5, 1e6])
    ap.add_argument("--samples", type=int, default=8, help="posterior samples per diffusion run")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--subject-seed", type=int, default=900001)
    ap.add_argument("--h-effect-only", action="store_true", help="only the one-step table (seconds)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    write_section("deft-h", "### What the h-network adds in one step\n\nOn 16 held-out simulated slices (data "
                  "stream seed 424242, never used in training; background fraction 0.3): the NRMSE of the "
                  "non-negative Tweedie estimate from x_t with the prior alone and with the prior + h "
                  f"(`python benchmarks/deft.py`, machine: {machine()}).\n\n" + h_effect())
    if args.h_effect_only:
        return
    tasks = [(c, r, args.quick, args.samples, args.subject_seed) for c in args.counts for r in range(args.realisations)]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(one_realisation, tasks))
    else:
        done = [one_realisation(t) for t in tasks]
    write_report(args, done)


def write_report(args, done):
    from napari_petdiff.engine.diffusion.deft import DEFAULT_DEFT, list_deft

    card = next((c for c in list_deft() if c["name"] == DEFAULT_DEFT), {})
    rows, shown, calib, timing = [], {}, {}, {}
    sw = sweeps(args.quick, args.samples)
    for counts in args.counts:
        runs = sorted((d for d in done if d[0] == counts), key=lambda d: d[1])
        shown[(counts, "truth")] = (runs[0][3], None)
        for name, (_, pname, values, _) in sw.items():
            for v in values:
                timing.setdefault((name, v), []).extend(d[2][(name, v)][1] for d in runs)
            best = min(values, key=lambda v: np.mean([d[2][(name, v)][0]["NRMSE"] for d in runs]))
            show = values if name == "PET-DEFT" else [best]
            for v in show:
                scs = [d[2][(name, v)][0] for d in runs]
                agg = {k: (np.mean([s[k] for s in scs]), np.std([s[k] for s in scs]))
                       for k in ("NRMSE", "SSIM", "CRC hot")}
                div = np.mean([s["diversity"] for s in scs]) if "diversity" in scs[0] else None
                cov = {lv: np.mean([s["coverage"][lv] for s in scs]) for lv in LEVELS} if "coverage" in scs[0] else None
                rows.append((counts, name, pname, v, v == best, agg, div, cov))
                if cov is not None and v == best:
                    calib[(counts, name)] = cov
            _, _, img, std = runs[0][2][(name, best)]
            shown[(counts, name)] = (img, std)

    lines = [f"DEFT network: {card.get('name', '(none shipped)')} after {card.get('steps', '?')} training steps "
             f"({card.get('parameters', '?')} parameters, on brain-fdg-2d). Machine: {machine()}. Command: "
             f"`python benchmarks/deft.py --realisations {args.realisations} --samples {args.samples} "
             f"--jobs {args.jobs}{' --quick' if args.quick else ''}`. Data as in the quality benchmark (held-out "
             f"subject {args.subject_seed}, hot and cold lesion, background fraction 0.3); mean ± std over "
             f"{args.realisations} noise realisations. MAP-RDP and PET-LiSch: oracle-best parameter by NRMSE; "
             f"PET-DEFT: every step count (its ablation; * marks the best). Diffusion methods: the mean of "
             f"{args.samples} posterior samples (LiSch 25 steps, DEFT eta 0.5). Diversity: RMS posterior std over "
             "the brain / RMS truth. Coverage: fraction of brain voxels whose truth lies in the per-voxel "
             "mean ± z std interval (nominal 50 / 90 %).", "",
             "| trues | method | parameter | NRMSE | SSIM | CRC hot | diversity | coverage 50 % | coverage 90 % |",
             "|---|---|---|---|---|---|---|---|---|"]
    for counts, name, pname, v, best, agg, div, cov in rows:
        f = lambda k: f"{agg[k][0]:.3f} ± {agg[k][1]:.3f}"  # noqa: E731
        mark = " *" if best and name == "PET-DEFT" else ""
        lines.append(f"| {counts:.0e} | {name} | {pname}={v:g}{mark} | {f('NRMSE')} | {f('SSIM')} | "
                     f"{agg['CRC hot'][0]:.2f} | {'' if div is None else f'{div:.3f}'} | "
                     f"{'' if cov is None else f'{cov[0.5]:.2f}'} | {'' if cov is None else f'{cov[0.9]:.2f}'} |")
    # one row per method (its first sweep value; the runtime barely depends on it), DEFT per step count
    runtimes = {(f"{name} ({sw[name][1]}={v:g})" if name == "PET-DEFT" else name): ts
                for (name, v), ts in timing.items() if name == "PET-DEFT" or v == sw[name][2][0]}
    lines += runtime_lines(runtimes, "MAP-RDP", digits=2)
    md = "\n".join(lines)
    print(md)
    write_section("deft", "## PET-DEFT (supervised h-network)\n\n" + md +
                  "\n\n![DEFT grid](figures/deft_grid.png)\n\n![calibration](figures/deft_calibration.png)\n")
    figures(args.counts, shown, calib)


def figures(counts_list, shown, calib):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["truth", "MAP-RDP", "PET-LiSch", "PET-DEFT"]
    image_grid(plt, counts_list, names, shown, "PET-DEFT", FIG / "deft_grid.png",
               titles={n: f"{n} (mean)" for n in names[1:]})

    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="calibrated")
    for (c, n), cov in sorted(calib.items()):
        ax.plot(LEVELS, [cov[lv] for lv in LEVELS], "o-" if n == "PET-DEFT" else "s--", label=f"{n}, {c:.0e}")
    ax.set_xlabel("nominal level of the per-voxel interval"); ax.set_ylabel("observed coverage (brain voxels)")
    ax.set_xlim(0.4, 1); ax.set_ylim(0, 1); ax.legend(fontsize=7); ax.set_title("posterior calibration")
    fig.tight_layout(); fig.savefig(FIG / "deft_calibration.png", dpi=80); plt.close(fig)


if __name__ == "__main__":
    main()
