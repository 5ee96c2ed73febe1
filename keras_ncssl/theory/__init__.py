r"""Learning dynamics of non-contrastive SSL in a linear network, runnable.

[DP] Y. Tian, X. Chen, S. Ganguli, "Understanding self-supervised learning dynamics without
contrastive pairs", ICML 2021, arXiv:2102.06810, §3-4 and App. A-D.

Model ([DP] §3): online features f1 = W x1 (W is n2 x n1), target f2a = Wa x2, linear predictor
Wp (n2 x n2), loss J = 1/2 E||Wp f1 - sg(f2a)||^2, where x1, x2 are two augmentations of the
same x.  X = E[xbar xbar^T] with xbar = E[x'|x] is the augmentation-averaged data correlation
and X' = E_x Cov(x'|x) the augmentation noise, so E[x1 x1^T] = X + X' and E[x1 x2^T] = X.

Three levels of description, each with a right-hand side (``*_flow``) and an integrator
(``simulate_*``):

1. ``linear_flow`` / ``simulate_linear``: the full gradient flow of Lemma 1 for (W, Wp, Wa), any
   X and X', EMA target (BYOL) or Wa = W (SimSiam), with variants: symmetrised Wp, no predictor
   (Wp = I) and no stop-gradient ([DP] Thm 2).
2. ``symmetric_flow`` / ``simulate_symmetric``: the closed flow of (F, Wp), F = W X W^T, under
   [DP] assumptions 1-3 (Wa = tau W, X = I, X' = sigma2 I, symmetric Wp), and
   ``alignment_operator``, the matrix K of [DP] Thm 3.
3. ``mode_flow`` / ``simulate_modes``: the decoupled eigenmodes (p_j, s_j, tau_j) of [DP] §3.2,
   their integral of motion (``motion_constant``, ``invariant_s``), the one-dimensional flow on
   the invariant parabola (``parabola_flow``, ``simulate_parabola``), its non-zero fixed points
   (``fixed_points``) and the collapse boundary (``collapse_eta``).

Integration: every ``simulate_*`` uses the classical fixed-step fourth-order Runge-Kutta method
(``method="rk4"``, global error O(dt^4)); ``method="euler"`` is forward Euler, which *is* discrete
(S)GD with learning rate dt ([DP] §3: predictor lr = alpha * alpha_p, EMA rate alpha * beta,
weight decay alpha * eta, with alpha the step).  The number of steps is ceil(t_end / dt) and the
step is shrunk slightly so that the last step lands exactly on t_end.  RK4 is stable for
dt * rate < ~2.8 (rate: the largest eigenvalue magnitude of the Jacobian).  The default dt = 0.01
suits rates up to ~10 (dt * rate <= 0.1): with such settings the tests measure errors of 1e-9 to
1e-7 against exact solutions and invariants, falling 16-fold when dt halves.  ``simulate_linear``
warns when its initial state makes dt too large, and all integrators raise FloatingPointError if
the state becomes non-finite.

Diagnostics (alignment, commutator, balancing residual, ...) come from
:mod:`keras_ncssl.diagnostics`, the same functions that training callbacks use.

Modules: `common` (validation, integrators), `linear` (level 1), `symmetric` (level 2), `modes`
(level 3). Everything public is importable from `keras_ncssl.theory`.
"""
from keras_ncssl.theory.common import METHODS, PREDICTORS
from keras_ncssl.theory.linear import (LinearTrajectory, linear_diagnostics, linear_flow,
                                       simulate_linear)
from keras_ncssl.theory.modes import (ModeTrajectory, collapse_eta, fixed_points, invariant_s, mode_flow,
                                      motion_constant, parabola_flow, parabola_flow_derivative,
                                      simulate_modes, simulate_parabola)
from keras_ncssl.theory.symmetric import alignment_operator, simulate_symmetric, symmetric_flow

__all__ = [
    "METHODS",
    "PREDICTORS",
    "LinearTrajectory",
    "ModeTrajectory",
    "linear_flow",
    "simulate_linear",
    "linear_diagnostics",
    "symmetric_flow",
    "simulate_symmetric",
    "alignment_operator",
    "mode_flow",
    "simulate_modes",
    "motion_constant",
    "invariant_s",
    "parabola_flow",
    "parabola_flow_derivative",
    "simulate_parabola",
    "collapse_eta",
    "fixed_points",
]
