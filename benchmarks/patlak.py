"""Patlak Ki quality: voxel-wise LS / WLS vs the diffusion-prior methods at several dose levels.

Data: the 2-D FDG brain phantom (128 x 128 at 2 mm, hot and cold lesion, deformation seed 900001,
which the prior's training stream never draws), two-tissue kinetics with k4 = 0 (Huang 1980 rate
constants), Feng input, the 6 frames of 5 min from 30 to 60 min (t* = 30 min). ``--counts`` are
the expected trues summed over those frames. Every method sees the same noisy data per dose; the
parameters are fixed (not tuned per dose). Truth: the Patlak fit of the noise-free curves.

Usage: python benchmarks/patlak.py [--counts 1e7 3e6 1e6] [--threads 2] [--seed 11]
Writes the `patlak` section of docs/benchmarks.md and docs/figures/patlak.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

from napari_petdiff.engine import reconstruct  # noqa: E402
from napari_petdiff.engine.kinetics.frames import FrameModel  # noqa: E402
from napari_petdiff.engine.kinetics.patlak import patlak_plot, patlak_setup, region_curve  # noqa: E402
from napari_petdiff.engine.kinetics.simulate import make_dynamic_scan  # noqa: E402
from napari_petdiff.engine.metrics import nrmse, psnr, ssim  # noqa: E402

FIG = Path(__file__).resolve().parents[1] / "docs" / "figures"
MODELS = Path(__file__).resolve().parents[1] / "src" / "napari_petdiff" / "models"

FILTER_SWEEP_MM = (4.0, 6.0, 9.0, 12.0)  # the oracle row picks the best FWHM by Ki NRMSE per dose
# (label, method, parameters): one fixed setting per method for every dose (a tuple = oracle sweep)
METHODS = [
    ("LS", "patlak-ls", {}),
    ("WLS", "patlak-wls", {}),
    ("LS + 6 mm filter", "patlak-ls", {"postfilter_fwhm": 6.0}),
    ("LS + best filter (oracle)", "patlak-ls", {"postfilter_fwhm": FILTER_SWEEP_MM}),
    ("RED-diff", "patlak-red-diff", {"steps": 60}),
    ("HQS", "patlak-hqs", {"steps": 25}),
    ("direct (nested EM)", "patlak-direct", {"prior": "none", "iterations": 25}),
    ("direct + HQS prior", "patlak-direct", {"iterations": 25}),
]
PRIOR_METHODS = ("RED-diff", "HQS", "direct + HQS prior")


def metrics(est, truth, mask, lesion) -> dict:
    x, r = est.numpy(), truth.numpy()
    rng = float(r[mask].max() - r[mask].min())
    bias = 100.0 * (float(x[lesion].mean()) / float(r[lesion].mean()) - 1.0)
    return {"NRMSE": nrmse(x, r, mask), "PSNR": psnr(x, r, mask, rng), "SSIM": ssim(x, r, mask, rng),
            "lesion bias": bias}


def run_method(acq, im, mask, lesion, method, kw):
    """One run, or for a swept parameter (a tuple) the best run by Ki NRMSE (label gets the value)."""
    sweep = {k: v for k, v in kw.items() if isinstance(v, tuple)}
    if not sweep:
        t0 = time.time()
        res = reconstruct(acq, method, **kw)
        return res, metrics(res.mean, im["ki"], mask, lesion), time.time() - t0, ""
    (name, values), = sweep.items()
    best = None
    for v in values:
        t0 = time.time()
        res = reconstruct(acq, method, **{**kw, name: v})
        m = metrics(res.mean, im["ki"], mask, lesion)
        if best is None or m["NRMSE"] < best[1]["NRMSE"]:
            best = (res, m, time.time() - t0, f" ({v:g} mm)")
    return best


def prior_info() -> str:
    card = MODELS / "brain-fdg-2d.json"
    if not card.exists():
        return "prior brain-fdg-2d: not found"
    c = json.loads(card.read_text())
    return f"prior `brain-fdg-2d`: {c.get('steps', '?')} training steps ({c.get('date', '?')})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=float, nargs="+", default=[1e7, 3e6, 1e6])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--no-write", action="store_true", help="leave docs/benchmarks.md untouched")
    ap.add_argument("--figure", default=str(FIG / "patlak.png"), help="where to write the figure")
    ap.add_argument("--only", nargs="+", default=None, help="run only these method labels (quick checks)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = sorted(args.counts, reverse=True)
    rows, keep = [], {}
    t_all = time.time()
    for ci, n in enumerate(counts):
        acq, im = make_dynamic_scan(counts=n, start_min=30.0, seed=args.seed + ci, deformation_seed=900001)
        mask = im["brain_mask"].numpy() > 0
        lesion = im["lesion0"].numpy() > 0  # the hot lesion
        for label, method, kw in METHODS:
            if args.only and label not in args.only:
                continue
            res, m, dt, note = run_method(acq, im, mask, lesion, method, kw)
            m["V NRMSE"] = nrmse(res.extra["intercept"].numpy(), im["intercept"].numpy(), mask)
            rows.append({"counts": n, "method": label, "note": note, "seconds": dt, **m})
            print(f"{n:.0e} {label + note:30s} Ki NRMSE {m['NRMSE']:.3f} PSNR {m['PSNR']:.1f} SSIM {m['SSIM']:.3f} "
                  f"lesion {m['lesion bias']:+.0f} % V NRMSE {m['V NRMSE']:.3f} ({dt:.0f} s)", flush=True)
            if ci == len(counts) - 1:
                keep[label] = res
        if ci == len(counts) - 1:
            keep["_acq"], keep["_im"] = acq, im
            if not args.only:
                keep["_std"] = std_check(acq, im, mask)
    total = time.time() - t_all
    md = table(rows, counts, total, args, keep.get("_std"))
    print(md)
    figure(keep, counts[-1], Path(args.figure))
    if not args.no_write:
        write_section("patlak", md)


def std_check(acq, im, mask) -> dict:
    """HQS with 4 samples: is the posterior std of Ki on the scale of the actual error?"""
    t0 = time.time()
    res = reconstruct(acq, "patlak-hqs", steps=25, samples=4)
    err = (res.mean - im["ki"]).numpy()[mask]
    std = res.extra["ki_std"].numpy()[mask]
    out = {"nrmse": nrmse(res.mean.numpy(), im["ki"].numpy(), mask), "rms_std": float(np.sqrt((std ** 2).mean())),
           "rmse": float(np.sqrt((err ** 2).mean())), "within_2std": float((np.abs(err) <= 2 * std).mean()),
           "seconds": time.time() - t0}
    print(f"HQS 4 samples: NRMSE {out['nrmse']:.3f}, rms std {out['rms_std']:.4f} vs rmse {out['rmse']:.4f}, "
          f"|error| <= 2 std in {100 * out['within_2std']:.0f} % of brain voxels ({out['seconds']:.0f} s)")
    return out


def table(rows, counts, total, args, std=None) -> str:
    low = counts[-1]
    ls_low = next(r["NRMSE"] for r in rows if r["counts"] == low and r["method"] == "LS")
    lines = ["## Patlak Ki (dynamic FDG, 2-D brain)", "",
             f"Machine: {machine()}; {prior_info()}. Command: `python benchmarks/patlak.py --counts "
             f"{' '.join(f'{c:.0e}' for c in counts)} --seed {args.seed}` ({total / 60:.1f} min in all).", "",
             "Brain phantom (deformation seed 900001) with a hot and a cold lesion, 2TCM kinetics with k4 = 0, "
             "Feng input, 6 x 5 min frames from t* = 30 min, OSEM 3 x 10 subsets per frame for the indirect "
             "methods. Counts = expected trues over the 6 frames (+30 % randoms/scatter). Metrics inside the "
             "brain mask against the noise-free Patlak Ki; one noise realisation per dose; fixed parameters "
             "(see the script; chosen on another phantom and noise seed at 1e6 counts); the lesion bias is "
             "mean Ki in the hot lesion vs truth. `V` = intercept. Times are wall clock on the shared 2-core "
             "machine (the prior's training ran alongside, so the same method took 2-90 s at different moments "
             "of one run): compare them only roughly.", "",
             "| counts | method | Ki NRMSE | Ki PSNR (dB) | Ki SSIM | hot-lesion Ki bias | V NRMSE | NRMSE / LS "
             "| time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n in counts:
        ls = next(r["NRMSE"] for r in rows if r["counts"] == n and r["method"] == "LS")
        for r in (r for r in rows if r["counts"] == n):
            lines.append(f"| {n:.0e} | {r['method']}{r['note']} | {r['NRMSE']:.3f} | {r['PSNR']:.1f} | "
                         f"{r['SSIM']:.3f} | {r['lesion bias']:+.0f} % | {r['V NRMSE']:.2f} | {r['NRMSE'] / ls:.2f} | "
                         f"{r['seconds']:.0f} |")
    lines.append("")
    low_rows = {r["method"]: r["NRMSE"] for r in rows if r["counts"] == low}
    for name in PRIOR_METHODS:
        if name in low_rows:
            verdict = "meets" if low_rows[name] <= 0.6 * ls_low else "misses"
            lines.append(f"- {name}: Ki NRMSE {low_rows[name] / ls_low:.2f} x voxel-wise LS at the lowest dose "
                         f"({low:.0e}); {verdict} the goal of <= 0.6 x.")
    if "LS + best filter (oracle)" in low_rows:
        lines.append(f"- Reference: the best Gaussian post-filter of the frames before the LS fit (FWHM chosen per "
                     f"dose from {', '.join(f'{f:g}' for f in FILTER_SWEEP_MM)} mm with the truth) gives "
                     f"{low_rows['LS + best filter (oracle)'] / ls_low:.2f} x LS at the lowest dose: read the prior "
                     "methods against that row too, not only against plain LS.")
    if std:
        lines.append(f"- HQS posterior spread (4 samples, lowest dose): Ki NRMSE of the mean {std['nrmse']:.3f}; "
                     f"rms Ki std {std['rms_std']:.4f}/min against an rms error of {std['rmse']:.4f}/min; "
                     f"|error| <= 2 std in {100 * std['within_2std']:.0f} % of brain voxels "
                     f"({std['seconds']:.0f} s). The samples differ only by the diffusion noise: read the std as "
                     "a spread of plausible maps, not a calibrated posterior"
                     + (" (here it is below the error: the smoothing bias is shared by all samples)."
                        if std["rms_std"] < std["rmse"] else "."))
    lines.append("")
    lines.append("![Patlak](figures/patlak.png)")
    return "\n".join(lines)


def figure(keep, low, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acq, im = keep["_acq"], keep["_im"]
    truth = im["ki"][0].numpy()
    vmax = float(np.percentile(truth, 99.5)) * 1.2
    panels = [("truth", truth)] + [(k, keep[k].mean[0].numpy()) for k in
                                   ("LS", "WLS", "RED-diff", "HQS", "direct + HQS prior") if k in keep]
    fig = plt.figure(figsize=(13, 5.6))
    gs = fig.add_gridspec(2, 5)
    for i, (name, img) in enumerate(panels):
        ax = fig.add_subplot(gs[i // 3, i % 3])
        ax.imshow(img[10:118, 14:114], cmap="magma", vmin=0, vmax=vmax)
        ax.set_title(f"Ki {name}", fontsize=9)
        ax.axis("off")
    # Patlak plot of GM- and WM-dominated regions (by the true Ki) from the OSEM frames used by LS
    setup = patlak_setup(acq, 30.0, weighting="uniform")
    model = FrameModel(acq, setup.index, 10)
    x = None
    for _, x in model.osem(3):
        pass
    conc = setup.to_concentration(x)
    cls = acq.metadata["classes"]
    ki_t, v_t = im["ki"].numpy(), im["intercept"].numpy()
    brain = im["brain_mask"].numpy() > 0
    rois = {"GM": brain & (ki_t > 0.85 * cls["gm"]["ki"]) & (ki_t < 1.05 * cls["gm"]["ki"]),
            "WM": brain & (np.abs(ki_t - cls["wm"]["ki"]) < 0.03 * cls["wm"]["ki"])}
    ax = fig.add_subplot(gs[:, 3:])
    for (name, region), col in zip(rois.items(), ("tab:red", "tab:blue")):
        p = patlak_plot(region_curve(conc, region), setup)
        ax.plot(p["x_min"], p["y"], "o", color=col, label=f"{name} ROI ({int(region.sum())} voxels), OSEM frames")
        xs = np.linspace(0, p["x_min"].max() * 1.05, 10)
        ax.plot(xs, p["slope"] * xs + p["intercept"], "-", color=col, lw=1, label=f"fit: Ki {p['slope']:.4f}/min")
        kt, vt = float(ki_t[region].mean()), float(v_t[region].mean())
        ax.plot(xs, kt * xs + vt, "--", color=col, lw=1, label=f"truth: Ki {kt:.4f}/min")
    ax.set_xlabel("int C_p / C_p (min)")
    ax.set_ylabel("C_T / C_p")
    ax.set_title(f"Patlak plot, {low:.0e} counts", fontsize=9)
    ax.legend(fontsize=7)
    fig.suptitle(f"Patlak Ki (1/min) at {low:.0e} counts, t* = 30 min, 6 frames", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
