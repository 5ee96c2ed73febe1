"""Level 3: the decoupled eigenmodes (p_j, s_j, tau_j) of [DP] §3.2, their integral of motion, the
invariant parabola, its non-zero fixed points and the collapse boundary."""
import dataclasses
import math

import numpy as np

from keras_ncssl.theory.common import integrate, check_number


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
    return (p, s, tau, check_number("alpha_p", alpha_p), check_number("eta", eta),
            check_number("sigma2", sigma2), check_number("beta", beta, allow_none=True))


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
    t, states = integrate(rhs, state, t_end, dt, method, record_every)
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
    alpha_p = check_number("alpha_p", alpha_p, strict=True)
    return np.asarray(s0, dtype=np.float64) - np.asarray(p0, dtype=np.float64) ** 2 / alpha_p


def invariant_s(p, t, c, *, alpha_p=1.0, eta=0.0):
    r"""s predicted by the integral of motion: :math:`p^2/\alpha_p + c\,e^{-2\eta t}`.

    With eta > 0 every mode approaches the invariant parabola s = p^2 / alpha_p ([DP] §3.2),
    the motivation for DirectPred's p_j proportional to sqrt(s_j).  Arrays broadcast.
    """
    alpha_p = check_number("alpha_p", alpha_p, strict=True)
    eta = check_number("eta", eta)
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
    t, (p_t,) = integrate(lambda p: (p ** 2 * (tau - a * p) - eta * p,), (p0,), t_end, dt,
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
    tau = check_number("tau", tau, strict=True)
    eta = check_number("eta", eta)
    sigma2 = check_number("sigma2", sigma2)
    # Same expression as collapse_eta, so the switch happens exactly at its value.
    if eta > collapse_eta(tau, sigma2):
        return ()
    a = 1.0 + sigma2
    root = math.sqrt(max(tau * tau - 4.0 * eta * a, 0.0))
    return (2.0 * eta / (tau + root), (tau + root) / (2.0 * a))
