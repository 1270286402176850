"""Registers the Patlak (dynamic) methods (imported by engine.methods)."""
from ..methods import MethodSpec, register
from .direct import PatlakDirectParams, run_patlak_direct
from .patlak import PatlakLSParams, PatlakWLSParams, run_patlak_ls, run_patlak_wls
from .patlak_prior import PatlakHQSParams, PatlakREDParams, run_patlak_hqs, run_patlak_red_diff

register(MethodSpec("patlak-ls", run_patlak_ls, PatlakLSParams,
                    "Patlak: OSEM per frame, then voxel-wise least squares for Ki and intercept",
                    kind="dynamic", family="classical"))
register(MethodSpec("patlak-wls", run_patlak_wls, PatlakWLSParams,
                    "Patlak: OSEM per frame, then voxel-wise weighted least squares (frame-variance weights)",
                    kind="dynamic", family="classical"))
register(MethodSpec("patlak-red-diff", run_patlak_red_diff, PatlakREDParams,
                    "Patlak with a diffusion prior on the Ki and intercept maps (RED-diff, indirect)",
                    kind="dynamic", family="diffusion"))
register(MethodSpec("patlak-hqs", run_patlak_hqs, PatlakHQSParams,
                    "Patlak with a diffusion prior on the Ki and intercept maps (HQS, indirect; posterior samples)",
                    kind="dynamic", family="diffusion", samples=True))
register(MethodSpec("patlak-direct", run_patlak_direct, PatlakDirectParams,
                    "Direct Patlak from the dynamic sinograms (nested EM) with the diffusion prior through HQS",
                    kind="dynamic", family="diffusion"))
