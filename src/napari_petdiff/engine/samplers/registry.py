"""Registers the diffusion samplers (imported by engine.methods)."""
from ..methods import MethodSpec, register
from .dds import DDSParams, run_dds
from .lisch import LiSchParams, run_lisch

register(MethodSpec("dds", run_dds, DDSParams,
                    "PET-DDS: Tweedie estimate + K EM-preconditioned data-consistency steps per diffusion step",
                    family="diffusion", samples=True))
register(MethodSpec("lisch", run_lisch, LiSchParams,
                    "PET-LiSch: data consistency scheduled to the MLEM likelihood curve (one critical knob)",
                    family="diffusion", samples=True))
from .dps import DPSParams, run_dps  # noqa: E402

register(MethodSpec("dps", run_dps, DPSParams,
                    "DPS: diffusion posterior sampling by gradient steps through the network (baseline)",
                    family="diffusion", samples=True))
from .ddip import DDIPParams, run_ddip  # noqa: E402
from .lisch_scd import LiSchSCDParams, run_lisch_scd  # noqa: E402

register(MethodSpec("ddip-hqs", run_ddip, DDIPParams,
                    "DDIP-HQS: EM-prox x-step toward the Tweedie image, network fine-tuned on it (out-of-distribution "
                    "data)", family="diffusion", samples=True))
register(MethodSpec("lisch-scd", run_lisch_scd, LiSchSCDParams,
                    "PET-LiSch + steerable adaptation: LoRA fitted to the data while sampling (out-of-distribution "
                    "data)", family="diffusion", samples=True))
from .deft import DEFTParams, run_deft  # noqa: E402

register(MethodSpec("deft", run_deft, DEFTParams,
                    "PET-DEFT: a supervised h-network added to the prior's epsilon reads the data (few steps)",
                    family="diffusion", samples=True))
