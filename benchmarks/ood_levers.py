"""Which adaptation settings move DDIP-HQS and LiSch+SCD on out-of-distribution data?

One case and count level of ``ood.py`` (default: amyloid at 5e4 trues, its first noise realisation,
the same simulated scan), each setting a 4-sample mean at 25 DDIM steps, scored like ood.py. The
rows are single changes against each method's base setting, so a difference between rows is
the effect of that one knob on this scan (noise realisations are not averaged: ood.py's
realisation std at this case, about 0.002 NRMSE, is the scale to read them against).

Usage: python benchmarks/ood_levers.py [--case amyloid|ring] [--counts 5e4] [--jobs 2]
Writes the section ``ood-levers-<case>`` of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, write_section  # noqa: E402

STRONG = dict(target_iteration=8.0, adapt_every=1, lr=3e-3)
# (method, label, settings); the first row of each method is its base setting
LEVERS = [
    ("ddip-hqs", "base: rho 0.3, J 2, F 5, LoRA rank 4, lr 1e-3, eta 0.85", dict(rho=0.3)),
    ("ddip-hqs", "rho 0.1 growing 10x over the steps", dict(rho=0.1, rho_growth=10.0)),
    ("ddip-hqs", "rho 0.03 growing 30x", dict(rho=0.03, rho_growth=30.0)),
    ("ddip-hqs", "F 10, lr 3e-3 (more adaptation)", dict(rho=0.3, fit_iterations=10, lr=3e-3)),
    ("ddip-hqs", "whole network, lr 1e-4", dict(rho=0.3, adapt="full", lr=1e-4)),
    ("ddip-hqs", "LoRA rank 16, lr 3e-3", dict(rho=0.3, rank=16, lr=3e-3)),
    ("ddip-hqs", "J 1 (one EM iteration per x-step)", dict(rho=0.3, em_iterations=1)),
    ("ddip-hqs", "eta 0 (deterministic DDIM)", dict(rho=0.3, eta=0.0)),
    ("lisch-scd", "base: target iteration 8, every 5th step, lr 3e-4", dict(target_iteration=8.0)),
    ("lisch-scd", "base + RDP term 0.3", dict(target_iteration=8.0, rdp_weight=0.3)),
    ("lisch-scd", "strong: every step, lr 3e-3", STRONG),
    ("lisch-scd", "strong + RDP term 0.03", dict(STRONG, rdp_weight=0.03)),
    ("lisch-scd", "strong + RDP term 0.3", dict(STRONG, rdp_weight=0.3)),
    ("lisch-scd", "strong + RDP term 3", dict(STRONG, rdp_weight=3.0)),
]


def run(task):
    i, case, counts = task
    torch.set_num_threads(1)
    import ood
    from napari_petdiff.engine import reconstruct

    method, _, kw = LEVERS[i]
    ph, rois, acq, truth = ood.scan(case, counts, 0)  # ood.py's realisation 0
    t0 = time.perf_counter()
    out = reconstruct(acq, method, steps=25, samples=4, batch=4, **kw)
    dt = time.perf_counter() - t0
    print(f"{LEVERS[i][1]}: done in {dt:.0f} s", flush=True)
    return i, ood.scores(out.mean[0].numpy(), truth, ph, rois), dt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=["amyloid", "ring"], default="amyloid")
    ap.add_argument("--counts", type=float, default=5e4)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the workers run one thread each; the report says so
    tasks = [(i, args.case, args.counts) for i in range(len(LEVERS))]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as pool:
            done = sorted(pool.map(run, tasks))
    else:
        done = [run(t) for t in tasks]
    ring = args.case == "ring"
    lines = [f"### OOD levers: one setting at a time ({args.case}, {args.counts:.0e} trues)", "",
             f"{machine()} per worker. Command: `python benchmarks/ood_levers.py --case {args.case} --counts "
             f"{args.counts:g}`. Noise realisation 0 of `ood.py` (same scan), mean of 4 posterior samples, 25 DDIM "
             "steps; read differences against ood.py's realisation std (about 0.002 NRMSE on amyloid).", "",
             "| method | setting | NRMSE | SSIM | GM/WM | GM/WM error" + (" | ring CRC" if ring else "") +
             " | seconds (ratio to the method's base) |",
             "|---|---|---|---|---|---|---|" + ("---|" if ring else "")]
    base_t = {}
    for i, s, dt in done:
        method, label, _ = LEVERS[i]
        base_t.setdefault(method, dt)
        extra = f" | {s['ring CRC']:.2f}" if ring else ""
        lines.append(f"| {method} | {label} | {s['NRMSE']:.3f} | {s['SSIM']:.3f} | {s['GM/WM']:.2f} | "
                     f"{s['GM/WM error']:.3f}{extra} | {dt:.0f} ({dt / base_t[method]:.1f}x) |")
    md = "\n".join(lines)
    print(md)
    write_section(f"ood-levers-{args.case}", md)  # one section per case


if __name__ == "__main__":
    main()
