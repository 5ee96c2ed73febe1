"""Level 1: the full gradient flow of [DP] Lemma 1 for (W, Wp, Wa), its integrator and diagnostics."""
import dataclasses
import warnings

import numpy as np

from keras_ncssl import diagnostics
from keras_ncssl.theory.common import PREDICTORS, check_choice, check_covariance, integrate, check_matrix, check_number


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
    W = check_matrix("W", W)
    n2, n1 = W.shape
    alpha_p = check_number("alpha_p", alpha_p)
    eta = check_number("eta", eta)
    beta = check_number("beta", beta, allow_none=True)
    check_choice("predictor", predictor, PREDICTORS)
    if not isinstance(stop_gradient, (bool, np.bool_)):
        raise ValueError(f"stop_gradient must be True or False, got {stop_gradient!r}")
    if not stop_gradient and beta is not None:
        raise ValueError(
            "stop_gradient=False needs the target Wa = W (beta=None); an EMA target is not a "
            f"function of W, got beta={beta!r}")
    if predictor == "identity":
        if Wp is not None and not np.array_equal(check_matrix("Wp", Wp, (n2, n2)), np.eye(n2)):
            raise ValueError("predictor='identity' fixes Wp = I; pass Wp=None")
        Wp = np.eye(n2)
    elif Wp is None:
        raise ValueError(f"Wp is required for predictor={predictor!r} (an ({n2}, {n2}) matrix)")
    else:
        Wp = check_matrix("Wp", Wp, (n2, n2))
        if predictor == "symmetric":
            # The symmetrised flow only stays on symmetric matrices if it starts there.
            Wp = 0.5 * (Wp + Wp.T)
    if beta is None:
        if Wa is not None:
            raise ValueError("Wa is only used with an EMA target (beta given); with beta=None "
                             "the target is Wa = W (SimSiam)")
    else:
        Wa = W.copy() if Wa is None else check_matrix("Wa", Wa, (n2, n1))
    X = check_covariance("X", 1.0 if X is None else X, n1)
    noise = check_covariance("noise", noise, n1)
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
                   stop_gradient, check_number("dt", dt, strict=True))
    state = (W, Wp) if Wa is None else (W, Wp, Wa)
    t, states = integrate(rhs, state, t_end, dt, method, record_every)
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
