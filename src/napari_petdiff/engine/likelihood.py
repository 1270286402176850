r"""The Poisson log-likelihood: the one place where every method meets the data.

``L(x) = sum_i y_i log ybar_i(x) - ybar_i(x)`` (the constant ``-log y_i!`` is dropped),
``ybar = A x + b``. Images may carry leading batch dimensions (several posterior samples
at once); values then come back per batch element, in float64.

List-mode data use ``L(x) = sum_e log ybar_e(x) - s.x - B`` with the sensitivity ``s`` of
all possible LORs, so the same EM, gradient and line-search code serves both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .system import listmode_system_for, system_for

_TINY = 1e-12


def herman_meyer_order(n: int) -> list[int]:
    """Subset order by mixed-radix digit reversal: consecutive subsets far apart in angle."""
    if n < 1:
        raise ValueError("the number of subsets must be >= 1")
    factors, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    order = []
    for i in range(n):
        idx, rem, weight = 0, i, n
        for f in factors:
            weight //= f
            idx += (rem % f) * weight
            rem //= f
        order.append(idx)
    return order


@dataclass
class _Part:
    """One subset of the data (or all of it)."""
    system: object
    y: torch.Tensor
    b: torch.Tensor
    sens: torch.Tensor


class PoissonLikelihood:
    def __init__(self, acquisition, n_subsets: int = 1, backend: str = "auto", device=None,
                 fov_threshold: float = 1e-3):
        if acquisition.is_dynamic:
            raise ValueError("PoissonLikelihood takes a static acquisition; use acquisition.frame(k) per frame")
        self.acq = acquisition
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.grid = acquisition.grid
        self.image_shape = tuple(acquisition.grid.shape)
        self.listmode = acquisition.is_listmode
        n_views = acquisition.geometry.n_views
        if not isinstance(n_subsets, int) or n_subsets < 1:
            raise ValueError(f"n_subsets must be a positive integer; got {n_subsets!r}")
        if n_subsets > n_views:
            raise ValueError(f"n_subsets={n_subsets} exceeds the number of views ({n_views}); use at most {n_views}")
        if self.listmode and n_subsets > 1:
            raise ValueError("list-mode reconstruction here uses one subset; set n_subsets=1")
        self.n_subsets = n_subsets
        self.subset_order = herman_meyer_order(n_subsets)

        full_sys = system_for(acquisition, None, backend, self.device)
        ones = torch.ones(full_sys.out_shape, device=self.device)
        sens_full = full_sys.back(ones)
        # Voxels no LOR sees stay zero: the FOV mask.
        self.fov = sens_full > fov_threshold * sens_full.max()
        if not self.fov.any():
            raise ValueError("the sensitivity image is zero everywhere: no LOR crosses the image grid; "
                             "check the geometry and the image grid")
        self.sensitivity = torch.where(self.fov, sens_full, torch.zeros_like(sens_full))

        if self.listmode:
            lm = acquisition.listmode
            sys_lm = listmode_system_for(acquisition, self.device)
            y = torch.ones(lm.n_events, device=self.device)
            b = (lm.additive.to(self.device) if lm.additive is not None else torch.zeros_like(y))
            self._full = _Part(sys_lm, y, b, self.sensitivity)
            self._parts = [self._full]
            return

        y = acquisition.prompts.to(self.device)
        b = (acquisition.additive.to(self.device) if acquisition.additive is not None else torch.zeros_like(y))
        self._full = _Part(full_sys, y, b, self.sensitivity)
        if n_subsets == 1:
            self._parts = [self._full]
        else:
            self._parts = []
            for views in acquisition.geometry.view_subsets(n_subsets):
                views = views.to(self.device)
                sys_m = system_for(acquisition, views, backend, self.device)
                s_m = sys_m.back(torch.ones(sys_m.out_shape, device=self.device))
                self._parts.append(_Part(sys_m, y.index_select(-2, views), b.index_select(-2, views),
                                         torch.where(self.fov, s_m, torch.zeros_like(s_m))))
        if (self.sensitivity[self.fov] <= 0).any():
            raise ValueError("zero sensitivity inside the field of view")

    # ----------------------------------------------------------------- basics
    def _part(self, subset: Optional[int]) -> _Part:
        if subset is None:
            return self._full
        if not 0 <= subset < self.n_subsets:
            raise ValueError(f"subset {subset} does not exist (0..{self.n_subsets - 1})")
        return self._parts[subset]

    def check_image(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-3:]) != self.image_shape:
            raise ValueError(f"image has shape {tuple(x.shape)}; this acquisition's grid is {self.image_shape} "
                             "(z, y, x), optionally with leading batch dimensions")

    def forward(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        """A x (without background)."""
        return self._part(subset).system.forward(x)

    def expected(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        p = self._part(subset)
        return p.system.forward(x) + p.b

    def _value_from_q(self, q: torch.Tensor, p: _Part, x: Optional[torch.Tensor]) -> torch.Tensor:
        data_dims = tuple(range(q.ndim - p.y.ndim, q.ndim))
        qc = q.clamp_min(_TINY).double()
        logterm = torch.where(p.y > 0, p.y.double() * qc.log(), torch.zeros_like(qc)).sum(dim=data_dims)
        if self.listmode:
            img_dims = tuple(range(x.ndim - 3, x.ndim))
            return logterm - (p.sens.double() * x.double()).sum(dim=img_dims)
        return logterm - q.double().sum(dim=data_dims)

    def value(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        """Log-likelihood (float64; one value per leading batch element)."""
        self.check_image(x)
        p = self._part(subset)
        return self._value_from_q(p.system.forward(x) + p.b, p, x)

    def gradient(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        """A^T (y / ybar - 1) = A^T(y/ybar) - s (for the chosen subset)."""
        self.check_image(x)
        p = self._part(subset)
        q = p.system.forward(x) + p.b
        return p.system.back(p.y / q.clamp_min(_TINY)) - p.sens

    def value_and_gradient(self, x: torch.Tensor, subset: Optional[int] = None):
        """(L(x), grad L(x)) from one forward and one back projection."""
        self.check_image(x)
        p = self._part(subset)
        q = p.system.forward(x) + p.b
        return self._value_from_q(q, p, x), p.system.back(p.y / q.clamp_min(_TINY)) - p.sens

    def em_step(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        """One MLEM update (one OSEM sub-iteration for a subset); zero outside the FOV."""
        return self.em_step_and_value(x, subset)[0]

    def em_step_and_value(self, x: torch.Tensor, subset: Optional[int] = None):
        """(EM(x), L(x), A x + b) from one forward and one back projection."""
        self.check_image(x)
        p = self._part(subset)
        q = p.system.forward(x) + p.b
        back = p.system.back(p.y / q.clamp_min(_TINY))
        em = torch.where(self.fov, x / p.sens.clamp_min(_TINY) * back, torch.zeros_like(x))
        return em, self._value_from_q(q, p, x), q

    def em_direction(self, x: torch.Tensor, subset: Optional[int] = None) -> torch.Tensor:
        """EM(x) - x = (x / s) * grad L(x): the EM-preconditioned gradient."""
        return self.em_step(x, subset) - torch.where(self.fov, x, torch.zeros_like(x))

    def em_prox(self, x: torch.Tensor, anchor: torch.Tensor, rho, subset: Optional[int] = None) -> torch.Tensor:
        """Maximise the EM surrogate minus rho/2 ||x - anchor||^2 (De Pierro's closed form).

        With x_EM = EM(x): x+ = [-(s - rho z) + sqrt((s - rho z)^2 + 4 rho s x_EM)] / (2 rho).
        ``rho`` may be a scalar or a tensor broadcastable to the image (per-sample weights).
        """
        rho_t = torch.as_tensor(rho, dtype=x.dtype, device=x.device)
        if (rho_t < 0).any():
            raise ValueError(f"the proximal weight rho must be >= 0; got {rho}")
        x_em = self.em_step(x, subset)
        s = self._part(subset).sens
        if bool((rho_t == 0).all()):
            return x_em
        a = s - rho_t * anchor
        rho_safe = rho_t.clamp_min(1e-30)
        disc = (a * a + 4.0 * rho_safe * s * x_em).clamp_min(0)
        # Stable form of the positive root when a > 0 (avoids cancellation).
        root = torch.where(a > 0, 2.0 * s * x_em / (a + disc.sqrt()).clamp_min(_TINY), (disc.sqrt() - a) / (2 * rho_safe))
        root = torch.where(rho_t > 0, root, x_em)
        return torch.where(self.fov, root.clamp_min(0), torch.zeros_like(x))

    # ---------------------------------------------------------- line search
    def line_search_to_target(self, x: torch.Tensor, d: torch.Tensor, target, alpha_max: float = 1.0,
                              n_iter: int = 30, q0: Optional[torch.Tensor] = None,
                              qd: Optional[torch.Tensor] = None):
        """Smallest step alpha in (0, alpha_max] along d with L(x + alpha d) >= target.

        ``phi(alpha) = sum_i y_i log(q0_i + alpha qd_i) - (lin0 + alpha lind)`` is concave, so
        safeguarded Newton finds its maximiser on [0, alpha_max], then Newton from the left
        (monotone for a concave function) solves ``phi = target``. Only two sinograms are needed
        (A x + b and A d): every trial alpha costs vector ops on the bins with counts.
        ``target`` is a float or a per-batch tensor. Returns (alpha, value, reached) per batch
        element; where the target is out of reach alpha maximises L on [0, alpha_max].
        """
        p = self._full
        # Callers that already hold A x + b (or A d) pass them in to save projections.
        q0 = p.system.forward(x) + p.b if q0 is None else q0
        qd = p.system.forward(d) if qd is None else qd
        nd = p.y.ndim
        batch_shape = q0.shape[: q0.ndim - nd]
        pos = (p.y > 0).reshape(-1)
        y = p.y.reshape(-1)[pos].double()
        q0p = q0.reshape(*batch_shape, -1)[..., pos].double()
        qdp = qd.reshape(*batch_shape, -1)[..., pos].double()
        if self.listmode:
            img_dims = tuple(range(x.ndim - 3, x.ndim))
            lin0 = (p.sens.double() * x.double()).sum(dim=img_dims)
            lind = (p.sens.double() * d.double()).sum(dim=img_dims)
        else:
            lin0, lind = q0.double().sum(dim=tuple(range(-nd, 0))), qd.double().sum(dim=tuple(range(-nd, 0)))
        # Largest alpha keeping every expectation with counts positive (log stays defined).
        neg = qdp < 0
        lim = torch.where(neg, -q0p / qdp.where(neg, torch.ones_like(qdp)), torch.full_like(qdp, float("inf")))
        a_hi = torch.minimum(lim.amin(dim=-1) * (1 - 1e-9) if lim.numel() else lim.sum(-1),
                             torch.full(batch_shape, float(alpha_max), dtype=torch.float64, device=x.device))

        def q_at(a):
            return (q0p + a[..., None] * qdp).clamp_min(_TINY)

        def phi(a):
            return (y * q_at(a).log()).sum(-1) - (lin0 + a * lind)

        def derivs(a):
            r = qdp / q_at(a)
            return (y * r).sum(-1) - lind, -(y * r * r).sum(-1)

        target_t = torch.as_tensor(target, dtype=torch.float64, device=x.device).expand(batch_shape)
        zeros = torch.zeros(batch_shape, dtype=torch.float64, device=x.device)
        # 1) maximiser of phi on [0, a_hi]: safeguarded Newton on phi' (decreasing in alpha).
        lo, hi = zeros.clone(), a_hi.clone()
        g_hi, _ = derivs(hi)
        a = torch.where(g_hi >= 0, hi, 0.5 * hi)
        for _ in range(n_iter):
            g, h = derivs(a)
            lo = torch.where(g > 0, a, lo)
            hi = torch.where(g > 0, hi, a)
            step = a - g / h.clamp_max(-1e-300)
            a_new = torch.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
            a_new = torch.where(g_hi >= 0, a_hi, a_new)
            if bool(((a_new - a).abs() <= 1e-12 * (1 + a.abs())).all()):
                a = a_new
                break
            a = a_new
        a_best = a
        v_best, v0 = phi(a_best), phi(zeros)
        reached = v_best >= target_t
        # 2) phi(alpha) = target on [0, a_best]: Newton from the left never overshoots (concavity).
        a = zeros.clone()
        for _ in range(n_iter):
            v = phi(a)
            g, _ = derivs(a)
            step = (target_t - v) / g.clamp_min(1e-300)
            a_new = torch.minimum(a + step.clamp_min(0), a_best)
            done = (v >= target_t - 1e-12 * target_t.abs()) | ~reached
            a_new = torch.where(done, a, a_new)
            if bool(done.all()) or bool(((a_new - a).abs() <= 1e-14 * (1 + a.abs())).all()):
                a = a_new
                break
            a = a_new
        alpha = torch.where(reached, a, a_best)
        alpha = torch.where(v0 >= target_t, zeros, alpha)
        return alpha, phi(alpha), reached | (v0 >= target_t)

    # ------------------------------------------------------------ utilities
    def uniform_image(self, batch_shape=()) -> torch.Tensor:
        """Positive uniform start: total net counts / total sensitivity, inside the FOV."""
        p = self._full
        if self.listmode:
            net = max(float(p.y.sum() - p.b.sum()), 1.0)
        else:
            net = max(float((p.y - p.b).sum()), float(p.y.sum()) * 0.05, 1.0)
        level = net / float(self.sensitivity.sum())
        img = torch.where(self.fov, torch.full(self.image_shape, level, device=self.device), torch.zeros(self.image_shape, device=self.device))
        return img.expand(*batch_shape, *self.image_shape).clone()

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.fov, x, torch.zeros_like(x))
