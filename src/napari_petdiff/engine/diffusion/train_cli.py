"""`petdiff train` (a slice prior), `petdiff train-deft` (a DEFT h-network) and `petdiff priors`."""
from __future__ import annotations

import json
import os
import sys
import time

# flag -> (TrainConfig field or "data.<field>", type, help); defaults None so that only the flags
# given on the command line override the config file or the resumed checkpoint.
_FLAGS = {
    "--out": ("out", str, "run directory (checkpoints, loss.csv, exported prior)"),
    "--name": ("name", str, "prior name (default 'prior')"),
    "--description": ("description", str, "one line for the model card"),
    "--steps": ("steps", int, "total optimiser steps (a resumed run continues up to this number)"),
    "--batch-size": ("batch_size", int, "global batch size (split over torchrun processes)"),
    "--lr": ("lr", float, "Adam learning rate (default 2e-4)"),
    "--lr-schedule": ("lr_schedule", str, "constant or cosine (after warm-up)"),
    "--loss-weighting": ("loss_weighting", str, "eps (plain) or trunc-snr (eps MSE x min(1/alpha_bar, max))"),
    "--max-loss-weight": ("max_loss_weight", float, "cap of the trunc-snr weight (default 25)"),
    "--warmup": ("warmup_steps", int, "linear warm-up steps"),
    "--ema-decay": ("ema_decay", float, "EMA decay (default 0.999)"),
    "--ema-start": ("ema_start", int, "steps before the EMA starts averaging"),
    "--seed": ("seed", int, "random seed (data, timesteps, noise)"),
    "--base-channels": ("base_channels", int, "UNet base width (default 32)"),
    "--num-res-blocks": ("num_res_blocks", int, "residual blocks per level"),
    "--dropout": ("dropout", float, "dropout in residual blocks"),
    "--image-size": ("data.image_size", int, "slice size in pixels (default 128)"),
    "--voxel-size": ("data.voxel_size_mm", float, "voxel size in mm (default 2)"),
    "--source": ("data.source", str, "phantom, synthetic or nifti:<folder>"),
    "--slices-per-volume": ("data.slices_per_volume", int, "slices drawn from each generated volume"),
    "--volumes-per-group": ("data.volumes_per_group", int, "volumes mixed in one shuffled group"),
    "--workers": ("data.workers", int, "background data generation processes (0 or 1)"),
    "--data-sharding": ("data_sharding", str, "rank (own data per process) or global (split one batch)"),
    "--log-every": ("log_every", int, "steps between loss.csv rows"),
    "--checkpoint-every": ("checkpoint_every", int, "steps between checkpoints (0: by time only)"),
    "--checkpoint-minutes": ("checkpoint_minutes", float, "minutes between checkpoints"),
    "--keep-checkpoints": ("keep_checkpoints", int, "how many recent checkpoints to keep"),
    "--export-to": ("export_to", str, "stem of the exported prior, e.g. src/napari_petdiff/models/brain-fdg-2d"),
    "--export-minutes": ("export_minutes", float, "minutes between exports of the EMA weights"),
    "--cond-channels": ("cond_channels", int, "1: MR-conditioned prior (paired phantom MR as an input channel)"),
    "--cond-dropout": ("cond_dropout", float, "probability of dropping the MR (classifier-free, default 0.1)"),
    "--init-from": ("init_from", str, "start from this prior's weights (name or path): fine-tuning"),
}


def _tuple_int(s: str) -> tuple:
    try:
        return tuple(int(v) for v in s.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise ValueError(f"expected comma-separated integers such as 1,2,2,4; got {s!r}") from None


# the DEFT h-network's own fields (petdiff train-deft)
_DEFT_FLAGS = {
    "--prior": ("prior", str, "the frozen prior h is trained for (default brain-fdg-2d)"),
    "--counts-min": ("counts_min", float, "lowest total trues per training slice (log-uniform range)"),
    "--counts-max": ("counts_max", float, "highest total trues per training slice"),
    "--delta": ("delta", float, "offset that lets zero voxels grow in the guidance image (default 0.01)"),
}


def _add_training_options(p, cfg_name: str) -> None:
    p.add_argument("--config", help=f"JSON file with {cfg_name} fields (flags override it)")
    p.add_argument("--resume", help="run directory or checkpoint to continue from (its config is reused)")
    for flag, (dest, typ, hlp) in _FLAGS.items():
        p.add_argument(flag, dest="cfg_" + dest.replace(".", "__"), type=typ, default=None, help=hlp,
                       metavar=typ.__name__.upper())
    p.add_argument("--channel-mult", dest="cfg_channel_mult", type=_tuple_int, default=None,
                   help="UNet channel multipliers, e.g. 1,2,2,4")
    p.add_argument("--attention", dest="cfg_attention_resolutions", type=_tuple_int, default=None,
                   help="feature-map sizes with self-attention, e.g. 16 (empty string: none)")
    p.add_argument("--bf16", dest="cfg_bf16", action="store_true", default=None, help="bf16 autocast (default)")
    p.add_argument("--no-bf16", dest="cfg_bf16", action="store_false", help="float32 throughout")
    p.add_argument("--no-channels-last", dest="cfg_channels_last", action="store_false", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("train", help="train (or resume) a diffusion slice prior",
                              description="Train a 2-D DDPM slice prior. Under `torchrun --nproc-per-node N -m "
                                          "napari_petdiff.cli train ...` it runs DistributedDataParallel.")
    _add_training_options(p, "TrainConfig")
    p.set_defaults(config_class="TrainConfig")

    d = subparsers.add_parser("train-deft", help="train (or resume) a PET-DEFT h-network on a frozen prior",
                              description="Train DEFT's h-network on simulated (phantom, Poisson scan) pairs over a "
                                          "range of count levels; the prior stays frozen. Same checkpoints, resume "
                                          "and torchrun support as `petdiff train`.")
    _add_training_options(d, "DeftConfig")
    for flag, (dest, typ, hlp) in _DEFT_FLAGS.items():
        d.add_argument(flag, dest="deft_" + dest, type=typ, default=None, help=hlp, metavar=typ.__name__.upper())
    d.set_defaults(config_class="DeftConfig")

    q = subparsers.add_parser("priors", help="list the shipped diffusion priors and their model cards")
    q.add_argument("--json", action="store_true", help="print the full cards as JSON")
    q.set_defaults(func=run_priors)


def build_config(args):
    from .deft import DeftConfig
    from .train import TrainConfig, find_checkpoint

    cls = DeftConfig if getattr(args, "config_class", "TrainConfig") == "DeftConfig" else TrainConfig
    if args.config:
        cfg = cls.from_json(args.config)
    elif args.resume:
        state = json.loads((find_checkpoint(args.resume) / "state.json").read_text())
        cfg = cls.from_dict(state["config"])
    else:
        cfg = cls()
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    if "data__image_size" in given and not (args.resume or args.config):
        s = given["data__image_size"]
        cfg.data.volume_shape = (max(1, s // 2), s, s)
    for key, v in given.items():
        if key.startswith("data__"):
            setattr(cfg.data, key[6:], v)
        else:
            setattr(cfg, key, v)
    deft = {k[5:]: v for k, v in vars(args).items() if k.startswith("deft_") and v is not None}
    if "prior" in deft:
        cfg.prior = deft["prior"]
    if "delta" in deft:
        cfg.delta = deft["delta"]
    if "counts_min" in deft or "counts_max" in deft:
        cfg.counts_range = (deft.get("counts_min", cfg.counts_range[0]), deft.get("counts_max", cfg.counts_range[1]))
    if getattr(args, "threads", None):
        cfg.threads = int(args.threads)
    cfg.resume = args.resume or ""
    return cfg


class _Bar:
    """tqdm on a terminal; plain lines (every 30 s) in a log file."""

    def __init__(self, total: int, initial: int, quiet: bool):
        quiet = quiet or os.environ.get("RANK", "0") != "0"  # one bar per torchrun job
        self.quiet, self.total = quiet, total
        self.tqdm = None
        self._last = 0.0
        if not quiet and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.tqdm = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, ev) -> None:
        if self.quiet:
            return
        if self.tqdm is not None:
            self.tqdm.n = ev.step
            self.tqdm.set_postfix_str(ev.message, refresh=True)
            return
        now = time.monotonic()
        if now - self._last > 30 or ev.step == ev.total:
            self._last = now
            pct = 100.0 * ev.step / max(1, ev.total)
            print(f"[{time.strftime('%H:%M:%S')}] step {ev.step}/{ev.total} ({pct:.1f}%) {ev.message}", flush=True)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def run_train(args) -> int:
    from .train import train

    cfg = build_config(args)
    device = getattr(args, "device", None) or "cpu"
    gen = train(cfg, device=device)
    bar = None
    summary = None
    try:
        while True:
            ev = next(gen)
            if bar is None:
                bar = _Bar(ev.total, ev.step - 1, args.quiet)
            bar.update(ev)
    except StopIteration as stop:
        summary = stop.value
    finally:
        if bar is not None:
            bar.close()
    if summary and not args.quiet and os.environ.get("RANK", "0") == "0":
        print(f"stopped at step {summary['steps']}" if summary["stopped"] else f"done: {summary['steps']} steps",
              f"({summary['wall_time_s'] / 60:.1f} min total); checkpoint {summary['checkpoint']}; "
              f"prior {summary['export']}", flush=True)
        if summary["stopped"]:
            cmd = "train-deft" if getattr(args, "config_class", "") == "DeftConfig" else "train"
            print(f"resume with: petdiff {cmd} --resume {summary['out']}", flush=True)
    return 0


def run_priors(args) -> int:
    from .io import list_priors

    cards = list_priors()
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    if not cards:
        print("no shipped priors found")
        return 0
    for c in cards:
        wall = c.get("wall_time_s")
        print(f"{c['name']}: {c['image_size']}x{c['image_size']} slices at {c['voxel_size_mm']:g} mm, "
              f"{c.get('parameters', '?')} parameters, {c.get('steps', '?')} training steps"
              + (f" ({wall / 3600:.2f} h)" if isinstance(wall, (int, float)) else "")
              + f", exported {c.get('date', '?')}")
        if c.get("architecture", {}).get("cond_channels", 0):
            print("    MR-conditioned: needs an MR image on the PET grid (recon --mr FILE, or a simulated scan's MR)")
        if c.get("description"):
            print(f"    {c['description']}")
    from .deft import list_deft

    for c in list_deft():
        base = c.get("base_prior", {}).get("name", "?")
        print(f"{c['name']} (DEFT h-network for {base}, `--method deft`): {c.get('parameters', '?')} parameters, "
              f"{c.get('steps', '?')} training steps, exported {c.get('date', '?')}")
    return 0
