"""Personalised MR-registered prior against the generic prior on one target subject.

Target: a 25-slice brain slab (2 mm) with its own anatomy (deformation seed TARGET_SEED, 6 mm RMS:
stronger than the 4 mm of the generic prior's training brains and of the sources) and two
PET-only lesions (hot insular, cold frontal: the MR has neither). Sources: 8 built-in phantoms,
each with its own deformation, GM:WM ratio and lesions. The personalised prior is brain-fdg-2d
fine-tuned on 64 Dirichlet pseudo-PETs of the sources registered to the target MR.

  python benchmarks/personalised.py registration   # affine vs demons vs B-spline (Dice, seconds)
  python benchmarks/personalised.py build          # personalise (resumable) into --work
  python benchmarks/personalised.py bench --jobs 2 # reconstructions of the target's central slice

Every section goes into docs/benchmarks.md ("personal-*" markers) with a figure in docs/figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, runtime_lines, write_section  # noqa: E402

from napari_petdiff.engine.grid import ImageGrid  # noqa: E402
from napari_petdiff.engine.phantoms import brain_phantom, default_lesions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT / "docs" / "figures"
TARGET_SEED, TARGET_STRENGTH_MM = 900101, 6.0
SLAB = (25, 128, 128)
CENTRE = 12  # slab slice at world z = 0 (both lesions are centred there)
WORK = ROOT / "training" / "personalised-bench"
# the ablation: pseudo-PETs without added lesions (build --lesion-prob 0 --work <this>)
WORK_NO_LESIONS = ROOT / "training" / "personalised-bench-nolesions"


def target():
    """The target subject: 3-D slab phantom with PET-only lesions (the MR has none)."""
    return brain_phantom(dims=3, shape=SLAB, deformation_seed=TARGET_SEED,
                         deformation_strength_mm=TARGET_STRENGTH_MM, lesions=default_lesions(2))


def slice_grid(grid: ImageGrid) -> ImageGrid:
    return ImageGrid((1,) + grid.shape[1:], grid.voxel_size,
                     (grid.origin[0] + CENTRE * grid.voxel_size[0],) + grid.origin[1:])


def config(args):
    from napari_petdiff.engine.personal import PersonaliseConfig

    return PersonaliseConfig(out=str(args.work), name="personalised-bench", sources=f"phantom:{args.sources}",
                             n_pseudo=args.pseudo, subset_size=args.subset, steps=args.steps, lr=args.lr,
                             lesion_prob=args.lesion_prob, threads=args.threads)


# --- registration ----------------------------------------------------------------------------------
def dice(a, b) -> float:
    a, b = a > 0.5, b > 0.5
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def run_registration(args):
    from napari_petdiff.engine.personal import RegistrationConfig, phantom_subjects, register
    from napari_petdiff.engine.phantoms import deform

    ph = target()
    subjects = phantom_subjects(ph.grid, args.n_subjects, seed=0)
    rows, times = {}, {}
    for s in subjects:
        gm_src = brain_phantom(dims=3, shape=SLAB, deformation_seed=s.info["deformation_seed"]).gm
        rows.setdefault("none", []).append((dice(ph.gm, gm_src), float(np.sqrt(np.mean((s.mr - ph.mr) ** 2)))))
        for m in ("affine", "demons", "bspline"):
            t0 = time.perf_counter()
            f, info = register(ph.mr, s.mr, ph.grid, cfg=RegistrationConfig(method=m, threads=args.threads))
            times.setdefault(m, []).append(time.perf_counter() - t0)
            rows.setdefault(m, []).append((dice(ph.gm, deform(gm_src, f)), info["mr_rmse_after"]))
            print(s.name, m, rows[m][-1], f"{times[m][-1]:.1f} s", flush=True)
    lines = ["### Personalised prior: registration of the source MRs to the target MR", "",
             f"{machine()}, SimpleITK {_sitk_version()}. Command: `python benchmarks/personalised.py registration "
             f"--n-subjects {args.n_subjects}`. {args.n_subjects} built-in sources (4 mm deformations) to the target "
             f"slab {SLAB} (6 mm). GM Dice: the source's GM map (fraction > 0.5) warped with the MR-derived field "
             "against the target's; MR RMSE after warping. Mean over subjects.", "",
             "| registration | GM Dice | MR RMSE | seconds per subject | ratio to affine |", "|---|---|---|---|---|"]
    t_aff = float(np.median(times["affine"]))
    for m, v in rows.items():
        t = f"{np.median(times[m]):.1f} | {np.median(times[m]) / t_aff:.1f}" if m in times else "- | -"
        lines.append(f"| {m} | {np.mean([a for a, _ in v]):.3f} | {np.mean([b for _, b in v]):.3f} | {t} |")
    lines += ["", "ANTsPy (antspyx 0.6.3) was not measured: it requires numpy < 2.4 and scipy < 1.16, which cannot "
                  "be installed next to this napari environment (numpy 2.4, scipy 1.17)."]
    md = "\n".join(lines)
    print(md)
    write_section("personal-registration", md)


def _sitk_version() -> str:
    import SimpleITK as sitk

    return sitk.Version_VersionString()


# --- build -------------------------------------------------------------------------------------------
def run_build(args):
    from napari_petdiff.engine.personal import personalise

    ph = target()
    t0 = time.time()
    gen = personalise(config(args), ph.mr, ph.grid, acquisition_grid=slice_grid(ph.grid))
    last = 0.0
    try:
        while True:
            ev = next(gen)
            if time.time() - last > 30 or ev.step == ev.total:
                last = time.time()
                print(f"[{time.time() - t0:7.0f} s] {ev.stage} {ev.step}/{ev.total} {ev.message}", flush=True)
    except StopIteration as stop:
        print(stop.value)

# --- reconstruction benchmark ---------------------------------------------------------------------
def sweeps(steps: int, quick: bool, priors: dict):
    """``priors``: label -> prior (name or path); every diffusion method runs with each."""
    diff = dict(steps=steps, samples=4, batch=4)
    dds = [1.0] if quick else [0.3, 1.0, 3.0]
    lisch = [8.0] if quick else [4.0, 8.0, 16.0, 32.0]
    out = {"MAP-RDP": ("map-rdp", "beta", [3.0, 10.0] if quick else [1.0, 3.0, 10.0, 30.0],
                       dict(epochs=20, subsets=8))}
    for method, name, pname, values, extra in (("dds", "PET-DDS", "anchor", dds, dict(dc_iterations=3)),
                                                ("lisch", "PET-LiSch", "target_iteration", lisch, {})):
        for label, prior in priors.items():
            out[f"{name} {label}"] = (method, pname, values, dict(diff, prior=prior, **extra))
    return out


def bench_priors(args) -> dict:
    priors = {"generic": "brain-fdg-2d", "personalised": str(Path(args.work) / "personalised-bench.safetensors")}
    ablation = WORK_NO_LESIONS / "personalised-bench.safetensors"
    if ablation.exists():
        priors["personalised, no lesions added"] = str(ablation)
    for item in args.extra or []:
        label, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"--extra takes LABEL=PRIOR_PATH; got {item!r}")
        priors[label] = path
    return priors


def rois(ph):
    """Central-slice masks: brain, hot and cold lesions, lesion-free GM and WM (fraction > 0.8)."""
    k = CENTRE
    brain = ph.brain_mask[k]
    hot, cold = ph.lesion_masks[0][k], ph.lesion_masks[1][k]
    free = brain & ~hot & ~cold
    return {"brain": brain, "hot": hot, "cold": cold, "gm": free & (ph.gm[k] > 0.8), "wm": free & (ph.wm[k] > 0.8)}


def evaluate(x, truth, m):
    from napari_petdiff.engine.metrics import contrast_recovery, nrmse, ssim

    gmwm = lambda a: float(a[m["gm"]].mean() / a[m["wm"]].mean())  # noqa: E731
    return {"NRMSE": nrmse(x, truth, m["brain"]), "SSIM": ssim(x, truth, m["brain"]),
            "CRC hot": contrast_recovery(x, truth, m["hot"], m["wm"]),
            "CRC cold": contrast_recovery(x, truth, m["cold"], m["wm"]),
            "GM/WM CR": (gmwm(x) - 1.0) / (gmwm(truth) - 1.0),
            "WM CoV": float(x[m["wm"]].std() / x[m["wm"]].mean())}


def one_realisation(task):
    from napari_petdiff.engine import reconstruct
    from napari_petdiff.engine.samples import geometry_for
    from napari_petdiff.engine.simulate import simulate

    counts, r, steps, quick, priors = task
    torch.set_num_threads(1)
    ph = target()
    g2 = slice_grid(ph.grid)
    sim = simulate(ph.activity[CENTRE:CENTRE + 1], g2, geometry_for(g2), ph.mu[CENTRE:CENTRE + 1], counts=counts,
                   background_fraction=0.3, seed=3000 + r)
    truth = sim.truth[0].numpy()
    m = rois(ph)
    res, imgs, times = {}, {}, {}
    for name, (method, pname, values, fixed) in sweeps(steps, quick, priors).items():
        for v in values:
            t0 = time.perf_counter()
            out = reconstruct(sim.acquisition, method, **{pname: v}, **fixed)
            times.setdefault(name, []).append((time.perf_counter() - t0) / fixed.get("samples", 1))
            imgs[(name, v)] = (out.mean[0].numpy(), None if out.std is None else out.std[0].numpy())
            res[(name, v)] = evaluate(imgs[(name, v)][0], truth, m)
        print(f"{counts:.0e} r{r}: {name} done", flush=True)
    return counts, r, res, imgs, times, truth


def pseudo_quality(args) -> list[str]:
    """How close the personalised training images are to the target, next to the population template."""
    from napari_petdiff.engine.io import read_nifti
    from napari_petdiff.engine.metrics import nrmse

    ph = brain_phantom(dims=3, shape=SLAB, deformation_seed=TARGET_SEED, deformation_strength_mm=TARGET_STRENGTH_MM)
    brain = ph.brain_mask
    unit = lambda a: a / a[brain].mean()  # noqa: E731
    truth = unit(ph.activity)
    tmpl = unit(brain_phantom(dims=3, shape=SLAB).activity)
    pseudo = [unit(read_nifti(f)[0]) for f in sorted((Path(args.work) / "pseudo").glob("pseudo-*.nii.gz"))]
    per = [nrmse(p, truth, brain) for p in pseudo]
    return ["", "Training images against the target's lesion-free activity (each scaled to unit brain mean; NRMSE "
            "over the target's brain):", "", "| image | NRMSE |", "|---|---|",
            f"| MNI template (undeformed: the population's anatomy) | {nrmse(tmpl, truth, brain):.3f} |",
            f"| one pseudo-PET (median of {len(per)}) | {np.median(per):.3f} |",
            f"| mean of the pseudo-PETs | {nrmse(np.mean(pseudo, 0), truth, brain):.3f} |"]


def run_bench(args):
    from napari_petdiff.engine.diffusion.io import load_prior

    priors = bench_priors(args)
    card = load_prior(priors["personalised"]).card  # fails early (with the reason) when the build has not run
    tasks = [(c, r, args.diffusion_steps, args.quick, priors) for c in args.counts for r in range(args.realisations)]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            done = list(pool.map(one_realisation, tasks))
    else:
        done = [one_realisation(t) for t in tasks]
    sw = sweeps(args.diffusion_steps, args.quick, priors)
    keys = ["NRMSE", "SSIM", "CRC hot", "CRC cold", "GM/WM CR", "WM CoV"]
    lines = ["### Personalised prior against the generic prior on one target subject", "",
             f"{machine()}. Command: `python benchmarks/personalised.py bench --realisations {args.realisations} "
             f"--diffusion-steps {args.diffusion_steps}{' --quick' if args.quick else ''}"
             f"{''.join(f' --extra {e!r}' for e in args.extra or [])}`. Personalised prior: "
             f"brain-fdg-2d fine-tuned for {card.get('steps')} steps ({card.get('wall_time_s', 0) / 60:.0f} min) on "
             f"{card['personalised']['n_pseudo']} pseudo-PETs (Dirichlet alpha {card['personalised']['alpha']:g}, "
             f"subsets of {card['personalised']['subset_size']} of {len(card['personalised']['sources'])} sources, "
             f"{card['personalised']['registration']['method']} registration, random lesions added to "
             f"{card['personalised'].get('lesion_prob', 0):.0%} of them); built with `python benchmarks/personalised.py "
             f"build`{'; the ablation without added lesions with `build --lesion-prob 0 --work ' + str(WORK_NO_LESIONS.relative_to(ROOT)) + '`' if 'personalised, no lesions added' in priors else ''}"
             f"{''.join(f'; {k}: `{v}`' for k, v in priors.items() if k not in ('generic', 'personalised', 'personalised, no lesions added'))}. Target: central slice of the slab, background fraction 0.3, "
             f"{args.realisations} noise realisations; mean ± std at the sweep-best parameter (by NRMSE); diffusion "
             f"methods: mean of 4 posterior samples, {args.diffusion_steps} DDIM steps. CRC: lesion contrast "
             "recovery against lesion-free WM; GM/WM CR: (GM/WM - 1) recovered relative to the truth's; WM CoV: "
             "white-matter noise.", "",
             "| trues | method | best parameter | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    shown, curves, timing = {}, {}, {}
    for c in args.counts:
        runs = sorted((d for d in done if d[0] == c), key=lambda d: d[1])
        shown[(c, "truth")] = (runs[0][5], None)
        for name, (_, pname, values, _) in sw.items():
            per_v = {v: [d[2][(name, v)] for d in runs] for v in values}
            best = min(values, key=lambda v: np.mean([d["NRMSE"] for d in per_v[v]]))
            cells = [f"{np.mean([d[k] for d in per_v[best]]):.3f} ± {np.std([d[k] for d in per_v[best]]):.3f}"
                     for k in keys]
            lines.append(f"| {c:.0e} | {name} | {pname}={best:g} | " + " | ".join(cells) + " |")
            shown[(c, name)] = runs[0][3][(name, best)]
            curves[(c, name)] = [(np.mean([d["WM CoV"] for d in per_v[v]]), np.mean([d["GM/WM CR"] for d in per_v[v]]),
                                  np.mean([d["CRC hot"] for d in per_v[v]])) for v in values]
            for d in runs:
                timing.setdefault(name, []).extend(d[4][name])
    lines += pseudo_quality(args)
    lines += runtime_lines(timing, "MAP-RDP")
    lines += ["", "![personalised](figures/personalised.png)", "",
              "![contrast-noise](figures/personalised_contrast_noise.png)"]
    md = "\n".join(lines)
    print(md)
    write_section("personal-bench", md)
    figures(args, sw, shown, curves)


def figures(args, sw, shown, curves):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from _report import image_grid

    names = ["truth"] + list(sw)
    image_grid(plt, args.counts, names, shown, "PET-LiSch personalised", FIG / "personalised.png",
               titles={n: n.replace(" ", "\n", 1).replace(", ", ",\n") for n in names})
    fig, axes = plt.subplots(1, 2 * len(args.counts), figsize=(4.2 * 2 * len(args.counts), 3.6))
    for i, c in enumerate(args.counts):
        for name in sw:
            pts = np.array(curves[(c, name)])
            style = "--" if "generic" in name else (":" if "no lesions" in name else "-")
            axes[2 * i].plot(pts[:, 0], pts[:, 1], style, marker="o", label=name)
            axes[2 * i + 1].plot(pts[:, 0], pts[:, 2], style, marker="o", label=name)
        axes[2 * i].set(xlabel="WM CoV (noise)", ylabel="GM/WM contrast recovery", title=f"{c:.0e} trues")
        axes[2 * i + 1].set(xlabel="WM CoV (noise)", ylabel="hot lesion CRC", title=f"{c:.0e} trues")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG / "personalised_contrast_noise.png", dpi=80)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("registration")
    r.add_argument("--n-subjects", type=int, default=3)
    for p in [r, sub.add_parser("build"), sub.add_parser("bench")]:
        p.add_argument("--work", type=Path, default=WORK)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--sources", type=int, default=8)
        p.add_argument("--pseudo", type=int, default=64)
        p.add_argument("--subset", type=int, default=4)
        p.add_argument("--steps", type=int, default=800)
        p.add_argument("--lr", type=float, default=1e-4)
        p.add_argument("--lesion-prob", type=float, default=0.5)
    b = sub.choices["bench"]
    b.add_argument("--realisations", type=int, default=3)
    b.add_argument("--counts", type=float, nargs="+", default=[3e4, 1e5])
    b.add_argument("--diffusion-steps", type=int, default=25)
    b.add_argument("--jobs", type=int, default=2)
    b.add_argument("--quick", action="store_true")
    b.add_argument("--extra", action="append", metavar="LABEL=PATH",
                   help="another prior to compare, e.g. 'personalised, 200 steps=training/personalised-bench-200/"
                        "personalised-bench.safetensors'")
    args = ap.parse_args()
    if args.cmd == "registration":
        run_registration(args)
    elif args.cmd == "build":
        run_build(args)
    else:
        run_bench(args)


if __name__ == "__main__":
    main()
