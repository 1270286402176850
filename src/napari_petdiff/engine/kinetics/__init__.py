"""Dynamic PET kinetics: simulation and Patlak parametric imaging (docs/patlak.md).

Modules: ``input_function`` (Feng model, CSV samples, frame regressors), ``compartment`` (2-tissue
model), ``simulate`` (``make_dynamic_scan``), ``frames`` (batched per-frame Poisson model),
``patlak`` (setup, voxel-wise (W)LS, Patlak plot), ``patlak_prior`` (RED-diff, HQS), ``direct``
(nested EM + HQS) and ``registry`` (the ``patlak-*`` methods). Nothing is imported here, so that
``engine.methods`` loads these modules only when the registry is first used.
"""
