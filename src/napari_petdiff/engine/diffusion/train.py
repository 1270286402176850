"""Training loop of the slice prior (methods.md 13.3): epsilon-matching DDPM loss.

Adam, grad clip, EMA (fp32, started after ``ema_start`` steps), bf16 autocast + channels_last on
CPU, periodic checkpoints (safetensors + JSON, the newest ``keep_checkpoints`` kept), periodic
export of the EMA weights as a loadable prior, loss log CSV, SIGINT/SIGTERM -> checkpoint + stop,
DDP when launched by torchrun (WORLD_SIZE set).

Exact resume comes by construction: the random draws of step k (timesteps, noise, dropout) use a
generator seeded from (seed, rank, k), and the data stream is a pure function of its position,
so a checkpoint needs only the weights, EMA, optimiser state and the step.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..run import Cancelled, CancelToken, Progress
from .data import DataConfig, SliceStream
from .io import save_prior
from .prior import ScorePrior
from .schedule import DDPMSchedule
from .unet import UNet

CKPT_FORMAT = "napari-petdiff-train-ckpt-1"


@dataclass
class TrainConfig:
    out: str = "training/prior"
    name: str = "prior"
    description: str = ""
    steps: int = 10000
    batch_size: int = 8                 # global batch (split over DDP ranks)
    lr: float = 2e-4
    lr_schedule: str = "constant"       # "constant" or "cosine" (both after a linear warm-up)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # "eps": plain epsilon MSE; "trunc-snr": epsilon MSE x min(1/alpha_bar_t, max_loss_weight), i.e.
    # the x0 error at high noise (where 1/alpha_bar amplifies every epsilon error) gets its share
    loss_weighting: str = "eps"
    max_loss_weight: float = 25.0
    ema_decay: float = 0.999
    ema_start: int = 50
    ema_warmup: bool = True             # decay min(ema_decay, (1+k)/(10+k)), k steps after ema_start
    seed: int = 0
    bf16: bool = True
    channels_last: bool = True
    threads: int = 2                    # total torch threads (divided over DDP ranks)
    # network
    base_channels: int = 32
    channel_mult: tuple = (1, 2, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (16,)
    dropout: float = 0.0
    cond_channels: int = 0              # 1: MR-conditioned (paired T1-like MR as an extra input channel)
    cond_dropout: float = 0.1           # classifier-free training: the MR is dropped (zeroed) this often
    init_from: str = ""                 # prior (name or path) whose weights start a new run (fine-tuning)
    # schedule
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # data
    data: DataConfig = field(default_factory=DataConfig)
    data_sharding: str = "rank"         # "rank": own data seed per rank; "global": ranks split one global batch
    # bookkeeping
    log_every: int = 1
    checkpoint_every: int = 0           # steps between checkpoints (0: only by time and at the end)
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 2
    export_to: str = ""                 # stem of the exported prior ("": <out>/<name>)
    export_minutes: float = 10.0
    card_extra: dict = field(default_factory=dict)  # more model-card fields (e.g. a personalised prior's target)
    resume: str = ""                    # a run directory or one of its checkpoints

    def to_dict(self) -> dict:
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, DataConfig) else (list(v) if isinstance(v, tuple) else v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "data" in d and isinstance(d["data"], dict):
            d["data"] = DataConfig.from_dict(d["data"])
        for k in ("channel_mult", "attention_resolutions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "TrainConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"training config {path} is not valid JSON: {exc}") from None

    def arch(self) -> dict:
        return dict(in_channels=1, cond_channels=self.cond_channels, out_channels=1,
                    base_channels=self.base_channels, channel_mult=tuple(self.channel_mult),
                    num_res_blocks=self.num_res_blocks, attention_resolutions=tuple(self.attention_resolutions),
                    dropout=self.dropout, image_size=self.data.image_size)

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch size must be >= 1; got steps={self.steps}, batch={self.batch_size}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine'; got {self.lr_schedule!r}")
        if self.loss_weighting not in ("eps", "trunc-snr"):
            raise ValueError(f"loss_weighting must be 'eps' or 'trunc-snr'; got {self.loss_weighting!r}")
        if self.data_sharding not in ("rank", "global"):
            raise ValueError(f"data_sharding must be 'rank' or 'global'; got {self.data_sharding!r}")
        m = 2 ** (len(self.channel_mult) - 1)
        if self.data.image_size % m:
            raise ValueError(f"image size {self.data.image_size} must be divisible by {m} "
                             f"for a UNet with {len(self.channel_mult)} levels")
        self.validate_inputs()

    def validate_inputs(self) -> None:
        """Checks of the network's extra inputs (the MR channel here; DEFT overrides)."""
        if self.cond_channels not in (0, 1):
            raise ValueError(f"cond_channels must be 0 (unconditional) or 1 (MR-conditioned); got {self.cond_channels}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1); got {self.cond_dropout}")
        if self.cond_channels and not self.data.source.startswith(("phantom", "synthetic")):
            raise ValueError("MR-conditioned training needs paired MR images: use data source 'phantom'")
        self.data.with_mr = bool(self.cond_channels)  # the data follow the network's inputs

    def make_task(self, device) -> "EpsTask":
        return EpsTask(self, device)


# --- distributed ----------------------------------------------------------------------------------
@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    initialised_here: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist
        here = False
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            here = True
        return cls(world, dist.get_rank(), here)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def close(self) -> None:
        if self.initialised_here:
            import torch.distributed as dist
            dist.destroy_process_group()


def _step_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(rank), int(step), 7]).generate_state(1, np.uint64)[0] >> 1)


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return cfg.lr


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """EMA decay after ``step`` steps; the warm-up keeps a short run's EMA from lagging far behind
    (with a plain 0.999 it would still hold the weights of ~1000 steps ago)."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    k = step - cfg.ema_start
    return min(cfg.ema_decay, (1 + k) / (10 + k))


# --- checkpoints ----------------------------------------------------------------------------------
def _contig(sd: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in sd.items()}


def find_checkpoint(path) -> Path:
    """The newest checkpoint in a run directory, or ``path`` itself if it is a checkpoint."""
    p = Path(path)
    if (p / "state.json").exists():
        return p
    cands = sorted((p / "checkpoints").glob("step-*")) if (p / "checkpoints").is_dir() else []
    cands = [c for c in cands if (c / "state.json").exists()]
    if not cands:
        raise FileNotFoundError(f"no checkpoint found in {p} (expected {p}/checkpoints/step-*/state.json)")
    return cands[-1]


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, ema: dict, opt: torch.optim.Optimizer,
                    cfg: TrainConfig, wall_s: float, position: int, keep: int) -> Path:
    ck_root = out / "checkpoints"
    ck_root.mkdir(parents=True, exist_ok=True)
    final = ck_root / f"step-{step:08d}"
    tmp = ck_root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_contig(model.state_dict()), str(tmp / "model.safetensors"))
    save_file(_contig(ema), str(tmp / "ema.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v for i, st in osd["state"].items() for k, v in st.items() if torch.is_tensor(v)}
    save_file(_contig(tensors), str(tmp / "optim.safetensors"))
    state = {"format": CKPT_FORMAT, "step": step, "wall_time_s": wall_s, "data_position": position,
             "rng": "per-step generators seeded from (seed, rank, step); no state to store",
             "param_groups": osd["param_groups"], "config": cfg.to_dict(),
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    olds = sorted(c for c in ck_root.glob("step-*") if c != final)
    for c in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(c, ignore_errors=True)
    return final


def load_checkpoint(path) -> tuple[dict, dict, dict, dict]:
    ck = find_checkpoint(path)
    state = json.loads((ck / "state.json").read_text())
    if state.get("format") != CKPT_FORMAT:
        raise ValueError(f"{ck} is not a napari-petdiff training checkpoint (format {state.get('format')!r})")
    return (state, load_file(str(ck / "model.safetensors")), load_file(str(ck / "ema.safetensors")),
            load_file(str(ck / "optim.safetensors")))


def _load_optimizer(opt: torch.optim.Optimizer, params: list, tensors: dict, param_groups: list) -> None:
    state = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        i = int(i)
        p = params[i]
        if name != "step" and v.shape == p.shape:
            v = torch.empty_like(p).copy_(v)  # same memory format as the parameter
        state.setdefault(i, {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": param_groups})


# --- the loop -------------------------------------------------------------------------------------
class _StopFlag:
    """SIGINT/SIGTERM -> finish the current step, checkpoint, stop (only from the main thread)."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        self.set = True

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def export_ema(cfg: TrainConfig, ema: dict, step: int, wall_s: float, loss_recent: float, world: int) -> Path:
    net = UNet(**cfg.arch())
    net.load_state_dict(ema)
    prior = ScorePrior(net, DDPMSchedule(cfg.T, cfg.beta_start, cfg.beta_end), name=cfg.name,
                       image_size=cfg.data.image_size, voxel_size_mm=cfg.data.voxel_size_mm)
    stem = Path(cfg.export_to) if cfg.export_to else Path(cfg.out) / cfg.name
    extra = {
        "description": cfg.description,
        "steps": step,
        "wall_time_s": round(wall_s, 1),
        "weights": "EMA" if step > cfg.ema_start else "raw (EMA not started)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "training": {
            "loss_recent_mean": loss_recent, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "lr_schedule": cfg.lr_schedule, "loss_weighting": cfg.loss_weighting,
            "max_loss_weight": cfg.max_loss_weight, "warmup_steps": cfg.warmup_steps, "ema_decay": cfg.ema_decay,
            "ema_start": cfg.ema_start, "ema_warmup": cfg.ema_warmup, "grad_clip": cfg.grad_clip, "bf16_autocast": cfg.bf16,
            "channels_last": cfg.channels_last, "seed": cfg.seed, "world_size": world,
            "slices_seen": step * cfg.batch_size, "loss": "MSE(eps, eps_theta(x_t, t)), t ~ U{0..T-1}, weighted per loss_weighting",
            "data": cfg.data.to_dict(),
            "init_from": cfg.init_from or None,
            "conditioning": ({"channels": cfg.cond_channels, "image": "T1-like MR in [0, 1], aligned with the PET "
                              "slice (phantom generator)", "dropout": cfg.cond_dropout,
                              "guidance": "classifier-free: (1 + w) eps(MR) - w eps(no MR)"}
                             if cfg.cond_channels else None),
            "augmentation": "support-mean normalisation, x U(scale_range), left-right flips; "
                            "slices axial/coronal/sagittal with orientation_probs, zero-padded to image_size",
        },
    }
    extra.update(cfg.card_extra)
    return save_prior(prior, stem, extra)


def init_weights_from(net: UNet, name_or_path: str) -> None:
    """Start from a trained prior's weights. A new conditioning channel gets zero input weights,
    so the fine-tuned network starts out computing exactly what the unconditional one did."""
    from .io import load_prior

    src = load_prior(name_or_path).net.state_dict()
    own = net.state_dict()
    if set(src) != set(own):
        raise ValueError(f"cannot initialise from {name_or_path!r}: its network has different layers "
                         "(base channels, levels, blocks or attention must match)")
    with torch.no_grad():
        for k, v in src.items():
            if v.shape == own[k].shape:
                own[k].copy_(v)
            elif k == "inp.weight" and v.shape[0] == own[k].shape[0] and v.shape[1] < own[k].shape[1]:
                own[k].zero_()
                own[k][:, : v.shape[1]].copy_(v)
            else:
                raise ValueError(f"cannot initialise from {name_or_path!r}: layer {k} has shape {tuple(v.shape)}, "
                                 f"this network needs {tuple(own[k].shape)}")


class EpsTask:
    """What a training step learns; the loop (optimiser, EMA, DDP, checkpoints) is shared.

    The prior's task: the clean slices are the targets, the network predicts epsilon, an MR
    channel (dropped with probability ``cond_dropout``) conditions it. DEFT (deft.py) swaps in
    simulated scans as targets and a frozen prior plus an h-network as the prediction.
    """

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device

    def init_net(self, net: UNet) -> None:
        if self.cfg.init_from:
            init_weights_from(net, self.cfg.init_from)

    def draws(self, n: int, gen: torch.Generator):
        """Per-image random numbers of a step, drawn for the whole (global) batch so that DDP
        ranks that split one batch see the draws a single process would: here the MR dropout."""
        if not self.cfg.cond_channels:
            return None
        return torch.rand((n, 1, 1, 1), generator=gen) >= self.cfg.cond_dropout

    def targets(self, batch: torch.Tensor, draws):
        """(normalised clean images x0 (B, 1, H, W), context for predict) from a data batch."""
        x0 = batch[:, :1].to(self.device)
        cond = None if draws is None else (batch[:, 1:] * draws).to(self.device)
        return x0, cond

    def predict(self, model, x_t: torch.Tensor, t: torch.Tensor, ctx) -> torch.Tensor:
        mf = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        cond = None if ctx is None else ctx.contiguous(memory_format=mf)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            return model(x_t, t, cond)

    def export(self, ema: dict, step: int, wall_s: float, loss_recent: float, world: int) -> Path:
        return export_ema(self.cfg, ema, step, wall_s, loss_recent, world)


def train(cfg: TrainConfig, cancel: CancelToken | None = None, device=None):
    """Generator: yields Progress events (message holds the loss); returns a summary dict.

    ``cfg.make_task`` decides what is learnt (a prior, or DEFT's h-network)."""
    cfg.validate()
    device = torch.device(device or "cpu")
    dist = _Dist.from_env(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if cfg.batch_size % dist.world:
        raise ValueError(f"global batch {cfg.batch_size} must be divisible by the number of processes {dist.world}")
    local_b = cfg.batch_size // dist.world
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.threads // dist.world))
    out = Path(cfg.out)
    is0 = dist.rank == 0
    if is0:
        out.mkdir(parents=True, exist_ok=True)

    step, wall_prev = 0, 0.0
    ck_state = None
    if cfg.resume:
        ck_state, msd, esd, osd_t = load_checkpoint(cfg.resume)
        saved = type(cfg).from_dict(ck_state["config"])
        if saved.arch() != cfg.arch():
            raise ValueError(f"cannot resume {cfg.resume}: its network {saved.arch()} differs from the requested "
                             f"{cfg.arch()}; resume with the checkpoint's own settings")
        step, wall_prev = int(ck_state["step"]), float(ck_state["wall_time_s"])

    task = cfg.make_task(device)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and in every run of this seed
    net = UNet(**cfg.arch()).to(device)
    if cfg.resume:
        net.load_state_dict(msd)
    else:
        task.init_net(net)
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = net.to(memory_format=mf)
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]
    ema = {n: p.detach().float().clone().contiguous() for n, p in net.named_parameters()}
    opt = torch.optim.Adam(params, lr=cfg.lr)
    if cfg.resume:
        ema = {n: esd[n].to(device).float() for n in names}
        _load_optimizer(opt, params, osd_t, ck_state["param_groups"])
    model = net
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
    sched = DDPMSchedule(cfg.T, cfg.beta_start, cfg.beta_end)
    abar = sched.alpha_bar.to(device=device, dtype=torch.float32)

    if cfg.data_sharding == "global":
        stream = SliceStream(cfg.data, cfg.batch_size, seed=cfg.seed, rank=0, start=step * cfg.batch_size)
        draw_b, data_rank = cfg.batch_size, 0
    else:
        stream = SliceStream(cfg.data, local_b, seed=cfg.seed, rank=dist.rank, start=step * local_b)
        draw_b, data_rank = local_b, dist.rank

    csv_path = out / "loss.csv"
    if is0:
        rows = []
        if cfg.resume and csv_path.exists():
            with open(csv_path) as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= step]
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "loss", "lr", "grad_norm", "wall_s"])
            w.writerows(rows)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    csv_f = open(csv_path, "a", newline="") if is0 else None
    writer = csv.writer(csv_f) if csv_f else None

    t0 = time.time()
    last_ck = last_export = time.time()
    recent = []
    stopped = False
    gen = torch.Generator(device="cpu")
    start_step = step
    try:
        with _StopFlag() as flag:
            net.train()
            for batch in stream:
                if step >= cfg.steps:
                    break
                gen.manual_seed(_step_seed(cfg.seed, data_rank, step))
                t = torch.randint(0, cfg.T, (draw_b,), generator=gen)
                eps = torch.randn((batch.shape[0], 1, *batch.shape[2:]), generator=gen)
                draws = task.draws(batch.shape[0], gen)
                if cfg.data_sharding == "global":
                    sl = slice(dist.rank * local_b, (dist.rank + 1) * local_b)
                    batch, t, eps = batch[sl], t[sl], eps[sl]
                    draws = None if draws is None else draws[sl]
                torch.manual_seed(_step_seed(cfg.seed, dist.rank, step) + 1)  # dropout
                eps, t = eps.to(device), t.to(device)
                x0, ctx = task.targets(batch, draws)
                a = abar[t].view(-1, 1, 1, 1)
                x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).contiguous(memory_format=mf)
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                pred = task.predict(model, x_t, t, ctx)
                per_image = (pred.float() - eps).square().mean(dim=(1, 2, 3))
                loss = per_image.mean()  # logged: the plain epsilon MSE, comparable across weightings
                if cfg.loss_weighting == "trunc-snr":
                    w = (1.0 / a.view(-1)).clamp(max=cfg.max_loss_weight)
                    objective = (w * per_image).mean()
                else:
                    objective = loss
                opt.zero_grad(set_to_none=True)
                objective.backward()
                gn = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                opt.step()
                step += 1
                with torch.no_grad():
                    if step <= cfg.ema_start:
                        for n, p in zip(names, params):
                            ema[n].copy_(p)
                    else:
                        d = ema_decay_at(cfg, step)
                        for n, p in zip(names, params):
                            ema[n].mul_(d).add_(p.detach(), alpha=1 - d)
                stop_local = float(flag.set or (cancel is not None and cancel.cancelled))
                red = dist.sum(torch.tensor([loss.item(), stop_local], dtype=torch.float64))
                loss_g = float(red[0]) / dist.world
                stop = bool(red[1] > 0)
                wall = wall_prev + time.time() - t0
                recent = (recent + [loss_g])[-200:]
                if is0:
                    if step % cfg.log_every == 0 or stop or step == cfg.steps:
                        writer.writerow([step, f"{loss_g:.6f}", f"{lr:.3e}", f"{gn:.4f}", f"{wall:.1f}"])
                        csv_f.flush()
                    due_ck = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or \
                        (time.time() - last_ck) > 60 * cfg.checkpoint_minutes
                    if due_ck and not stop and step < cfg.steps:
                        save_checkpoint(out, step, net, ema, opt, cfg, wall, stream.position, cfg.keep_checkpoints)
                        last_ck = time.time()
                    if (time.time() - last_export) > 60 * cfg.export_minutes and step < cfg.steps and not stop:
                        task.export(ema, step, wall, float(np.mean(recent)), dist.world)
                        last_export = time.time()
                rate = (step - start_step) / max(1e-9, time.time() - t0)
                yield Progress(step, cfg.steps, message=f"loss {loss_g:.4f} lr {lr:.2e} {rate:.2f} it/s",
                               stage="train")
                if stop:
                    stopped = True
                    break
        wall = wall_prev + time.time() - t0
        ck_path = export_path = None
        if is0:
            if step > start_step or not cfg.resume:
                ck_path = save_checkpoint(out, step, net, ema, opt, cfg, wall, stream.position,
                                          cfg.keep_checkpoints)
            export_path = task.export(ema, step, wall, float(np.mean(recent)) if recent else float("nan"),
                                      dist.world)
        if dist.world > 1:
            import torch.distributed as tdist
            tdist.barrier()
        if cancel is not None and cancel.cancelled and not flag.set:
            raise Cancelled("training cancelled (checkpoint written)")
        return {"steps": step, "out": str(out), "checkpoint": str(ck_path) if ck_path else None,
                "export": str(export_path) if export_path else None, "stopped": stopped, "wall_time_s": wall}
    finally:
        if csv_f:
            csv_f.close()
        dist.close()
