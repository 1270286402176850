"""Reconstruction quality: OSEM, MAP-RDP, PET-DDS, PET-LiSch, DPS and PET-DEFT on the same 2-D data.

Test slices: FDG brain phantoms with a hot and a cold lesion, deformation seeds >= 900000
(the prior's training stream never uses `deformation_seed`; it draws its own random fields).
Each method's free parameter is swept and the best value by NRMSE (an oracle choice, as in the
papers' tables) is reported per count level; every method sees the same noisy data.

Usage: python benchmarks/quality.py [--realisations 5] [--counts 3e4 1e5 1e6] [--quick]
Writes the `quality` section of docs/benchmarks.md and figures in docs/figures/.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import image_grid, machine, runtime_lines, write_section  # noqa: E402

from napari_petdiff.engine import reconstruct  # noqa: E402
from napari_petdiff.engine.metrics import background_cov, contrast_recovery, nrmse, psnr, ssim  # noqa: E402
from napari_petdiff.engine.samples import make_scan  # noqa: E402

FIG = Path(__file__).resolve().parents[1] / "docs" / "figures"


def methods_and_sweeps(counts: float, quick: bool, steps: int = 25):
    # Sweeps wide enough that no best value sits on an edge (earlier runs: MAP-RDP beta ~10 at 3e4
    # trues, LiSch's target grows with the counts). Diffusion methods report the mean of 4 posterior
    # samples (DPS 2: it backpropagates through the network at every step).
    diff = dict(steps=steps, samples=4, batch=4)
    return {
        "OSEM": ("osem", "iterations", [1, 2, 4, 8] if quick else [1, 2, 3, 4, 6, 8, 12], dict(subsets=8)),
        "MAP-RDP": ("map-rdp", "beta", [1.0, 10.0] if quick else [0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
                    dict(epochs=20, subsets=8)),
        "PET-DDS": ("dds", "anchor", [0.3, 1.0] if quick else [0.3, 1.0, 3.0], dict(dc_iterations=3, **diff)),
        "PET-LiSch": ("lisch", "target_iteration", [4.0, 8.0] if quick else [4.0, 8.0, 16.0, 32.0, 64.0], diff),
        # DPS's step grows with the counts (gradient of sqrt(deviance)): 0.3 diverged at 1e6 trues
        "DPS": ("dps", "zeta", [0.3] if quick else [0.03, 0.1, 0.3], dict(steps=2 * steps, samples=2, batch=2)),
        **({"PET-DEFT": ("deft", "steps", [20] if quick else [10, 20], dict(samples=4, batch=4))}
           if has_deft() else {}),
        # the MR-guided prior reads the phantom's T1 that the simulated acquisition carries
        **({"PET-LiSch + MR": ("lisch", "target_iteration", [8.0] if quick else [4.0, 8.0, 16.0, 32.0],
                               dict(diff, prior=MR_PRIOR))} if has_mr_prior() else {}),
    }


MR_PRIOR = "brain-fdg-mr-2d"


def has_mr_prior() -> bool:
    from napari_petdiff.engine.diffusion.io import list_priors

    return any(c.get("name") == MR_PRIOR for c in list_priors())


def has_deft() -> bool:
    from napari_petdiff.engine.diffusion.deft import DEFAULT_DEFT, list_deft

    return any(c.get("name") == DEFAULT_DEFT for c in list_deft())


def evaluate(img, truth, mask, les_hot, les_cold, wm_bg):
    x, r = img[0].numpy(), truth[0].numpy()
    m = mask[0].numpy() > 0
    return {
        "NRMSE": nrmse(x, r, m), "PSNR": psnr(x, r, m), "SSIM": ssim(x, r, m),
        "CRC hot": contrast_recovery(x, r, les_hot, wm_bg), "CRC cold": contrast_recovery(x, r, les_cold, wm_bg),
        "CoV": background_cov(x, wm_bg),
    }


def one_realisation(task):
    """Every method and sweep value on one noise realisation: (counts, r, scores, images, stds, times)."""
    counts, r, quick, steps, subject, threads = task
    torch.set_num_threads(threads)
    sweeps = methods_and_sweeps(counts, quick, steps)
    acq, ref = make_scan("brain2d", counts=counts, background_fraction=0.3, lesions=True, seed=1000 + r,
                         deformation_seed=subject)
    truth, mask = ref["truth"], ref["brain_mask"]
    les_hot, les_cold = ref["lesion0"][0].numpy() > 0, ref["lesion1"][0].numpy() > 0
    wm_bg = (mask[0].numpy() > 0) & ~les_hot & ~les_cold
    scores, imgs, stds, times = {}, {}, {}, {}
    for name, (method, pname, values, fixed) in sweeps.items():
        for v in values:
            t0 = time.perf_counter()
            res = reconstruct(acq, method, **{pname: v}, **fixed)
            times.setdefault(name, []).append((time.perf_counter() - t0) / max(1, fixed.get("samples", 1)))
            scores[(name, v)] = evaluate(res.mean, truth, mask, les_hot, les_cold, wm_bg)
            imgs[(name, v)] = res.mean[0].numpy()
            if res.std is not None:
                stds[(name, v)] = res.std[0].numpy()
        print(f"counts {counts:.0e} realisation {r}: {name} done", flush=True)
    return counts, r, scores, imgs, stds, times, truth[0].numpy(), mask[0].numpy() > 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--realisations", type=int, default=5)
    ap.add_argument("--counts", type=float, nargs="+", default=[3e4, 1e5, 1e6])
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--quick", action="store_true", help="small sweeps (for a smoke run)")
    ap.add_argument("--steps", type=int, default=25, help="diffusion steps (DPS uses twice as many)")
    ap.add_argument("--subject-seed", type=int, default=900001)
    args = ap.parse_args()
    torch.set_num_threads(1)

    tasks = [(c, r, args.quick, args.steps, args.subject_seed, 1) for c in args.counts for r in range(args.realisations)]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(one_realisation, tasks))
    else:
        done = [one_realisation(t) for t in tasks]

    table, best_imgs, timing, bias_var = [], {}, {}, {}
    for counts in args.counts:
        runs = sorted((d for d in done if d[0] == counts), key=lambda d: d[1])
        truth, m = runs[0][6], runs[0][7]
        for name, sw in methods_and_sweeps(counts, args.quick, args.steps).items():
            per_v = {v: [d[2][(name, v)] for d in runs] for v in sw[2]}
            best_v = min(sw[2], key=lambda v: np.mean([s["NRMSE"] for s in per_v[v]]))
            agg = {k: (np.mean([s[k] for s in per_v[best_v]]), np.std([s[k] for s in per_v[best_v]]))
                   for k in per_v[best_v][0]}
            table.append((counts, name, sw[1], best_v, agg))
            stack = np.stack([d[3][(name, best_v)] for d in runs])
            best_imgs[(counts, name)] = (stack[0], runs[0][4].get((name, best_v)))
            bias = np.sqrt(np.mean((stack.mean(0) - truth)[m] ** 2)) / np.sqrt(np.mean(truth[m] ** 2))
            sd = np.sqrt(np.mean(stack.var(0)[m])) / np.sqrt(np.mean(truth[m] ** 2))
            bias_var[(counts, name)] = (bias, sd)
            for d in runs:
                timing.setdefault(name, []).extend(d[5][name])
        best_imgs[(counts, "truth")] = (truth, None)

    from napari_petdiff.engine.samplers.core import get_prior
    card = get_prior("brain-fdg-2d", torch.device("cpu")).card
    mr_note = ""
    if has_mr_prior():
        mr_note = (f" MR-guided rows: {MR_PRIOR} after {get_prior(MR_PRIOR, torch.device('cpu')).card.get('steps')} "
                   "fine-tuning steps, given the phantom's T1.")
    lines = [f"Prior: brain-fdg-2d after {card.get('steps')} training steps ({card.get('date', '')[:16]}).{mr_note} "
             f"Machine: {machine()}. Command: `python benchmarks/quality.py --realisations {args.realisations}"
             f"{' --quick' if args.quick else ''} --steps {args.steps} --jobs {args.jobs}` (one torch thread per "
             "job). 2-D FDG brain slice (128x128, 2 mm) with a hot and a cold "
             f"lesion, held-out deformation seed {args.subject_seed}, background fraction 0.3, "
             f"{args.realisations} noise realisations per count level; mean ± std over realisations at the "
             f"sweep-best parameter (oracle by NRMSE). Diffusion methods: {args.steps} DDIM steps (DPS {2 * args.steps}; "
             "PET-DEFT's step count is its swept parameter), the mean of 4 posterior samples (DPS 2).", "",
             "| trues | method | best parameter | NRMSE | PSNR (dB) | SSIM | CRC hot | CRC cold | WM CoV |",
             "|---|---|---|---|---|---|---|---|---|"]
    for counts, name, pname, v, agg in table:
        f = lambda k, p=3: f"{agg[k][0]:.{p}f} ± {agg[k][1]:.{p}f}"  # noqa: E731
        lines.append(f"| {counts:.0e} | {name} | {pname}={v:g} | {f('NRMSE')} | {f('PSNR', 2)} | {f('SSIM')} | "
                     f"{f('CRC hot', 2)} | {f('CRC cold', 2)} | {f('CoV')} |")
    lines += runtime_lines(timing, "OSEM")
    md = "\n".join(lines)
    print(md)
    write_section("quality", "## Reconstruction quality (2-D)\n\n" + md +
                  "\n\n![grid](figures/quality_grid.png)\n\n![bias-variance](figures/bias_variance.png)\n")
    _figures(args.counts, best_imgs, bias_var)


def _figures(counts_list, best_imgs, bias_var):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["truth", "OSEM", "MAP-RDP", "PET-DDS", "PET-LiSch", "DPS"]
    names += (["PET-DEFT"] if has_deft() else []) + (["PET-LiSch + MR"] if has_mr_prior() else [])
    image_grid(plt, counts_list, names, best_imgs, "PET-LiSch", FIG / "quality_grid.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for n in names[1:]:
        pts = [bias_var[(c, n)] for c in counts_list]
        ax.plot([p[1] for p in pts], [p[0] for p in pts], "o-", label=n)
    # log axes: one diverging method (DPS at high counts) must not squash the others into a corner
    ax.set_xscale("log"); ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter
    ax.xaxis.set_minor_formatter(NullFormatter()); ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("normalised std over realisations"); ax.set_ylabel("normalised bias (RMS)")
    ax.legend(fontsize=8); ax.set_title("bias vs variance (points: count levels)")
    fig.tight_layout(); fig.savefig(FIG / "bias_variance.png", dpi=80); plt.close(fig)


if __name__ == "__main__":
    main()
