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
"""
import dataclasses
import math
import numbers
import warnings

import numpy as np

from keras_ncssl import diagnostics

__all__ = [
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

PREDICTORS = ("linear", "symmetric", "identity")
METHODS = ("rk4", "euler")

# Tolerances for "symmetric" and "PSD" checks, relative to the matrix scale: loose enough for
# matrices built in float32 (tf tensors), tight enough to reject genuinely indefinite input.
_SYMMETRY_RTOL = 1e-6
_PSD_RTOL = 1e-6


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _number(name, value, *, minimum=0.0, strict=False, allow_none=False):
    """A finite real scalar >= minimum (> minimum if strict); ValueError otherwise."""
    if value is None and allow_none:
        return None
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    allowed = f"a finite number {bound}" + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.ndarray, np.generic)) \
            or np.ndim(value) != 0:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def _matrix(name, value, shape=None):
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a real matrix, got {type(value).__name__}") from error
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {array.shape}")
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(f"{name} has shape {array.shape}; it must be {tuple(shape)}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf")
    return array


def _check_symmetric(name, array):
    scale = max(1.0, float(np.max(np.abs(array))))
    asymmetry = float(np.max(np.abs(array - array.T)))
    if asymmetry > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"{name} must be symmetric; max |{name} - {name}^T| = {asymmetry:.3g}")


def _covariance(name, value, n):
    """n x n symmetric PSD matrix; a number c means c * I (c >= 0)."""
    if np.ndim(value) == 0:
        return _number(name, value) * np.eye(n)
    array = _matrix(name, value, (n, n))
    _check_symmetric(name, array)
    array = 0.5 * (array + array.T)
    eigenvalues = diagnostics.spectrum(array)
    if eigenvalues[-1] < -_PSD_RTOL * max(1.0, eigenvalues[0]):
        raise ValueError(
            f"{name} must be positive semi-definite (a covariance); its smallest eigenvalue is "
            f"{eigenvalues[-1]:.3g}")
    return array


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Fixed-step integrators
# --------------------------------------------------------------------------------------------

def _euler_step(rhs, state, h):
    return tuple(y + h * k for y, k in zip(state, rhs(*state)))


def _rk4_step(rhs, state, h):
    k1 = rhs(*state)
    k2 = rhs(*(y + 0.5 * h * k for y, k in zip(state, k1)))
    k3 = rhs(*(y + 0.5 * h * k for y, k in zip(state, k2)))
    k4 = rhs(*(y + h * k for y, k in zip(state, k3)))
    return tuple(y + (h / 6.0) * (a + 2.0 * b + 2.0 * c + d)
                 for y, a, b, c, d in zip(state, k1, k2, k3, k4))


def _integrate(rhs, state, t_end, dt, method, record_every):
    """Integrate dy/dt = rhs(*y) from t = 0 to t_end; returns (times, stacked states)."""
    t_end = _number("t_end", t_end)
    dt = _number("dt", dt, strict=True)
    _choice("method", method, METHODS)
    if isinstance(record_every, bool) or not isinstance(record_every, numbers.Integral) \
            or record_every < 1:
        raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
    # The 1e-12 keeps t_end / dt = 1000.0000000000001 from costing an extra, tiny step.
    n_steps = int(math.ceil(t_end / dt * (1.0 - 1e-12))) if t_end > 0 else 0
    h = t_end / n_steps if n_steps else 0.0
    step = _rk4_step if method == "rk4" else _euler_step
    times, records = [0.0], [state]
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(1, n_steps + 1):
            state = step(rhs, state, h)
            if k % record_every == 0 or k == n_steps:
                if not all(np.all(np.isfinite(y)) for y in state):
                    raise FloatingPointError(
                        f"the state became non-finite by t = {k * h:.4g} ({method}, dt = {h:.3g});"
                        " the dynamics diverge or dt is too large for stability")
                times.append(k * h)
                records.append(state)
    return np.asarray(times), tuple(np.stack(column) for column in zip(*records))


# --------------------------------------------------------------------------------------------
# 1. Full gradient flow of Lemma 1
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LinearTrajectory:
    """A recorded solution of the Lemma 1 flow.

    Attributes
    ----------
    t : ndarray, shape (T,)
    W : ndarray, shape (T, n2, n1)
    Wp : ndarray, shape (T, n2, n2)
    Wa : ndarray, shape (T, n2, n1)
        The target; equal to W for SimSiam / no stop-gradient.
    X, noise : ndarray, shape (n1, n1)
        Data correlation X and augmentation noise X' the flow was run with.
    alpha_p, eta : float
    """

    t: np.ndarray
    W: np.ndarray
    Wp: np.ndarray
    Wa: np.ndarray
    X: np.ndarray
    noise: np.ndarray
    alpha_p: float
    eta: float

    @property
    def F(self):
        """F(t) = W X W^T ([DP] §3: the correlation of the augmentation-averaged features)."""
        return self.W @ self.X @ np.swapaxes(self.W, -1, -2)


def _linear_rhs(X, X_total, alpha_p, eta, beta, stop_gradient, predictor):
    """Closure dy/dt for the state (W, Wp) or (W, Wp, Wa); see ``linear_flow``."""
    def rhs(W, Wp, Wa=None):
        target = W if Wa is None else Wa
        # G = -dJ/d(Wp W): the regression residual that drives both W and Wp.
        G = target @ X - Wp @ W @ X_total
        dW = Wp.T @ G - eta * W
        if not stop_gradient:
            # Gradient also flows through the target branch Wa = W ([DP] Thm 2).
            dW = dW + Wp @ W @ X - W @ X_total
        if predictor == "identity":
            dWp = np.zeros_like(Wp)
        else:
            dWp = alpha_p * G @ W.T - eta * Wp
            if predictor == "symmetric":
                dWp = 0.5 * (dWp + dWp.T)
        if Wa is None:
            return dW, dWp
        return dW, dWp, beta * (W - Wa)
    return rhs


def _linear_setup(W, Wp, Wa, X, noise, alpha_p, eta, beta, stop_gradient, predictor):
    """Validate everything for the Lemma 1 flow; returns arrays and the rhs closure."""
    W = _matrix("W", W)
    n2, n1 = W.shape
    alpha_p = _number("alpha_p", alpha_p)
    eta = _number("eta", eta)
    beta = _number("beta", beta, allow_none=True)
    _choice("predictor", predictor, PREDICTORS)
    if not isinstance(stop_gradient, (bool, np.bool_)):
        raise ValueError(f"stop_gradient must be True or False, got {stop_gradient!r}")
    if not stop_gradient and beta is not None:
        raise ValueError(
            "stop_gradient=False needs the target Wa = W (beta=None); an EMA target is not a "
            f"function of W, got beta={beta!r}")
    if predictor == "identity":
        if Wp is not None and not np.array_equal(_matrix("Wp", Wp, (n2, n2)), np.eye(n2)):
            raise ValueError("predictor='identity' fixes Wp = I; pass Wp=None")
        Wp = np.eye(n2)
    elif Wp is None:
        raise ValueError(f"Wp is required for predictor={predictor!r} (an ({n2}, {n2}) matrix)")
    else:
        Wp = _matrix("Wp", Wp, (n2, n2))
        if predictor == "symmetric":
            # The symmetrised flow only stays on symmetric matrices if it starts there.
            Wp = 0.5 * (Wp + Wp.T)
    if beta is None:
        if Wa is not None:
            raise ValueError("Wa is only used with an EMA target (beta given); with beta=None "
                             "the target is Wa = W (SimSiam)")
    else:
        Wa = W.copy() if Wa is None else _matrix("Wa", Wa, (n2, n1))
    X = _covariance("X", 1.0 if X is None else X, n1)
    noise = _covariance("noise", noise, n1)
    rhs = _linear_rhs(X, X + noise, alpha_p, eta, beta, bool(stop_gradient), predictor)
    return W, Wp, Wa, X, noise, alpha_p, eta, beta, rhs


def linear_flow(W, Wp=None, Wa=None, *, X=None, noise=0.0, alpha_p=1.0, eta=0.0, beta=None,
                stop_gradient=True, predictor="linear"):
    r"""Right-hand side of the gradient flow of [DP] Lemma 1 (with weight decay eta).

    .. math::
        \dot W_p &= \alpha_p\,(-W_p W (X + X') + W_a X)\,W^\top - \eta W_p \\
        \dot W   &= W_p^\top (-W_p W (X + X') + W_a X) - \eta W \\
        \dot W_a &= \beta\,(W - W_a)

    SimSiam (``beta=None``): Wa = W under stop-gradient and the third equation is dropped.
    Variants:

    * ``predictor="symmetric"``: the symmetric part of the Wp equation ([DP] assumption 3, the
      "sym Wp" rows of [DP] Tab. 3); Wp stays symmetric.
    * ``predictor="identity"``: no predictor, Wp = I fixed; with stop-gradient and SimSiam
      :math:`\dot W = -W (X' + \eta I)`, so W collapses to 0 ([DP] §3.1).
    * ``stop_gradient=False`` (needs ``beta=None``): the gradient also flows through the target
      Wa = W, adding :math:`W_p W X - W (X + X')`; then
      :math:`\frac{d}{dt}\mathrm{vec}(W) = -H\,\mathrm{vec}(W)` with
      :math:`H = X' \otimes (W_p^\top W_p + I) + X \otimes \tilde W_p^\top \tilde W_p + \eta I`,
      :math:`\tilde W_p = W_p - I`, and W decays to 0 ([DP] Thm 2).

    Parameters
    ----------
    W : array_like, (n2, n1)
    Wp : array_like, (n2, n2), or None for ``predictor="identity"``
    Wa : array_like, (n2, n1); required iff ``beta`` is given (EMA target)
    X : None, float >= 0 or (n1, n1) PSD matrix
        Data correlation; None means I, a number c means c I.
    noise : float >= 0 or (n1, n1) PSD matrix
        Augmentation noise X'; a number sigma2 means sigma2 I.
    alpha_p : float >= 0
        Relative predictor learning rate (0 freezes the predictor).
    eta : float >= 0
        Weight decay.
    beta : float >= 0 or None
        EMA rate of the target (None: SimSiam, Wa = W).
    stop_gradient : bool
    predictor : {"linear", "symmetric", "identity"}

    Returns
    -------
    (dW, dWp) for SimSiam, (dW, dWp, dWa) with an EMA target.
    """
    if beta is not None and Wa is None:
        raise ValueError("an EMA target (beta given) needs the current Wa")
    W, Wp, Wa, _, _, _, _, _, rhs = _linear_setup(
        W, Wp, Wa, X, noise, alpha_p, eta, beta, stop_gradient, predictor)
    return rhs(W, Wp) if Wa is None else rhs(W, Wp, Wa)


def simulate_linear(W0, Wp0=None, Wa0=None, *, X=None, noise=0.0, alpha_p=1.0, eta=0.0,
                    beta=None, stop_gradient=True, predictor="linear", t_end=10.0, dt=0.01,
                    method="rk4", record_every=1):
    """Integrate the Lemma 1 flow (see ``linear_flow``) from t = 0 to t_end.

    Parameters
    ----------
    W0, Wp0, Wa0 : initial weights as in ``linear_flow``; with an EMA target ``Wa0`` defaults
        to a copy of W0 (BYOL initialises the target as the online network).
    X, noise, alpha_p, eta, beta, stop_gradient, predictor : as in ``linear_flow``.
    t_end : float >= 0
    dt : float > 0
        Largest step; see the module docstring for the method and its stability.
    method : {"rk4", "euler"}
        "euler" with dt = alpha is discrete gradient descent with learning rate alpha.
    record_every : int >= 1
        Keep every k-th step (the last step is always kept).

    Returns
    -------
    LinearTrajectory
    """
    W, Wp, Wa, X, noise, alpha_p, eta, beta, rhs = _linear_setup(
        W0, Wp0, Wa0, X, noise, alpha_p, eta, beta, stop_gradient, predictor)
    _warn_if_stiff(W, Wp, X + noise, 0.0 if predictor == "identity" else alpha_p, eta, beta,
                   stop_gradient, _number("dt", dt, strict=True))
    state = (W, Wp) if Wa is None else (W, Wp, Wa)
    t, states = _integrate(rhs, state, t_end, dt, method, record_every)
    W_t, Wp_t = states[0], states[1]
    Wa_t = W_t if Wa is None else states[2]
    return LinearTrajectory(t=t, W=W_t, Wp=Wp_t, Wa=Wa_t, X=X, noise=noise,
                            alpha_p=alpha_p, eta=eta)


def _warn_if_stiff(W, Wp, X_total, alpha_p, eta, beta, stop_gradient, dt):
    # Rough bound on the Jacobian's spectral radius at t = 0: the predictor equation scales
    # with alpha_p ||W||^2 ||X+X'||, the W equation with ||Wp||^2 ||X+X'|| (plus ||X+X'||
    # (1 + ||Wp||) without stop-gradient).  RK4's stability interval on the real axis is ~2.8.
    scale = np.linalg.norm(X_total, 2)
    wp_norm = np.linalg.norm(Wp, 2)
    rate = (alpha_p * np.linalg.norm(W, 2) ** 2 + wp_norm ** 2) * scale + eta + (beta or 0.0)
    if not stop_gradient:
        rate += scale * (1.0 + wp_norm)
    if dt * rate > 2.5:
        warnings.warn(f"dt = {dt:g} may be too large for the initial rates (~{rate:.3g}): "
                      f"dt * rate = {dt * rate:.2g}, RK4 is stable up to ~2.8",
                      RuntimeWarning, stacklevel=3)


def linear_diagnostics(trajectory):
    """Diagnostics along a ``LinearTrajectory``, one value per recorded time.

    Uses :mod:`keras_ncssl.diagnostics` with F(t) = W X W^T.

    Returns
    -------
    dict of ndarray with keys
        ``spectrum`` (T, n2) eigenvalues of F, descending; ``alignment`` (T, n2)
        cos(u_j, Wp u_j) in the same order ([DP] Fig. 2); ``wp_spectrum`` (T, n2) eigenvalues
        of the symmetric part of Wp, descending; ``commutator`` (T,) ||[F, Wp]||_F ([DP] Thm 3);
        ``symmetric_norm``, ``skew_norm`` (T,) ([DP] Fig. 8); ``balancing`` (T,)
        ||W W^T - Wp^T Wp / alpha_p||_F ([DP] Thm 1; needs alpha_p > 0, else NaN);
        ``effective_rank`` (T,) of F; ``w_norm`` (T,) ||W||_F.
    """
    F = trajectory.F
    alignment, eigenvalues = diagnostics.eigen_alignment(F, trajectory.Wp)
    symmetric_norm, skew_norm = diagnostics.symmetric_skew_norms(trajectory.Wp)
    if trajectory.alpha_p > 0:
        balancing = np.linalg.norm(
            diagnostics.balancing_residual(trajectory.W, trajectory.Wp, trajectory.alpha_p),
            axis=(-2, -1))
    else:
        balancing = np.full(trajectory.t.shape, np.nan)
    return {
        "spectrum": eigenvalues,
        "alignment": alignment,
        "wp_spectrum": diagnostics.spectrum(trajectory.Wp),
        "commutator": diagnostics.commutator_norm(F, trajectory.Wp),
        "symmetric_norm": symmetric_norm,
        "skew_norm": skew_norm,
        "balancing": balancing,
        "effective_rank": diagnostics.effective_rank(F),
        "w_norm": np.linalg.norm(trajectory.W, axis=(-2, -1)),
    }


# --------------------------------------------------------------------------------------------
# 2. Symmetric (F, Wp) flow under assumptions 1-3, and Thm 3
# --------------------------------------------------------------------------------------------

def _symmetric_setup(F, Wp, tau, sigma2, alpha_p, eta):
    F = _matrix("F", F)
    n = F.shape[0]
    F = _covariance("F", F, n)
    Wp = _matrix("Wp", Wp, (n, n))
    _check_symmetric("Wp", Wp)
    return (F, 0.5 * (Wp + Wp.T), _number("tau", tau), _number("sigma2", sigma2),
            _number("alpha_p", alpha_p), _number("eta", eta))


def _symmetric_rhs(tau, sigma2, alpha_p, eta):
    a = 1.0 + sigma2

    def rhs(F, Wp):
        FWp = F @ Wp
        anti_FWp = FWp + FWp.T        # {Wp, F} for symmetric F, Wp
        Wp2 = Wp @ Wp
        FWp2 = F @ Wp2
        dWp = -0.5 * alpha_p * a * anti_FWp + alpha_p * tau * F - eta * Wp
        dF = -a * (FWp2 + FWp2.T) + tau * anti_FWp - 2.0 * eta * F
        return dF, dWp
    return rhs


def symmetric_flow(F, Wp, *, tau=1.0, sigma2=0.0, alpha_p=1.0, eta=0.0):
    r"""The (F, Wp) flow under [DP] assumptions 1-3 (§3.2, Eqs. 6-7).

    With Wa = tau W (tau constant here), X = I, X' = sigma2 I and a symmetric Wp, F = W W^T
    and Wp obey the closed system

    .. math::
        \dot W_p &= -\tfrac{\alpha_p}{2}(1+\sigma^2)\{W_p, F\} + \alpha_p \tau F - \eta W_p \\
        \dot F   &= -(1+\sigma^2)\{W_p^2, F\} + \tau \{W_p, F\} - 2\eta F

    with {A, B} = AB + BA.  It equals the Lemma 1 flow with ``predictor="symmetric"``,
    ``beta=None`` (tau = 1), X = I, X' = sigma2 I.

    Returns
    -------
    (dF, dWp)
    """
    F, Wp, tau, sigma2, alpha_p, eta = _symmetric_setup(F, Wp, tau, sigma2, alpha_p, eta)
    return _symmetric_rhs(tau, sigma2, alpha_p, eta)(F, Wp)


def simulate_symmetric(F0, Wp0, *, tau=1.0, sigma2=0.0, alpha_p=1.0, eta=0.0, t_end=10.0,
                       dt=0.01, method="rk4", record_every=1):
    """Integrate ``symmetric_flow``; returns (t (T,), F (T, n, n), Wp (T, n, n))."""
    F, Wp, tau, sigma2, alpha_p, eta = _symmetric_setup(F0, Wp0, tau, sigma2, alpha_p, eta)
    t, (F_t, Wp_t) = _integrate(_symmetric_rhs(tau, sigma2, alpha_p, eta), (F, Wp), t_end, dt,
                                method, record_every)
    return t, F_t, Wp_t


def alignment_operator(F, Wp, *, tau=1.0, sigma2=0.0, alpha_p=1.0, eta=0.0):
    r"""The matrix K of [DP] Thm 3 (eigenspace alignment).

    .. math:: K = (1+\sigma^2)\Big[\tfrac{\alpha_p}{2} F + W_p^2
              - \tfrac{\tau}{1+\sigma^2} W_p\Big] + \tfrac32 \eta I,

    so that along ``symmetric_flow`` the commutator C = [F, Wp] = F Wp - Wp F obeys
    dC/dt = -(C K + K C), and if lambda_min(K(t)) >= lambda_0 > 0 for all t then
    ||C(t)||_F <= exp(-2 lambda_0 t) ||C(0)||_F.

    Parameters
    ----------
    F, Wp : array_like, shape (..., n, n) (stacks allowed, e.g. a whole trajectory)

    Returns
    -------
    ndarray, shape (..., n, n)
    """
    F = np.asarray(F, dtype=np.float64)
    Wp = np.asarray(Wp, dtype=np.float64)
    if F.shape[-2:] != Wp.shape[-2:] or F.shape[-1] != F.shape[-2]:
        raise ValueError(f"F {F.shape} and Wp {Wp.shape} must be square matrices of one size")
    tau, sigma2 = _number("tau", tau), _number("sigma2", sigma2)
    alpha_p, eta = _number("alpha_p", alpha_p), _number("eta", eta)
    a = 1.0 + sigma2
    return (a * (0.5 * alpha_p * F + Wp @ Wp) - tau * Wp
            + 1.5 * eta * np.eye(F.shape[-1]))


# --------------------------------------------------------------------------------------------
# 3. Decoupled eigenmodes, integral of motion, invariant parabola, fixed points
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ModeTrajectory:
    """A recorded solution of the decoupled modes; arrays of shape (T, *modes), t is (T,).

    Attributes
    ----------
    t : ndarray
    p, s, tau : ndarray
        Predictor eigenvalue p_j, feature eigenvalue s_j = w_j^2 and tau_j = w_a,j / w_j
        (NaN where w_j = 0 with an EMA target: tau is undefined on a collapsed mode).
    w, wa : ndarray
        The equivalent scalar network: online weight w_j (sign included) and target w_a,j.
    """

    t: np.ndarray
    p: np.ndarray
    s: np.ndarray
    tau: np.ndarray
    w: np.ndarray
    wa: np.ndarray


def _mode_rhs(alpha_p, eta, sigma2, beta):
    a = 1.0 + sigma2

    def rhs(p, s, tau):
        gain = tau - a * p
        dp = alpha_p * s * gain - eta * p
        ds = 2.0 * p * s * gain - 2.0 * eta * s
        if beta is None:
            dtau = np.zeros_like(tau)
        else:
            # tau = wa / w: d tau = beta (1 - tau) - tau * (dw / w), dw / w = ds / (2 s);
            # written without dividing by s.
            dtau = beta * (1.0 - tau) - tau * (p * gain - eta)
        return dp, ds, dtau
    return rhs


def _scalar_rhs(alpha_p, eta, sigma2, beta, tau):
    """The scalar network of [DP] §3.2 / App. D with X = 1, X' = sigma2: state (w, wp[, wa])."""
    a = 1.0 + sigma2

    def rhs(w, wp, wa=None):
        target = tau * w if wa is None else wa
        residual = target - a * wp * w      # wa * lambda_d - wp * w * lambda_s
        dwp = alpha_p * residual * w - eta * wp
        dw = wp * residual - eta * w
        if wa is None:
            return dw, dwp
        return dw, dwp, beta * (w - wa)
    return rhs


def _mode_setup(p, s, tau, alpha_p, eta, sigma2, beta):
    try:
        p, s, tau = (np.array(v, dtype=np.float64) for v in (p, s, tau))
        p, s, tau = (np.array(v) for v in np.broadcast_arrays(p, s, tau))
    except (TypeError, ValueError) as error:
        raise ValueError(f"p, s and tau must be real arrays that broadcast together: {error}") \
            from None
    for name, value in (("p", p), ("s", s), ("tau", tau)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{name} contains NaN or inf")
    if np.any(s < 0):
        raise ValueError(f"s must be >= 0 (s_j is an eigenvalue of F = W X W^T); got min "
                         f"{s.min():.3g}")
    return (p, s, tau, _number("alpha_p", alpha_p), _number("eta", eta),
            _number("sigma2", sigma2), _number("beta", beta, allow_none=True))


def mode_flow(p, s, tau=1.0, *, alpha_p=1.0, eta=0.0, sigma2=0.0, beta=None):
    r"""Decoupled dynamics of the eigenmodes (vectorised over modes), [DP] §3.2.

    With Wp = U diag(p) U^T and F = U diag(s) U^T,

    .. math::
        \dot p_j &= \alpha_p s_j [\tau - (1+\sigma^2) p_j] - \eta p_j \\
        \dot s_j &= 2 p_j s_j [\tau - (1+\sigma^2) p_j] - 2 \eta s_j \\
        s_j \dot\tau &= \beta (1 - \tau) s_j - \tau \dot s_j / 2

    This is the scalar network s = w^2, p = w_p, tau = w_a / w.  Each mode carries its own tau
    (assumption 1 of [DP] is the case where they agree).  ``beta=None`` holds tau fixed
    (SimSiam: tau = 1).

    Returns
    -------
    (dp, ds, dtau), arrays of the broadcast shape of (p, s, tau).
    """
    p, s, tau, alpha_p, eta, sigma2, beta = _mode_setup(p, s, tau, alpha_p, eta, sigma2, beta)
    return _mode_rhs(alpha_p, eta, sigma2, beta)(p, s, tau)


def simulate_modes(p0, s0, tau0=1.0, *, alpha_p=1.0, eta=0.0, sigma2=0.0, beta=None,
                   t_end=10.0, dt=0.01, method="rk4", record_every=1):
    """Integrate the decoupled modes of ``mode_flow`` for many modes at once.

    The (p, s, tau) coordinates are singular where w crosses 0 with an EMA target: tau = wa / w
    blows up in finite time (d tau / dt contains +|p| tau^2 when p < 0), although nothing
    happens to the network.  So the integrator advances the equivalent scalar network
    ([DP] §3.2, App. D with lambda_d = 1, lambda_s = 1 + sigma2)

        dw_p/dt = alpha_p w (w_a - (1+sigma2) w_p w) - eta w_p
        dw/dt   = w_p (w_a - (1+sigma2) w_p w) - eta w
        dw_a/dt = beta (w - w_a)        (beta=None: w_a = tau0 w)

    from w(0) = sqrt(s0), w_p(0) = p0, w_a(0) = tau0 w(0), and reports p = w_p, s = w^2,
    tau = w_a / w.  Where these are regular the two systems are the same flow.

    Parameters
    ----------
    p0, s0, tau0 : array_like, broadcast together; s0 >= 0
    alpha_p, eta, sigma2 : float >= 0
    beta : float >= 0 or None
        EMA rate (None: tau fixed at tau0).
    t_end, dt, method, record_every : see ``simulate_linear``.

    Returns
    -------
    ModeTrajectory
    """
    p, s, tau, alpha_p, eta, sigma2, beta = _mode_setup(p0, s0, tau0, alpha_p, eta, sigma2, beta)
    w = np.sqrt(s)
    rhs = _scalar_rhs(alpha_p, eta, sigma2, beta, tau)
    state = (w, p) if beta is None else (w, p, tau * w)
    t, states = _integrate(rhs, state, t_end, dt, method, record_every)
    w_t, p_t = states[0], states[1]
    if beta is None:
        wa_t = tau * w_t
        tau_t = np.broadcast_to(tau, w_t.shape).copy()
    else:
        wa_t = states[2]
        tau_t = np.divide(wa_t, w_t, out=np.full_like(w_t, np.nan), where=w_t != 0)
    return ModeTrajectory(t=t, p=p_t, s=w_t ** 2, tau=tau_t, w=w_t, wa=wa_t)


def motion_constant(p0, s0, alpha_p=1.0):
    r"""The constant c_j of the integral of motion, :math:`c_j = s_j(0) - p_j(0)^2/\alpha_p`.

    [DP] §3.2: along ``mode_flow`` (any tau(t), sigma2, beta),
    :math:`\frac{d}{dt}(s_j - p_j^2/\alpha_p) = -2\eta (s_j - p_j^2/\alpha_p)`, hence
    :math:`s_j(t) = p_j(t)^2/\alpha_p + c_j e^{-2\eta t}`.  The paper prints
    :math:`c_j = p_j(0)^2/\alpha_p - s_j(0)`; that sign is a slip (set t = 0).
    """
    alpha_p = _number("alpha_p", alpha_p, strict=True)
    return np.asarray(s0, dtype=np.float64) - np.asarray(p0, dtype=np.float64) ** 2 / alpha_p


def invariant_s(p, t, c, *, alpha_p=1.0, eta=0.0):
    r"""s predicted by the integral of motion: :math:`p^2/\alpha_p + c\,e^{-2\eta t}`.

    With eta > 0 every mode approaches the invariant parabola s = p^2 / alpha_p ([DP] §3.2),
    the motivation for DirectPred's p_j proportional to sqrt(s_j).  Arrays broadcast.
    """
    alpha_p = _number("alpha_p", alpha_p, strict=True)
    eta = _number("eta", eta)
    p, t, c = (np.asarray(v, dtype=np.float64) for v in (p, t, c))
    return p ** 2 / alpha_p + c * np.exp(-2.0 * eta * t)


def _parameters(**values):
    """Arrays of finite values >= 0 (scalars or broadcastable arrays); ValueError otherwise."""
    arrays = []
    for name, value in values.items():
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a number or array of numbers >= 0") from error
        if not np.all(np.isfinite(array)) or np.any(array < 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        arrays.append(array)
    return arrays


def parabola_flow(p, tau=1.0, eta=0.0, sigma2=0.0):
    r"""Predictor dynamics on the invariant parabola s = p^2/alpha_p ([DP] §3.2).

    .. math:: \dot p = p^2\,[\tau - (1+\sigma^2) p] - \eta p

    (alpha_p cancels).  Zeros: 0 and ``fixed_points(tau, eta, sigma2)``.  All arguments are
    arrays that broadcast together (tau, eta, sigma2 >= 0).
    """
    tau, eta, sigma2 = _parameters(tau=tau, eta=eta, sigma2=sigma2)
    p = np.asarray(p, dtype=np.float64)
    return p ** 2 * (tau - (1.0 + sigma2) * p) - eta * p


def parabola_flow_derivative(p, tau=1.0, eta=0.0, sigma2=0.0):
    r"""d(p_dot)/dp of ``parabola_flow``: :math:`2\tau p - 3(1+\sigma^2)p^2 - \eta`.

    Negative at a stable fixed point, positive at an unstable one.  Arrays broadcast.
    """
    tau, eta, sigma2 = _parameters(tau=tau, eta=eta, sigma2=sigma2)
    p = np.asarray(p, dtype=np.float64)
    return 2.0 * tau * p - 3.0 * (1.0 + sigma2) * p ** 2 - eta


def simulate_parabola(p0, tau=1.0, eta=0.0, sigma2=0.0, *, t_end=10.0, dt=0.01, method="rk4",
                      record_every=1):
    """Integrate ``parabola_flow`` (constant tau) for arrays of starting points and parameters.

    p0, tau, eta and sigma2 broadcast together, so a whole (tau, eta) grid is one call.

    Returns
    -------
    t : ndarray (T,)
    p : ndarray (T, *broadcast shape)
    """
    tau, eta, sigma2 = _parameters(tau=tau, eta=eta, sigma2=sigma2)
    p0 = np.asarray(p0, dtype=np.float64)
    if not np.all(np.isfinite(p0)):
        raise ValueError("p0 contains NaN or inf")
    try:
        shape = np.broadcast_shapes(p0.shape, tau.shape, eta.shape, sigma2.shape)
    except ValueError:
        raise ValueError(f"p0 {p0.shape}, tau {tau.shape}, eta {eta.shape} and sigma2 "
                         f"{sigma2.shape} must broadcast together") from None
    a = 1.0 + sigma2
    p0 = np.broadcast_to(p0, shape).copy()
    t, (p_t,) = _integrate(lambda p: (p ** 2 * (tau - a * p) - eta * p,), (p0,), t_end, dt,
                           method, record_every)
    return t, p_t


def collapse_eta(tau, sigma2=0.0):
    r"""Largest weight decay with non-zero fixed points: :math:`\tau^2 / (4 (1+\sigma^2))`.

    [DP] §3.2: for eta above it the only fixed point on the parabola is p = 0 (collapse).
    Vectorised over tau and sigma2.
    """
    tau = np.asarray(tau, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if np.any(~np.isfinite(tau)) or np.any(tau <= 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")
    if np.any(~np.isfinite(sigma2)) or np.any(sigma2 < 0):
        raise ValueError(f"sigma2 must be finite and >= 0, got {sigma2!r}")
    boundary = tau ** 2 / (4.0 * (1.0 + sigma2))
    return float(boundary) if boundary.ndim == 0 else boundary


def fixed_points(tau, eta, sigma2=0.0):
    r"""Non-zero fixed points (p_minus, p_plus) of ``parabola_flow``, or () on collapse.

    [DP] §3.2: for :math:`0 \le \eta \le \tau^2/(4(1+\sigma^2))`

    .. math:: p^*_\pm = \frac{\tau \pm \sqrt{\tau^2 - 4\eta(1+\sigma^2)}}{2(1+\sigma^2)},

    p_plus is stable and p_minus unstable (the collapse basin is 0 <= p < p_minus, where p = 0
    is stable for eta > 0); p_minus rises with eta and falls with tau.  For
    :math:`\eta > \tau^2/(4(1+\sigma^2))` (see ``collapse_eta``) only p = 0 remains and ``()``
    is returned.  At the boundary the two coincide; at eta = 0, p_minus = 0.

    p_minus is computed as 2 eta / (tau + sqrt(...)) (equal by Vieta) to avoid cancellation
    for small eta.

    Parameters
    ----------
    tau : float > 0
    eta : float >= 0
    sigma2 : float >= 0

    Returns
    -------
    tuple
        ``(p_minus, p_plus)`` as floats, or ``()``.
    """
    tau = _number("tau", tau, strict=True)
    eta = _number("eta", eta)
    sigma2 = _number("sigma2", sigma2)
    # Same expression as collapse_eta, so the switch happens exactly at its value.
    if eta > collapse_eta(tau, sigma2):
        return ()
    a = 1.0 + sigma2
    root = math.sqrt(max(tau * tau - 4.0 * eta * a, 0.0))
    return (2.0 * eta / (tau + root), (tau + root) / (2.0 * a))
